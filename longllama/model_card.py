"""The old path of :mod:`longllama.fot.model_card`: ``import longllama.model_card`` gives that very module (not a
copy), and ``python -m longllama.model_card`` runs it."""

import sys

from longllama.fot import model_card as _moved

if __name__ == "__main__":
    sys.exit(_moved.main())
sys.modules[__name__] = _moved
