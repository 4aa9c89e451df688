"""The tiny random LongLLaMA configs and models the tests share (importable from a child interpreter)."""

from __future__ import annotations

import torch

from longllama import LongLlamaConfig, LongLlamaForCausalLM

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=2,
    max_position_embeddings=16,
    last_context_length=8,
    mem_layers=[1],
    mem_dtype="float32",
)


def tiny_config(**overrides) -> LongLlamaConfig:
    """Vocab 64, hidden 32 (2 heads of 16), 3 layers with memory in layer 1, window 16, last_context_length 8,
    float32 memory; any field can be overridden."""
    return LongLlamaConfig(**{**TINY, **overrides})


def tiny_model(seed: int = 0, **overrides) -> LongLlamaForCausalLM:
    """A :func:`tiny_config` model in eval mode, its weights drawn from ``seed``."""
    torch.manual_seed(seed)
    return LongLlamaForCausalLM(tiny_config(**overrides)).eval()
