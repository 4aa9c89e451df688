"""The "auto" index: its growth policy, the box-bound IVF, keys stored once, and the byte accounting."""

from __future__ import annotations

import math

import faiss
import numpy as np
import pytest
import torch

import knn_memory
from indexes import GrowthPolicy, StreamingIndex
from indexes.bounded_ivf import BoundedIVF
from indexes.inverted_lists import segment_table

D = 8


def bf16_keys(n: int, seed: int, d: int = D) -> torch.Tensor:
    """Clustered float32 keys that are exact in bfloat16 (what the backends hand to an index)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(16, d, generator=g) * 3
    x = centers[torch.randint(0, 16, (n,), generator=g)] + torch.randn(n, d, generator=g)
    return x.to(torch.bfloat16).to(torch.float32)


# ---------------------------------------------------------------------- the policy
def test_policy_schedule_lists_and_sample():
    p = GrowthPolicy(
        exact_until=1000,
        lists_per_sqrt=2.0,
        regrow_factor=2.0,
        train_per_list=32,
        max_train_sample=5000,
        min_lists=4,
        max_lists=100,
    )
    assert p.next_build(0) == 1000  # exact until then
    assert p.next_build(1000) == 2000 and p.next_build(2001) == 4002  # rebuilt at every doubling
    assert p.lists_for(1000) == round(2 * math.sqrt(1000)) == 63
    assert p.lists_for(4000) == 100  # capped by max_lists
    assert p.lists_for(3) == 3  # never more lists than keys
    assert p.lists_for(9) == 6 and GrowthPolicy(min_lists=10).lists_for(16) == 10
    assert p.train_size(100_000, 63) == 32 * 63  # per list...
    assert (
        p.train_size(100_000, 100) == 3200 and GrowthPolicy(max_train_sample=500).train_size(10**6, 64) == 500
    )
    assert p.train_size(50, 63) == 50  # ...never more than there are
    assert p.nprobe_for(3) == 3 and p.nprobe_for(1000) == p.nprobe


@pytest.mark.parametrize(
    ("field", "value", "error", "match"),
    [
        (
            "exact_until",
            0,
            ValueError,
            r"exact_until must be a positive int, got 0 \(expected 1 <= exact_until",
        ),
        (
            "exact_until",
            2**41,
            ValueError,
            r"exact_until must be a positive int, got 2199023255552 \(expected 1 <=",
        ),
        ("exact_until", True, TypeError, "exact_until must be a positive int, got bool"),
        (
            "nprobe",
            2**31,
            ValueError,
            r"nprobe must be a positive int, got 2147483648 \(expected 1 <= nprobe <= 65536\)",
        ),
        (
            "regrow_factor",
            1.0,
            ValueError,
            r"regrow_factor must be a finite number in \(1.0, 1024.0\], got 1.0",
        ),
        (
            "lists_per_sqrt",
            float("nan"),
            ValueError,
            r"lists_per_sqrt must be a finite number in \(0.0, 1024.0\], got nan",
        ),
        ("max_lists", 2, ValueError, r"max_lists must be an int >= 16, got 2"),
        ("rank_shrink", 0.0, ValueError, r"rank_shrink must be a finite number in \(0.0, 1.0\], got 0.0"),
        ("rank_shrink", 1.5, ValueError, r"rank_shrink must be a finite number in \(0.0, 1.0\], got 1.5"),
    ],
)
def test_policy_refuses_bad_values(field, value, error, match):
    with pytest.raises(error, match=match):
        GrowthPolicy(**{field: value})


def test_auto_switches_at_exact_until_and_regrows_lists_with_sqrt_n():
    policy = GrowthPolicy(exact_until=600, lists_per_sqrt=1.0, regrow_factor=2.0, min_lists=2)
    idx = StreamingIndex(D, "auto", policy=policy, store_dtype=torch.bfloat16)
    keys = bf16_keys(5000, 0)
    history = []
    for begin in range(0, 5000, 100):
        idx.add(keys[begin : begin + 100])
        history.append((idx.ntotal, idx.uses_index, idx.nlist, idx.trained_at, idx.has_store))
    before = [h for h in history if h[0] < 600]
    assert all(not used and store for _, used, _, _, store in before)  # exact, keys in the store
    builds = sorted({h[3] for h in history if h[1]})
    assert builds == [600, 1200, 2400, 4800]  # at exact_until, then at each doubling
    for _n, used, lists, trained_at, store in history:
        if used:
            assert lists == policy.lists_for(trained_at) and not store  # keys live in the codes only
    assert idx.trainings == 4
    assert torch.equal(idx.keys(), keys)  # the codes give every key back exactly, in order


def test_auto_with_every_list_probed_equals_exact_search():
    keys = bf16_keys(3000, 1)
    idx = StreamingIndex(D, "auto", policy=GrowthPolicy(exact_until=500), store_dtype=torch.bfloat16)
    idx.add(keys)
    assert idx.uses_index
    idx.set_search_params(nprobe=idx.nlist)
    queries = torch.randn(20, D, generator=torch.Generator().manual_seed(2))
    scores, ids = idx.search(queries, 3000)
    ref_scores, _ref_ids = torch.topk(queries @ keys.T, 3000, dim=1)
    torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=1e-5)
    # scores are the exact inner products of the ids returned (the codes are the keys)
    exact = torch.gather(queries @ keys.T, 1, ids)
    torch.testing.assert_close(scores, exact, atol=1e-4, rtol=1e-5)


def test_box_bounds_hold_every_key_and_bound_every_score():
    keys = bf16_keys(4000, 3).numpy()
    ivf = BoundedIVF.build(keys, keys[:1000], 20, torch.bfloat16, niter=5)
    lists = ivf.assign(torch.from_numpy(keys))
    k = torch.from_numpy(keys)
    assert bool((k <= ivf.hi[lists]).all()) and bool((k >= ivf.lo[lists]).all())
    assert torch.equal(ivf.counts, ivf.lists.sizes()) and int(ivf.counts.sum()) == 4000
    q = torch.randn(10, D, generator=torch.Generator().manual_seed(4))
    bounds, ranked = ivf.rank_lists(q, 20)
    best = torch.full((10, 20), -torch.inf)
    best = best.scatter_reduce(1, lists[None].expand(10, -1), q @ k.T, reduce="amax")
    assert bool((torch.gather(best, 1, ranked) <= bounds + 1e-4).all())


def test_box_bound_ranking_finds_what_centroid_ranking_misses():
    """Queries out of the keys' distribution: a plain IVF ranks lists by q·centroid and misses."""
    g = torch.Generator().manual_seed(5)
    keys = (torch.randn(6000, D, generator=g) * torch.tensor([4.0] + [1.0] * (D - 1))).bfloat16().float()
    queries = torch.zeros(50, D)
    queries[:, 1] = 1.0 + 0.1 * torch.randn(50, generator=g)  # look along a low-variance channel
    exact = torch.topk(queries @ keys.T, 10, dim=1).indices
    ivf = BoundedIVF.build(keys.numpy(), keys[:3000].numpy(), 64, torch.bfloat16, niter=10)
    ivf.nprobe = 4
    _, ids = ivf.search(queries.numpy(), 10)
    quantizer = faiss.IndexFlatL2(D)
    quantizer.add(ivf.centroids.numpy())  # the same lists, ranked by q·centroid
    plain = faiss.IndexIVFScalarQuantizer(
        quantizer, D, 64, faiss.ScalarQuantizer.QT_bf16, faiss.METRIC_INNER_PRODUCT, False
    )
    plain.is_trained = True
    plain.add(keys.numpy())
    plain.nprobe = 4
    _, plain_ids = plain.search(queries.numpy(), 10)

    def recall(got: np.ndarray) -> float:
        return float((torch.from_numpy(got)[:, :, None] == exact[:, None, :]).any(-1).float().mean())

    assert recall(ids) > recall(plain_ids) + 0.2


