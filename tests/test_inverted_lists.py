"""The inverted lists of the "auto" index: compiled (every instruction set) and Python lists alike,
exact against brute force, certified early stops, storage, growth, persistence."""

from __future__ import annotations

import copy
import pickle

import faiss
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from indexes import native
from indexes.bounded_ivf import BoundedIVF, shrunk_queries, split_queries
from indexes.inverted_lists import InvertedLists, key_bytes, remaining_bounds, segment_table

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
ENGINES = ["python"] + ([f"native-{isa}" for isa in native.isas()])


@pytest.fixture(autouse=True)
def _restore_isa():
    yield
    if native.available():
        native.set_isa("avx512")  # capped at the CPU's best: what a process starts with


def make(engine: str, nlist: int, dim: int, dtype: torch.dtype) -> InvertedLists:
    if engine == "python":
        return InvertedLists(nlist, dim, dtype, native=False)
    native.set_isa(engine.removeprefix("native-"))
    return InvertedLists(nlist, dim, dtype, native=True)


def filled(engine, nlist, dim, dtype, n, seed=0, step=333):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, dim, generator=g).to(dtype)
    owner = torch.randint(0, nlist, (n,), generator=g)
    lists = make(engine, nlist, dim, dtype)
    for begin in range(0, n, step):
        end = min(n, begin + step)
        lists.add(keys[begin:end], owner[begin:end], torch.arange(begin, end))
    return lists, keys, owner


def test_the_compiled_lists_are_built_here():
    """The install builds them (setup.py); a silent fall-back to the Python lists would hide a break."""
    assert native.available(), "indexes/_inverted_lists.c was not built: reinstall (pip install -e .)"
    assert native.isa() in native.ISA_NAMES
    assert native.isas()[0] == "scalar" and native.isas()[-1] == native.best_isa()
    with pytest.raises(ValueError, match="isa must be one of"):
        native.set_isa("sse9")


def test_without_the_compiled_lists_the_python_ones_are_used_with_a_warning(monkeypatch, caplog):
    from indexes import inverted_lists

    monkeypatch.setattr(native, "library", lambda: None)
    monkeypatch.setattr(inverted_lists, "_warned", [])
    with caplog.at_level("WARNING", logger="indexes.inverted_lists"):
        lists = InvertedLists(3, 4, torch.bfloat16)
        InvertedLists(3, 4, torch.bfloat16)
    assert not lists.is_native
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1  # said once
    assert "not built" in caplog.records[0].message
    with pytest.raises(RuntimeError, match="native=True but the compiled inverted lists are not built"):
        InvertedLists(3, 4, torch.bfloat16, native=True)
    with pytest.raises(ValueError, match="dtype must be one of"):
        InvertedLists(3, 4, torch.float64)
    with pytest.raises(ValueError, match="dim must be in"):
        InvertedLists(3, 5000, torch.float32)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [32, 100, 7, 1])
def test_scan_of_every_list_is_the_exact_top_k(engine, dtype, dim):
    lists, keys, _ = filled(engine, 13, dim, dtype, 2000)
    q = torch.randn(11, dim, generator=torch.Generator().manual_seed(1))
    ranked = torch.stack([torch.randperm(13, generator=torch.Generator().manual_seed(i)) for i in range(11)])
    bounds = torch.full((11, 13), 1e30)
    scores, ids, (scanned, seen, capped) = lists.scan(q.numpy(), 20, ranked, bounds, 13)
    exact = q @ keys.float().T
    ref = torch.topk(exact, 20)
    torch.testing.assert_close(torch.from_numpy(scores), ref.values, atol=2e-5, rtol=1e-5)
    # the ids are those of the scores: each score is its key's inner product
    torch.testing.assert_close(
        torch.gather(exact, 1, torch.from_numpy(ids)), ref.values, atol=2e-5, rtol=1e-5
    )
    assert (scanned, seen, capped) == (11 * 13, 11 * 2000, 0)


