"""Assignment of keys to lists: the compiled kernel and torch against the nearest centroid in float64."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from indexes import native
from indexes.quantizer import Quantizer

# torch, then the compiled kernel with each instruction set this CPU has
ENGINES = ["torch"] + ([f"native-{isa}" for isa in native.isas()])


@pytest.fixture(scope="module")
def engine(request):
    name = request.param
    if name == "torch":
        yield False
        return
    native.set_isa(name.removeprefix("native-"))
    try:
        yield True
    finally:
        native.set_isa("avx512")  # capped at the CPU's best: what a process starts with


def _nearest_ok(x: torch.Tensor, centroids: torch.Tensor, got: torch.Tensor) -> None:
    """Every ``got[i]`` is a nearest centroid of ``x[i]`` up to float32 rounding (float64 reference)."""
    x64, c64 = x.double(), centroids.double()
    dist = 0.5 * (c64 * c64).sum(1)[None] - x64 @ c64.T  # [n, L]
    best = dist.min(dim=1).values
    chosen = dist.gather(1, got[:, None]).squeeze(1)
    scale = 1e-5 * (1 + (x64.abs() @ c64.abs().T).max(dim=1).values + (c64 * c64).sum(1).max())
    assert bool(((chosen - best) <= scale).all()), (chosen - best).max()


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(0, 41),
    lists=st.integers(1, 70),
    dim=st.sampled_from([1, 2, 5, 32, 100]),
    seed=st.integers(0, 2**16),
)
def test_assign_picks_a_nearest_centroid(engine, n, lists, dim, seed):
    g = torch.Generator().manual_seed(seed)
    centroids = torch.randn(lists, dim, generator=g)
    x = torch.randn(n, dim, generator=g)
    q = Quantizer(centroids, engine)
    got = q.assign(x)
    assert got.dtype == torch.int64 and got.shape == (n,)
    assert bool(((got >= 0) & (got < lists)).all())  # never a padding column
    if n:
        _nearest_ok(x, centroids, got)
    assert torch.equal(q.centroids, centroids)


@pytest.mark.skipif(not native.available(), reason="compiled library not built")
def test_compiled_kernel_agrees_with_torch_away_from_ties():
    g = torch.Generator().manual_seed(3)
    centroids = torch.randn(1448, 32, generator=g)
    x = torch.randn(1000, 32, generator=g)
    a, b = Quantizer(centroids, True).assign(x), Quantizer(centroids, False).assign(x)
    dist = 0.5 * (centroids * centroids).sum(1)[None] - x @ centroids.T
    two = dist.topk(2, dim=1, largest=False).values
    clear = (two[:, 1] - two[:, 0]) > 1e-3  # the runner-up is not within rounding of the nearest
    assert int(clear.sum()) > 900
    assert torch.equal(a[clear], b[clear])
    # a key sitting on a centroid goes to it; ties go to the first list
    assert Quantizer(centroids, True).assign(centroids[[7, 1447, 0]]).tolist() == [7, 1447, 0]
    twin = torch.stack([centroids[5], centroids[5]])
    assert Quantizer(twin, True).assign(centroids[5:6]).tolist() == [0]


def test_padding_and_bytes():
    q = Quantizer(torch.randn(17, 8), False)
    assert q.nlist == 17 and q._ct.shape == (8, 32) and q.nbytes() == 32 * 9 * 4
    assert bool(torch.isinf(q._hn[17:]).all()) and bool(torch.isfinite(q._hn[:17]).all())


@pytest.mark.skipif(
    not native.available() or native.split_threads(2) == 1, reason="compiled library without OpenMP"
)
@pytest.mark.parametrize("n", [8191, 8192, 20001])
def test_keys_split_over_threads_go_to_the_same_lists(n):
    """knn_assign cuts many keys into parts of at least 4096, one per thread: the same list for each key
    as on one thread (each key's sums are its own), whatever the cut."""
    g = torch.Generator().manual_seed(n)
    centroids = torch.randn(300, 32, generator=g)
    x = torch.randn(n, 32, generator=g)
    q = Quantizer(centroids, True)
    one = q.assign(x)
    for threads in (2, 3, 7):
        assert torch.equal(q.assign(x, threads), one)
    _nearest_ok(x, centroids, one)
