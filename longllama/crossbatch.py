"""The old path of :mod:`longllama.fot.crossbatch`: ``import longllama.crossbatch`` gives that very module (not a
copy)."""

import sys

from longllama.fot import crossbatch as _moved

sys.modules[__name__] = _moved
