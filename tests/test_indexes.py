"""indexes/: spec parsing, the streaming index (exact, then trained, then retrained), recall, fan-out."""

from __future__ import annotations

import math
import multiprocessing as mp
import re
import threading

import faiss
import numpy as np
import pytest
import torch

import indexes.chunked as chunked
from indexes import StreamingIndex, check_k, faiss_threads, fan_out, parse_spec, set_faiss_threads
from indexes.spec import POINTS_PER_CENTROID, check_search_params
from knn_memory.synthetic import make_memory


def topk_reference(queries: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product top-k in float64 with torch (independent of Faiss)."""
    scores = queries.double() @ keys.double().T
    top = torch.topk(scores, min(k, keys.shape[0]), dim=1)
    return top.values.float(), top.indices


def recall_at_k(ids: torch.Tensor, ref_ids: torch.Tensor) -> float:
    return (ref_ids.unsqueeze(-1) == ids.unsqueeze(-2)).any(-1).float().mean().item()


def centroids(index: StreamingIndex) -> np.ndarray:
    ivf = faiss.extract_index_ivf(index._index)
    return ivf.quantizer.reconstruct_n(0, ivf.nlist)


# ---------------------------------------------------------------------- spec parsing
@pytest.mark.parametrize(
    ("spec", "flat", "training", "nlist", "params"),
    [
        ("Flat", True, False, 0, ()),
        (" Flat ", True, False, 0, ()),
        ("IVF4,Flat", False, True, 4, ("nprobe",)),
        ("HNSW8", False, False, 0, ("efSearch",)),
        ("IVF4,PQ2", False, True, 4, ("nprobe",)),
        ("SQfp16", False, False, 0, ()),
    ],
)
def test_parse_spec_good(spec, flat, training, nlist, params):
    parsed = parse_spec(spec, 8)
    assert parsed.spec == spec.strip()
    assert parsed.dim == 8
    assert parsed.is_flat is flat
    assert parsed.needs_training is training
    assert parsed.nlist == nlist
    assert parsed.search_params == params
    if training:
        assert parsed.min_train_points >= POINTS_PER_CENTROID * max(nlist, 1)
    else:
        assert parsed.min_train_points == 0


def test_parse_spec_codebooks_need_enough_points():
    # PQ / SQ8 codebooks have 256 centroids each: 39 * 256 keys before training
    assert parse_spec("IVF4,PQ2", 8).min_train_points == POINTS_PER_CENTROID * 256
    assert parse_spec("SQ8", 8).min_train_points == POINTS_PER_CENTROID * 256


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("Bogus", "'Bogus' is not a usable Faiss index_factory string"),
        ("IVF4", "'IVF4' is not a usable"),
        ("flat", "'flat' is not a usable"),
        ("LSH", "'LSH' is not a usable Faiss index_factory string for inner-product"),
        ("PQ3", r"'PQ3' is not a usable .* at dim=8"),  # 8 is not a multiple of 3
        ("", "non-empty"),
        ("   ", "non-empty"),
        ("NSG32", "'NSG32': NSG graphs cannot be extended"),
        ("IVF4,NSG32", "NSG graphs cannot be extended"),
        ("IDMap,Flat", "'IDMap,Flat': entry ids are assigned by the memory"),
        ("IDMap2,Flat", "drop the IDMap prefix"),
    ],
)
def test_parse_spec_bad(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_spec(spec, 8)


@pytest.mark.parametrize("dim", [0, -3, 2**16 + 1])
def test_parse_spec_bad_dim(dim):
    with pytest.raises(
        ValueError, match=re.escape(f"dim must be a positive int, got {dim!r} (expected 1 <= dim")
    ):
        parse_spec("Flat", dim)


@pytest.mark.parametrize("dim", [2.0, True, None])
def test_parse_spec_dim_of_another_type(dim):
    with pytest.raises(
        TypeError, match=re.escape(f"dim must be a positive int, got {type(dim).__name__} {dim!r}")
    ):
        parse_spec("Flat", dim)


def test_parse_spec_not_a_string():
    with pytest.raises(TypeError, match="index_factory string, got int"):
        parse_spec(42, 8)


def test_search_params_validation():
    ivf = parse_spec("IVF4,Flat", 8)
    hnsw = parse_spec("HNSW8", 8)
    flat = parse_spec("Flat", 8)
    assert check_search_params(ivf, {"nprobe": 3, "efSearch": None}) == {"nprobe": 3}
    assert check_search_params(hnsw, {"efSearch": 40}) == {"efSearch": 40}
    with pytest.raises(ValueError, match=r"nprobe must be a positive int, got 0"):
        check_search_params(ivf, {"nprobe": 0})
    with pytest.raises(TypeError, match=r"nprobe must be a positive int, got float 2\.5"):
        check_search_params(ivf, {"nprobe": 2.5})
    with pytest.raises(ValueError, match=r"efSearch=16 does not apply to index 'IVF4,Flat'"):
        check_search_params(ivf, {"efSearch": 16})
    with pytest.raises(ValueError, match=r"nprobe=4 does not apply to index 'Flat' \(it accepts none\)"):
        check_search_params(flat, {"nprobe": 4})
    with pytest.raises(ValueError, match=r"unknown search parameter 'nlist'"):
        check_search_params(ivf, {"nlist": 8})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"spec": "HNSW8", "nprobe": 2}, "nprobe=2 does not apply to index 'HNSW8'"),
        ({"spec": "IVF4,Flat", "efSearch": 8}, "efSearch=8 does not apply"),
        ({"retrain_factor": 1.0}, r"retrain_factor must be a finite number in \(1\.0, .*\], got 1\.0"),
        ({"retrain_factor": float("nan")}, "retrain_factor must be a finite number in"),
        ({"min_train_points": -1}, r"min_train_points must be an int >= 0, got -1 "),
        ({"train_sample": 0}, r"train_sample must be a positive int, got 0 "),
        ({"chunk_size": 0}, r"chunk_size must be a positive int, got 0"),
        ({"device": "tpu"}, r"device 'tpu'"),
    ],
)
def test_streaming_index_bad_options(kwargs, match):
    kwargs = {"spec": "Flat", **kwargs}
    with pytest.raises(ValueError, match=match):
        StreamingIndex(8, **kwargs)


def test_streaming_index_spec_dim_mismatch():
    with pytest.raises(ValueError, match=r"spec was parsed for dim=8, but dim=16"):
        StreamingIndex(16, parse_spec("Flat", 8))


@pytest.mark.parametrize("k", [0, -2])
def test_check_k_values(k):
    with pytest.raises(ValueError, match=rf"k must be a positive int, got {k} "):
        check_k(k)


@pytest.mark.parametrize("k", [1.5, True, "3", None])
def test_check_k_types(k):
    with pytest.raises(TypeError, match=r"k must be a positive int, got"):
        check_k(k)


def test_check_k_accepts_numpy_ints_and_names_the_argument():
    assert check_k(np.int64(3)) == 3
    with pytest.raises(ValueError, match=r"top_k must be a positive int, got 0 "):
        check_k(0, "top_k")


# ---------------------------------------------------------------------- exact search
def test_flat_equals_torch_topk_across_chunks(monkeypatch):
    monkeypatch.setattr(chunked, "FIRST_CHUNK", 8)
    g = torch.Generator().manual_seed(0)
    idx = StreamingIndex(12, "Flat", chunk_size=32)
    added = []
    for n in (5, 3, 17, 1, 40, 9):
        x = torch.randn(n, 12, generator=g)
        idx.add(x)
        added.append(x)
    keys = torch.cat(added)
    assert len(idx) == idx.ntotal == keys.shape[0]
    assert len(idx._store.chunks) > 2  # the merge over chunks is exercised
    assert torch.equal(idx.keys(), keys)
    queries = torch.randn(7, 12, generator=g)
    for k in (1, 4, 20, keys.shape[0]):
        scores, ids = idx.search(queries, k)
        ref_scores, ref_ids = topk_reference(queries, keys, k)
        assert scores.dtype == torch.float32 and ids.dtype == torch.int64
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=1e-5)


def test_growth_never_moves_stored_keys(monkeypatch):
    monkeypatch.setattr(chunked, "FIRST_CHUNK", 4)
    idx = StreamingIndex(4, "Flat", chunk_size=16)
    idx.add(torch.randn(3, 4))
    first = idx._store.chunks[0].data_ptr()
    for _ in range(30):
        idx.add(torch.randn(3, 4))
    assert idx._store.chunks[0].data_ptr() == first  # appended, never copied into a bigger buffer
    assert all(c.shape[0] <= 16 for c in idx._store.chunks)
    assert sum(idx._store.fills) == len(idx) == 93


@pytest.mark.parametrize("spec", ["Flat", "IVF4,Flat", "HNSW8"])
def test_k_above_ntotal_gives_empty_slots(spec):
    g = torch.Generator().manual_seed(1)
    idx = StreamingIndex(8, spec, **({"nprobe": 4} if spec.startswith("IVF") else {}))
    n = 200
    idx.add(torch.randn(n, 8, generator=g))
    assert idx.uses_index is (spec != "Flat")
    scores, ids = idx.search(torch.randn(3, 8, generator=g), n + 6)
    assert scores.shape == ids.shape == (3, n + 6)
    assert bool((ids[:, n:] == -1).all())
    assert bool(torch.isneginf(scores[:, n:]).all())
    found = ids[:, :n]
    if spec != "HNSW8":  # IVF with every list probed and Flat return every key
        assert all(sorted(row.tolist()) == list(range(n)) for row in found)
    assert bool(torch.isfinite(scores[ids >= 0]).all())
    assert bool(torch.isneginf(scores[ids < 0]).all())


def test_empty_index_search_is_defined():
    idx = StreamingIndex(8, "IVF4,Flat")
    scores, ids = idx.search(torch.randn(2, 8), 5)
    assert scores.shape == ids.shape == (2, 5)
    assert bool((ids == -1).all()) and bool(torch.isneginf(scores).all())
    scores, ids = idx.search(torch.randn(0, 8), 5)
    assert scores.shape == ids.shape == (0, 5)


# ---------------------------------------------------------------------- training policy
def test_ivf_stays_exact_below_min_train_points_then_trains():
    g = torch.Generator().manual_seed(2)
    idx = StreamingIndex(8, "IVF4,Flat", nprobe=4)
    need = idx.min_train_points
    assert need == POINTS_PER_CENTROID * 4
    keys = torch.randn(need, 8, generator=g)
    queries = torch.randn(5, 8, generator=g)
    idx.add(keys[:100])
    idx.add(keys[100 : need - 1])
    assert not idx.uses_index and idx.trainings == 0 and idx.trained_at == 0
    _, ids = idx.search(queries, 10)
    assert torch.equal(ids, topk_reference(queries, keys[: need - 1], 10)[1])
    idx.add(keys[need - 1 :])
    assert idx.uses_index and idx.trainings == 1 and idx.trained_at == need
    assert isinstance(faiss.extract_index_ivf(idx._index), faiss.IndexIVF)
    assert idx._index.ntotal == need
    # every list probed: the trained IVF is exact, with the same (insertion-order) ids
    _, ids = idx.search(queries, 10)
    assert torch.equal(ids, topk_reference(queries, keys, 10)[1])


def test_min_train_points_can_be_raised_not_lowered():
    assert StreamingIndex(8, "IVF4,Flat", min_train_points=500).min_train_points == 500
    assert StreamingIndex(8, "IVF4,Flat", min_train_points=10).min_train_points == 156


@pytest.mark.parametrize("factor", [4.0, 2])
def test_retrains_when_memory_grows_by_retrain_factor(factor):
    g = torch.Generator().manual_seed(3)
    idx = StreamingIndex(8, "IVF4,Flat", nprobe=4, retrain_factor=factor)
    history = []
    for step in range(15):
        before = centroids(idx) if idx.uses_index else None
        trainings = idx.trainings
        # the second half of the stream drifts away from the first
        idx.add(torch.randn(120, 8, generator=g) + (3.0 if step >= 8 else 0.0))
        if idx.trainings != trainings:
            history.append(idx.ntotal)
            assert idx.trained_at == idx.ntotal
            if before is not None:
                assert not np.allclose(before, centroids(idx))  # trained afresh, not kept
        else:
            assert idx.trained_at == (history[-1] if history else 0)
    # first training at the first add reaching 156 keys (180), then whenever ntotal >= factor * trained_at
    expected, trained = [], 0
    for n in range(120, 120 * 16, 120):
        if (trained == 0 and n >= 156) or (trained and n >= factor * trained):
            expected.append(n)
            trained = n
    assert history == expected
    assert idx.trainings == len(expected) >= 2
    queries = torch.randn(4, 8, generator=g)
    assert torch.equal(idx.search(queries, 7)[1], topk_reference(queries, idx.keys(), 7)[1])


def test_retrain_factor_none_trains_once():
    idx = StreamingIndex(8, "IVF4,Flat", retrain_factor=None)
    for _ in range(12):
        idx.add(torch.randn(100, 8))
    assert idx.trainings == 1 and idx.trained_at == 200


def test_hnsw_grows_in_place_without_retraining():
    idx = StreamingIndex(8, "HNSW8")
    idx.add(torch.randn(50, 8))
    built = idx._index
    for _ in range(20):
        idx.add(torch.randn(50, 8))
    assert idx._index is built  # no rebuild: HNSW takes keys incrementally and needs no training
    assert idx._index.ntotal == len(idx) == 1050
    assert idx.trainings == 0


def test_reset_drops_keys_and_training():
    idx = StreamingIndex(8, "IVF4,Flat")
    idx.add(torch.randn(300, 8))
    assert idx.uses_index
    idx.reset()
    assert len(idx) == 0 and not idx.uses_index and idx.trained_at == 0
    assert bool((idx.search(torch.randn(1, 8), 3)[1] == -1).all())
    idx.add(torch.randn(20, 8))
    assert not idx.uses_index and len(idx) == 20


# ---------------------------------------------------------------------- recall on clustered keys
@pytest.fixture(scope="module")
def clustered():
    keys, _, queries = make_memory(
        "clustered", num_heads=1, head_dim=16, n_keys=4096, n_queries=128, clusters=64, seed=0
    )
    keys, queries = keys[0, 0], queries[0, 0]
    return keys, queries, topk_reference(queries, keys, 10)[1]


def with_search_params(index: StreamingIndex, **params) -> StreamingIndex:
    """The same keys and trained index with other search knobs (through state / from_state)."""
    return StreamingIndex.from_state({**index.state(), "search_params": params})


def test_ivf_recall_nprobe_sweep(clustered):
    keys, queries, ref = clustered
    # measured on this data: 0.86 / 0.93 / 0.99 / 1.00 / 1.00 (nprobe 1 / 2 / 4 / 8 / 32)
    bounds = {1: 0.70, 2: 0.80, 4: 0.90, 8: 0.95, 32: 1.0}
    trained = StreamingIndex(16, "IVF32,Flat")
    trained.add(keys)
    assert trained.uses_index and trained.trainings == 1
    recalls = {}
    for nprobe in bounds:
        idx = with_search_params(trained, nprobe=nprobe)
        assert faiss.extract_index_ivf(idx._index).nprobe == nprobe
        recalls[nprobe] = recall_at_k(idx.search(queries, 10)[1], ref)
    print("IVF32,Flat recall@10 by nprobe:", recalls)
    for nprobe, bound in bounds.items():
        assert recalls[nprobe] >= bound, (nprobe, recalls)
    values = list(recalls.values())
    assert values == sorted(values)  # probing more lists never loses a neighbour
    assert recalls[1] < 1.0  # the approximation is real: one list of 32 misses neighbours


def test_hnsw_recall(clustered):
    keys, queries, ref = clustered
    # measured on this data: about 0.97 (efSearch 16) and 0.99 (efSearch 64)
    built = StreamingIndex(16, "HNSW16", efSearch=16)
    built.add(keys)
    recalls = {}
    for ef, bound in ((16, 0.90), (64, 0.95)):
        idx = with_search_params(built, efSearch=ef)
        assert idx._index.hnsw.efSearch == ef
        recalls[ef] = recall_at_k(idx.search(queries, 10)[1], ref)
        assert recalls[ef] >= bound, recalls
    print("HNSW16 recall@10 by efSearch:", recalls)


# ---------------------------------------------------------------------- copies and persistence
def test_state_round_trip_keeps_training():
    g = torch.Generator().manual_seed(5)
    idx = StreamingIndex(8, "IVF4,Flat", nprobe=2)
    for _ in range(9):
        idx.add(torch.randn(100, 8, generator=g))
    assert idx.trainings == 2 and idx.trained_at == 800
    state = idx.state()
    back = StreamingIndex.from_state(state)
    assert (back.trainings, back.trained_at, back.ntotal) == (2, 800, 900)
    assert back.search_params == {"nprobe": 2}
    np.testing.assert_array_equal(centroids(back), centroids(idx))
    queries = torch.randn(6, 8, generator=g)
    for a, b in zip(idx.search(queries, 9), back.search(queries, 9), strict=True):
        assert torch.equal(a, b)
    # the loaded index carries on with the same policy: no retraining until 4 x 800 keys
    more = torch.randn(100, 8, generator=g)
    idx.add(more)
    back.add(more)
    assert back.trainings == idx.trainings == 2
    for a, b in zip(idx.search(queries, 9), back.search(queries, 9), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("spec", ["Flat", "HNSW8"])
def test_state_round_trip_untrained_specs(spec):
    idx = StreamingIndex(8, spec)
    idx.add(torch.randn(64, 8))
    back = StreamingIndex.from_state(idx.state())
    queries = torch.randn(3, 8)
    for a, b in zip(idx.search(queries, 5), back.search(queries, 5), strict=True):
        assert torch.equal(a, b)


def test_from_state_rejects_inconsistent_state():
    flat = StreamingIndex(8, "Flat")
    flat.add(torch.randn(300, 8))
    state = flat.state()
    with pytest.raises(ValueError, match=r"saved keys must be \[n, 8\], got torch.Size\(\[300, 7\]\)"):
        StreamingIndex.from_state({**state, "keys": state["keys"][:, :7]})
    with pytest.raises(ValueError, match=r"saved keys hold 299 rows, but the saved count is 300"):
        StreamingIndex.from_state({**state, "keys": state["keys"][:299]})
    idx = StreamingIndex(8, "IVF4,Flat")
    idx.add(torch.randn(300, 8))
    state = idx.state()
    assert state["keys"] is None  # IVF,Flat codes are the keys: no second copy is saved
    with pytest.raises(ValueError, match=r"saved index holds 300 keys but 299 keys were saved"):
        StreamingIndex.from_state({**state, "ntotal": 299})
    with pytest.raises(ValueError, match=r"saved 'IVF4,Flat' index cannot be read"):
        StreamingIndex.from_state({**state, "index": state["index"][: len(state["index"]) // 2]})


@pytest.mark.parametrize("spec", ["Flat", "IVF4,Flat", "HNSW8"])
def test_clone_is_independent(spec):
    g = torch.Generator().manual_seed(6)
    idx = StreamingIndex(8, spec)
    idx.add(torch.randn(300, 8, generator=g))
    copy = idx.clone()
    assert (copy.trainings, copy.trained_at, copy.uses_index) == (
        idx.trainings,
        idx.trained_at,
        idx.uses_index,
    )
    queries = torch.randn(4, 8, generator=g)
    before = idx.search(queries, 5)
    copy.add(torch.randn(50, 8, generator=g) * 10)  # big keys that would win every search
    assert len(idx) == 300 and len(copy) == 350
    for a, b in zip(before, idx.search(queries, 5), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(copy.search(queries, 5)[1], before[1])
    idx.reset()
    assert len(copy) == 350 and copy.uses_index is (spec != "Flat")


# ---------------------------------------------------------------------- threads
def test_fan_out_equals_sequential():
    g = torch.Generator().manual_seed(7)
    heads = []
    for spec in ("Flat", "IVF4,Flat", "HNSW8", "Flat"):
        ix = StreamingIndex(8, spec)
        ix.add(torch.randn(250, 8, generator=g))
        heads.append((ix, torch.randn(33, 8, generator=g)))

    def search(job):
        ix, q = job
        return ix.search(q, 6)

    sequential = [search(job) for job in heads]
    pooled = fan_out(search, heads, workers=2)
    assert len(pooled) == len(sequential)
    for (s1, i1), (s2, i2) in zip(sequential, pooled, strict=True):
        assert torch.equal(i1, i2)
        torch.testing.assert_close(s1, s2, atol=1e-6, rtol=1e-6)
    assert fan_out(lambda x: x * x, range(9), workers=2) == [x * x for x in range(9)]
    assert fan_out(lambda x: x, [], workers=2) == []


def test_fan_out_runs_faiss_single_threaded_per_worker():
    def probe(_):
        return threading.current_thread().name, faiss.omp_get_max_threads()

    with faiss_threads(2):
        out = fan_out(probe, range(6), workers=2)
        assert all(name.startswith("faiss-head") for name, _ in out)
        assert [n for _, n in out] == [1] * 6
        # one item: runs in the calling thread with Faiss's full thread count
        ((name, n),) = fan_out(probe, [0], workers=2)
        assert name == threading.current_thread().name and n == 2
        assert faiss.omp_get_max_threads() == 2  # the caller's setting is untouched


def test_faiss_threads_restores_and_validates():
    before = faiss.omp_get_max_threads()
    with faiss_threads(1):
        assert faiss.omp_get_max_threads() == 1
    assert faiss.omp_get_max_threads() == before
    with pytest.raises(ValueError, match=r"n \(Faiss threads\) must be a positive int, got 0"):
        set_faiss_threads(0)


def _faiss_in_forked_child(queue):
    x = np.random.default_rng(0).random((20000, 32), dtype=np.float32)
    d, _ = faiss.knn(x[:2000], x, 4)
    queue.put((math.isfinite(float(d.sum())), fan_out(lambda _: faiss.omp_get_max_threads(), range(3), 2)))


def test_forked_child_can_use_faiss():
    # Faiss (OpenMP) used with several threads, then fork: without the fork hook the child hangs.
    x = np.random.default_rng(1).random((20000, 32), dtype=np.float32)
    with faiss_threads(2):
        faiss.knn(x[:2000], x, 4)
        ctx = mp.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_faiss_in_forked_child, args=(queue,))
        child.start()
        child.join(30)
        if child.exitcode is None:
            child.kill()
            child.join()
            pytest.fail("a child forked after multi-threaded Faiss use hung in Faiss")
    assert child.exitcode == 0
    assert queue.get(timeout=5) == (True, [1, 1, 1])


def test_set_search_params_in_place_equals_a_rebuilt_index(clustered):
    keys, queries, _ = clustered
    index = StreamingIndex(16, "IVF32,Flat", nprobe=1)
    index.add(keys)
    rebuilt = with_search_params(index, nprobe=8)
    index.set_search_params(nprobe=8)
    assert index.search_params == {"nprobe": 8} and index.trainings == 1
    a, b = index.search(queries, 10), rebuilt.search(queries, 10)
    assert torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match=r"efSearch=16 does not apply to index 'IVF32,Flat'"):
        index.set_search_params(efSearch=16)
    with pytest.raises(ValueError, match="nprobe must be a positive int, got 0"):
        index.set_search_params(nprobe=0)
    assert index.search_params == {"nprobe": 8}