def test_auto_state_round_trip_and_clone_keep_searching_alike():
    keys = bf16_keys(2500, 6)
    idx = StreamingIndex(
        D, "auto", policy=GrowthPolicy(exact_until=1000), store_dtype=torch.bfloat16, nprobe=3
    )
    idx.add(keys)
    back = StreamingIndex.from_state(idx.state())
    copy = idx.clone()
    q = torch.randn(7, D, generator=torch.Generator().manual_seed(7))
    ref = idx.search(q, 5)
    for other in (back, copy):
        assert (other.nlist, other.trainings, other.trained_at) == (idx.nlist, idx.trainings, idx.trained_at)
        got = other.search(q, 5)
        assert torch.equal(got[1], ref[1]) and torch.equal(got[0], ref[0])
    copy.add(keys[:10] * 50)  # grows the copy only
    assert idx.ntotal == 2500 and copy.ntotal == 2510
    state = idx.state()
    bad = {**state, "index": {**state["index"], "counts": state["index"]["counts"] + 1}}
    with pytest.raises(ValueError, match="list counts do not match"):
        StreamingIndex.from_state(bad)
    nan = state["index"]["bounds"].clone()
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="bounds contain NaN"):
        StreamingIndex.from_state({**state, "index": {**state["index"], "bounds": nan}})


