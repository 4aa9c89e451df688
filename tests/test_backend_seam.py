"""The backend seam: a backend is one module plus its registration, an index any object with the KeyIndex
members. Discovery, the generic ``name[:spec]`` grammar, per-backend matching options, custom indexes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import indexes
import knn_memory
from knn_memory.registry import parse_backend_spec
from longllama.cli_args import backend_fields, parse_backend

ROOT = Path(__file__).resolve().parents[1]

TOY_MODULE = textwrap.dedent(
    '''
    """A backend that no file of the library names: dense memory with one extra, free option."""
    from knn_memory.backends.exact import ExactBackend
    from knn_memory.registry import register_backend


    @register_backend("toy")
    class ToyBackend(ExactBackend):
        FREE_OPTIONS = ("batch_size", "chunk_size", "label")

        def __init__(self, *, label: str = "plain", **kwargs):
            super().__init__(**kwargs)
            self.label = label

        @classmethod
        def parse_spec(cls, spec, name="--backend"):
            return {} if spec is None else {"label": spec}

        def config(self):
            return {**super().config(), "label": self.label}
    '''
)

CHILD = textwrap.dedent(
    """
    import json, sys, torch
    import knn_memory.backends
    knn_memory.backends.__path__.append(sys.argv[1])  # a new module in the backends package
    import knn_memory
    from longllama.cli_args import parse_backend
    from tests.tiny import tiny_model

    out = {"available": knn_memory.available_backends(), "fields": parse_backend("toy:shiny")}
    model = tiny_model(mem_backend="toy", mem_index_params={"label": "shiny"})
    ids = torch.randint(0, 64, (1, 40))
    with torch.no_grad():
        res = model(ids)
        model.save_memory(res.cache, sys.argv[2])
        other = tiny_model(mem_backend="toy", mem_index_params={"label": "other"})  # label is free
        cache = other.load_memory(sys.argv[2])
        exact = tiny_model(mem_backend="exact")
        try:
            exact.load_memory(sys.argv[2])
            out["refused"] = None
        except ValueError as err:
            out["refused"] = str(err)
    mem = cache.memory(1)
    out["loaded"] = [type(mem).__name__, mem.label, len(mem)]
    print(json.dumps(out))
    """
)


def test_a_new_backend_module_is_found_registered_and_used_by_the_model(tmp_path):
    """Nothing but the module: the registry finds it, the CLI grammar parses its spec, the model builds it,
    saves and loads it, and its own FREE_OPTIONS decide what a loading model may change."""
    (tmp_path / "toy.py").write_text(TOY_MODULE)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), str(tmp_path / "mem")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "toy" in out["available"] and "exact" in out["available"]
    assert out["fields"] == {"mem_backend": "toy", "mem_index_params": {"label": "shiny"}}
    assert out["loaded"][0] == "ToyBackend" and out["loaded"][1] == "shiny" and out["loaded"][2] > 0
    assert out["refused"] is not None and "mem_backend='toy'" in out["refused"]


def test_every_builtin_backend_module_registers_itself_in_a_fresh_interpreter():
    code = (
        "import json, pkgutil, knn_memory.backends as b, knn_memory.registry as r;"
        "print(json.dumps([sorted(m.name for m in pkgutil.iter_modules(b.__path__)), r.available_backends()]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    modules, names = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"exact", "faiss"} <= set(names)
    classes = {knn_memory.backend_class(n).__module__.rsplit(".", 1)[-1] for n in names}
    assert set(modules) <= classes, (
        f"a module of knn_memory.backends registers no backend: {set(modules) - classes}"
    )


def test_generic_grammar():
    assert parse_backend_spec("faiss:IVF64,Flat:nprobe=8") == ("faiss", {"index": "IVF64,Flat", "nprobe": 8})
    assert parse_backend_spec("faiss") == ("faiss", {})
    assert parse_backend_spec("exact") == ("exact", {})
    assert parse_backend_spec("faiss:auto:lists_per_sqrt=1.5:max_nprobe=8") == (
        "faiss",
        {"index": "auto", "lists_per_sqrt": 1.5, "max_nprobe": 8},
    )
    assert backend_fields("faiss", {"index": "auto", "nprobe": 4}) == {
        "mem_backend": "faiss",
        "mem_index": "auto",
        "mem_index_params": {"nprobe": 4},
    }
    for bad, needle in [
        ("faiss:Flat:nprobe=", "must be NAME=VALUE"),
        ("faiss:Flat:nprobe=4:nprobe=5", "given twice"),
        ("nope:Flat", "unknown memory backend 'nope'"),
        ("faiss:auto:x=a b", "number or a word"),
    ]:
        with pytest.raises(ValueError, match=needle):
            parse_backend(bad)


def test_unknown_option_names_the_backend_and_its_options():
    with pytest.raises(
        TypeError, match=r"the 'exact' backend takes no option\(s\) \['nprobe'\]; its options: \["
    ):
        knn_memory.create_backend("exact", num_heads=1, head_dim=4, nprobe=3)


@indexes.register_index("test-torch-flat")
class TorchFlat:
    """A brute-force index in plain torch: the KeyIndex members and nothing of Faiss."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.keys = torch.empty(0, dim)
        self.searches = 0

    @property
    def ntotal(self) -> int:
        return self.keys.shape[0]

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * 4

    def add_checked(self, x: torch.Tensor) -> None:
        self.keys = torch.cat([self.keys, x])

    def search_checked(self, q: torch.Tensor, k: int):
        self.searches += 1
        scores = q @ self.keys.T
        if scores.shape[1] < k:
            pad = k - scores.shape[1]
            scores = torch.cat([scores, torch.full((q.shape[0], pad), -torch.inf)], dim=1)
        top = scores.topk(k, dim=1)
        ids = torch.where(torch.isinf(top.values), -1, top.indices)
        return top.values, ids

    def state(self) -> dict:
        return {"dim": self.dim, "keys": self.keys.clone()}

    @classmethod
    def from_state(cls, state: dict, device="cpu") -> TorchFlat:
        new = cls(state["dim"])
        new.keys = state["keys"].clone()
        return new

    def clone(self) -> TorchFlat:
        return TorchFlat.from_state(self.state())


