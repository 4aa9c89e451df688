"""Focused Transformer (FoT) training of a LongLLaMA: everything that trains a model, nothing it needs to run.

A subpackage of its own because training is a job of its own, with its own dependencies (SentencePiece
training, synthetic documents, checkpoints, plots) that the model never imports; the model offers training
one hook, the ``memory_override`` of its forward call, and training runs the model's own forward through
it.

* :mod:`~longllama.fot.training`: the training loop, checkpoints, export, and ``longllama-train``
  (``python -m longllama.fot.training``);
* :mod:`~longllama.fot.crossbatch`: which earlier windows (and negatives) each training row attends to,
  and the dense memory built from them (the ``memory_override`` training passes);
* :mod:`~longllama.fot.training_data`: synthetic needle-in-filler documents, shaped like the passkey
  prompt of :mod:`longllama.tools.passkey`;
* :mod:`~longllama.fot.tokenizer_training`: the SentencePiece tokenizer trained on those documents;
* :mod:`~longllama.fot.model_card`: the model card of a trained run.

Imports point down: this package uses the model (:mod:`longllama`) and :mod:`longllama.tools` (argument
parsing, the passkey prompt's text); neither imports it.
"""
