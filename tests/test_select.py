"""`indexes.select.top_k` against `torch.topk` on every path: the compiled selection on every instruction
set of this CPU (AVX-512: group maxima and counted places; below it: the maxima of runs), and without
it the heap, the partition and the whole row."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from indexes import native, select
from indexes.select import MIN_K, PARTITION_RANGE, top_k

ENGINES = [f"compiled-{isa}" for isa in native.isas()] + ["torch"]


@pytest.fixture(autouse=True, params=ENGINES, scope="module")
def engine(request):
    """Every test here once with the compiled selection on each instruction set (where built) and once
    without it."""
    with pytest.MonkeyPatch.context() as m:
        if request.param == "torch":
            m.setattr(select.native, "library", lambda: None)
        else:
            native.set_isa(request.param.removeprefix("compiled-"))
        yield request.param
    if native.available():
        native.set_isa("avx512")  # capped at the CPU's best: what a process starts with


def _check(scores: torch.Tensor, k: int) -> None:
    values, pos = top_k(scores, k)
    kk = min(k, scores.shape[1])
    want = torch.topk(scores, kk, dim=1).values
    assert values.shape == pos.shape == (scores.shape[0], kk)
    assert pos.dtype == torch.int64 and values.dtype == scores.dtype
    torch.testing.assert_close(values, want, rtol=0, atol=0)  # the same k values, best first
    torch.testing.assert_close(torch.gather(scores, 1, pos), values, rtol=0, atol=0)  # positions match
    assert all(len(set(row)) == kk for row in pos.tolist())  # no position twice


@pytest.mark.parametrize(
    "n, k",
    [
        (PARTITION_RANGE[0] * MIN_K, MIN_K),  # partition, both ends of its range
        (PARTITION_RANGE[1] * 32, 32),
        (4096, 32),
        (PARTITION_RANGE[1] * 32 + 1, 32),  # torch.topk: too many scores, too small k, too few
        (1024, 8),
        (100, 99),
        (50, 50),
        (10, 32),
        (1, 1),
    ],
)
def test_top_k_equals_torch_topk(n, k):
    g = torch.Generator().manual_seed(n * 31 + k)
    _check(torch.randn(17, n, generator=g), k)


def test_top_k_with_ties_and_infinities():
    scores = torch.tensor(
        [[1.0, 3.0, 3.0, -float("inf"), 2.0, 3.0], [0.0] * 6, [float("inf"), 1, 2, 3, 4, 5]]
    )
    _check(scores, 4)
    values, pos = top_k(scores, 4)
    assert sorted(pos[0].tolist()[:3]) == [1, 2, 5]  # the three tied best, in some order
    assert values[2, 0] == float("inf") and pos[2, 0] == 0


def test_the_compiled_selection_is_used_where_built(engine, monkeypatch):
    calls = []
    lib = native.library()
    if lib is not None:
        monkeypatch.setattr(
            select.native,
            "library",
            lambda: type(
                "Spy", (), {"knn_topk_rows": lambda self, *a: calls.append(a) or lib.knn_topk_rows(*a)}
            )(),
        )
    top_k(torch.randn(3, 500), 7)
    assert len(calls) == (0 if engine == "torch" else 1)
    top_k(torch.randn(3, 500, dtype=torch.float64), 7)  # another dtype: torch
    assert len(calls) == (0 if engine == "torch" else 1)


@pytest.mark.parametrize("n, k", [(1024, 32), (4096, 128), (600, 8), (64, 16)])
def test_ties_at_the_kth_place_keep_the_earliest(engine, n, k):
    """Scores tied at the k-th place: the compiled selection keeps the earliest of them (torch.topk
    promises no such rule)."""
    g = torch.Generator().manual_seed(n + k)
    scores = torch.rand(5, n, generator=g) - 2.0  # all below the ties
    best = torch.randperm(n, generator=g)[: k - 3]
    scores[:, best] = 5.0 + torch.rand(5, k - 3, generator=g)  # k - 3 clear winners
    tied = torch.randperm(n, generator=g)[:9]
    tied = tied[~torch.isin(tied, best)][:6]  # six tied for the last three places
    scores[:, tied] = 1.0
    _check(scores, k)
    if engine.startswith("compiled"):
        _, pos = top_k(scores, k)
        for row in pos.tolist():
            assert sorted(row[-3:]) == sorted(tied.tolist())[:3]


@pytest.mark.parametrize("n, k", [(1024, 32), (8192, 16)])
def test_rows_of_many_ties(n, k):
    """Most of a row tied with its k-th best: more candidates than counted places take (the compiled
    selection's fallback to the runs), and rows of a single value."""
    g = torch.Generator().manual_seed(n)
    scores = torch.randint(0, 3, (4, n), generator=g).float()
    scores[1] = 7.0
    scores[2, : n // 2] = -1.0
    _check(scores, k)


def test_top_k_of_no_rows():
    values, pos = top_k(torch.empty(0, 100), 5)
    assert values.shape == pos.shape == (0, 5)


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(1, 6),
    n=st.integers(1, 1200),
    k=st.integers(1, 80),
    integers=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_top_k_property(m, n, k, integers, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(m, n, generator=g)
    if integers:  # many ties
        scores = torch.randint(-3, 3, (m, n), generator=g).float()
    _check(scores, k)


@pytest.mark.parametrize("limit", [7000, None])  # 7000: 7 queries per matmul; None: all 40 at once
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_store_exact_search_both_paths(monkeypatch, limit, dtype):
    import indexes.streaming as streaming
    from indexes import StreamingIndex

    if limit is not None:
        monkeypatch.setattr(streaming, "SELECT_SCORES", limit)
    monkeypatch.setattr(streaming, "EXACT_BLOCK", 1000)  # several blocks: the merge runs too
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(2500, 16, generator=g)
    q = torch.randn(40, 16, generator=g)
    index = StreamingIndex(16, "Flat", store_dtype=dtype)
    index.add(keys)
    scores, ids = index.search(q, 24)
    stored = keys.to(dtype).float()
    want = torch.topk(q @ stored.T, 24, dim=1).values
    torch.testing.assert_close(scores, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((q[:, None, :] * stored[ids]).sum(-1), scores, rtol=1e-5, atol=1e-5)


def test_faiss_exact_search_takes_its_blas_path():
    """The faiss-cpu wheel's default sends small query batches through a 3-4x slower loop."""
    import faiss

    import indexes.streaming as streaming

    assert faiss.cvar.distance_compute_blas_threshold == streaming.BLAS_THRESHOLD <= 64  # one window
