"""``memory_attention_windows``: G stacked windows, each searching the memory the windows before it left,
give what G calls of ``memory_attention`` (each followed by the window's add) give, bit for bit."""

from __future__ import annotations

import pytest
import torch

import knn_memory.attention as attention
from knn_memory import create_backend, memory_attention, memory_attention_windows

H, D, N = 2, 16, 8  # heads, head_dim, tokens per window

BACKENDS = {
    "faiss-auto": dict(name="faiss", index="auto", top_k=4, exact_until=24),
    "faiss-flat": dict(name="faiss", index="Flat", top_k=4),
    "exact-top-k": dict(name="exact", top_k=4),
    "exact-dense": dict(name="exact"),
}


def _memory(spec: dict, rows: int, prefill: int, seed: int):
    spec = dict(spec)
    mem = create_backend(
        spec.pop("name"), num_heads=H, head_dim=D, batch_size=rows, mem_dtype="bfloat16", **spec
    )
    if prefill:
        g = torch.Generator().manual_seed(seed + 100)
        mem.add(torch.randn(rows, H, prefill, D, generator=g), torch.randn(rows, H, prefill, D, generator=g))
    return mem


def _inputs(windows: int, rows: int, seed: int, broadcast_mask: bool, padded: bool):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(windows * rows, H, N, D, generator=g) for _ in range(3))
    causal = torch.ones(N, N, dtype=torch.bool).triu(1)
    mask = torch.zeros(1 if broadcast_mask else windows * rows, 1, N, N).masked_fill(
        causal, torch.finfo(torch.float32).min
    )
    real = torch.ones(windows * rows, N, dtype=torch.bool)
    if padded:  # row 0 of the first window adds 2 entries: its next searches find fewer than k (-inf slots)
        real[0, :6] = False
    return q, k, v, mask, real


def _one_by_one(q, k, v, mask, real, memory, windows, **kw):
    rows = q.shape[0] // windows
    outs = []
    for g in range(windows):
        r = slice(g * rows, (g + 1) * rows)
        outs.append(memory_attention(q[r], k[r], v[r], mask if mask.shape[0] == 1 else mask[r], memory, **kw))
        memory.add(k[r], v[r], mask=real[r])
    return torch.cat(outs)


def _together(q, k, v, mask, real, memory, windows, **kw):
    rows = q.shape[0] // windows

    def add(g):
        r = slice(g * rows, (g + 1) * rows)
        memory.add(k[r], v[r], mask=real[r])

    return memory_attention_windows(q, k, v, mask, memory, windows=windows, after_search=add, **kw)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize(
    ("windows", "rows", "prefill", "broadcast_mask", "padded"),
    [
        (5, 1, 0, False, False),
        (4, 2, 0, True, True),
        (3, 2, 6, False, False),
        (1, 1, 30, False, False),
        (6, 1, 40, True, False),
    ],
)
def test_windows_together_equal_windows_one_by_one(
    backend, windows, rows, prefill, broadcast_mask, padded, monkeypatch
):
    together_calls = []
    real_together = attention._windows_together

    def counted(*args):
        together_calls.append(args[6] - args[5])  # windows run together
        return real_together(*args)

    monkeypatch.setattr(attention, "_windows_together", counted)
    q, k, v, mask, real = _inputs(
        windows, rows, seed=windows + 10 * rows, broadcast_mask=broadcast_mask, padded=padded
    )
    ref_mem = _memory(BACKENDS[backend], rows, prefill, seed=rows)
    new_mem = _memory(BACKENDS[backend], rows, prefill, seed=rows)
    with torch.no_grad():
        ref = _one_by_one(q, k, v, mask, real, ref_mem, windows)
        out = _together(q, k, v, mask, real, new_mem, windows)
    assert torch.equal(out, ref)
    assert torch.equal(new_mem.lengths, ref_mem.lengths)
    probe = torch.randn(rows, H, 3, D, generator=torch.Generator().manual_seed(7))
    a, b = ref_mem.search(probe), new_mem.search(probe)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.ids, b.ids)
    # the windows after the first that finds a non-empty memory run together, except for dense memory
    expected = [] if backend == "exact-dense" else [windows - (prefill == 0)]
    assert together_calls == [w for w in expected if w > 0]


@pytest.mark.parametrize("grad", [False, True])
def test_grouping_and_autograd_run_one_by_one(grad, monkeypatch):
    """Head/query blocks (``grouping``) and autograd take the one-window path, with the same result."""
    monkeypatch.setattr(attention, "_windows_together", lambda *a: pytest.fail("ran the windows together"))
    q, k, v, mask, real = _inputs(3, 1, seed=3, broadcast_mask=False, padded=False)
    ref_mem = _memory(BACKENDS["faiss-flat"], 1, 10, seed=1)
    new_mem = _memory(BACKENDS["faiss-flat"], 1, 10, seed=1)
    kw = {} if grad else {"grouping": (1, 4)}
    with torch.set_grad_enabled(grad):
        ref = _one_by_one(q, k, v, mask, real, ref_mem, 3, **kw)
        out = _together(q, k, v, mask, real, new_mem, 3, **kw)
    assert torch.equal(out, ref)


def test_checks_every_window_before_any_search():
    """A NaN in the last window is refused before the first window adds anything."""
    q, k, v, mask, real = _inputs(3, 1, seed=5, broadcast_mask=False, padded=False)
    q[2, 0, 0, 0] = float("nan")
    mem = _memory(BACKENDS["faiss-flat"], 1, 10, seed=1)
    with pytest.raises(ValueError, match="query contains NaN"):
        _together(q, k, v, mask, real, mem, 3)
    assert mem.lengths.tolist() == [10]


@pytest.mark.parametrize(
    ("windows", "message"),
    [
        (0, "windows must be a positive int"),
        (True, "windows must be a positive int"),
        (4, "with G = windows = 4"),
    ],
)
def test_bad_window_counts_are_refused(windows, message):
    q, k, v, mask, _ = _inputs(3, 1, seed=5, broadcast_mask=False, padded=False)
    mem = _memory(BACKENDS["faiss-flat"], 1, 10, seed=1)
    with pytest.raises(ValueError, match=message):
        memory_attention_windows(q, k, v, mask, mem, windows=windows)


def test_a_memory_of_another_batch_size_is_refused():
    q, k, v, mask, _ = _inputs(3, 2, seed=5, broadcast_mask=False, padded=False)
    mem = _memory(BACKENDS["faiss-flat"], 1, 10, seed=1)  # B = 1, but each window has 2 rows
    with pytest.raises(ValueError, match=r"each window of query"):
        memory_attention_windows(q, k, v, mask, mem, windows=3)


@pytest.mark.parametrize("kind", ["faiss-flat", "exact-dense"])
def test_a_wider_mask_keeps_the_activations_dtype(kind):
    """bfloat16 activations with a float32 additive mask: the scores widen to float32, but the weights,
    and so the output, come back in bfloat16, through both functions (the values' matmul needs that)."""
    q, k, v, mask, _ = _inputs(2, 1, 0, broadcast_mask=True, padded=False)
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    assert mask.dtype == torch.float32
    mem = _memory(BACKENDS[kind], 1, 16, 0)
    one = memory_attention(q[:1], k[:1], v[:1], mask, mem)
    both = memory_attention_windows(q, k, v, mask, _memory(BACKENDS[kind], 1, 16, 0), windows=2)
    assert one.dtype == both.dtype == torch.bfloat16
    assert torch.equal(both[:1], one)  # window 0 saw the same memory in both
