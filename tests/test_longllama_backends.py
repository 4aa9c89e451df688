"""The model across memory backends: Faiss top-k against the exact dense memory of upstream."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

import indexes.streaming as streaming
from indexes import native
from longllama import LongLlamaForCausalLM

PROMPT_LENGTH = 120  # W=16, L=8: 112 tokens in memory


def build(config) -> LongLlamaForCausalLM:
    torch.manual_seed(0)
    model = LongLlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=1, pad_token_id=0)
    return model


def prompt(batch: int = 2) -> torch.Tensor:
    return torch.randint(3, 64, (batch, PROMPT_LENGTH), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def run(config, ids):
    model = build(config)
    logits = model(ids).logits
    tokens = model.generate(ids, max_new_tokens=12, do_sample=False, last_context_length=8)
    return logits, tokens[:, PROMPT_LENGTH:]


@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize("mem_dtype", ["float32", "bfloat16"])
def test_faiss_flat_with_k_at_least_memory_equals_exact(longllama_config, mem_dtype, kernel, monkeypatch):
    """``kernel``: the Flat store searched by the compiled exact kernel from its first key (it takes over
    from ``EXACT_KERNEL_KEYS`` on, where the CPU has AVX-512), else by the matmul."""
    if kernel:
        if not (native.available() and native.best_isa() == "avx512"):
            pytest.skip("the exact kernel needs the library built, on AVX-512")
        monkeypatch.setattr(streaming, "EXACT_KERNEL_KEYS", 1)
        calls = []
        real = native.exact_top_k
        monkeypatch.setattr(native, "exact_top_k", lambda *a: calls.append(1) or real(*a))
    ids = prompt()
    exact_logits, exact_tokens = run(longllama_config(mem_dtype=mem_dtype, mem_layers=[1, 2]), ids)
    faiss_config = longllama_config(
        mem_dtype=mem_dtype, mem_layers=[1, 2], mem_backend="faiss", mem_index="Flat", mem_top_k=256
    )
    faiss_logits, faiss_tokens = run(faiss_config, ids)
    torch.testing.assert_close(faiss_logits, exact_logits, rtol=0, atol=1e-4)
    assert torch.equal(faiss_tokens, exact_tokens)
    if kernel:
        assert calls  # the kernel did the searches


@torch.no_grad()
def test_top_k_agreement_with_dense_memory(longllama_config):
    """Reports how far top-k memory attention moves the logits from the dense memory, per k."""
    ids = prompt()
    base = dict(mem_layers=[1, 2])
    dense = build(longllama_config(**base))(ids).logits
    memory_part = slice(16, PROMPT_LENGTH)  # positions that can see memory (after the first window)
    print(f"\ntiny model, memory of {PROMPT_LENGTH - 8} entries per row; vs the dense (exact) memory:")
    for k in (2, 8, 32, 112):
        exact_k = build(longllama_config(**base, mem_top_k=k))(ids).logits
        faiss_k = build(longllama_config(**base, mem_top_k=k, mem_backend="faiss", mem_index="Flat"))(
            ids
        ).logits
        # Flat is an exact search: its top-k is torch's top-k
        torch.testing.assert_close(faiss_k, exact_k, rtol=0, atol=1e-4)
        diff = (faiss_k - dense)[:, memory_part].abs()
        agreement = (faiss_k.argmax(-1) == dense.argmax(-1))[:, memory_part].float().mean().item()
        print(f"  k={k:4d}: max |logit diff| {diff.max().item():.3e}, mean {diff.mean().item():.3e}, "
              f"top-1 agreement {agreement:.3f}")  # fmt: skip
        assert 0.0 <= agreement <= 1.0
        if k >= PROMPT_LENGTH - 8:  # k covers the whole memory: top-k is the dense attention
            torch.testing.assert_close(faiss_k, dense, rtol=0, atol=1e-4)
            assert agreement == 1.0


@torch.no_grad()
def test_approximate_index_runs_in_the_model(longllama_config):
    config = longllama_config(
        mem_backend="faiss", mem_index="HNSW8", mem_top_k=8, mem_index_params={"efSearch": 16}
    )
    model = build(config)
    out = model(prompt(1))
    assert torch.isfinite(out.logits).all()
    assert out.cache.memory(1).name == "faiss" and out.cache.memory_lengths()[1] == PROMPT_LENGTH - 8
