"""save / load_backend: identical memories back, and ValueError for anything that is not a good save."""

from __future__ import annotations

import json

import pytest
import torch

import knn_memory
from knn_memory import create_backend, load_backend, memory_attention, save_backend
from knn_memory.persistence import CURRENT


def _memory(name: str, **kw):
    g = torch.Generator().manual_seed(0)
    B, H, d = 2, 2, 8
    mem = create_backend(name, num_heads=H, head_dim=d, batch_size=B, mem_dtype="bfloat16", **kw)
    for n in (120, 130, 150):
        mask = torch.rand(B, n, generator=g) > 0.1
        mem.add(torch.randn(B, H, n, d, generator=g), torch.randn(B, H, n, d, generator=g), mask)
    return mem, torch.randn(B, H, 6, d, generator=g)


def _same_hits(a, b):
    assert torch.equal(a.ids, b.ids)
    assert torch.equal(a.scores, b.scores)
    if a.dense:
        assert len(a.value_chunks) >= 1 and b.dense
        assert torch.equal(torch.cat(a.value_chunks, -2), torch.cat(b.value_chunks, -2))
    else:
        assert torch.equal(a.values, b.values)


@pytest.mark.parametrize(
    ("name", "kw"),
    [
        ("exact", {}),
        ("exact", {"top_k": 5}),
        ("faiss", {"index": "Flat", "top_k": 7}),
        ("faiss", {"index": "IVF4,Flat", "nprobe": 1, "top_k": 7}),
        ("faiss", {"index": "HNSW8", "efSearch": 12, "top_k": 7}),
    ],
)
def test_round_trip(tmp_path, name, kw):
    mem, queries = _memory(name, **kw)
    mem.save(tmp_path / "mem")
    back = load_backend(tmp_path / "mem")
    assert type(back) is type(mem)
    assert back.config() == mem.config()
    assert back.lengths.tolist() == mem.lengths.tolist()
    assert back.mem_dtype == torch.bfloat16
    _same_hits(mem.search(queries), back.search(queries))
    local = torch.randn(*queries.shape[:2], 3, queries.shape[-1])
    assert torch.equal(
        memory_attention(queries, local, local, memory=mem),
        memory_attention(queries, local, local, memory=back),
    )
    if name == "faiss":
        for b in range(mem.batch_size):
            for h in range(mem.num_heads):
                ours, theirs = mem.head_index(b, h), back.head_index(b, h)
                assert (theirs.trainings, theirs.trained_at) == (ours.trainings, ours.trained_at)
                assert theirs.uses_index == ours.uses_index
                assert theirs.search_params == ours.search_params
    # the loaded memory keeps growing like the original one
    extra = (torch.randn(2, 2, 40, 8), torch.randn(2, 2, 40, 8))
    mem.add(*extra)
    back.add(*extra)
    _same_hits(mem.search(queries), back.search(queries))


def test_trained_ivf_keeps_its_training(tmp_path):
    mem, queries = _memory("faiss", index="IVF4,Flat", nprobe=1, top_k=7)
    ix = mem.head_index(0, 1)
    assert ix.uses_index and ix.trainings == 1 and 0 < ix.trained_at < ix.ntotal  # trained, then grew
    save_backend(mem, tmp_path / "m")
    back = load_backend(tmp_path / "m")
    loaded = back.head_index(0, 1)
    assert loaded.uses_index and loaded.trainings == ix.trainings and loaded.trained_at == ix.trained_at
    # nprobe=1 of 4 lists: results depend on the centroids, so equal results mean the same training
    _same_hits(mem.search(queries), back.search(queries))


def test_saving_again_replaces_the_previous_version(tmp_path):
    mem, _ = _memory("exact")
    path = tmp_path / "m"
    first = save_backend(mem, path)
    mem.add(torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8))
    second = save_backend(mem, path)
    assert first != second and not first.exists() and second.exists()
    assert (path / CURRENT).read_text().strip() == second.name
    assert load_backend(path).lengths.tolist() == mem.lengths.tolist()


def test_load_to_device_and_reject_non_backends(tmp_path):
    mem, _ = _memory("exact")
    mem.save(tmp_path / "m")
    assert load_backend(tmp_path / "m", device="cpu").device == torch.device("cpu")
    with pytest.raises(TypeError, match=r"backend must be a MemoryBackend, got dict"):
        save_backend({}, tmp_path / "x")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"exists and is not a directory"):
        mem.save(tmp_path / "file")


# ---------------------------------------------------------------------- damaged saves
@pytest.fixture
def saved(tmp_path):
    mem, _ = _memory("faiss", index="IVF4,Flat", top_k=4)
    version = save_backend(mem, tmp_path / "m")
    return tmp_path / "m", version


@pytest.mark.parametrize("where", [0.1, 0.5, 0.99])
def test_flipped_byte_is_refused(saved, where):
    path, version = saved
    state = version / "state.pt"
    data = bytearray(state.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    state.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"file state\.pt is corrupt or truncated \(checksum mismatch\)"):
        load_backend(path)


def test_truncated_file_is_refused(saved):
    path, version = saved
    state = version / "state.pt"
    state.write_bytes(state.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"state\.pt is corrupt or truncated"):
        load_backend(path)


def test_missing_file_is_refused(saved):
    path, version = saved
    (version / "state.pt").unlink()
    with pytest.raises(ValueError, match=r"file state\.pt is missing"):
        load_backend(path)


def test_foreign_directories_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"is not a saved memory directory"):
        load_backend(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"holds no saved memory \(no CURRENT file\)"):
        load_backend(tmp_path / "empty")
    other = tmp_path / "other"
    (other / "v-1").mkdir(parents=True)
    (other / CURRENT).write_text("v-1\n")
    (other / "v-1" / "meta.json").write_text(json.dumps({"format": "something-else", "format_version": 1}))
    with pytest.raises(ValueError, match=r"holds format 'something-else', expected 'knn-memory/backend'"):
        load_backend(other)
    (other / CURRENT).write_text("../../etc\n")
    with pytest.raises(ValueError, match=r"CURRENT names '\.\./\.\./etc', which is not a saved version"):
        load_backend(other)


def test_format_version_mismatch_is_refused(saved):
    path, version = saved
    meta = json.loads((version / "meta.json").read_text())
    meta["format_version"] = 2
    (version / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"has format version 2; this library reads version 1"):
        load_backend(path)


def test_unreadable_meta_is_refused(saved):
    path, version = saved
    (version / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"unreadable meta\.json"):
        load_backend(path)


def test_state_of_another_backend_is_refused(tmp_path):
    mem, _ = _memory("exact")
    version = save_backend(mem, tmp_path / "m")
    meta = json.loads((version / "meta.json").read_text())
    meta["backend"] = "faiss"  # an exact state read as a faiss one
    (version / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"saved state does not match backend 'faiss'"):
        load_backend(tmp_path / "m")
    meta["backend"] = "annoy"
    (version / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"unknown memory backend 'annoy'"):
        knn_memory.load_backend(tmp_path / "m")
