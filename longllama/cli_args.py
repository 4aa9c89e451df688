"""The old path of :mod:`longllama.tools.cli_args`: ``import longllama.cli_args`` gives that very module (not a
copy)."""

import sys

from longllama.tools import cli_args as _moved

sys.modules[__name__] = _moved
