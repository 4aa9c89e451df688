"""The gather of retrieved values: the compiled copy against the torch path, on chunked storage."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from indexes import ChunkedTensor, native
from knn_memory import storage

needs_native = pytest.mark.skipif(not native.available(), reason="compiled library not built")


def _torch_gather(views, ids, dim, dtype):
    with pytest.MonkeyPatch.context() as m:
        m.setattr(storage, "gather_rows", lambda views, ids: None)
        return storage.gather_values(views, ids, dim, dtype)


def _expected(full: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The rows of ``full`` [h, N, d] at ``ids`` [h, q, k], zeros outside 0..N-1 (by hand)."""
    h, q, k = ids.shape
    out = torch.zeros(h, q, k, full.shape[-1], dtype=full.dtype)
    for a in range(h):
        for b in range(q):
            for c in range(k):
                e = int(ids[a, b, c])
                if 0 <= e < full.shape[1]:
                    out[a, b, c] = full[a, e]
    return out


def _store(heads: int, dim: int, sizes: list[int], dtype: torch.dtype, seed: int) -> ChunkedTensor:
    gen = torch.Generator().manual_seed(seed)
    store = ChunkedTensor((heads,), dim, dtype, "cpu", chunk=64, first=4)
    for n in sizes:
        store.append(torch.randn(heads, n, dim, generator=gen))
    return store


