"""Shared fixtures.

The tests run tiny models: one torch (and OpenMP) thread is faster for them than several, and keeps
the suite fast and its timings stable on a machine that is also doing other work.
"""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def longllama_config():
    """Factory of tiny random LongLLaMA configs: ``longllama_config(**overrides)``.

    Defaults: vocab 64, hidden 32 (2 heads of 16), 3 layers with memory in layer 1, window 16,
    last_context_length 8, float32 memory, a large init (0.1) so attention is peaked and memory matters.
    """
    from tiny import tiny_config

    def make(**overrides):
        return tiny_config(**{"initializer_range": 0.1, **overrides})

    return make


@pytest.fixture(autouse=True)
def _grad_mode_is_restored():
    """A test (or the code it calls in-process) must leave autograd as it found it."""
    enabled = torch.is_grad_enabled()
    yield
    if torch.is_grad_enabled() != enabled:
        torch.set_grad_enabled(enabled)
        pytest.fail("grad mode was left changed by this test or the code it called")
