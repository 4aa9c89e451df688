"""The old path of :mod:`longllama.fot.training`: ``import longllama.training`` gives that very module (not a
copy), and ``python -m longllama.training`` runs it."""

import sys

from longllama.fot import training as _moved

if __name__ == "__main__":
    sys.exit(_moved.main())
sys.modules[__name__] = _moved
