"""The old path of :mod:`longllama.fot.tokenizer_training`: ``import longllama.tokenizer_training`` gives that very module (not a
copy)."""

import sys

from longllama.fot import tokenizer_training as _moved

sys.modules[__name__] = _moved