@pytest.mark.parametrize("engine", ENGINES)
def test_fewer_keys_than_k_leave_empty_slots(engine):
    lists, _keys, _owner = filled(engine, 4, 8, torch.bfloat16, 5)
    q = torch.randn(2, 8)
    ranked = torch.arange(4).expand(2, -1).contiguous()
    scores, ids, _ = lists.scan(q.numpy(), 9, ranked, torch.zeros(2, 4), 4)
    assert (ids[:, :5] >= 0).all() and (ids[:, 5:] == -1).all()
    assert np.isneginf(scores[:, 5:]).all() and np.isfinite(scores[:, :5]).all()
    assert (np.diff(scores[:, :5], axis=1) <= 0).all()  # best first


@pytest.mark.parametrize("engine", ENGINES)
def test_a_query_stops_when_the_next_bound_is_below_its_kth_score(engine):
    """Lists ranked by true bounds: the scan stops early, certain, and is still exact; a query whose
    bounds never fall below its k-th score scans all `cap` lists and is counted as capped."""
    g = torch.Generator().manual_seed(2)
    owner = torch.randint(0, 16, (1600,), generator=g)
    x = (torch.randn(16, 8, generator=g) * 4)[owner] + 0.3 * torch.randn(1600, 8, generator=g)  # clusters
    lists = make(engine, 16, 8, torch.float32)
    lists.add(x, owner, torch.arange(1600))
    hi = torch.full((16, 8), -1e30).scatter_reduce(0, owner[:, None].expand(-1, 8), x, "amax")
    lo = torch.full((16, 8), 1e30).scatter_reduce(0, owner[:, None].expand(-1, 8), x, "amin")
    q = torch.randn(6, 8, generator=torch.Generator().manual_seed(3)) * 3
    bound = q.clamp_min(0) @ hi.T + q.clamp_max(0) @ lo.T
    bounds, ranked = torch.sort(bound, dim=1, descending=True)
    scores, _ids, (scanned, _, capped) = lists.scan(q.numpy(), 5, ranked, bounds, 1)
    torch.testing.assert_close(torch.from_numpy(scores), torch.topk(q @ x.T, 5).values, atol=1e-5, rtol=1e-5)
    assert scanned < 6 * 16 and capped == 0  # certain before the last list
    # bounds that never let a query stop: every list is scanned, the queries count as capped
    _, _, (scanned, _, capped) = lists.scan(q.numpy(), 5, ranked, torch.full_like(bounds, 1e30), 1)
    assert (scanned, capped) == (6 * 16, 6)


@pytest.mark.parametrize("engine", ENGINES)
def test_search_ranks_the_lists_itself_as_scan_over_the_top_bounds(engine):
    lists, _keys, _ = filled(engine, 40, 16, torch.bfloat16, 3000)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(17, 16, generator=g)
    bound = torch.randn(17, 40, generator=g) * 5 + 20  # high enough that the scans stop at various lists
    for cap, nprobe in ((40, 40), (12, 3), (5, 5), (1, 1)):
        top, ranked = torch.topk(bound, cap, dim=1)
        want = lists.scan(q.numpy(), 9, ranked, top, nprobe)
        got = lists.search(q.numpy(), 9, bound, cap, nprobe)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
        assert got[2] == want[2]


