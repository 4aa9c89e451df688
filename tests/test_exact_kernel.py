"""The compiled exact search (`indexes.native.exact_top_k`, ``knn_exact`` in the C file): the exact top-k
without a score matrix, which the store's exact search (``"Flat"``) uses from ``EXACT_KERNEL_KEYS``
keys on. Checked against float64 scores of the same stored keys, for every dtype of the store, odd
dimensions, several chunks, k above the number of keys, exact ties, and the queries split over threads."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import indexes.streaming as streaming
from indexes import StreamingIndex, native
from indexes.batched import search_many

AVX512 = native.available() and native.best_isa() == "avx512"
needs_kernel = pytest.mark.skipif(not AVX512, reason="the exact kernel needs the library built, on AVX-512")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def best_isa():
    yield
    if native.available():
        native.set_isa("avx512")  # capped at the CPU's best: what a process starts with


def _chunks(keys: torch.Tensor, cuts: list[int]) -> list[torch.Tensor]:
    edges = [0, *cuts, keys.shape[0]]
    return [keys[a:b].contiguous() for a, b in itertools.pairwise(edges) if b > a]


def _check_top_k(scores, ids, keys, q, k, atol=1e-4):
    """The result is an exact top-k of the float64 scores of ``keys`` (as stored), up to rounding."""
    m, n = q.shape[0], keys.shape[0]
    exact = q.double() @ keys.double().T  # [m, n]
    kk = min(k, n)
    assert scores.shape == ids.shape == (m, k)
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64
    assert bool((ids[:, kk:] == -1).all()) and bool(torch.isneginf(scores[:, kk:]).all())  # empty slots
    got = ids[:, :kk]
    assert all(len(set(row)) == kk for row in got.tolist())  # no key twice
    assert bool((got >= 0).all()) and bool((got < n).all())
    # each score is its key's score, best first
    torch.testing.assert_close(scores[:, :kk].double(), torch.gather(exact, 1, got), rtol=0, atol=atol)
    assert bool((scores[:, :kk].diff(dim=1) <= 0).all())
    # and no key left out beats the k-th kept by more than rounding
    want = torch.topk(exact, kk, dim=1).values
    torch.testing.assert_close(torch.gather(exact, 1, got), want, rtol=0, atol=atol)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [7, 32, 33, 100])
@pytest.mark.parametrize(
    "m, n, k, cuts",
    [(64, 3000, 32, [1000]), (9, 700, 128, [16, 300]), (3, 10, 32, []), (17, 1030, 1, [1024])],
)
def test_kernel_is_an_exact_top_k(dtype, dim, m, n, k, cuts):
    g = torch.Generator().manual_seed(m * 7 + n + dim)
    keys = torch.randn(n, dim, generator=g).to(dtype)
    q = torch.randn(m, dim, generator=g)
    found = native.exact_top_k(_chunks(keys, cuts), q, k)
    assert found is not None
    _check_top_k(*found, keys.float(), q, k)


@needs_kernel
@pytest.mark.parametrize("k", [5, 64, 100])  # the insertion sort (<= 64 candidates) and the merge sort
def test_kernel_ties_go_to_the_earliest_keys_in_id_order(k):
    """Small integer keys and queries tie exactly: of equal scores the lower ids come first, and of
    those tied at the k-th place the earliest are kept (as the matmul path's selection keeps them)."""
    g = torch.Generator().manual_seed(k)
    keys = torch.randint(-1, 2, (900, 6), generator=g).float()
    q = torch.randint(-1, 2, (11, 6), generator=g).float()
    scores, ids = native.exact_top_k(_chunks(keys, [333]), q, k)
    exact = q @ keys.T
    position = torch.arange(900).expand(11, 900)
    # sort by (score desc, id asc): the scores are small integers, so one key orders both
    order = torch.argsort(-exact * 10000 + position, dim=1)[:, :k]
    assert torch.equal(ids, order)
    assert torch.equal(scores, torch.gather(exact, 1, order))


@needs_kernel
def test_split_over_threads_gives_the_same_result(monkeypatch):
    monkeypatch.setattr(native, "EXACT_SPLIT_WORK", 1)
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(5000, 24, generator=g).to(torch.bfloat16)
    q = torch.randn(130, 24, generator=g)
    calls = []
    real = native._exact_part
    monkeypatch.setattr(native, "_exact_part", lambda *a: calls.append(a[6]) or real(*a))
    one = native.exact_top_k([keys], q, 16, threads=1)
    assert calls == [130]
    calls.clear()
    three = native.exact_top_k([keys], q, 16, threads=3)
    assert sorted(calls) == [43, 43, 44]  # three parts of the queries, 32 or more each
    assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1])


