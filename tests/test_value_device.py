"""Values kept on the CPU while the keys sit in a (GPU) index: ``FaissBackend(value_device="cpu")``."""

from __future__ import annotations

import pytest
import torch

from knn_memory import create_backend, load_backend

HAS_CUDA = torch.cuda.is_available()


def filled(device: str = "cpu", **kw):
    g = torch.Generator().manual_seed(0)
    mem = create_backend(
        "faiss", num_heads=2, head_dim=8, batch_size=2, mem_dtype="float32", device=device, top_k=4, **kw
    )
    keys, values = torch.randn(2, 2, 50, 8, generator=g), torch.randn(2, 2, 50, 8, generator=g)
    mask = torch.ones(2, 50, dtype=torch.bool)
    mask[1, 40:] = False
    mem.add(keys.to(device), values.to(device), mask.to(device))
    return mem, torch.randn(2, 2, 5, 8, generator=g).to(device)


def test_values_on_the_cpu_give_the_same_hits_on_a_cpu_memory(tmp_path):
    plain, q = filled()
    pinned, _ = filled(value_device="cpu")
    a, b = plain.search(q), pinned.search(q)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.scores, b.scores) and torch.equal(a.values, b.values)
    assert pinned.config()["value_device"] is None  # same device as the keys: nothing pinned
    pinned.save(tmp_path / "m")
    assert torch.equal(load_backend(tmp_path / "m").search(q).values, a.values)


@pytest.mark.parametrize(
    ("value_device", "error", "message"),
    [
        ("cuda:0", ValueError, "torch sees no CUDA device"),
        ("mps", ValueError, "only 'cpu' and 'cuda"),
        ("not a device", ValueError, "not a device string"),
        (3, TypeError, "device must be a str or torch.device"),
    ],
)
def test_bad_value_device_is_refused(value_device, error, message):
    if HAS_CUDA and str(value_device).startswith("cuda"):
        pytest.skip("CUDA is present here")
    with pytest.raises(error, match=message):
        filled(value_device=value_device)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("index", ["Flat", "IVF4,Flat"])
def test_gpu_keys_with_cpu_values_equal_an_all_cpu_memory(tmp_path, index):
    cpu, q = filled(index=index, min_train_points=40)
    gpu, _ = filled("cuda", index=index, min_train_points=40, value_device="cpu")
    assert all(v.device.type == "cpu" for v in gpu._values[0].views())
    hits = gpu.search(q.cuda())
    assert hits.values.device.type == "cuda" and hits.scores.device.type == "cuda"
    want = cpu.search(q)
    assert torch.equal(hits.ids.cpu(), want.ids)
    torch.testing.assert_close(hits.values.cpu(), want.values)
    assert gpu.config()["value_device"] == "cpu"
    gpu.save(tmp_path / "m")
    back = load_backend(tmp_path / "m", device="cuda")
    assert back.value_device == torch.device("cpu")
    torch.testing.assert_close(back.search(q.cuda()).values.cpu(), want.values)
