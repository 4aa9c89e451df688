"""The `MemoryBackend` contract, run over every registered backend (see ``backend_cases.py``).

Tiny sizes (B=2..3, H=2, d=8, a few hundred entries per row): enough for the IVF and ``"auto"`` cases
to train, small enough for the whole suite to take seconds.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from backend_cases import OPTIONS, BackendCase, backend_cases

import knn_memory
from knn_memory import MemoryBackend, MemoryHits, create_backend, load_backend

B, H, D = 2, 2, 8
N = 300  # entries per add in the larger tests: past the IVF4 (156) and "auto" (64) build sizes
CASES = backend_cases()


@pytest.fixture(params=CASES, ids=[c.id for c in CASES])
def case(request) -> BackendCase:
    return request.param


def make(case: BackendCase, batch: int = B, mem_dtype: str = "float32") -> MemoryBackend:
    return create_backend(
        case.name, num_heads=H, head_dim=D, batch_size=batch, mem_dtype=mem_dtype, **case.options
    )


def entries(n: int, seed: int, batch: int = B, pad: float = 0.0):
    """keys, values [batch, H, n, D] and a mask [batch, n] with about ``pad`` padding (never all of a row)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, H, n, D, generator=g)
    values = torch.randn(batch, H, n, D, generator=g)
    mask = torch.rand(batch, n, generator=g) >= pad
    if n:
        mask[:, 0] = True
    return keys, values, mask


