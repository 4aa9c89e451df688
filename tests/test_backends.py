"""Memory backends and memory attention against a plain-torch transcription of upstream LongLLaMA.

``upstream_attention`` below is written from upstream's ``LongLlamaAttention.forward`` (one softmax over
[local ; memory], each block clamped at max(finfo.min, -1e6), fp32 softmax, memory mask additive
``finfo.min``), on dense tensors, without any library code. Everything else is compared with it.
The contract every backend follows (ids, padding, reset, reorder, persistence...) is tested over every
registered backend in ``test_backend_contract.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import indexes.chunked as chunked
import knn_memory
import knn_memory.backends.faiss_index as faiss_backend
from knn_memory import ExactBackend, create_backend, memory_attention

MEM_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


# ---------------------------------------------------------------------- the reference
def upstream_attention(
    query, local_keys, local_values, local_mask, mem_keys, mem_values, mem_valid, mem_dtype, top_k=None
):
    """Upstream memory-layer attention on dense tensors.

    Args:
        query, local_keys, local_values: [B, H, q|n, d]; local_mask: additive [B, 1, q, n] or None.
        mem_keys, mem_values: [B, H, M, d] every entry ever added (padding included), any dtype.
        mem_valid: [B, M] bool, False for padding.
        top_k: None for upstream's dense memory; an int keeps only the top_k real entries of each query
            (by raw q·k), the kNN variant.
    """
    dtype = query.dtype
    d = query.shape[-1]
    floor = max(torch.finfo(dtype).min, -1e6)
    mk = mem_keys.to(mem_dtype).to(dtype)  # stored in mem_dtype, cast back at attention time
    mv = mem_values.to(mem_dtype).to(dtype)
    local = torch.matmul(query, local_keys.transpose(2, 3)) / math.sqrt(d)
    if local_mask is not None:
        local = local + local_mask
    local = torch.max(local, torch.tensor(floor, dtype=dtype))
    mem_mask = torch.zeros(mem_valid.shape, dtype=dtype).masked_fill(~mem_valid, torch.finfo(dtype).min)
    raw = torch.matmul(query, mk.transpose(2, 3))
    mem = raw / math.sqrt(d) + mem_mask[:, None, None, :]
    mem = torch.max(mem, torch.tensor(floor, dtype=dtype))
    if top_k is not None:
        real = mem_valid[:, None, None, :].expand_as(raw)
        ranked = raw.masked_fill(~real, -math.inf)
        keep = torch.zeros_like(real).scatter(
            -1, torch.topk(ranked, min(top_k, raw.shape[-1]), -1).indices, True
        )
        mem = mem.masked_fill(~(keep & real), -math.inf)  # not retrieved: not in the softmax at all
    probs = torch.softmax(torch.cat([local, mem], dim=-1), dim=-1, dtype=torch.float32).to(dtype)
    return torch.matmul(probs, torch.cat([local_values, mv], dim=-2))  # one matmul over [V_local ; V_mem]


def topk_ids_reference(queries, mem_keys, mem_valid, mem_dtype, k):
    """[B, H, q, k'] ids (counting real entries only) of the top-k real entries by raw q·k, k' = min(k, real)."""
    mk = mem_keys.to(mem_dtype).to(torch.float64)
    raw = torch.matmul(queries.double(), mk.transpose(2, 3)).masked_fill(
        ~mem_valid[:, None, None, :], -math.inf
    )
    real_ids = mem_valid.cumsum(-1) - 1
    out = []
    for b in range(queries.shape[0]):
        n_real = int(mem_valid[b].sum())
        pos = torch.topk(raw[b], min(k, n_real), dim=-1).indices
        out.append(real_ids[b][pos])
    return out


# ---------------------------------------------------------------------- generated cases
@st.composite
def cases(draw):
    B = draw(st.integers(1, 2))
    H = draw(st.integers(1, 3))
    d = draw(st.sampled_from([4, 5, 8, 16]))
    windows = draw(st.lists(st.integers(1, 9), min_size=1, max_size=4))
    pad_rate = draw(st.sampled_from([0.0, 0.3, 0.7]))
    q = draw(st.integers(1, 6))
    n_local = draw(st.integers(1, 6))
    mem_dtype = draw(st.sampled_from(MEM_DTYPES))
    grouping = draw(st.one_of(st.none(), st.tuples(st.integers(1, H), st.integers(1, q))))
    seed = draw(st.integers(0, 2**31 - 1))
    return B, H, d, windows, pad_rate, q, n_local, mem_dtype, grouping, seed


def make_case(B, H, d, windows, pad_rate, q, n_local, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    adds = []
    for n in windows:
        keys = torch.randn(B, H, n, d, generator=g)
        values = torch.randn(B, H, n, d, generator=g)
        mask = torch.rand(B, n, generator=g) >= pad_rate
        adds.append((keys, values, mask))
    query = torch.randn(B, H, q, d, generator=g).to(dtype)
    lk = torch.randn(B, H, n_local, d, generator=g).to(dtype)
    lv = torch.randn(B, H, n_local, d, generator=g).to(dtype)
    visible = torch.rand(B, 1, q, n_local, generator=g) > 0.4
    visible[..., torch.randint(0, n_local, (1,), generator=g)] = True  # every query sees a local key
    lmask = torch.zeros(B, 1, q, n_local, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
    return adds, (query, lk, lv, lmask)


def fill(backend, adds, dtype=torch.float32):
    for keys, values, mask in adds:
        backend.add(keys.to(dtype), values.to(dtype), mask)
    return backend


def stacked(adds):
    keys = torch.cat([k for k, _, _ in adds], dim=2)
    values = torch.cat([v for _, v, _ in adds], dim=2)
    valid = torch.cat([m for _, _, m in adds], dim=1)
    return keys, values, valid


def geometry(B, H, d, mem_dtype):
    return {"num_heads": H, "head_dim": d, "batch_size": B, "mem_dtype": mem_dtype}


# ---------------------------------------------------------------------- dense parity
@SETTINGS
@given(cases())
def test_exact_and_flat_match_upstream_dense(case):
    B, H, d, windows, pad_rate, q, n_local, mem_dtype, grouping, seed = case
    adds, (query, lk, lv, lmask) = make_case(B, H, d, windows, pad_rate, q, n_local, seed)
    mem_keys, mem_values, valid = stacked(adds)
    expected = upstream_attention(query, lk, lv, lmask, mem_keys, mem_values, valid, mem_dtype)

    exact = fill(create_backend("exact", **geometry(B, H, d, mem_dtype), chunk_size=7), adds)
    n_real = int(valid.sum(-1).max())
    flat = fill(
        create_backend("faiss", **geometry(B, H, d, mem_dtype), index="Flat", top_k=n_real + 3, workers=2),
        adds,
    )
    assert exact.lengths.tolist() == flat.lengths.tolist() == valid.sum(-1).tolist()
    for mem in (exact, flat):
        got = memory_attention(query, lk, lv, lmask, mem, grouping=grouping)
        assert got.shape == expected.shape and got.dtype == torch.float32
        assert (got - expected).abs().max().item() <= 1e-5, type(mem).__name__
        if grouping is not None:
            ungrouped = memory_attention(query, lk, lv, lmask, mem)
            assert (got - ungrouped).abs().max().item() <= 1e-6


@SETTINGS
@given(cases(), st.integers(1, 12))
def test_exact_topk_and_flat_match_topk_reference(case, k):
    B, H, d, windows, pad_rate, q, n_local, mem_dtype, grouping, seed = case
    adds, (query, lk, lv, lmask) = make_case(B, H, d, windows, pad_rate, q, n_local, seed)
    mem_keys, mem_values, valid = stacked(adds)
    expected = upstream_attention(query, lk, lv, lmask, mem_keys, mem_values, valid, mem_dtype, top_k=k)
    exact = fill(create_backend("exact", **geometry(B, H, d, mem_dtype), top_k=k, chunk_size=5), adds)
    flat = fill(create_backend("faiss", **geometry(B, H, d, mem_dtype), index="Flat", top_k=k), adds)
    ref_ids = topk_ids_reference(query, mem_keys, valid, mem_dtype, k)
    for mem in (exact, flat):
        got = memory_attention(query, lk, lv, lmask, mem, grouping=grouping)
        assert (got - expected).abs().max().item() <= 1e-5, type(mem).__name__
        hits = mem.search(query)
        assert hits.ids.shape == (B, H, q, k) and hits.scores.dtype == torch.float32
        for b in range(B):
            found = hits.ids[b, ..., : ref_ids[b].shape[-1]]
            # same entries as torch.topk (as sets: the order of equal scores is free)
            assert torch.equal(found.sort(-1).values, ref_ids[b].sort(-1).values)
            assert bool((hits.ids[b, ..., ref_ids[b].shape[-1] :] == -1).all())


def test_activation_dtypes_follow_upstream():
    # bf16 / fp16 activations: same formula, rounded in the activation dtype; both backends stay
    # within a few output ulps of the reference.
    for dtype in (torch.bfloat16, torch.float16):
        adds, (query, lk, lv, lmask) = make_case(2, 2, 16, [6, 5], 0.3, 4, 5, seed=11, dtype=dtype)
        mem_keys, mem_values, valid = stacked(adds)
        # the model's keys and values are in the activation dtype before memory rounds them to bf16
        mem_keys, mem_values = mem_keys.to(dtype), mem_values.to(dtype)
        expected = upstream_attention(query, lk, lv, lmask, mem_keys, mem_values, valid, torch.bfloat16)
        tol = 2 * torch.finfo(dtype).eps * float(expected.abs().max())  # measured: 1 ulp
        for name, extra in (("exact", {}), ("faiss", {"index": "Flat", "top_k": 64})):
            mem = fill(create_backend(name, **geometry(2, 2, 16, "bfloat16"), **extra), adds, dtype)
            got = memory_attention(query, lk, lv, lmask, mem)
            assert got.dtype == dtype
            assert (got.float() - expected.float()).abs().max().item() <= tol, (dtype, name)


def test_mem_dtype_rounding_happens_before_indexing():
    adds, _ = make_case(1, 2, 8, [5, 4], 0.0, 1, 1, seed=3)
    mem_keys, _, _ = stacked(adds)
    for mem_dtype in MEM_DTYPES:
        flat = fill(create_backend("faiss", **geometry(1, 2, 8, mem_dtype), index="Flat"), adds)
        for h in range(2):
            stored = flat.head_index(0, h).keys()
            assert torch.equal(stored, mem_keys[0, h].to(mem_dtype).float())
    default = create_backend("faiss", num_heads=1, head_dim=4)
    assert default.mem_dtype == torch.bfloat16  # upstream's default
    keys = torch.randn(1, 1, 3, 4)
    default.add(keys, keys)
    assert torch.equal(default.head_index(0, 0).keys(), keys[0, 0].bfloat16().float())
    assert not torch.equal(default.head_index(0, 0).keys(), keys[0, 0])


# ---------------------------------------------------------------------- ids, padding, empty slots
def test_ids_count_real_entries_and_minus_one_marks_empty():
    keys = torch.randn(2, 1, 6, 4)
    values = torch.randn(2, 1, 6, 4)
    mask = torch.tensor([[True, False, True, True, False, True], [False, False, True, False, False, False]])
    exact = create_backend("exact", **geometry(2, 1, 4, "float32"))
    exact.add(keys, values, mask)
    assert exact.lengths.tolist() == [4, 1] and len(exact) == 4
    hits = exact.search(torch.randn(2, 1, 3, 4))
    assert hits.dense and hits.values is None
    assert hits.ids[0, 0, 0].tolist() == [0, -1, 1, 2, -1, 3]
    assert hits.ids[1, 0, 2].tolist() == [-1, -1, 0, -1, -1, -1]
    assert bool(torch.isneginf(hits.scores[~mask[:, None, None, :].expand_as(hits.scores)]).all())

    flat = create_backend("faiss", **geometry(2, 1, 4, "float32"), index="Flat", top_k=5)
    flat.add(keys, values, mask)
    assert flat.lengths.tolist() == [4, 1]
    queries = torch.randn(2, 1, 3, 4)
    hits = flat.search(queries)
    assert sorted(hits.ids[0, 0, 0, :4].tolist()) == [0, 1, 2, 3]
    assert hits.ids[0, 0, 0, 4].item() == -1
    assert hits.ids[1, 0, 1].tolist() == [0, -1, -1, -1, -1]
    assert bool(torch.isneginf(hits.scores[hits.ids == -1]).all())
    assert bool((hits.values[hits.ids == -1] == 0).all())
    # retrieved values and scores belong to the entry named by the id
    real_keys, real_values = keys[0, 0, mask[0]], values[0, 0, mask[0]]
    for j in range(4):
        i = hits.ids[0, 0, 0, j].item()
        torch.testing.assert_close(hits.values[0, 0, 0, j], real_values[i])
        torch.testing.assert_close(hits.scores[0, 0, 0, j], queries[0, 0, 0] @ real_keys[i])


@pytest.mark.parametrize(("name", "extra"), [("exact", {}), ("exact", {"top_k": 3}), ("faiss", {"top_k": 3})])
def test_search_on_empty_memory_is_defined(name, extra):
    mem = create_backend(name, **geometry(1, 2, 4, "float32"), **extra)
    queries = torch.randn(1, 2, 5, 4)
    hits = mem.search(queries)
    if hits.dense:
        assert hits.scores.shape == (1, 2, 5, 0)
    else:
        assert hits.scores.shape == (1, 2, 5, 3) and hits.values.shape == (1, 2, 5, 3, 4)
        assert bool((hits.ids == -1).all()) and bool(torch.isneginf(hits.scores).all())
    probs = torch.softmax(hits.scores, -1).nan_to_num(0.0)
    assert hits.weighted_values(probs).shape == (1, 2, 5, 4)
    lk, lv = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    torch.testing.assert_close(
        memory_attention(queries, lk, lv, memory=mem), memory_attention(queries, lk, lv)
    )


# ---------------------------------------------------------------------- growth
def _outputs(mem, queries):
    """Memory-only attention output per row (what the model sees)."""
    empty = torch.empty(*queries.shape[:2], 0, queries.shape[-1])
    return memory_attention(queries, empty, empty, memory=mem)


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("exact", {}),
        ("exact", {"top_k": 4}),
        ("faiss", {"index": "Flat", "top_k": 4}),
        ("faiss", {"index": "IVF2,Flat", "top_k": 6, "nprobe": 2}),
    ],
)
def test_many_small_adds_equal_one_big_add(name, extra, monkeypatch):
    monkeypatch.setattr(chunked, "FIRST_CHUNK", 8)  # small chunks: growth crosses many of them
    monkeypatch.setattr(faiss_backend, "FIRST_VALUE_CHUNK", 8)
    monkeypatch.setattr(faiss_backend, "VALUE_CHUNK_BYTES", 16 * 2 * 8 * 4)
    g = torch.Generator().manual_seed(12)
    B, H, d = 2, 2, 8
    keys = torch.randn(B, H, 150, d, generator=g)
    values = torch.randn(B, H, 150, d, generator=g)
    mask = torch.rand(B, 150, generator=g) > 0.2
    opts = {**extra, **({"chunk_size": 16} if name == "exact" else {})}
    one = create_backend(name, **geometry(B, H, d, "float32"), **opts)
    one.add(keys, values, mask)
    many = create_backend(name, **geometry(B, H, d, "float32"), **opts)
    calls = []
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: calls.append(1) or real_cat(*a, **k))
    for i in range(0, 150, 3):
        many.add(keys[:, :, i : i + 3], values[:, :, i : i + 3], mask[:, i : i + 3])
    monkeypatch.setattr(torch, "cat", real_cat)
    assert calls == []  # appends into preallocated chunks, never concatenates the memory
    assert many.lengths.tolist() == one.lengths.tolist() == mask.sum(-1).tolist()
    queries = torch.randn(B, H, 5, d, generator=g)
    a, b = one.search(queries), many.search(queries)
    if name == "faiss" and "IVF" in extra.get("index", ""):
        assert many.head_index(0, 0).uses_index and many.head_index(0, 0).trainings >= 1
    else:
        assert torch.equal(a.ids, b.ids)
        torch.testing.assert_close(a.scores, b.scores)
    torch.testing.assert_close(_outputs(one, queries), _outputs(many, queries))


def test_exact_storage_is_chunked(monkeypatch):
    mem = create_backend("exact", **geometry(1, 1, 4, "float32"), chunk_size=8)
    mem.add(torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4))
    first = mem._keys.chunks[0].data_ptr()
    for _ in range(20):
        mem.add(torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4))
    assert mem._keys.chunks[0].data_ptr() == first
    assert len(mem._keys.chunks) == math.ceil(63 / 8) and mem.entries == 63


# ---------------------------------------------------------------------- threads, grouping, autograd
def test_thread_pool_search_equals_sequential():
    g = torch.Generator().manual_seed(13)
    B, H, d = 2, 3, 8
    keys, values = torch.randn(B, H, 300, d, generator=g), torch.randn(B, H, 300, d, generator=g)
    queries = torch.randn(B, H, 7, d, generator=g)
    mem = create_backend("faiss", **geometry(B, H, d, "float32"), index="IVF4,Flat", nprobe=2, top_k=5)
    mem.add(keys, values)
    assert mem.head_index(1, 2).uses_index
    mem.workers = 1  # one (row, head) after the other in this thread
    sequential = mem.search(queries)
    mem.workers = 2  # the thread pool
    pooled = mem.search(queries)
    assert torch.equal(sequential.ids, pooled.ids)
    torch.testing.assert_close(sequential.scores, pooled.scores, atol=1e-6, rtol=1e-6)
    assert torch.equal(sequential.values, pooled.values)


def test_default_fan_out_only_for_large_calls(monkeypatch):
    """Without ``workers``, a call fans out over (row, head) only with FAN_OUT_MIN queries or keys per
    (row, head); smaller calls run in the calling thread, one call per row (``add_many`` /
    ``search_many``: width 1 below). An explicit ``workers`` always applies."""
    import knn_memory.backends.faiss_index as fi

    widths = []
    real, add_many, search_many = fi.fan_out, fi.add_many, fi.search_many
    monkeypatch.setattr(
        fi, "fan_out", lambda fn, items, workers: widths.append(workers) or real(fn, items, workers)
    )
    monkeypatch.setattr(fi, "add_many", lambda *a: widths.append(1) or add_many(*a))
    monkeypatch.setattr(fi, "search_many", lambda *a: widths.append(1) or search_many(*a))
    monkeypatch.setattr(fi.torch, "get_num_threads", lambda: 2)
    H, d, big = 2, 8, fi.FAN_OUT_MIN
    mem = create_backend("faiss", **geometry(1, H, d, "float32"), index="Flat", top_k=3)
    mem.add(torch.randn(1, H, big - 1, d), torch.randn(1, H, big - 1, d))
    mem.add(torch.randn(1, H, big, d), torch.randn(1, H, big, d))
    mem.search(torch.randn(1, H, big - 1, d))
    mem.search(torch.randn(1, H, big, d))
    assert widths == [1, 2, 1, 2]
    mem.workers = 3
    mem.search(torch.randn(1, H, 1, d))
    assert widths[-1] == 3


def test_grouping_bounds_the_dense_scores(monkeypatch):
    g = torch.Generator().manual_seed(14)
    B, H, q, d, M = 2, 3, 5, 8, 40
    mem = create_backend("exact", **geometry(B, H, d, "float32"), chunk_size=16)
    mem.add(torch.randn(B, H, M, d, generator=g), torch.randn(B, H, M, d, generator=g))
    queries, lk, lv = (torch.randn(B, H, n, d, generator=g) for n in (q, 4, 4))
    seen = []
    search = ExactBackend.search

    def spy(self, queries, k=None, heads=None):
        hits = search(self, queries, k, heads)
        seen.append((tuple(queries.shape), heads, tuple(hits.scores.shape), hits))
        return hits

    monkeypatch.setattr(ExactBackend, "search", spy)
    full = memory_attention(queries, lk, lv, memory=mem)
    assert [s[0] for s in seen] == [(B, H, q, d)]
    seen.clear()
    grouped = memory_attention(queries, lk, lv, memory=mem, grouping=(1, 2))
    assert len(seen) == 3 * 3  # 3 head blocks x ceil(5 / 2) query blocks
    for qshape, heads, sshape, hits in seen:
        assert qshape[1] == 1 and qshape[2] <= 2
        assert heads.stop - heads.start == 1
        assert sshape == (B, 1, qshape[2], M)  # at most B*h*q*M scores at once
        assert hits.values is None  # dense values are shared by every query: never [q, M, d]
        assert all(c.shape[:3] == (B, 1, c.shape[2]) and c.dim() == 4 for c in hits.value_chunks)
        assert sum(c.shape[2] for c in hits.value_chunks) == M
    assert {(s[1].start, s[0][2]) for s in seen} == {(h, n) for h in range(3) for n in (2, 2, 1)}
    assert (grouped - full).abs().max().item() <= 1e-6


@pytest.mark.parametrize("use_memory", [False, True])
@pytest.mark.parametrize("n", [1, 3, 8, 16])
def test_a_row_attends_the_same_alone_and_in_a_batch(n, use_memory):
    """The model hands over q/k/v as [B, n, H, d] projections seen as [B, H, n, d]: a one-row view of
    that layout must give the bits of the same row inside a batch (prefix groups and batched generate
    rely on it). Some CPUs' matmul kernels round a strided one-row product differently."""
    g = torch.Generator().manual_seed(n)
    B, H, d = 3, 2, 16

    def heads_view(t):  # [B, n, H*d] -> [B, H, n, d], as the model's projections
        return t.view(B, n, H, d).transpose(1, 2)

    q, k, v = (heads_view(torch.randn(B, n, H * d, generator=g)) for _ in range(3))
    mask = torch.zeros(B, 1, n, n).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -1e9)
    mems = []
    for rows in (B, 1):
        mem = create_backend("exact", **geometry(rows, H, d, "float32"))
        mem.add(*(torch.randn(B, H, 7, d, generator=torch.Generator().manual_seed(9))[:rows] for _ in "kv"))
        mems.append(mem if use_memory else None)
    batch = memory_attention(q, k, v, mask, memory=mems[0])
    alone = memory_attention(q[:1], k[:1], v[:1], mask[:1], memory=mems[1])
    assert torch.equal(batch[:1], alone)


