"""Several indexes added to and searched in one compiled call (`indexes.batched`): the same as one call
per index, bit for bit, through the exact phase, builds and rebuilds; and the backend that uses it."""

from __future__ import annotations

import os

import faiss
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from indexes import GrowthPolicy, StreamingIndex, add_many, batched, native, search_many
from knn_memory import create_backend

pytestmark = pytest.mark.skipif(not native.available(), reason="the compiled inverted lists are not built")

D = 8
POLICY = GrowthPolicy(exact_until=48, lists_per_sqrt=1.0, regrow_factor=2.0, min_lists=2, max_nprobe=3)


def keys_like(heads: int, n: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """[heads, n, D] float32 clustered keys, exact in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(heads, 6, D, generator=g) * 3
    pick = torch.randint(0, 6, (heads, n), generator=g)
    x = torch.gather(centers, 1, pick[..., None].expand(-1, -1, D)) + torch.randn(heads, n, D, generator=g)
    return x.to(dtype).to(torch.float32).contiguous()


def new_indexes(heads: int, dtype: torch.dtype, spec: str = "auto") -> list[StreamingIndex]:
    if spec == "Flat":
        return [StreamingIndex(D, "Flat", store_dtype=dtype) for _ in range(heads)]
    return [StreamingIndex(D, "auto", store_dtype=dtype, policy=POLICY, seed=h) for h in range(heads)]


def assert_same_state(a: list[StreamingIndex], b: list[StreamingIndex]) -> None:
    for x, y in zip(a, b, strict=True):
        assert (x.ntotal, x.trained_at, x.trainings, x.uses_index, x.nlist) == (
            y.ntotal,
            y.trained_at,
            y.trainings,
            y.uses_index,
            y.nlist,
        )
        assert torch.equal(x.keys(), y.keys())
        assert x.nbytes == y.nbytes
        if x.compiled_ivf() is not None:
            ix, iy = x.compiled_ivf(), y.compiled_ivf()
            assert ix.stats == iy.stats
            assert torch.equal(ix.bounds, iy.bounds) and torch.equal(ix.counts, iy.counts)


@settings(max_examples=25, deadline=None)
@given(
    heads=st.integers(2, 4),
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=12),
    queries=st.integers(1, 9),
    k=st.sampled_from([1, 5, 64]),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    spec=st.sampled_from(["auto", "Flat"]),
    seed=st.integers(0, 10**6),
)
def test_one_call_equals_one_call_per_index(heads, sizes, queries, k, dtype, spec, seed):
    batched, single = new_indexes(heads, dtype, spec), new_indexes(heads, dtype, spec)
    for step, n in enumerate(sizes):
        x = keys_like(heads, n, seed + step, dtype)
        add_many(batched, x)
        for ix, xh in zip(single, x, strict=True):
            ix.add_checked(xh.contiguous())
        q = keys_like(heads, queries, seed + 1000 + step, torch.float32)
        got_s, got_i = search_many(batched, q, k)
        want = [ix.search_checked(qh.contiguous(), k) for ix, qh in zip(single, q, strict=True)]
        assert torch.equal(got_s, torch.stack([s for s, _ in want]))
        assert torch.equal(got_i, torch.stack([i for _, i in want]))
        assert_same_state(batched, single)
    # the schedule was exercised: past the exact phase the compiled path ran
    if spec == "auto" and sum(sizes) >= 2 * POLICY.exact_until:
        assert all(ix.compiled_ivf() is not None for ix in batched)


def test_the_compiled_path_is_taken_and_counts():
    heads = 3
    indexes = new_indexes(heads, torch.bfloat16)
    add_many(indexes, keys_like(heads, 200, 0, torch.bfloat16))
    ivfs = [ix.compiled_ivf() for ix in indexes]
    assert all(ivf is not None for ivf in ivfs)
    before = [ivf.ntotal for ivf in ivfs]
    add_many(indexes, keys_like(heads, 10, 1, torch.bfloat16))  # no rebuild due at 210 (next at 400)
    assert [ix.compiled_ivf() for ix in indexes] == ivfs  # the same index objects, added to
    assert [ivf.ntotal for ivf in ivfs] == [b + 10 for b in before] and all(
        ix.ntotal == 210 for ix in indexes
    )
    assert [int(ivf.counts.sum()) for ivf in ivfs] == [210] * heads
    search_many(indexes, keys_like(heads, 7, 2, torch.float32), 4)
    assert all(ivf.stats["queries"] == 7 and ivf.stats["lists_scanned"] >= 7 for ivf in ivfs)
    add_many(indexes, keys_like(heads, 190, 3, torch.bfloat16))  # 400 keys: the rebuild is due
    assert all(
        ix.trained_at == 400 and ix.compiled_ivf() is not ivf for ix, ivf in zip(indexes, ivfs, strict=True)
    )


def test_exact_indexes_are_searched_in_one_selection(monkeypatch):
    """Exact stores of equal size go through one score buffer and one selection, not index by index;
    more keys than one block's worth of scores, or unequal sizes, go index by index."""
    heads = 3
    indexes = new_indexes(heads, torch.bfloat16, "Flat")
    add_many(indexes, keys_like(heads, 100, 0, torch.bfloat16))
    q = keys_like(heads, 6, 1, torch.float32)
    want = [ix.search_checked(q[h].contiguous(), 200) for h, ix in enumerate(indexes)]
    calls = []
    real = StreamingIndex.search_checked
    monkeypatch.setattr(StreamingIndex, "search_checked", lambda *a: calls.append(1) or real(*a))
    s, i = search_many(indexes, q, 200)  # k beyond the 100 keys: padded as each index pads
    assert not calls
    assert torch.equal(s, torch.stack([w[0] for w in want])) and torch.equal(
        i, torch.stack([w[1] for w in want])
    )
    assert bool((i[..., 100:] == -1).all()) and bool(torch.isinf(s[..., 100:]).all())
    indexes[0].add_checked(keys_like(1, 1, 2, torch.bfloat16)[0])  # 101 keys against 100: one by one
    search_many(indexes, q, 4)
    assert len(calls) == heads


def test_mixed_indexes_fall_back_to_one_call_each():
    flat = StreamingIndex(D, "Flat")
    auto = new_indexes(1, torch.float32)[0]
    twin_flat, twin_auto = StreamingIndex(D, "Flat"), new_indexes(1, torch.float32)[0]
    x = keys_like(2, 120, 5, torch.float32)
    add_many([flat, auto], x)
    twin_flat.add_checked(x[0].contiguous())
    twin_auto.add_checked(x[1].contiguous())
    q = keys_like(2, 5, 6, torch.float32)
    s, i = search_many([flat, auto], q, 8)
    for row, ix in enumerate((twin_flat, twin_auto)):
        ws, wi = ix.search_checked(q[row].contiguous(), 8)
        assert torch.equal(s[row], ws) and torch.equal(i[row], wi)


@pytest.mark.parametrize("mask_rows", [False, True])
def test_backend_batched_rows_equal_the_per_head_fan_out(mask_rows):
    """workers=1 takes one call per row on one thread; workers=2 splits each row's heads over two
    threads (the exact phase: one call per (row, head) on a pool): same hits."""
    opts = dict(num_heads=3, head_dim=D, batch_size=2, index="auto", top_k=6, exact_until=64, min_lists=2)
    one, pool = create_backend("faiss", workers=1, **opts), create_backend("faiss", workers=2, **opts)
    g = torch.Generator().manual_seed(0)
    for step in range(12):
        keys = torch.randn(2, 3, 32, D, generator=g)
        values = torch.randn(2, 3, 32, D, generator=g)
        mask = None
        if mask_rows:
            mask = torch.ones(2, 32, dtype=torch.bool)
            mask[1, : step + 1] = False  # left padding of different lengths in row 1
        one.add(keys, values, mask)
        pool.add(keys, values, mask)
        q = torch.randn(2, 3, 5, D, generator=g)
        a, b = one.search(q), pool.search(q)
        assert (
            torch.equal(a.scores, b.scores) and torch.equal(a.ids, b.ids) and torch.equal(a.values, b.values)
        )
    assert one.head_index(0, 0).compiled_ivf() is not None  # the compiled path was reached


needs_openmp = pytest.mark.skipif(
    not native.available() or not native.library().knn_openmp(), reason="the library is built without OpenMP"
)


@needs_openmp
@pytest.mark.parametrize(("heads", "threads"), [(2, 2), (3, 2), (5, 3), (4, 8)])
def test_heads_split_over_threads_equal_one_thread(monkeypatch, heads, threads):
    """The compiled add and search with the heads cut over threads: the same results and the same index
    state as on one thread, bit for bit, through builds and rebuilds; the split really happened."""
    monkeypatch.setattr(batched, "SPLIT_WORK", 1)  # split however small the call
    parts = []
    for name in ("_compiled_add", "_compiled_search"):
        real = getattr(batched, name)
        monkeypatch.setattr(batched, name, lambda *a, real=real: parts.append(a[-1]) or real(*a))
    side_by_side = []
    real_fan_out = batched.fan_out
    monkeypatch.setattr(
        batched, "fan_out", lambda fn, items, w: side_by_side.append(w) or real_fan_out(fn, items, w)
    )
    split, single = new_indexes(heads, torch.bfloat16), new_indexes(heads, torch.bfloat16)
    for step, n in enumerate([40, 30, 60, 5, 90, 200, 7]):
        x = keys_like(heads, n, 100 + step, torch.bfloat16)
        add_many(split, x, threads)
        add_many(single, x)
        q = keys_like(heads, 9, 200 + step, torch.float32)
        got_s, got_i = search_many(split, q, 6, threads)
        want_s, want_i = search_many(single, q, 6)
        assert torch.equal(got_s, want_s) and torch.equal(got_i, want_i)
        assert_same_state(split, single)
    assert max(parts) == min(heads, threads)  # the threaded calls did run (the others on one thread)
    assert side_by_side and set(side_by_side) == {min(heads, threads)}  # so did the rebuilds


@needs_openmp
def test_rebuilds_side_by_side_keep_the_callers_kmeans_threads_and_memory_budget(monkeypatch):
    """Rebuilds on worker threads run Faiss's k-means on the caller's thread count (its centroids depend
    on it); past the memory budget of their key copies they run one after the other."""
    seen = []
    real_rebuild = StreamingIndex.rebuild
    monkeypatch.setattr(
        StreamingIndex,
        "rebuild",
        lambda self, t=1: seen.append((t, faiss.omp_get_max_threads())) or real_rebuild(self, t),
    )
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(3)
    try:
        indexes = new_indexes(4, torch.bfloat16)
        add_many(indexes, keys_like(4, 60, 0, torch.bfloat16), 2)  # the first build, from the exact phase
        assert seen == [] and all(ix.compiled_ivf() is not None for ix in indexes)
        add_many(indexes, keys_like(4, 60, 1, torch.bfloat16), 2)  # 120 keys: a rebuild is due
        assert seen == [(1, 3)] * 4  # side by side: one thread each for the assignment, k-means on 3
        seen.clear()
        monkeypatch.setattr(batched, "TOGETHER_BYTES", 0)
        add_many(indexes, keys_like(4, 120, 2, torch.bfloat16), 2)  # 240 keys: the next one
        assert seen == [(2, 3)] * 4  # one after the other, in the calling thread
    finally:
        faiss.omp_set_num_threads(before)


@needs_openmp
def test_no_split_without_threads_or_in_a_forked_child(monkeypatch):
    monkeypatch.setattr(batched, "SPLIT_WORK", 1)
    assert batched._parts(4, 10**9, 1) == 1  # one thread asked for
    assert batched._parts(4, 3, 4) == 3  # at most one thread per SPLIT_WORK of work
    monkeypatch.setattr(native, "split_threads", lambda threads: 1)  # a library without OpenMP
    assert batched._parts(4, 10**9, 4) == 1
    monkeypatch.undo()
    pid = os.fork()
    if pid == 0:  # the child: never start the parent's OpenMP threads (they hang after a fork)
        os._exit(0 if native.split_threads(4) == 1 else 3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
