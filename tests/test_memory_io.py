"""Saving a model's whole cache and loading it back: same logits as the live cache, and clear refusals."""

from __future__ import annotations

import json
import re

import pytest
import torch
from backend_cases import backend_cases

from indexes import StreamingIndex
from knn_memory import create_backend, save_backend
from knn_memory.persistence import CURRENT, read_version, write_version
from longllama import LongLlamaCache, LongLlamaForCausalLM
from longllama.memory_io import load_memory, memory_file, save_memory, weights_fingerprint

CONTEXT = 230  # W=16, L=8: 222 tokens in memory per row, over 14 windows
# every registered backend, as model settings; the IVF4 cases train at 156 keys per head
BACKENDS = {case.id: case.model_settings() for case in backend_cases()}


def build(config, seed: int = 0) -> LongLlamaForCausalLM:
    torch.manual_seed(seed)
    return LongLlamaForCausalLM(config).eval()


def ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_same_state(a: object, b: object, where: str = "state") -> None:
    """Equal nested states: tensors equal (dtype and values), everything else ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_cache(a: LongLlamaCache, b: LongLlamaCache) -> None:
    assert (a.batch_size, a.seen_tokens, a.local_length) == (b.batch_size, b.seen_tokens, b.local_length)
    assert_same_state(a.positions, b.positions, "positions")
    for i, (la, lb) in enumerate(zip(a.layers, b.layers, strict=True)):
        assert_same_state(la.keys, lb.keys, f"layer {i} keys")
        assert_same_state(la.values, lb.values, f"layer {i} values")
        assert (la.memory is None) == (lb.memory is None)
        if la.memory is not None:
            assert type(la.memory) is type(lb.memory)
            assert_same_state(la.memory.state(), lb.memory.state(), f"layer {i} memory")


@pytest.fixture
def config(longllama_config):
    def make(**overrides):
        return longllama_config(**{"mem_layers": [1, 2], **overrides})

    return make


@pytest.mark.parametrize("backend", list(BACKENDS))
@torch.no_grad()
def test_loaded_memory_answers_like_the_live_one(config, tmp_path, backend):
    model = build(config(**BACKENDS[backend]))
    out = model(ids(2, CONTEXT, seed=1))
    assert out.cache.memory_lengths() == [0, CONTEXT - 8, CONTEXT - 8]
    model.save_memory(out.cache, tmp_path / "mem")
    ivf = BACKENDS[backend].get("mem_index", "").startswith("IVF")
    if ivf:
        for layer in (1, 2):
            for b in range(2):
                ix = out.cache.memory(layer).head_index(b, 1)
                assert ix.uses_index and ix.trainings == 1 and ix.trained_at < ix.ntotal
        trained = {
            (layer, b, h): (ix.trainings, ix.trained_at)
            for layer in (1, 2)
            for b in range(2)
            for h in range(2)
            for ix in [out.cache.memory(layer).head_index(b, h)]
        }

    def no_training(self):
        raise AssertionError("loading must not rebuild or retrain an index")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StreamingIndex, "_build", no_training)
        loaded = model.load_memory(tmp_path / "mem")
    assert_same_cache(out.cache, loaded)
    if ivf:
        for (layer, b, h), training in trained.items():
            ix = loaded.memory(layer).head_index(b, h)
            assert ix.uses_index and (ix.trainings, ix.trained_at) == training

    # ask a question twice (12 tokens overflow the 8 local ones, so memory grows too), then generate
    for seed in (2, 3):
        question = ids(2, 12, seed=seed)
        live = model(question, past_key_values=out.cache).logits
        again = model(question, past_key_values=loaded).logits
        assert torch.equal(live, again)
    assert_same_cache(out.cache, loaded)
    # the loaded cache saves again to the same memory
    model.save_memory(loaded, tmp_path / "mem2")
    assert_same_cache(loaded, model.load_memory(tmp_path / "mem2"))


@torch.no_grad()
def test_padding_and_memory_only_caches_round_trip(config, tmp_path):
    model = build(config())
    context = ids(2, 60, seed=4)
    mask = torch.ones(2, 60, dtype=torch.long)
    mask[1, :13] = 0  # left padding in row 1: padding entries are kept out of attention after loading too
    out = model(context, attention_mask=mask, use_cache=False)  # everything into memory, no local cache
    assert out.cache.local_length == 0
    model.save_memory(out.cache, tmp_path / "m")
    loaded = model.load_memory(tmp_path / "m")
    assert_same_cache(out.cache, loaded)
    question = ids(2, 5, seed=5)
    assert torch.equal(
        model(question, past_key_values=out.cache, attention_mask=torch.ones(2, 5)).logits,
        model(question, past_key_values=loaded, attention_mask=torch.ones(2, 5)).logits,
    )


@torch.no_grad()
def test_generation_continues_from_a_loaded_memory(config, tmp_path):
    model = build(config(mem_backend="faiss", mem_top_k=4))
    model.generation_config.pad_token_id = 0
    context = ids(1, 70, seed=6)
    out = model(context)
    model.save_memory(out.cache, tmp_path / "m")
    question = ids(1, 4, seed=7)
    full = torch.cat([context, question], dim=1)
    kwargs = dict(max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(full))
    live = model.generate(full, past_key_values=out.cache, **kwargs)
    loaded = model.generate(full, past_key_values=model.load_memory(tmp_path / "m"), **kwargs)
    assert torch.equal(live, loaded)


# ---------------------------------------------------------------------- refusals
@pytest.fixture
def saved(config, tmp_path):
    model = build(config(mem_backend="faiss", mem_index="IVF4,Flat", mem_top_k=6))
    with torch.no_grad():
        out = model(ids(1, CONTEXT, seed=8))
    version = model.save_memory(out.cache, tmp_path / "mem")
    return model, tmp_path / "mem", version


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"rope_theta": 500.0}, r"rope_theta=10000\.0 \(this model: 500\.0\)"),
        ({"max_position_embeddings": 32}, r"max_position_embeddings=16 \(this model: 32\)"),
        ({"mem_layers": [1]}, r"mem_layers=\[1, 2\] \(this model: \[1\]\)"),
        ({"mem_dtype": "bfloat16"}, r"mem_dtype='float32' \(this model: 'bfloat16'\)"),
        ({"mem_positionals": False}, r"mem_positionals=True \(this model: False\)"),
        ({"vocab_size": 80}, r"vocab_size=64 \(this model: 80\)"),
        ({"hidden_size": 48, "num_attention_heads": 3}, r"hidden_size=32 \(this model: 48\)"),
    ],
)
def test_another_architecture_is_refused(saved, config, overrides, field):
    _, path, _ = saved
    other = build(config(mem_backend="faiss", mem_index="IVF4,Flat", mem_top_k=6, **overrides))
    with pytest.raises(ValueError, match=r"was encoded by a different model: .*" + field):
        other.load_memory(path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mem_backend": "exact", "mem_index": None}, r"uses mem_backend='faiss' but this model has mem_backend='exact'"),
        ({"mem_top_k": 7}, r"mem_top_k: saved 6, this model 7"),
        ({"mem_index": "Flat"}, r"mem_index: saved 'IVF4,Flat', this model 'Flat'"),
        ({"mem_index_params": {"nprobe": 2}}, r"mem_index_params\['nprobe'\]: saved None, this model 2"),
    ],
)  # fmt: skip
def test_other_memory_settings_are_refused(saved, config, overrides, message):
    _, path, _ = saved
    settings = {"mem_backend": "faiss", "mem_index": "IVF4,Flat", "mem_top_k": 6, **overrides}
    with pytest.raises(ValueError, match=message + r".*Load the model with the saved settings|" + message):
        build(config(**settings)).load_memory(path)


def test_free_settings_may_differ(saved, config):
    _, path, _ = saved
    model = build(
        config(
            mem_backend="faiss",
            mem_index="IVF4,Flat",
            mem_top_k=6,
            mem_index_params={"workers": 1},
            mem_attention_grouping=(1, 4),
            last_context_length=4,
        )
    )
    assert model.load_memory(path).memory_lengths()[1] == CONTEXT - 8


def test_other_weights_or_dtype_are_refused(saved, config):
    model, path, _ = saved
    settings = dict(mem_backend="faiss", mem_index="IVF4,Flat", mem_top_k=6)
    with pytest.raises(ValueError, match=r"encoded by a model with other weights"):
        build(config(**settings), seed=1).load_memory(path)
    assert weights_fingerprint(model.model) == weights_fingerprint(build(config(**settings)).model)
    with pytest.raises(
        ValueError, match=r"encoded in torch_dtype=float32, but this model runs in torch\.float64"
    ):
        build(config(**settings)).double().load_memory(path)


@pytest.mark.parametrize("name", ["cache.pt", memory_file(1), memory_file(2)])
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_files_are_refused(saved, name, damage):
    model, path, version = saved
    f = version / name
    data = bytearray(f.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
        f.write_bytes(bytes(data))
    elif damage == "truncate":
        f.write_bytes(bytes(data[: len(data) // 3]))
    else:
        f.unlink()
    expected = r"is missing" if damage == "delete" else r"is corrupt or truncated \(checksum mismatch\)"
    with pytest.raises(ValueError, match=f"file {re.escape(name)} " + expected):
        model.load_memory(path)


def test_foreign_paths_are_refused(saved, tmp_path):
    model, path, version = saved
    with pytest.raises(ValueError, match=r"is not a saved memory directory"):
        model.load_memory(tmp_path / "missing")
    (tmp_path / "a-file").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match=r"is not a saved memory directory"):
        model.load_memory(tmp_path / "a-file")
    model.save_pretrained(tmp_path / "checkpoint")  # a model directory is not a memory ...
    with pytest.raises(ValueError, match=r"holds no saved memory \(no CURRENT file\)"):
        model.load_memory(tmp_path / "checkpoint")
    with pytest.raises(ValueError, match=r"non-empty directory that holds no saved memory"):
        model.save_memory(model.load_memory(path), tmp_path / "checkpoint")  # ... nor written into
    backend = create_backend("exact", num_heads=2, head_dim=16)
    save_backend(backend, tmp_path / "one-backend")
    with pytest.raises(ValueError, match=r"holds format 'knn-memory/backend', expected 'knn-memory/cache'"):
        model.load_memory(tmp_path / "one-backend")
    meta = json.loads((version / "meta.json").read_text())
    (version / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match=r"has format version 99; this library reads version 1"):
        model.load_memory(path)
    (path / CURRENT).write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match=r"unreadable CURRENT file|CURRENT names"):
        model.load_memory(path)


def _rewrite(path, edit):
    """Re-save a memory with ``edit`` applied to its loaded files (valid checksums, bad content)."""
    meta, files = read_version(path, "knn-memory/cache")
    files = {name: (obj.clone() if isinstance(obj, torch.Tensor) else obj) for name, obj in files.items()}
    edit(files)
    meta = {k: v for k, v in meta.items() if k != "files"}
    write_version(path, files, meta)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda f: f["cache.pt"].pop("positions"), r"cache\.pt does not hold a saved cache"),
        (lambda f: f.update({"cache.pt": [1, 2]}), r"cache\.pt does not hold a saved cache"),
        (lambda f: f["cache.pt"].update(batch_size=0), r"saved batch size 0 is not a positive int"),
        (lambda f: f["cache.pt"].update(batch_size=2), r"memory of layer 1 is \[B=1, H=2, d=16\], expected \[B=2"),
        (lambda f: f["cache.pt"]["local"].__setitem__(0, (torch.zeros(1, 2, 3, 16),) * 2),
         r"saved local keys of layer 0 have shape \[1, 2, 3, 16\], expected \[B=1, H=2, n=8, d=16\]"),
        (lambda f: f["cache.pt"].update(positions=torch.zeros(3, 8)), r"saved positions are not \[B=1, n\]"),
        (lambda f: f["cache.pt"]["backends"].update({"1": "annoy"}), r"unknown memory backend 'annoy'"),
        (lambda f: f["cache.pt"]["backends"].update({"1": "exact"}), r"memory-1\.pt does not match backend 'exact'"),
        (lambda f: f["cache.pt"]["backends"].pop("2"), r"saved memory layers .* do not match the config"),
        (lambda f: f.pop(memory_file(2)), r"memory-2\.pt does not hold a backend state"),
        (lambda f: f[memory_file(1)]["values"].pop(), r"saved memory has 1 rows of keys and 0 of values, its config says batch_size=1"),
        (lambda f: f["cache.pt"].update(seen_tokens=-1), r"saved token count -1 is not an int >= 0"),
        (lambda f: f["cache.pt"]["local"][0][0].__setitem__((0, 1, 2, 3), float("nan")),
         r"saved local keys of layer 0 contains NaN or inf"),
        (lambda f: f["cache.pt"]["local"][2][1].__setitem__((0, 0, 0, 0), float("-inf")),
         r"saved local values of layer 2 contains NaN or inf"),
        (lambda f: f["cache.pt"]["local"].__setitem__(1, tuple(t.double() * 1e300 for t in f["cache.pt"]["local"][1])),
         r"saved local keys of layer 1 holds a finite value of magnitude .* overflows to inf in float32"),
        (lambda f: f["cache.pt"]["local"].__setitem__(0, tuple(t.int() for t in f["cache.pt"]["local"][0])),
         r"saved local keys of layer 0 have dtype torch\.int32"),
    ],
)  # fmt: skip
def test_inconsistent_content_is_refused(saved, edit, message):
    model, path, _ = saved
    _rewrite(path, edit)
    with pytest.raises(ValueError, match=message):
        model.load_memory(path)


def test_bad_arguments(saved, config, tmp_path):
    model, path, _ = saved
    with pytest.raises(TypeError, match=r"cache must be a LongLlamaCache returned by the model, got dict"):
        model.save_memory({}, tmp_path / "x")
    with pytest.raises(ValueError, match=r"cache is empty \(the model has not run with it yet\)"):
        model.save_memory(LongLlamaCache(model.config), tmp_path / "x")
    other = config(mem_layers=[0])
    with pytest.raises(ValueError, match=r"cache was built for 3 layers with memory layers \[1, 2\]"):
        save_memory(model.load_memory(path), tmp_path / "x", other)
    with pytest.raises(TypeError, match=r"config must be a LongLlamaConfig, got dict"):
        load_memory(path, {})
    assert not (tmp_path / "x").exists()