def real_entries(keys, values, mask, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row b's real keys and values [H, m, D] in insertion order (what ids count)."""
    return keys[b][:, mask[b]], values[b][:, mask[b]]


def queries(q: int, seed: int, batch: int = B, heads: int = H) -> torch.Tensor:
    return torch.randn(batch, heads, q, D, generator=torch.Generator().manual_seed(seed))


def same_hits(a: MemoryHits, b: MemoryHits, rows=slice(None)) -> None:
    """``a`` (rows ``rows``) and ``b`` hold the same entries with the same scores and values.

    Dense hits of ``a`` may have more entries than ``b`` (rows are aligned, so another row's adds pad
    this one): those must be padding.
    """
    assert a.dense == b.dense
    ids, scores = a.ids[rows], a.scores[rows]
    if a.dense:
        m = b.k
        assert bool((ids[..., m:] == -1).all()) and bool(torch.isneginf(scores[..., m:]).all())
        ids, scores = ids[..., :m], scores[..., :m]
        values = torch.cat(a.value_chunks, dim=-2)[rows][..., :m, :]
        assert torch.equal(values, torch.cat(b.value_chunks, dim=-2))
    else:
        assert torch.equal(a.values[rows], b.values)
    assert torch.equal(ids, b.ids)
    torch.testing.assert_close(scores, b.scores, rtol=1e-6, atol=1e-6)


def check_hits(
    mem: MemoryBackend, hits: MemoryHits, q: torch.Tensor, real: list, k: int | None, exact: bool
) -> None:
    """Shapes, dtypes, ids, scores and values of one search against the real entries of each row.

    ``real[b]`` is row b's (keys, values) [H, m, D] as added; keys are compared after rounding to
    ``mem_dtype``, as every backend stores them. ``k``: slots per query (None for dense hits);
    ``exact``: a top-k backend must then fill min(k, m) slots.
    """
    heads = slice(0, H)
    Bq, h, nq, _ = q.shape
    assert hits.ids.dtype == torch.int64 and hits.scores.dtype == torch.float32
    assert hits.scores.shape == hits.ids.shape and hits.scores.shape[:3] == (Bq, h, nq)
    if hits.dense:
        assert hits.values is None
        assert sum(c.shape[-2] for c in hits.value_chunks) == hits.k
    else:
        assert hits.k == k
        assert hits.values.shape == (Bq, h, nq, k, D) and hits.values.dtype == mem.mem_dtype
    for b in range(Bq):
        keys, values = (t[heads].to(mem.mem_dtype) for t in real[b])
        m = keys.shape[1]
        ids, scores = hits.ids[b], hits.scores[b]
        empty = ids < 0
        assert bool((ids >= -1).all()) and bool((ids < m).all())
        assert bool(torch.isneginf(scores[empty]).all()) and bool(torch.isfinite(scores[~empty]).all())
        want = torch.einsum("hqd,hmd->hqm", q[b].double(), keys.double())  # [h, q, m]
        got = torch.gather(want, -1, ids.clamp(min=0))
        torch.testing.assert_close(scores[~empty].double(), got[~empty], rtol=1e-4, atol=1e-4)
        if hits.dense:
            # every real entry once per query, in insertion order
            assert bool((ids[..., ~empty[0, 0]] == torch.arange(m)).all())
            assert bool((empty == empty[:1, :1]).all())
            continue
        # top-k: distinct ids, empty slots only at the end, the retrieved values those of the ids
        filled = (~empty).sum(-1)
        assert bool((filled <= min(k, m)).all())
        assert bool((empty == (torch.arange(k) >= filled[..., None])).all())
        for j in range(h):
            for i in range(nq):
                row = ids[j, i, : filled[j, i]]
                assert len(set(row.tolist())) == len(row)
                assert torch.equal(hits.values[b, j, i, : len(row)], values[j, row])
        assert bool((hits.values[b][empty] == 0).all())
        if exact:
            assert bool((filled == min(k, m)).all())


# ---------------------------------------------------------------------- the registry
@pytest.mark.parametrize("name", knn_memory.available_backends())
def test_every_registered_backend_builds_with_defaults(name):
    mem = create_backend(name, num_heads=H, head_dim=D)
    assert isinstance(mem, MemoryBackend) and type(mem) is knn_memory.backend_class(name)
    assert mem.name == name and len(mem) == 0 and mem.is_empty and mem.lengths.tolist() == [0]
    keys, values, _ = entries(3, seed=0, batch=1)
    mem.add(keys, values)
    assert mem.lengths.tolist() == [3]


def test_cases_cover_the_registry():
    names = knn_memory.available_backends()
    assert {"exact", "faiss", "capture"} <= set(names)
    assert sorted({c.name for c in CASES}) == names
    assert set(OPTIONS) <= set(names), "option sets for a backend that is not registered"
    assert len({c.id for c in CASES}) == len(CASES)


def test_a_newly_registered_backend_gets_a_case_with_its_defaults(monkeypatch):
    import knn_memory.registry as registry

    class Newcomer(knn_memory.ExactBackend):
        pass

    monkeypatch.setitem(registry._REGISTRY, "newcomer", Newcomer)
    (new,) = [c for c in backend_cases() if c.name == "newcomer"]
    assert (new.id, new.options, new.exact) == ("newcomer", {}, False)
    assert type(make(new)) is Newcomer


# ---------------------------------------------------------------------- add / search
@pytest.mark.parametrize("mem_dtype", ["float32", "bfloat16"])
def test_add_and_search_shapes_dtypes_ids(case, mem_dtype):
    mem = make(case, mem_dtype=mem_dtype)
    keys, values, mask = entries(N, seed=1, pad=0.2)
    mem.add(keys[:, :, :100], values[:, :, :100], mask[:, :100])
    mem.add(keys[:, :, 100:], values[:, :, 100:], mask[:, 100:])
    assert mem.lengths.dtype == torch.int64 and mem.lengths.tolist() == mask.sum(-1).tolist()
    assert len(mem) == int(mask.sum(-1).max()) and not mem.is_empty
    q = queries(5, seed=2)
    real = [real_entries(keys, values, mask, b) for b in range(B)]
    for k in (None, 1, 7):
        hits = mem.search(q, k=k)
        want_k = case.top_k if k is None else k
        check_hits(mem, hits, q, real, None if hits.dense else want_k, case.exact)


def test_search_of_an_empty_memory(case):
    mem = make(case)
    q = queries(3, seed=3)
    hits = mem.search(q)
    if hits.dense:
        assert hits.scores.shape == (B, H, 3, 0)
    else:
        assert bool((hits.ids == -1).all()) and bool(torch.isneginf(hits.scores).all())
        assert hits.values.shape == (B, H, 3, hits.k, D)
    probs = torch.softmax(hits.scores, -1).nan_to_num(0.0)
    assert hits.weighted_values(probs).shape == (B, H, 3, D)


def test_k_larger_than_stored(case):
    mem = make(case)
    keys, values, _ = entries(6, seed=4)
    mask = torch.tensor([[True, False, True, True, True, False], [False, True, False, False, True, False]])
    mem.add(keys, values, mask)
    assert mem.lengths.tolist() == [4, 2]
    q = queries(3, seed=5)
    hits = mem.search(q, k=9)
    real = [real_entries(keys, values, mask, b) for b in range(B)]
    check_hits(mem, hits, q, real, None if hits.dense else 9, case.exact)
    for b, m in enumerate((4, 2)):
        found = hits.ids[b][hits.ids[b] >= 0]
        assert set(found.tolist()) <= set(range(m))
        if case.exact:
            assert bool(((hits.ids[b] >= 0).sum(-1) == m).all())


def test_padding_is_never_retrieved(case):
    B_, n = 2, 40
    q = queries(4, seed=6)
    keys, values, mask = entries(n, seed=7, pad=0.5)
    # padding keys along the queries would win every search if they were stored
    keys = torch.where(mask[:, None, :, None], keys, 50 * q.mean(dim=2, keepdim=True))
    values = torch.where(mask[:, None, :, None], values, torch.full_like(values, 1e3))
    mem = make(case)
    mem.add(keys, values, mask)
    hits = mem.search(q)
    if hits.dense:
        assert bool(torch.isneginf(hits.scores[..., ~mask[0]][0]).all())
        assert bool((hits.ids[0][..., ~mask[0]] == -1).all())
    else:
        assert bool((hits.values.abs() < 1e3).all())
    real = [real_entries(keys, values, mask, b) for b in range(B_)]
    check_hits(mem, hits, q, real, None if hits.dense else hits.k, case.exact)
    # no mask and an all-True mask are the same add
    a, b = make(case), make(case)
    a.add(keys, values)
    b.add(keys, values, torch.ones(B_, n, dtype=torch.bool))
    if case.exact:
        same_hits(a.search(q), b.search(q))
    assert a.lengths.tolist() == b.lengths.tolist() == [n, n]
    if case.exact:  # the same answers as a memory that never saw the padding
        clean = make(case)
        for row in range(B_):
            only = torch.zeros(B_, n, dtype=torch.bool)
            only[row] = mask[row]
            clean.add(keys, values, only)
        got, want = mem.search(q), clean.search(q)
        check_hits(clean, want, q, real, None if want.dense else want.k, exact=True)
        if not got.dense:
            same_hits(got, want)


def test_heads_slice_equals_the_full_search(case):
    mem = make(case)
    keys, values, mask = entries(N, seed=8, pad=0.1)
    mem.add(keys, values, mask)
    q = queries(4, seed=9)
    full = mem.search(q)
    for heads in (slice(0, 1), slice(1, 2), slice(0, 2)):
        part = mem.search(q[:, heads].contiguous(), heads=heads)
        assert torch.equal(part.ids, full.ids[:, heads])
        torch.testing.assert_close(part.scores, full.scores[:, heads], rtol=0, atol=0)
        if not full.dense:
            assert torch.equal(part.values, full.values[:, heads])
    with pytest.raises(ValueError, match="heads"):
        mem.search(q[:, :1].contiguous(), heads=slice(1, 3))


# ---------------------------------------------------------------------- reset, reorder
def test_reset_rows(case):
    mem = make(case, batch=3)
    keys, values, mask = entries(N, seed=10, batch=3, pad=0.1)
    mem.add(keys, values, mask)
    q = queries(4, seed=11, batch=3)
    before = mem.search(q)
    lengths = mask.sum(-1).tolist()
    mem.reset([1])
    assert mem.lengths.tolist() == [lengths[0], 0, lengths[2]]
    after = mem.search(q)
    assert bool((after.ids[1] == -1).all())
    for r in (0, 2):
        assert torch.equal(after.ids[r][after.ids[r] >= 0], before.ids[r][before.ids[r] >= 0])
        torch.testing.assert_close(after.scores[r][after.ids[r] >= 0], before.scores[r][before.ids[r] >= 0])
    # the reset row's new entries get ids from 0 and answer like a fresh memory's
    new_keys, new_values, _ = entries(5, seed=12, batch=3)
    only_row1 = torch.tensor([[False] * 5, [True] * 5, [False] * 5])
    mem.add(new_keys, new_values, only_row1)
    assert mem.lengths.tolist() == [lengths[0], 5, lengths[2]]
    hits = mem.search(q)
    assert set(hits.ids[1].flatten().tolist()) - {-1} <= set(range(5))
    fresh = make(case, batch=1)
    fresh.add(new_keys[1:2], new_values[1:2])
    want = fresh.search(q[1:2])
    got_ids, want_ids = hits.ids[1][hits.ids[1] >= 0], want.ids[0][want.ids[0] >= 0]
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(hits.scores[1][hits.ids[1] >= 0], want.scores[0][want.ids[0] >= 0])
    mem.reset(2)  # one row as an int
    assert mem.lengths.tolist() == [lengths[0], 5, 0]
    mem.reset()
    assert mem.lengths.tolist() == [0, 0, 0] and mem.is_empty
    with pytest.raises(ValueError, match=r"row 3 out of range for batch_size=3"):
        mem.reset([3])


def test_reorder_with_duplicated_rows_gives_independent_beams(case):
    mem = make(case)
    keys, values, mask = entries(N, seed=13, pad=0.1)
    mem.add(keys, values, mask)
    q1 = queries(3, seed=14, batch=1)
    q3 = q1.expand(3, -1, -1, -1).contiguous()
    old = mem.search(q1.expand(B, -1, -1, -1).contiguous())
    lengths = mask.sum(-1).tolist()
    mem.reorder(torch.tensor([1, 1, 0], dtype=torch.int32))
    assert mem.batch_size == 3 and mem.lengths.tolist() == [lengths[1], lengths[1], lengths[0]]
    out = mem.search(q3)
    for new_row, old_row in ((0, 1), (1, 1), (2, 0)):
        same_hits(out, _row(old, old_row), rows=slice(new_row, new_row + 1))
    # growing or resetting one duplicated beam leaves the other as it was
    grow = torch.tensor([[True] * 4, [False] * 4, [False] * 4])
    bait = 10 * q1[:, :, :1].expand(3, H, 4, D).contiguous()  # keys every query prefers
    mem.add(bait, torch.randn(3, H, 4, D), grow)
    assert mem.lengths.tolist() == [lengths[1] + 4, lengths[1], lengths[0]]
    out2 = mem.search(q3)
    same_hits(out2, _row(out, 1), rows=slice(1, 2))
    same_hits(out2, _row(out, 2), rows=slice(2, 3))
    assert not torch.equal(out2.ids[0], out.ids[0]) or not torch.equal(out2.scores[0], out.scores[0])
    mem.reset([1])
    assert mem.lengths.tolist() == [lengths[1] + 4, 0, lengths[0]]
    same_hits(mem.search(q3), _row(out2, 0), rows=slice(0, 1))
    with pytest.raises(ValueError, match="rows must lie in"):
        mem.reorder(torch.tensor([3]))


def _row(hits: MemoryHits, r: int) -> MemoryHits:
    """Row r of ``hits`` as a batch-1 result."""
    pick = slice(r, r + 1)
    if hits.dense:
        return MemoryHits(hits.scores[pick], hits.ids[pick], None, tuple(c[pick] for c in hits.value_chunks))
    return MemoryHits(hits.scores[pick], hits.ids[pick], hits.values[pick])


# ---------------------------------------------------------------------- sizes
def test_lengths_len_and_nbytes_grow_with_entries(case):
    mem = make(case)
    assert mem.lengths.tolist() == [0, 0] and len(mem) == 0
    empty_bytes = mem.nbytes
    assert isinstance(empty_bytes, int) and empty_bytes >= 0
    sizes = [empty_bytes]
    total = torch.zeros(B, dtype=torch.int64)
    for seed, n in enumerate((10, 50, 200)):
        keys, values, mask = entries(n, seed=20 + seed, pad=0.3)
        mem.add(keys, values, mask)
        total += mask.sum(-1)
        assert torch.equal(mem.lengths, total) and len(mem) == int(total.max())
        sizes.append(mem.nbytes)
    assert sizes[1] > 0
    assert sizes == sorted(sizes) and sizes[-1] > sizes[1]
    # at least the values themselves: every real entry's value, in mem_dtype
    assert sizes[-1] >= int(total.sum()) * H * D * 4
    mem.reset()
    assert mem.nbytes < sizes[-1]


# ---------------------------------------------------------------------- truncate, checkpoint, rollback
def test_checkpoint_and_rollback(case):
    mem = make(case)
    keys, values, mask = entries(2 * N, seed=30, pad=0.1)
    mem.add(keys[:, :, :N], values[:, :, :N], mask[:, :N])
    q = queries(4, seed=31)
    before, lengths = mem.search(q), mem.lengths.clone()
    token = mem.checkpoint()
    for round_ in range(3):
        mem.add(keys[:, :, N:], values[:, :, N:], mask[:, N:])
        if round_ == 1:
            mem.reorder(torch.tensor([1, 1, 0]))
        if round_ == 2:
            mem.reset([0])
        mem.rollback(token)
        assert mem.batch_size == B and torch.equal(mem.lengths, lengths)
        same_hits(mem.search(q), before)
    with pytest.raises(ValueError, match="checkpoint was taken of another memory"):
        make(case).rollback(token)


def test_truncate_forgets_the_tail_or_refuses_before_any_change(case):
    mem = make(case)
    keys, values, mask = entries(N, seed=32, pad=0.2)
    mem.add(keys, values, mask)
    q = queries(4, seed=33)
    before, lengths = mem.search(q), mem.lengths.clone()
    cut = torch.tensor([40, 25])
    try:
        mem.truncate(cut)
    except ValueError as err:  # a backend that cannot remove entries says so, and changes nothing
        assert "cannot" in str(err)
        assert torch.equal(mem.lengths, lengths)
        same_hits(mem.search(q), before)
        return
    assert torch.equal(mem.lengths, cut)
    hits = mem.search(q)
    for b in range(B):
        assert bool((hits.ids[b] < int(cut[b])).all())
    if case.exact:  # the same answers as a memory of those entries only
        alone = make(case)
        kept = mask & (mask.cumsum(-1) <= cut[:, None])
        alone.add(keys, values, kept)
        want = alone.search(q)
        for b in range(B):
            assert torch.equal(hits.ids[b][hits.ids[b] >= 0], want.ids[b][want.ids[b] >= 0])
    with pytest.raises(ValueError, match="lengths must lie"):
        mem.truncate(int(cut.max()) + 1)
    mem.truncate(0)
    assert mem.is_empty


# ---------------------------------------------------------------------- persistence
def test_state_and_save_load_round_trips(case, tmp_path):
    mem = make(case)
    keys, values, mask = entries(N, seed=40, pad=0.1)
    mem.add(keys, values, mask)
    q = queries(4, seed=41)
    want = mem.search(q)
    copy = type(mem).from_state(mem.state())
    mem.save(tmp_path / "mem")
    loaded = load_backend(tmp_path / "mem")
    for back in (copy, loaded):
        assert type(back) is type(mem) and back.config() == mem.config()
        assert torch.equal(back.lengths, mem.lengths)
        same_hits(back.search(q), want)
    # a loaded memory keeps growing like the original
    more = entries(40, seed=42)
    mem.add(*more)
    loaded.add(*more)
    same_hits(loaded.search(q), mem.search(q))


# ---------------------------------------------------------------------- threads
def test_concurrent_searches_equal_sequential_ones(case):
    mem = make(case)
    keys, values, mask = entries(N, seed=50, pad=0.1)
    mem.add(keys, values, mask)
    qs = [queries(3, seed=60 + i) for i in range(8)]
    sequential = [mem.search(q) for q in qs]
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(mem.search, qs))
    for a, b in zip(concurrent, sequential, strict=True):
        same_hits(a, b)


