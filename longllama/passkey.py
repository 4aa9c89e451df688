"""The old path of :mod:`longllama.tools.passkey`: ``import longllama.passkey`` gives that very module (not a
copy)."""

import sys

from longllama.tools import passkey as _moved

sys.modules[__name__] = _moved