@pytest.mark.parametrize("mem_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("query_grad", [False, True])
def test_gradients_flow_through_exact_memory(mem_dtype, query_grad):
    g = torch.Generator().manual_seed(15)
    B, H, d = 1, 2, 8
    adds = [(torch.randn(B, H, n, d, generator=g), torch.randn(B, H, n, d, generator=g)) for n in (4, 3, 5)]
    query, lk, lv = (torch.randn(B, H, n, d, generator=g) for n in (3, 2, 2))
    weight = torch.randn(B, H, 3, d, generator=g)

    def leaves():
        return [(k.clone().requires_grad_(), v.clone().requires_grad_()) for k, v in adds]

    ours, ref = leaves(), leaves()
    q_ours, q_ref = query.clone().requires_grad_(query_grad), query.clone().requires_grad_(query_grad)
    mem = create_backend("exact", **geometry(B, H, d, mem_dtype), chunk_size=4)
    for k, v in ours:
        mem.add(k, v)
    (memory_attention(q_ours, lk, lv, memory=mem) * weight).sum().backward()
    keys = torch.cat([k for k, _ in ref], dim=2)
    values = torch.cat([v for _, v in ref], dim=2)
    valid = torch.ones(B, keys.shape[2], dtype=torch.bool)
    (upstream_attention(q_ref, lk, lv, None, keys, values, valid, mem_dtype) * weight).sum().backward()
    for (k1, v1), (k2, v2) in zip(ours, ref, strict=True):
        assert k1.grad is not None and v1.grad is not None
        assert k1.grad.abs().sum() > 0 and v1.grad.abs().sum() > 0
        torch.testing.assert_close(k1.grad, k2.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(v1.grad, v2.grad, atol=1e-5, rtol=1e-4)
    if query_grad:
        torch.testing.assert_close(q_ours.grad, q_ref.grad, atol=1e-5, rtol=1e-4)


def test_registry():
    assert {"exact", "faiss"} <= set(knn_memory.available_backends())
    assert knn_memory.backend_class("faiss") is knn_memory.FaissBackend
    assert isinstance(create_backend("exact", num_heads=1, head_dim=2), ExactBackend)


def test_fully_masked_rows_follow_upstream_clamp():
    # Rows no real token uses, where only upstream's -1e6 clamp of each block decides the output: a query
    # that sees no local key attends to the row's real memory entries, or, when the row's memory holds
    # only padding, uniformly to every local key and memory entry. The exact backend reproduces both.
    g = torch.Generator().manual_seed(16)
    B, H, q, n, d = 2, 2, 3, 4, 8
    query, lk, lv = (torch.randn(B, H, m, d, generator=g) for m in (q, n, n))
    lmask = torch.zeros(B, 1, q, n)
    lmask[..., 1, :] = torch.finfo(torch.float32).min  # query 1 sees nothing local
    lmask[..., 2, 1:] = torch.finfo(torch.float32).min  # query 2 sees one local key
    keys, values = torch.randn(B, H, 5, d, generator=g), torch.randn(B, H, 5, d, generator=g)
    valid = torch.tensor([[True, False, True, True, False], [False] * 5])  # row 1: padding only
    exact = create_backend("exact", **geometry(B, H, d, "float32"))
    exact.add(keys, values, valid)
    expected = upstream_attention(query, lk, lv, lmask, keys, values, valid, torch.float32)
    got = memory_attention(query, lk, lv, lmask, exact)
    assert (got - expected).abs().max().item() <= 1e-5
    uniform = torch.cat([lv[1], values[1]], dim=1).mean(dim=1)  # [H, d]
    torch.testing.assert_close(got[1, :, 1], uniform)
    flat = create_backend("faiss", **geometry(B, H, d, "float32"), index="Flat", top_k=8)
    flat.add(keys, values, valid)
    got = memory_attention(query, lk, lv, lmask, flat)
    assert (got[0] - expected[0]).abs().max().item() <= 1e-5  # a row with real memory: the same


@pytest.mark.parametrize(("name", "extra"), [("exact", {}), ("faiss", {"top_k": 7})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_grad_attention_equals_the_autograd_path_and_frees_the_search_scores(
    name, extra, dtype, monkeypatch
):
    """Without autograd the joint scores are built in place: the same numbers, and the search's own
    scores tensor is gone before the softmax (two score-sized tensors alive, not four)."""
    import weakref

    import knn_memory.attention as attention_module

    g = torch.Generator().manual_seed(21)
    B, H, q, d, M = 2, 3, 5, 8, 40
    mem = create_backend(name, **geometry(B, H, d, "bfloat16"), **extra)
    mem.add(torch.randn(B, H, M, d, generator=g), torch.randn(B, H, M, d, generator=g))
    queries, lk, lv = (torch.randn(B, H, n, d, generator=g).to(dtype) for n in (q, 4, 4))
    with torch.enable_grad():
        want = memory_attention(queries, lk, lv, memory=mem)

    alive = []
    search, softmax = type(mem).search_for_attention, attention_module.F.softmax

    def spy_search(self, *args, **kwargs):
        hits = search(self, *args, **kwargs)
        alive.append(weakref.ref(hits.scores))
        return hits

    def spy_softmax(*args, **kwargs):
        alive.append(alive[-1]() is not None)
        return softmax(*args, **kwargs)

    monkeypatch.setattr(type(mem), "search_for_attention", spy_search)
    monkeypatch.setattr(attention_module.F, "softmax", spy_softmax)
    with torch.no_grad():
        got = memory_attention(queries, lk, lv, memory=mem)
    assert torch.equal(got, want)
    assert alive[1] is False  # the search's scores were freed before the softmax ran


def test_faiss_set_search_params_reaches_every_index_now_and_later():
    mem = create_backend("faiss", num_heads=2, head_dim=8, batch_size=2, index="HNSW8", efSearch=4, top_k=3)
    mem.add(torch.randn(2, 2, 30, 8), torch.randn(2, 2, 30, 8))
    mem.set_search_params(efSearch=64)
    assert all(mem.head_index(b, h).search_params == {"efSearch": 64} for b in range(2) for h in range(2))
    mem.reset([1])
    assert mem.head_index(1, 0).search_params == {"efSearch": 64} and mem.config()["efSearch"] == 64
    with pytest.raises(ValueError, match=r"nprobe=4 does not apply to index 'HNSW8'"):
        mem.set_search_params(nprobe=4)
    with pytest.raises(ValueError, match="efSearch must be a positive int"):
        mem.set_search_params(efSearch=-1)
    assert mem.head_index(0, 1).search_params == {"efSearch": 64} and mem.config()["efSearch"] == 64
