"""The old path of :mod:`longllama.tools.passkey_cli`: ``import longllama.passkey_cli`` gives that very module (not a
copy), and ``python -m longllama.passkey_cli`` runs it."""

import sys

from longllama.tools import passkey_cli as _moved

if __name__ == "__main__":
    sys.exit(_moved.main())
sys.modules[__name__] = _moved