# ---------------------------------------------------------------------- backend and bytes
def test_faiss_backend_auto_options_are_checked():
    geometry = {"num_heads": 2, "head_dim": D}
    mem = knn_memory.create_backend("faiss", **geometry, index="auto", exact_until=100, nprobe=4)
    assert mem.index == "auto" and mem.config()["exact_until"] == 100 and mem.config()["nprobe"] == 4
    with pytest.raises(ValueError, match=r"\['exact_until'\] configure index='auto' only"):
        knn_memory.create_backend("faiss", **geometry, index="Flat", exact_until=100)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['bogus'\]"):
        knn_memory.create_backend("faiss", **geometry, index="auto", bogus=1)
    with pytest.raises(ValueError, match="train_sample=10 does not apply to index='auto'"):
        knn_memory.create_backend("faiss", **geometry, index="auto", train_sample=10)
    assert knn_memory.search_knobs("auto", D) == ("nprobe",)


def held_bytes(mem) -> int:
    """Bytes of what a Faiss backend holds, counted from the arrays themselves."""
    total = 0
    for b in range(mem.batch_size):
        total += sum(v.numel() * v.element_size() for v in mem._values[b].views())
        for h in range(mem.num_heads):
            ix = mem.head_index(b, h)
            if ix.has_store:
                total += sum(v.numel() * v.element_size() for v in ix._store.views())
            index = ix._index
            if isinstance(index, BoundedIVF):
                room = int(index.lists.capacities().sum())  # keys the lists have room for
                assert room >= index.ntotal
                # bf16 codes + int32 ids, list headers and their tables of segments
                tables = sum(segment_table(int(n)) for n in index.lists.segments())
                total += room * (D * 2 + 4) + index.nlist * 48 + tables * 16
                # centroids (transposed) and their half norms, padded to whole blocks of 16 lists
                padded = -(-index.nlist // 16) * 16
                assert index._quantizer._ct.shape == (D, padded) and index._quantizer._hn.shape == (padded,)
                total += padded * (D + 1) * 4
                total += index.bounds.numel() * 4 + index.counts.numel() * 8
    return total


@pytest.mark.parametrize("index", ["Flat", "auto"])
def test_nbytes_counts_the_arrays_held_and_is_near_dense(index):
    opts = {"exact_until": 300} if index == "auto" else {}
    mem = knn_memory.create_backend("faiss", num_heads=2, head_dim=D, batch_size=2, index=index, **opts)
    dense = knn_memory.create_backend("exact", num_heads=2, head_dim=D, batch_size=2)
    g = torch.Generator().manual_seed(8)
    for _ in range(20):
        k, v = torch.randn(2, 2, 64, D, generator=g), torch.randn(2, 2, 64, D, generator=g)
        mem.add(k, v)
        dense.add(k, v)
        assert mem.nbytes == held_bytes(mem)
    assert mem.head_index(0, 0).uses_index is (index == "auto")
    # keys once, in bf16 (Flat) or in bf16 codes + 4-byte ids (auto), beside bf16 values; the lists'
    # centroids (and norms), bounds, counts and headers on top
    values = 2 * 1280 * 2 * D * 2
    if index == "Flat":
        assert mem.nbytes == values + 2 * 1280 * 2 * D * 2
    else:
        lists = sum(mem.head_index(b, h).nlist for b in range(2) for h in range(2))
        padded = sum(-(-mem.head_index(b, h).nlist // 16) * 16 for b in range(2) for h in range(2))
        fixed = values + lists * (2 * D * 4 + 8 + 48) + padded * (D + 1) * 4
        per_key = D * 2 + 4
        # at least every key; unused room at most an eighth of the keys plus under two blocks per list,
        # and a table of 4 segments per list (one reserved at the build, one per growth step since)
        segments = [mem.head_index(b, h)._index.lists.segments() for b in range(2) for h in range(2)]
        assert max(int(x.max()) for x in segments) <= 4
        assert fixed + 2 * 2 * 1280 * per_key <= mem.nbytes
        assert mem.nbytes <= fixed + (2 * 2 * 1280 * 1.125 + lists * 31) * per_key + lists * 4 * 16
    if index == "Flat":
        assert mem.nbytes <= dense.nbytes


def test_decode_all_widens_block_by_block_into_id_order(monkeypatch):
    """A rebuild decodes every key to float32 a block at a time: the keys come back exactly, in id
    order, whatever the block size (here 7 keys, so blocks end inside lists)."""
    import indexes.bounded_ivf as bounded_ivf

    g = torch.Generator().manual_seed(11)
    keys = torch.randn(300, 8, generator=g).to(torch.bfloat16).to(torch.float32)
    ivf = BoundedIVF.build(keys.numpy(), keys[:64].numpy(), 5, torch.bfloat16, 4)
    monkeypatch.setattr(bounded_ivf, "ASSIGN_BLOCK", 7)
    assert torch.equal(torch.from_numpy(ivf.decode_all()), keys)
