"""The functions the passkey task configs name (lm-eval loads this file by path): the library's own."""

from longllama.lm_eval_tasks import passkey_dataset, score_generation

__all__ = ["passkey_dataset", "score_generation"]
