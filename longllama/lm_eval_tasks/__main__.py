"""``python -m longllama.lm_eval_tasks``: see :func:`longllama.lm_eval_tasks.main`."""

import sys

from longllama.lm_eval_tasks import main

sys.exit(main())