@needs_native
@settings(max_examples=40, deadline=None)
@given(
    heads=st.integers(1, 4),
    dim=st.sampled_from([1, 3, 32, 100]),
    sizes=st.lists(st.integers(1, 70), min_size=1, max_size=6),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    head_slice=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_compiled_gather_equals_torch_and_by_hand(heads, dim, sizes, dtype, head_slice, seed):
    store = _store(heads, dim, sizes, dtype, seed)
    views = store.views()
    assert len(views) >= 1
    n = store.length
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(-2, n + 3, (heads, 5, 3), generator=gen)  # out of range both sides: zeros
    if head_slice and heads > 1:
        views = [v[1:] for v in views]  # a head slice: heads a chunk's stride apart, not packed
        ids = ids[1:]
    got = storage.gather_values(views, ids, dim, dtype)
    assert got.dtype == dtype and got.shape == (*ids.shape, dim)
    assert torch.equal(got, _torch_gather(views, ids, dim, dtype))
    assert torch.equal(got, _expected(torch.cat(views, dim=1), ids))


@needs_native
def test_gather_rows_takes_the_compiled_path_and_declines_what_it_cannot_do():
    store = _store(2, 8, [5, 9], torch.bfloat16, 0)
    views = store.views()
    ids = torch.tensor([[0, 13, -1], [4, 5, 14]])
    out = native.gather_rows(views, ids)
    assert out is not None and out.shape == (2, 3, 8)
    assert torch.equal(out[:, 2][1], torch.zeros(8, dtype=torch.bfloat16))  # id 14 of 14 entries
    assert len(views) >= 3 and torch.equal(out[0, 1], torch.cat(views, dim=1)[0, 13])  # the last chunk
    # what it leaves to the torch path
    assert native.gather_rows([], ids) is None
    assert native.gather_rows([v.float() for v in views[:1]] + views[1:], ids) is None  # mixed dtypes
    assert native.gather_rows([v.transpose(1, 2) for v in views], ids) is None  # rows not contiguous
    assert native.gather_rows(views, ids.to(torch.int32)) is None
    assert native.gather_rows(views, ids[:1]) is None  # heads disagree


def test_gather_without_entries_gives_zeros():
    ids = torch.full((2, 3, 4), -1)
    out = storage.gather_values([], ids, 5, torch.bfloat16)
    assert out.shape == (2, 3, 4, 5) and not bool(out.any())


def _weighted_by_hand(full: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """sum_j probs[..., j] * full[h, ids[..., j]] [h, q, d] in float64 (ids outside 0..N-1 add nothing)."""
    gathered = _expected(full, ids).double()  # [h, q, k, d], zeros outside
    return (probs.double().unsqueeze(-1) * gathered).sum(-2)


@needs_native
@settings(max_examples=40, deadline=None)
@given(
    heads=st.integers(1, 4),
    dim=st.sampled_from([1, 3, 6, 16, 17, 32, 100]),
    sizes=st.lists(st.integers(1, 70), min_size=1, max_size=6),
    k=st.integers(1, 40),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    head_slice=st.booleans(),
    isa=st.sampled_from(native.isas() or ("scalar",)),
    seed=st.integers(0, 2**16),
)
def test_weighted_rows_equal_the_weighted_sum_by_hand(heads, dim, sizes, k, dtype, head_slice, isa, seed):
    """The values weighted in place (every instruction set): the same sum as gathering them first, to
    float32 rounding, for any dim (tails of a vector included: a store past the output's end corrupts
    the heap and aborts), dtype, chunking and head slice; ids outside the memory and zero weights add
    nothing."""
    store = _store(heads, dim, sizes, dtype, seed)
    views = store.views()
    n = store.length
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(-2, n + 3, (heads, 5, k), generator=gen)
    probs = torch.rand(heads, 5, k, generator=gen)
    probs[probs < 0.2] = 0.0
    if head_slice and heads > 1:
        views, ids, probs = [v[1:] for v in views], ids[1:], probs[1:]
    native.set_isa(isa)
    try:
        got = native.weighted_rows(views, ids, probs)
    finally:
        native.set_isa("avx512")  # capped at the CPU's best: what a process starts with
    assert got is not None and got.dtype == torch.float32 and got.shape == (*ids.shape[:2], dim)
    want = _weighted_by_hand(torch.cat(views, dim=1), ids, probs)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@needs_native
def test_weighted_rows_decline_what_they_cannot_do():
    store = _store(2, 8, [5, 9], torch.bfloat16, 0)
    views = store.views()
    ids = torch.tensor([[[0, 13, -1]], [[4, 5, 14]]])
    probs = torch.rand(2, 1, 3)
    assert native.weighted_rows(views, ids, probs) is not None
    assert native.weighted_rows([], ids, probs) is None
    assert native.weighted_rows(views, ids, probs.double()) is None  # float32 weights only
    assert native.weighted_rows(views, ids, probs[:, :, :2]) is None  # shapes disagree
    assert native.weighted_rows([v.to(torch.float64) for v in views], ids, probs) is None
    assert native.weighted_rows([v.transpose(1, 2) for v in views], ids, probs) is None
    assert native.weighted_rows(views, ids.to(torch.int32), probs) is None


@pytest.mark.parametrize("mem_dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_attention_hits_leave_their_values_in_the_memory(mem_dtype, batch_size):
    """``search_for_attention`` leaves the top-k values in the memory; gathered, they are ``search``'s,
    bit for bit, and weighted in place they give ``search``'s weighted values to float32 rounding
    (weights that need gradients take the gathered values)."""
    from knn_memory import create_backend

    g = torch.Generator().manual_seed(5)
    B, H, d = batch_size, 3, 12
    mem = create_backend("faiss", num_heads=H, head_dim=d, batch_size=B, mem_dtype=mem_dtype, top_k=6)
    for n in (7, 20, 1):
        mask = torch.rand(B, n, generator=g) > 0.2
        mem.add(torch.randn(B, H, n, d, generator=g), torch.randn(B, H, n, d, generator=g), mask)
    q = torch.randn(B, 2, 4, d, generator=g)
    eager = mem.search(q, heads=slice(1, 3))
    deferred = mem.search_for_attention(q, heads=slice(1, 3))
    assert eager.values is not None and eager.retrieved is not None
    assert deferred.values is None and deferred.retrieved is not None
    assert torch.equal(deferred.scores, eager.scores) and torch.equal(deferred.ids, eager.ids)
    probs = torch.softmax(torch.randn(B, 2, 4, 6, generator=g), -1)
    want = torch.matmul(probs.unsqueeze(-2), eager.values.float()).squeeze(-2)
    in_place = deferred.weighted_values(probs)
    assert deferred.values is None  # never gathered
    torch.testing.assert_close(in_place, want, rtol=1e-5, atol=1e-6)
    trained = probs.clone().requires_grad_()
    out = deferred.weighted_values(trained)
    out.sum().backward()
    assert trained.grad is not None and deferred.values is not None
    assert torch.equal(deferred.gathered_values(), eager.values)