# ---------------------------------------------------------------------- exactness
def test_exact_backends_equal_the_dense_reference(case):
    if not case.exact:
        pytest.skip(f"{case.id} promises no exact results")
    keys, values, mask = entries(N, seed=70, pad=0.2)
    q = queries(6, seed=71)
    ref = create_backend("exact", num_heads=H, head_dim=D, batch_size=B, mem_dtype="bfloat16")
    mem = make(case, mem_dtype="bfloat16")
    for m in (ref, mem):
        m.add(keys[:, :, :120], values[:, :, :120], mask[:, :120])
        m.add(keys[:, :, 120:], values[:, :, 120:], mask[:, 120:])
    dense = ref.search(q)
    n_real = mask.sum(-1)
    for k in (int(n_real.max()) + 5, 6):
        hits = mem.search(q, k=k)
        for b in range(B):
            real = dense.ids[b] >= 0  # [H, q, M]
            ref_scores = dense.scores[b][real].reshape(H, 6, int(n_real[b]))
            ref_ids = dense.ids[b][real].reshape(H, 6, int(n_real[b]))
            ids, scores = hits.ids[b], hits.scores[b]
            if hits.dense:  # a dense backend: every real entry, the same scores
                assert torch.equal(ids[ids >= 0].reshape(ref_ids.shape), ref_ids)
                torch.testing.assert_close(scores[ids >= 0].reshape(ref_scores.shape), ref_scores)
                continue
            kk = min(k, int(n_real[b]))
            top = torch.topk(ref_scores, kk, dim=-1)
            torch.testing.assert_close(scores[..., :kk], top.values, rtol=1e-5, atol=1e-5)
            if kk == int(n_real[b]):  # k >= N: every entry, each with its score
                order = ids[..., :kk].argsort(-1)
                assert torch.equal(ids[..., :kk].gather(-1, order), ref_ids)
                torch.testing.assert_close(scores[..., :kk].gather(-1, order), ref_scores)
                assert bool((ids[..., kk:] == -1).all())
    # and the attention the model computes from them (a top-k memory is compared at k >= N)
    if case.top_k is None or case.top_k > int(n_real.max()):
        empty = torch.empty(B, H, 0, D)
        torch.testing.assert_close(
            knn_memory.memory_attention(q, empty, empty, memory=mem),
            knn_memory.memory_attention(q, empty, empty, memory=ref),
        )
