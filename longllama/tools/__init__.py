"""Tools around the model: the passkey evaluation, its command line, and what every command line shares.

A subpackage of its own because these drive a model from the outside and the model needs none of them.
Named ``tools`` rather than after the passkey task because two of its modules serve every command line of
the library: :mod:`~longllama.tools.cli_args` (also FoT training's and the benchmarks') and
:mod:`~longllama.tools.peak_rss` (also the benchmarks').

* :mod:`~longllama.tools.passkey`: the passkey prompt (its text, the one copy of it), one run, scoring and
  the summary;
* :mod:`~longllama.tools.passkey_cli`: ``longllama-passkey`` (``python -m longllama.tools.passkey_cli``,
  also under ``torchrun``);
* :mod:`~longllama.tools.cli_args`: token counts, backend names, one-line errors;
* :mod:`~longllama.tools.peak_rss`: :class:`~longllama.tools.peak_rss.PeakRSS`, peak resident memory.

The lm-evaluation-harness form of the passkey task stays in :mod:`longllama.lm_eval_tasks`, whose
folder of task configs is package data that lm-eval is pointed at by path.

Imports point down: this package uses the model (:mod:`longllama`) and :mod:`knn_memory`; the model never
imports it.
"""