def test_kernel_declines_what_it_does_not_take():
    keys = torch.randn(100, 8)
    q = torch.randn(4, 8)
    assert native.exact_top_k([keys], q.double(), 3) is None  # queries not float32
    assert native.exact_top_k([keys], q[:, :4], 3) is None  # another dim
    assert native.exact_top_k([keys.double()], q, 3) is None  # a dtype the store never holds
    assert native.exact_top_k([keys.T.contiguous().T], q, 3) is None  # rows not contiguous
    assert native.exact_top_k([], q, 3) is None
    if native.available():
        native.set_isa("avx2")
        assert native.exact_top_k([keys], q, 3) is None  # AVX-512 only: the caller scores by matmul


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flat_search_from_the_threshold_on(monkeypatch, isa, dtype):
    """A Flat store searched past ``EXACT_KERNEL_KEYS``: by the kernel with AVX-512 (counted), by the
    matmul elsewhere; an exact top-k either way, over several store chunks."""
    if isa not in native.isas():
        pytest.skip(f"no {isa} here")
    native.set_isa(isa)
    monkeypatch.setattr(streaming, "EXACT_KERNEL_KEYS", 100)
    monkeypatch.setattr(streaming, "FIRST_KEY_CHUNK", 256)  # chunks of 256, 512, ...
    calls = []
    real = native.exact_top_k
    monkeypatch.setattr(native, "exact_top_k", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(11)
    keys = torch.randn(1000, 12, generator=g)
    q = torch.randn(20, 12, generator=g)
    index = StreamingIndex(12, "Flat", store_dtype=dtype)
    index.add(keys[:90])
    index.search(q, 8)
    assert calls == []  # below the threshold: the matmul
    index.add(keys[90:])
    assert len(index._store.views()) > 1
    scores, ids = index.search(q, 40)
    assert len(calls) == 1
    _check_top_k(scores, ids, keys.to(dtype).float(), q, 40)


@needs_kernel
def test_searching_heads_together_equals_each_alone(monkeypatch):
    """`search_many` (the backend's path) returns what each index's own search returns, bit for bit,
    whether its keys are few (the matmul of every head at once) or past the kernel's threshold."""
    g = torch.Generator().manual_seed(2)
    for n in (150, 4000):
        monkeypatch.setattr(streaming, "EXACT_KERNEL_KEYS", 1000)
        heads = [StreamingIndex(16, "Flat", store_dtype=torch.bfloat16) for _ in range(3)]
        for ix in heads:
            ix.add(torch.randn(n, 16, generator=g))
        q = torch.randn(3, 64, 16, generator=g)
        together = search_many(heads, q, 32)
        for h, ix in enumerate(heads):
            alone = ix.search(q[h], 32)
            assert torch.equal(together[0][h], alone[0]) and torch.equal(together[1][h], alone[1])


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 40),
    n=st.integers(1, 2500),
    k=st.integers(1, 200),
    dim=st.integers(1, 40),
    dtype=st.sampled_from(DTYPES),
    cut=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_kernel_property(m, n, k, dim, dtype, cut, seed):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, dim, generator=g).to(dtype)
    q = torch.randn(m, dim, generator=g)
    found = native.exact_top_k(_chunks(keys, [int(cut * n)]), q, k)
    _check_top_k(*found, keys.float(), q, k)