@pytest.mark.parametrize("engine", ENGINES)
def test_search_ranks_many_lists_and_breaks_ties_by_the_lower_list(engine):
    lists, _keys, owner = filled(engine, 1500, 8, torch.float32, 6000, step=6000)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(9, 8, generator=g)
    bound = torch.randn(9, 1500, generator=g)
    bound[:, 700:716] += 3  # one run of 16 holds several of the best, the others get skipped
    for cap in (1, 8, 32, 1500):
        top, ranked = torch.topk(bound, cap, dim=1)
        want = lists.scan(q.numpy(), 5, ranked, top, cap)
        got = lists.search(q.numpy(), 5, bound, cap, cap)
        np.testing.assert_array_equal(got[1], want[1])
        assert got[2] == want[2]
    # equal bounds: the lower lists are the ones scanned (1 of 3, then 2 of 3)
    flat = torch.zeros(9, 1500)
    flat[:, [4, 9, 1200]] = 1.0
    for cap, scanned in ((1, [4]), (2, [4, 9])):
        ids = lists.search(q.numpy(), 6000, flat, cap, cap)[1]
        inside = torch.isin(owner, torch.tensor(scanned))
        assert sorted(i for i in ids[0].tolist() if i >= 0) == torch.nonzero(inside).squeeze(1).tolist()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_export_gives_the_keys_back_bit_for_bit_and_truncate_keeps_the_first(engine, dtype):
    lists, keys, owner = filled(engine, 7, 9, dtype, 500)
    codes, ids = lists.export()
    assert torch.equal(torch.sort(ids).values, torch.arange(500))
    back = torch.empty_like(keys)
    back[ids] = codes
    assert torch.equal(back.view(torch.uint8), keys.view(torch.uint8))
    assert torch.equal(lists.sizes(), torch.bincount(owner, minlength=7))
    lists.truncate(321)
    codes, ids = lists.export()
    assert torch.equal(torch.sort(ids).values, torch.arange(321))
    assert torch.equal(codes.view(torch.uint8), keys[ids].view(torch.uint8))
    # adding after a truncation continues cleanly (the dropped room is reused)
    more = torch.randn(50, 9).to(dtype)
    lists.add(more, torch.zeros(50, dtype=torch.int64), torch.arange(321, 371))
    q = torch.randn(3, 9)
    everything = torch.cat([keys[:321], more]).float()
    scores, _, _ = lists.scan(q.numpy(), 4, torch.arange(7).expand(3, -1).contiguous(), torch.zeros(3, 7), 7)
    torch.testing.assert_close(
        torch.from_numpy(scores), torch.topk(q @ everything.T, 4).values, atol=1e-5, rtol=1e-5
    )