def _memories(index, B=2, H=3, d=8, n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(B, H, n, d, generator=g), torch.randn(B, H, n, d, generator=g)
    mask = torch.ones(B, n, dtype=torch.bool)
    mask[1, :7] = False
    mem = knn_memory.create_backend(
        "faiss", num_heads=H, head_dim=d, batch_size=B, mem_dtype="float32", top_k=5, index=index
    )
    mem.add(keys, values, mask)
    return mem, torch.randn(B, H, 4, d, generator=g)


def test_faiss_backend_takes_any_key_index(tmp_path):
    ours, queries = _memories(TorchFlat(8))
    flat, _ = _memories("Flat")
    a, b = ours.search(queries), flat.search(queries)
    assert torch.equal(a.ids, b.ids)
    torch.testing.assert_close(a.scores, b.scores)
    torch.testing.assert_close(a.values, b.values)
    assert ours.head_index(0, 0).searches == 1 and ours.index == "<test-torch-flat>"
    assert ours.nbytes == flat.nbytes  # both hold float32 keys once, and the same values
    # a checkpoint clones an index that cannot truncate; rollback forgets what came after
    cp = ours.checkpoint()
    ours.add(torch.randn(2, 3, 5, 8) * 10, torch.randn(2, 3, 5, 8))
    ours.rollback(cp)
    assert torch.equal(ours.search(queries).ids, a.ids)
    # saved with its kind, loaded through the index registry
    ours.save(tmp_path / "m")
    loaded = knn_memory.load_backend(tmp_path / "m")
    assert isinstance(loaded.head_index(1, 2), TorchFlat)
    assert torch.equal(loaded.search(queries).ids, a.ids)


def test_key_index_templates_are_checked():
    with pytest.raises(TypeError, match=r"lacks \['ntotal', 'nbytes'"):
        knn_memory.create_backend(
            "faiss", num_heads=1, head_dim=8, index=object.__new__(type("X", (), {"dim": 8}))
        )
    full = TorchFlat(8)
    full.add_checked(torch.randn(3, 8))
    with pytest.raises(ValueError, match="must be empty, holds 3 keys"):
        knn_memory.create_backend("faiss", num_heads=1, head_dim=8, index=full)
    with pytest.raises(ValueError, match="dim 8, but head_dim=4"):
        knn_memory.create_backend("faiss", num_heads=1, head_dim=4, index=TorchFlat(8))
    with pytest.raises(ValueError, match=r"\['nprobe'\] configure an index string"):
        knn_memory.create_backend("faiss", num_heads=1, head_dim=8, index=TorchFlat(8), nprobe=4)
