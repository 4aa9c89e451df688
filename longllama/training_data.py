"""The old path of :mod:`longllama.fot.training_data`: ``import longllama.training_data`` gives that very module (not a
copy)."""

import sys

from longllama.fot import training_data as _moved

sys.modules[__name__] = _moved