@settings(max_examples=25, deadline=None)
@given(
    adds=st.lists(st.integers(1, 90), min_size=1, max_size=8),
    reserved=st.integers(0, 40),
    cut=st.floats(0, 1),
    after=st.lists(st.integers(1, 90), max_size=3),
    dim=st.sampled_from([3, 16, 33]),
    dtype=st.sampled_from(DTYPES),
)
def test_compiled_and_python_lists_hold_and_find_the_same(adds, reserved, cut, after, dim, dtype):
    """A reserve, any sequence of adds, a truncation and more adds (into the room the truncation left):
    same sizes, room, segments, bytes, exported keys and scan results."""
    if not native.available():
        pytest.skip("compiled lists not built")
    g = torch.Generator().manual_seed(sum(adds))
    a = InvertedLists(5, dim, dtype, native=True)
    b = InvertedLists(5, dim, dtype, native=False)
    extra = torch.tensor([reserved, 0, reserved // 2, 1, 0])
    for lists in (a, b):
        lists.reserve(extra)
    n = 0

    def add(count):
        x = torch.randn(count, dim, generator=g).to(dtype)
        owner = torch.randint(0, 5, (count,), generator=g)
        for lists in (a, b):
            lists.add(x, owner, torch.arange(n, n + count))
        return n + count

    for count in adds:
        n = add(count)
    n = int(cut * n)
    for lists in (a, b):
        lists.truncate(n)
    for count in after:
        n = add(count)
    assert torch.equal(a.sizes(), b.sizes()) and torch.equal(a.capacities(), b.capacities())
    assert torch.equal(a.segments(), b.segments())
    tables = sum(segment_table(int(c)) for c in a.segments())
    assert a.nbytes() == b.nbytes() == int(a.capacities().sum()) * key_bytes(a) + 5 * 48 + tables * 16
    (ca, ia), (cb, ib) = a.export(), b.export()
    assert torch.equal(ia, ib) and torch.equal(ca.view(torch.uint8), cb.view(torch.uint8))
    assert torch.equal(torch.sort(ia).values, torch.arange(n))  # every key kept once, none lost
    q = torch.randn(4, dim, generator=g)
    ranked = torch.stack([torch.randperm(5, generator=g) for _ in range(4)])
    bounds = torch.sort(torch.randn(4, 5, generator=g) * 3, dim=1, descending=True).values
    sa, _ida, sta = a.scan(q.numpy(), 6, ranked, bounds, 2)
    sb, _idb, stb = b.scan(q.numpy(), 6, ranked, bounds, 2)
    np.testing.assert_allclose(sa, sb, atol=1e-4, rtol=1e-5)
    assert sta == stb


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_querys_result_does_not_depend_on_the_others_in_its_batch(engine, dtype):
    """Queries that share lists are scored together (each block read once for all): same bits as alone."""
    lists, _, _ = filled(engine, 12, 33, dtype, 1500)
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 33, generator=g) + 0.01 * torch.randn(20, 33, generator=g)  # alike: they share lists
    bound = torch.randn(1, 12, generator=g).expand(20, -1) + 0.1 * torch.randn(20, 12, generator=g)
    alone = [lists.search(q[i : i + 1].numpy(), 7, bound[i : i + 1], 9, 5) for i in range(20)]
    for m in (2, 3, 5, 8, 9, 17, 20):  # a list's queries go in groups of up to 8: every group size occurs
        together = lists.search(q[:m].numpy(), 7, bound[:m], 9, 5)
        for i in range(m):
            np.testing.assert_array_equal(alone[i][0][0], together[0][i])
            np.testing.assert_array_equal(alone[i][1][0], together[1][i])


@pytest.mark.parametrize("engine", ENGINES)
def test_a_nan_bound_still_ranks_real_lists(engine):
    """The AVX-512 ranking does not order NaN: a row with one goes to the one-by-one ranking, and every
    id returned is still a key's (a list number out of range would be read out of bounds)."""
    lists, keys, _ = filled(engine, 40, 16, torch.bfloat16, 3000)
    g = torch.Generator().manual_seed(8)
    q = torch.randn(6, 16, generator=g)
    bound = torch.randn(6, 40, generator=g)
    clean = lists.search(q.numpy(), 9, bound, 8, 8)
    bound[2, 5] = float("nan")
    scores, ids, _ = lists.search(q.numpy(), 9, bound, 8, 8)
    assert ((ids >= 0) & (ids < keys.shape[0])).all() and np.isfinite(scores).all()
    rows = [0, 1, 3, 4, 5]  # the other rows rank as before
    np.testing.assert_array_equal(ids[rows], clean[1][rows])


@pytest.mark.parametrize("engine", ENGINES)
def test_add_boxed_widens_each_lists_box_and_counts(engine):
    g = torch.Generator().manual_seed(9)
    keys = torch.randn(300, 5, generator=g)
    owner = torch.randint(0, 6, (300,), generator=g)
    lists = make(engine, 6, 5, torch.float16)
    bounds = torch.cat([torch.full((6, 5), -1e30), torch.full((6, 5), 1e30)], dim=1)
    counts = torch.zeros(6, dtype=torch.int64)
    for begin in range(0, 300, 64):
        rows = slice(begin, begin + 64)
        ids = torch.arange(begin, min(300, begin + 64))
        lists.add_boxed(keys[rows].half(), owner[rows], ids, keys[rows], bounds, counts)
    assert torch.equal(counts, torch.bincount(owner, minlength=6)) and torch.equal(counts, lists.sizes())
    for l in range(6):
        mine = keys[owner == l]
        assert torch.equal(bounds[l, :5], mine.amax(0)) and torch.equal(bounds[l, 5:], mine.amin(0))


@pytest.mark.parametrize("native_lists", [True, False] if native.available() else [False])
def test_lists_are_freed_as_soon_as_they_are_dropped(native_lists):
    """No reference cycle: a rebuilt index's old lists leave memory at once, not when the garbage
    collector runs (a cycle kept every generation of a growing index resident)."""
    import gc
    import weakref

    gc.disable()
    try:
        lists = InvertedLists(4, 8, torch.bfloat16, native=native_lists)
        engine = weakref.ref(lists._lists)
        del lists
        assert engine() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("native_lists", [True, False] if native.available() else [False])
def test_growth_leaves_at_most_an_eighth_unused(native_lists):
    lists = InvertedLists(3, 32, torch.bfloat16, native=native_lists)
    lists.reserve(torch.tensor([100, 0, 7]))
    assert lists.capacities().tolist() == [112, 0, 16]  # exact, in whole blocks of 16 keys
    assert lists.segments().tolist() == [1, 0, 1]
    lists = InvertedLists(3, 32, torch.bfloat16, native=native_lists)
    steps = 0
    for i in range(3000):
        before = lists.capacities()
        lists.add(torch.randn(1, 32).bfloat16(), torch.tensor([i % 3]), torch.tensor([i]))
        room, size = lists.capacities(), lists.sizes()
        assert bool((room >= size).all()) and bool(
            (room <= torch.clamp_min(size * 9 // 8, size + 16) + 16).all()
        )
        steps += int((room != before).sum())
    assert int(lists.segments().sum()) == steps  # one segment per growth step, none moved or merged
    tables = sum(segment_table(int(c)) for c in lists.segments())
    assert lists.nbytes() == int(lists.capacities().sum()) * (32 * 2 + 4) + 3 * 48 + tables * 16


# ---------------------------------------------------------------------- the index over the lists
def built(n=3000, lists=24, dtype=torch.bfloat16):
    keys = torch.randn(n, 16, generator=torch.Generator().manual_seed(5)).to(dtype).float().numpy()
    ivf = BoundedIVF.build(keys, keys[:800], lists, dtype, niter=5)
    ivf.nprobe, ivf.max_nprobe = 2, 8
    return ivf, keys


def test_state_pickle_and_deepcopy_give_an_index_that_searches_alike():
    ivf, keys = built()
    q = np.random.default_rng(0).standard_normal((9, 16)).astype(np.float32)
    ref = ivf.search(q, 7)
    loaded = BoundedIVF.from_state(ivf.state())
    loaded.nprobe, loaded.max_nprobe = 2, 8  # knobs are the caller's, not part of the state
    for other in (loaded, pickle.loads(pickle.dumps(ivf)), copy.deepcopy(ivf)):
        got = other.search(q, 7)
        assert np.array_equal(got[1], ref[1]) and np.array_equal(got[0], ref[0])
        assert np.array_equal(other.decode_all(), keys)
    assert (pickle.loads(pickle.dumps(ivf)).nprobe, copy.deepcopy(ivf).max_nprobe) == (2, 8)


def test_a_state_saved_by_the_faiss_based_index_still_loads():
    """Earlier versions saved the "auto" index as a Faiss IVF (bf16 codes) beside bounds and counts."""
    ivf, keys = built()
    quantizer = faiss.IndexFlatL2(16)
    quantizer.add(ivf.centroids.numpy())
    old = faiss.IndexIVFScalarQuantizer(
        quantizer, 16, ivf.nlist, faiss.ScalarQuantizer.QT_bf16, faiss.METRIC_INNER_PRODUCT, False
    )
    old.is_trained = True
    assign = ivf.assign(torch.from_numpy(keys)).numpy()  # held: swig_ptr does not keep it alive
    old.add_core(len(keys), faiss.swig_ptr(keys), None, faiss.swig_ptr(assign))
    state = {
        "faiss": torch.from_numpy(faiss.serialize_index(old)),
        "bounds": ivf.bounds,
        "counts": ivf.counts,
    }
    back = BoundedIVF.from_state(state, dim=16)
    assert np.array_equal(back.decode_all(), keys) and torch.equal(back.counts, ivf.counts)
    back.nprobe, back.max_nprobe = 2, 8
    q = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    assert np.array_equal(back.search(q, 4)[1], ivf.search(q, 4)[1])
    with pytest.raises(ValueError, match="list counts do not match"):
        BoundedIVF.from_state({**state, "counts": ivf.counts.flip(0)})


def test_a_saved_state_is_checked_before_it_is_used():
    ivf, _ = built(n=500, lists=8)
    state = ivf.state()
    ids = state["ids"].clone()
    ids[0] = ids[1]
    with pytest.raises(ValueError, match=r"ids are not 0\.\.499, each once"):
        BoundedIVF.from_state({**state, "ids": ids})
    first = int(state["counts"][0])
    swapped = state["ids"].clone()
    swapped[[0, first - 1]] = swapped[[first - 1, 0]]
    with pytest.raises(ValueError, match="do not rise along each list"):
        BoundedIVF.from_state({**state, "ids": swapped})
    codes = state["codes"].clone()
    codes[3, 2] = float("nan")
    with pytest.raises(ValueError, match="codes contain NaN"):
        BoundedIVF.from_state({**state, "codes": codes})
    with pytest.raises(ValueError, match="codes must be a"):
        BoundedIVF.from_state({**state, "codes": state["codes"].to(torch.float64)})
    with pytest.raises(ValueError, match="has dim 16, expected 8"):
        BoundedIVF.from_state(state, dim=8)
    with pytest.raises(ValueError, match="counts do not match the codes"):
        BoundedIVF.from_state({**state, "counts": state["counts"] * 2})
    with pytest.raises(ValueError, match="centroids contain NaN"):
        BoundedIVF.from_state({**state, "centroids": state["centroids"] * float("nan")})


# ---------------------------------------------------------------------- lists ranked by another key
def test_remaining_bounds_is_the_largest_bound_not_yet_scanned():
    g = torch.Generator().manual_seed(8)
    bound = torch.randn(5, 30, generator=g)
    lists = torch.stack([torch.randperm(30, generator=g)[:7] for _ in range(5)])
    got = remaining_bounds(bound, lists)
    for i in range(5):
        for j in range(7):
            scanned = set(lists[i, :j].tolist())
            want = max(float(bound[i, l]) for l in range(30) if l not in scanned)
            assert float(got[i, j]) == want
    assert bool(torch.isinf(remaining_bounds(None, lists)).all())


@pytest.mark.parametrize("engine", ENGINES)
def test_search_by_a_rank_scans_in_rank_order_and_stops_on_the_remaining_bound(engine):
    """With a rank, the lists are scanned in the rank's order (of equal ranks the lower list first) and the
    stop test compares the k-th score with the largest bound of the lists left, so that a scan stopped
    early is still exact: the same as :meth:`scan` over that order with those bounds, on every engine."""
    g = torch.Generator().manual_seed(4)
    owner = torch.randint(0, 40, (3000,), generator=g)
    keys = (
        (torch.randn(40, 16, generator=g) * 4)[owner] + 0.3 * torch.randn(3000, 16, generator=g)
    ).bfloat16()
    lists = make(engine, 40, 16, torch.bfloat16)
    lists.add(keys, owner, torch.arange(3000))  # clusters: tight boxes, so scans can stop early
    q = torch.randn(17, 16, generator=g) * 3
    hi = torch.full((40, 16), -1e30).scatter_reduce(0, owner[:, None].expand(-1, 16), keys.float(), "amax")
    lo = torch.full((40, 16), 1e30).scatter_reduce(0, owner[:, None].expand(-1, 16), keys.float(), "amin")
    bound = q.clamp_min(0) @ hi.T + q.clamp_max(0) @ lo.T  # true bounds
    rank = torch.randn(17, 40, generator=g)  # an order that has nothing to do with them
    rank[:, 5] = rank[:, 6] = 9.0  # a tie: list 5 first
    exact = torch.topk(q @ keys.float().T, 9, dim=1)
    for cap, nprobe in ((40, 1), (40, 3), (12, 3), (8, 8)):
        order = torch.sort(rank, dim=1, descending=True, stable=True).indices[:, :cap].contiguous()
        assert bool((order[:, :2] == torch.tensor([5, 6])).all())
        want = lists.scan(q.numpy(), 9, order, remaining_bounds(bound, order), nprobe)
        got = lists.search(q.numpy(), 9, bound if cap > nprobe else None, cap, nprobe, rank)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
        assert got[2] == want[2]
        if cap == 40:  # every query either stopped certain or scanned every list: exact
            torch.testing.assert_close(torch.from_numpy(got[0]), exact.values, atol=1e-5, rtol=1e-5)
            if nprobe == 1:
                assert got[2][0] < 17 * 40  # some stopped early
    with pytest.raises(ValueError, match="needs the bound"):
        lists.search(q.numpy(), 9, None, 12, 3, rank)


@pytest.mark.parametrize("shrink", [1.0, 0.25, 0.01])
def test_bounded_ivf_ranked_by_a_shrunk_box_is_exact_with_every_list_allowed(shrink):
    """However the lists are ranked, a query that may scan every list ends exact (certain or complete);
    with shrink 1 the rank is the bound itself."""
    g = torch.Generator().manual_seed(9)
    keys = (torch.randn(4000, 12, generator=g) * torch.linspace(0.2, 3, 12)).bfloat16().float()
    ivf = BoundedIVF.build(keys.numpy(), keys[:2000].numpy(), 30, torch.bfloat16, niter=5)
    ivf.nprobe, ivf.max_nprobe, ivf.rank_shrink = 2, 30, shrink
    q = torch.randn(25, 12, generator=g) * 2
    scores, _ = ivf.search(q.numpy(), 10)
    torch.testing.assert_close(
        torch.from_numpy(scores), torch.topk(q @ keys.T, 10).values, atol=1e-4, rtol=1e-5
    )
    assert ivf.stats["lists_scanned"] < 25 * 30  # the certificate stopped some before the last list
    # the shrunk box's bound, from the stored bounds in one matmul, is that of the box shrunk about its centre
    centre, half = (ivf.hi + ivf.lo) / 2, (ivf.hi - ivf.lo) / 2
    want = q.clamp_min(0) @ (centre + shrink * half).T + q.clamp_max(0) @ (centre - shrink * half).T
    got = shrunk_queries(split_queries(q), shrink) @ ivf.bounds.T
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-5)


def test_rank_shrink_survives_clone_pickle_and_deepcopy():
    keys = torch.randn(2000, 8, generator=torch.Generator().manual_seed(1))
    ivf = BoundedIVF.build(keys.numpy(), keys.numpy(), 16, torch.float32, niter=3)
    ivf.nprobe, ivf.max_nprobe, ivf.rank_shrink = 3, 6, 0.3
    for other in (ivf.clone(), pickle.loads(pickle.dumps(ivf)), copy.deepcopy(ivf)):
        assert (other.nprobe, other.max_nprobe, other.rank_shrink) == (3, 6, 0.3)


NATIVE_ENGINES = [e for e in ENGINES if e != "python"]


@pytest.mark.skipif(not NATIVE_ENGINES, reason="the compiled lists are not built")
@pytest.mark.parametrize("engine", NATIVE_ENGINES)
@pytest.mark.parametrize(
    ("m", "nlist", "dim", "shrink", "cap", "nprobe"),
    [
        (17, 40, 16, 0.25, 4, 4),  # ranked by the shrunk box, no stop test
        (9, 70, 12, 0.25, 20, 3),  # ... and the bounds for the stop test (2 dim not a multiple of 16)
        (1, 33, 16, 1.0, 5, 2),  # ranked by the bound; one query (a decoded token)
        (64, 97, 32, 0.5, 8, 8),  # a window of the embedded model; lists past a block of 32
        (3, 16, 5, 0.01, 16, 1),
    ],
)
def test_search_from_boxes_ranks_and_stops_as_the_bounds_computed_in_torch(
    engine, m, nlist, dim, shrink, cap, nprobe
):
    """The compiled call that ranks the lists itself from their boxes (the bound of the box and of the box
    shrunk by ``shrink``, one product of the query rows with the transposed boxes) gives what
    :meth:`InvertedLists.search` gives with those products computed by torch, on every instruction set."""
    g = torch.Generator().manual_seed(nlist + dim)
    n = 30 * nlist
    owner = torch.randint(0, nlist, (n,), generator=g)
    centres = torch.randn(nlist, dim, generator=g) * 3
    keys = (centres[owner] + torch.randn(n, dim, generator=g)).bfloat16()
    lists = make(engine, nlist, dim, torch.bfloat16)
    boxes = torch.cat([torch.full((nlist, dim), -1e30), torch.full((nlist, dim), 1e30)], dim=1)
    counts = torch.zeros(nlist, dtype=torch.int64)
    lists.add_boxed(keys, owner, torch.arange(n), keys.float(), boxes, counts)
    q = torch.randn(m, dim, generator=g) * 2
    split = split_queries(q)
    bound = split @ boxes.T
    rank = None if shrink == 1.0 else shrunk_queries(split, shrink) @ boxes.T
    want = lists.search(q.numpy(), 7, bound, cap, nprobe, rank)
    got = lists.search_boxes(q.numpy(), 7, boxes, shrink, cap, nprobe)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
    assert got[2][:2] == want[2][:2]
    # the ranking matters here: the lists of lowest rank give another result
    if rank is not None and cap == nprobe:
        worst = lists.search(q.numpy(), 7, None, cap, nprobe, -rank)
        assert not np.array_equal(worst[1], want[1])


@pytest.mark.parametrize("engine", [e for e in ENGINES if e != "python"])
@pytest.mark.parametrize("shrink", [1.0, 0.25])
def test_search_from_boxes_gives_a_row_alone_what_it_gets_in_a_batch(engine, shrink):
    """One query (a decoded token) is ranked without the tiles of a batch, from the boxes where they
    are: every row of a batch searched alone gets the same ids, scores and stats. (A mixed-up column
    fails this; a change in the last bits of the ranks seldom changes which lists are scanned, and does
    not here.)"""
    nlist, dim = 203, 32  # lists past several tiles of 32 columns, and a last partial tile
    g = torch.Generator().manual_seed(7)
    n = 20 * nlist
    owner = torch.randint(0, nlist, (n,), generator=g)
    keys = (torch.randn(nlist, dim, generator=g)[owner] * 3 + torch.randn(n, dim, generator=g)).bfloat16()
    lists = make(engine, nlist, dim, torch.bfloat16)
    boxes = torch.cat([torch.full((nlist, dim), -1e30), torch.full((nlist, dim), 1e30)], dim=1)
    lists.add_boxed(keys, owner, torch.arange(n), keys.float(), boxes, torch.zeros(nlist, dtype=torch.int64))
    q = (torch.randn(13, dim, generator=g) * 2).numpy()
    batch = lists.search_boxes(q, 9, boxes, shrink, 24, 3)
    stats = [0, 0]
    for r in range(q.shape[0]):
        alone = lists.search_boxes(q[r : r + 1], 9, boxes, shrink, 24, 3)
        np.testing.assert_array_equal(alone[1][0], batch[1][r])
        np.testing.assert_array_equal(alone[0][0], batch[0][r])
        stats = [a + b for a, b in zip(stats, alone[2][:2], strict=True)]
    assert stats == list(batch[2][:2])


def test_search_from_boxes_needs_the_compiled_lists():
    lists = make("python", 4, 8, torch.float32)
    with pytest.raises(RuntimeError, match="compiled lists"):
        lists.search_boxes(np.zeros((1, 8), np.float32), 1, torch.zeros(4, 16), 1.0, 1, 1)
