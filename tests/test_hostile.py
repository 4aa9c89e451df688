"""Hostile and careless use: files that try to run code, arguments that would crash Faiss or wrap, values
that overflow ``mem_dtype``, threads on every mutating call, saves that race, and small contract gaps.

Anything that could kill the interpreter if the library slipped runs in a child process.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from indexes.validate import all_finite, check_finite, check_float, check_int, check_tensor_fits
from knn_memory import create_backend, load_backend
from longllama import training

ROOT = Path(__file__).resolve().parent.parent
FEW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run_child(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def filled(name: str = "faiss", n: int = 40, **kw) -> object:
    mem = create_backend(name, num_heads=2, head_dim=8, top_k=4, **kw)
    g = torch.Generator().manual_seed(0)
    mem.add(torch.randn(1, 2, n, 8, generator=g), torch.randn(1, 2, n, 8, generator=g))
    return mem


# ---------------------------------------------------------------------- 1. no code execution from files
class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("mode", ["--export", "--resume"])
def test_a_crafted_checkpoint_runs_no_code(tmp_path, mode, capsys):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "checkpoint.pt", "wb") as f:
        torch.save({"model": _Payload(str(marker)), "step": 1}, f)
    argv = ["--out", str(run), mode, "--steps", "1", "--tokenizer-docs", "50"]
    if mode == "--resume":  # the reader --resume uses (a full run would train a tokenizer first)
        with pytest.raises(ValueError, match="cannot be read as plain data"):
            training.load_checkpoint(run / "checkpoint.pt")
    else:
        assert training.main(argv) == 2
        err = capsys.readouterr().err
        assert "cannot be read as plain data" in err and err.count("\n") == 1
    assert not marker.exists()


def test_a_crafted_memory_file_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    mem = filled("exact")
    mem.save(tmp_path / "m")
    version = next(p for p in (tmp_path / "m").iterdir() if p.name.startswith("v-"))
    state = version / "state.pt"
    state.write_bytes(pickle.dumps(_Payload(str(marker))))
    _recompute_checksums(version)
    with pytest.raises(ValueError, match="cannot be read"):
        load_backend(tmp_path / "m")
    assert not marker.exists()


def _recompute_checksums(version: Path) -> None:
    import hashlib
    import json

    meta = json.loads((version / "meta.json").read_text())
    for name in meta["files"]:
        data = (version / name).read_bytes()
        meta["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (version / "meta.json").write_text(json.dumps(meta))


# ---------------------------------------------------------------------- 2. nothing reaching Faiss crashes it
def test_long_and_numeric_extreme_factory_strings_never_crash():
    result = run_child(
        """
        import random
        from knn_memory import create_backend
        from longllama import LongLlamaConfig
        from longllama.cache import create_memory
        specs = ["Flat," * 4000, "IVF" + "9" * 40 + ",Flat", "IVF2147483648,Flat", "HNSW100000",
                 "PQ4x99", "PCA99999999,Flat", "IVF1," * 3000 + "Flat", "x" * 20000, "OPQ4_4294967297,PQ4",
                 "IVF16384_HNSW100000,Flat", "RR99999999,Flat", "SQ8" + " " * 100000]
        rng = random.Random(0)
        for _ in range(40):
            parts = [rng.choice(["IVF", "HNSW", "PQ", "PCA", "OPQ", "SQ", "RFlat", "Flat", ","])
                     + str(rng.choice([0, 1, 2**31, 2**32 + 1, 10**30, rng.randrange(10**6)])) for _ in range(3)]
            specs.append(",".join(parts))
        for spec in specs:
            for build in (
                lambda: create_backend("faiss", num_heads=1, head_dim=8, index=spec),
                lambda: create_memory(LongLlamaConfig(hidden_size=16, num_attention_heads=2, num_hidden_layers=2,
                                                      mem_layers=[1], mem_backend="faiss", mem_index=spec),
                                      batch_size=1, device="cpu"),
            ):
                try:
                    build()
                except (ValueError, TypeError):
                    pass
        print("ok")
        """,
        timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_an_edited_saved_spec_is_refused_before_faiss(tmp_path):
    mem = filled("faiss")
    mem.save(tmp_path / "m")
    result = run_child(
        f"""
        import json, torch
        from pathlib import Path
        from knn_memory import load_backend
        import tests.test_hostile as h
        root = Path({str(tmp_path / "m")!r})
        version = next(p for p in root.iterdir() if p.name.startswith("v-"))
        state = torch.load(version / "state.pt", weights_only=True)
        state["config"]["index"] = "Flat," * 5000
        for row in state["rows"]:
            for s in row:
                s["spec"] = "Flat," * 5000
        torch.save(state, version / "state.pt")
        h._recompute_checksums(version)
        try:
            load_backend(root)
        except ValueError as err:
            print("refused:", str(err)[:80])
        """
    )
    assert result.returncode == 0 and "refused" in result.stdout, result.stderr[-3000:]


# ---------------------------------------------------------------------- 3. integers that would wrap
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"index": "HNSW8", "efSearch": 2**31}, "efSearch"),
        ({"index": "IVF2,Flat", "nprobe": 2**31}, "nprobe"),
        ({"top_k": 2**31}, "top_k"),
        ({"head_dim": 2**40}, "head_dim"),
        ({"num_heads": 2**40}, "num_heads"),
        ({"batch_size": 2**40}, "batch_size"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -1}, "seed"),
        ({"workers": 2**40}, "workers"),
        ({"index": "IVF2,Flat", "train_sample": 2**64}, "train_sample"),
    ],
)
def test_every_knob_has_an_upper_bound_named_in_the_error(kwargs, name):
    args = {"num_heads": 2, "head_dim": 8, **kwargs}
    with pytest.raises(ValueError, match=rf"^{name} must be .*got -?\d+"):
        create_backend("faiss", **args)


@pytest.mark.parametrize("name", ["exact", "faiss"])
def test_k_beyond_the_bound_is_refused_before_any_allocation(name):
    mem = filled(name)
    with pytest.raises(ValueError, match=r"^k must be a positive int, got 2147483648 "):
        mem.search(torch.randn(1, 2, 3, 8), k=2**31)


def test_mem_top_k_too_large_is_refused_at_load():
    from longllama import LongLlamaConfig

    with pytest.raises(ValueError, match=r"mem_top_k must be a positive int, got 1099511627776"):
        LongLlamaConfig(mem_top_k=2**40)


@FEW
@given(value=st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.booleans(), st.none()))
def test_check_int_accepts_exactly_the_range(value):
    ok = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1000
    if ok:
        assert check_int(value, "knob", 1, 1000) == value
    else:
        with pytest.raises((TypeError, ValueError), match=r"^knob must be"):
            check_int(value, "knob", 1, 1000)


@FEW
@given(value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10), st.booleans()))
def test_check_float_refuses_non_finite(value):
    ok = not isinstance(value, bool) and value == value and abs(value) != float("inf") and 0 < value <= 5
    if ok:
        assert check_float(value, "x", 0, 5, low_open=True) == float(value)
    else:
        with pytest.raises((TypeError, ValueError), match=r"^x must be a finite number"):
            check_float(value, "x", 0, 5, low_open=True)


# ---------------------------------------------------------------------- 4. values beyond mem_dtype's range
@FEW
@given(
    source=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    target=st.sampled_from([torch.float16, torch.bfloat16]),
    scale=st.floats(0.999, 1.001),
    sign=st.sampled_from([1.0, -1.0]),
)
def test_refused_exactly_where_rounding_gives_inf(source, target, scale, sign):
    edge = torch.finfo(target).max + 0.5 * torch.finfo(target).max * torch.finfo(target).eps
    t = torch.tensor([0.5, sign * edge * scale], dtype=torch.float64).to(source)
    if not bool(torch.isfinite(t).all()):
        return
    if bool(torch.isinf(t.to(target)).any()):
        with pytest.raises(ValueError, match=r"x holds a finite value .* overflows to inf"):
            check_tensor_fits(t, "x", target)
    else:
        check_tensor_fits(t, "x", target)


def test_the_float16_edge():
    check_tensor_fits(torch.tensor([65519.0, -65519.0]), "x", torch.float16)
    with pytest.raises(ValueError, match=r"x holds a finite value of magnitude 65520 .* float16"):
        check_tensor_fits(torch.tensor([1.0, -65520.0]), "x", torch.float16)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_the_finite_check_finds_every_nan_and_inf_and_no_more(dtype):
    """One float64 sum for float32 and 16-bit floats: the largest values, many of them, never add up to
    inf there; float64 (whose largest values would) is checked element by element."""
    big = torch.full((3, 1000), torch.finfo(dtype).max, dtype=dtype)
    big[1] = -torch.finfo(dtype).max
    assert all_finite(big) and all_finite(big[:0])
    check_finite(big, "x")
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = big.clone()
        t[2, 777] = bad
        assert not all_finite(t)
        with pytest.raises(ValueError, match=r"^x contains NaN or inf$"):
            check_finite(t, "x")
    with pytest.raises(ValueError, match=r"^queries contain NaN or inf$"):
        check_finite(torch.tensor([float("nan")], dtype=dtype), "queries", "contain")


@pytest.mark.parametrize("name", ["exact", "faiss"])
@pytest.mark.parametrize("which", ["keys", "values"])
def test_finite_values_that_overflow_float16_are_refused(name, which):
    mem = create_backend(name, num_heads=1, head_dim=4, mem_dtype="float16", top_k=2)
    keys, values = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    (keys if which == "keys" else values)[0, 0, 1, 2] = 70000.0
    with pytest.raises(
        ValueError, match=rf"{which} holds a finite value .*overflows to inf in float16"
    ) as err:
        mem.add(keys, values)
    assert "NaN" not in str(err.value)
    assert len(mem) == 0
    ok = torch.full((1, 1, 3, 4), 65504.0)
    mem.add(ok, ok)  # the largest float16 is fine
    check_tensor_fits(torch.tensor([65519.0]), "x", torch.float16)
    with pytest.raises(ValueError, match="overflows"):
        check_tensor_fits(torch.tensor([65520.0]), "x", torch.float16)
    with pytest.raises(ValueError, match="NaN or inf"):
        check_tensor_fits(torch.tensor([float("nan")]), "x", torch.float16)


# ---------------------------------------------------------------------- 5. threads
def test_two_threads_adding_to_one_hnsw_memory_never_abort():
    result = run_child(
        """
        import threading, torch
        from knn_memory import create_backend
        for trial in range(3):
            mem = create_backend("faiss", num_heads=2, head_dim=16, index="HNSW16", top_k=4, workers=1)
            def work(seed):
                g = torch.Generator().manual_seed(seed)
                for _ in range(6):
                    mem.add(torch.randn(1, 2, 200, 16, generator=g), torch.randn(1, 2, 200, 16, generator=g))
            threads = [threading.Thread(target=work, args=(s,)) for s in range(2)]
            [t.start() for t in threads]; [t.join() for t in threads]
            assert int(mem.lengths[0]) == 2 * 6 * 200, mem.lengths
        print("ok")
        """,
        timeout=300,
    )
    assert result.returncode == 0 and "ok" in result.stdout, (result.returncode, result.stderr[-3000:])


@pytest.mark.parametrize("name", ["exact", "faiss"])
def test_every_mutating_call_from_threads_is_serialised(name, tmp_path):
    mem = filled(name, n=16)
    errors: list[BaseException] = []
    g = torch.Generator().manual_seed(1)
    kv = [(torch.randn(1, 2, 8, 8, generator=g), torch.randn(1, 2, 8, 8, generator=g)) for _ in range(4)]
    q = torch.randn(1, 2, 3, 8)

    def guard(fn):
        def run():
            try:
                for _ in range(4):
                    fn()
            except BaseException as err:
                errors.append(err)

        return run

    def add():
        for k, v in kv:
            mem.add(k, v)

    def search():
        hits = mem.search(q)
        assert hits.scores.shape[:3] == (1, 2, 3)

    def save():
        mem.save(tmp_path / "m")

    def reset():
        mem.reset(0)

    def rollback():
        mem.rollback(mem.checkpoint())

    jobs = [add, search, save, reset, search, rollback, add]
    threads = [threading.Thread(target=guard(fn)) for fn in jobs]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
    loaded = load_backend(tmp_path / "m")
    assert loaded.lengths.shape == (1,)


def test_searches_run_together_while_writers_wait():
    from knn_memory.locking import RWLock

    lock = RWLock()
    inside = threading.Barrier(2, timeout=10)

    def reader():
        lock.acquire_read()
        try:
            inside.wait()  # both readers hold the lock at once, or this times out
        finally:
            lock.release_read()

    threads = [threading.Thread(target=reader) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not inside.broken
    lock.acquire_read()
    with pytest.raises(RuntimeError, match="cannot run inside a search"):
        lock.acquire_write("add")
    lock.release_read()


# ---------------------------------------------------------------------- 6. saves never lose or delete data
def test_save_keeps_the_users_files_and_refuses_a_foreign_directory(tmp_path):
    mem = filled("exact")
    foreign = tmp_path / "notes"
    (foreign / "v-2024").mkdir(parents=True)
    (foreign / "v-2024" / "draft.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no saved memory"):
        mem.save(foreign)
    assert (foreign / "v-2024" / "draft.txt").read_text() == "mine"

    path = tmp_path / "m"
    mem.save(path)
    (path / "v-mine").mkdir()
    (path / "v-mine" / "x.txt").write_text("keep")
    (path / "v-0123456789ab").mkdir()  # looks like a version, but this library never wrote it
    mem.save(path)
    mem.save(path)
    assert (path / "v-mine" / "x.txt").read_text() == "keep"
    assert (path / "v-0123456789ab").is_dir()
    assert len([p for p in path.iterdir() if p.name.startswith("v-")]) == 3  # ours (one) + two of theirs


def test_two_processes_saving_to_one_directory_leave_it_loadable(tmp_path):
    code = f"""
        import sys, torch
        from knn_memory import create_backend
        mem = create_backend("faiss", num_heads=2, head_dim=8, top_k=4)
        g = torch.Generator().manual_seed(int(sys.argv[1]))
        mem.add(torch.randn(1, 2, 500, 8, generator=g), torch.randn(1, 2, 500, 8, generator=g))
        for _ in range(5):
            mem.save({str(tmp_path / "m")!r})
    """
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), str(i)], cwd=ROOT, stderr=subprocess.PIPE
        )
        for i in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    assert int(load_backend(tmp_path / "m").lengths[0]) == 500
    assert len([p for p in (tmp_path / "m").iterdir() if p.name.startswith("v-")]) == 1


def test_a_full_disk_is_an_oserror_and_leaves_nothing(tmp_path):
    result = run_child(
        f"""
        import resource, signal, torch
        from pathlib import Path
        from knn_memory import create_backend, load_backend
        path = Path({str(tmp_path / "m")!r})
        small = create_backend("exact", num_heads=1, head_dim=4)
        small.add(torch.ones(1, 1, 2, 4), torch.ones(1, 1, 2, 4))
        small.save(path)
        big = create_backend("exact", num_heads=4, head_dim=64, mem_dtype="float32")
        big.add(torch.randn(1, 4, 4096, 64), torch.randn(1, 4, 4096, 64))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))  # a 1 MiB "disk"
        try:
            big.save(path)
        except OSError as err:
            print("OSError", err)
        left = sorted(p.name for p in path.iterdir() if p.name.startswith((".tmp-", ".CURRENT.")))
        versions = [p.name for p in path.iterdir() if p.name.startswith("v-")]
        print("left", left, len(versions), int(load_backend(path).lengths[0]))
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OSError" in result.stdout and "left [] 1 2" in result.stdout, (
        result.stdout + result.stderr[-2000:]
    )


# ---------------------------------------------------------------------- 9. smaller contract gaps
@pytest.mark.parametrize("name", ["exact", "faiss"])
@pytest.mark.parametrize("heads", [slice(5, 9), slice(1, 1), slice(-1, 2), slice(0, 3)])
def test_heads_out_of_range_are_refused_alike(name, heads):
    mem = filled(name)
    with pytest.raises(ValueError, match=r"heads must be a non-empty slice start:stop"):
        mem.search(torch.randn(1, 1, 3, 8), heads=heads)


@pytest.mark.parametrize("name", ["exact", "faiss"])
def test_reset_takes_one_row_as_an_int(name):
    mem = filled(name)
    mem.reset(0)
    assert int(mem.lengths[0]) == 0
    with pytest.raises(TypeError, match="rows must be"):
        mem.reset("0")
    with pytest.raises(ValueError, match=r"row 3 out of range"):
        mem.reset(3)


def test_exact_reset_frees_the_rows_storage():
    mem = create_backend("exact", num_heads=2, head_dim=8, batch_size=2)
    mem.add(torch.randn(2, 2, 64, 8), torch.randn(2, 2, 64, 8))
    full = mem.nbytes
    mem.reset(0)
    assert mem.nbytes == full  # row 1 still holds 64 aligned entries
    mem.reset([1])
    assert mem.nbytes < full and len(mem) == 0


# ---------------------------------------------------------------------- 7. saved memories checked for meaning
def _tamper(root: Path, edit) -> None:
    version = next(p for p in root.iterdir() if p.name.startswith("v-"))
    state = torch.load(version / "state.pt", weights_only=True)
    edit(state)
    torch.save(state, version / "state.pt")
    _recompute_checksums(version)


def _faiss_bytes(index) -> torch.Tensor:
    import faiss

    return torch.from_numpy(faiss.serialize_index(index).copy())


def _swap_index(kind: str):
    def edit(state):
        import faiss

        for row in state["rows"]:
            for s in row:
                if kind == "l2":
                    index = faiss.IndexFlatL2(8)
                elif kind == "dim":
                    index = faiss.IndexFlatIP(4)
                else:
                    index = faiss.index_factory(8, "HNSW8", faiss.METRIC_INNER_PRODUCT)
                index.add(torch.randn(s["ntotal"], index.d).numpy())
                s["index"] = _faiss_bytes(index)

    return edit


@pytest.mark.parametrize(
    ("index", "edit", "match"),
    [
        ("Flat", lambda s: s["values"][0].view(-1).__setitem__(0, float("nan")), "NaN or inf"),
        ("IVF2,Flat", lambda s: s["values"][0].view(-1).__setitem__(3, float("inf")), "NaN or inf"),
        ("IVF2,Flat", _swap_index("l2"), "does not match its spec"),
        ("IVF2,Flat", _swap_index("dim"), "does not match its spec"),
        ("IVF2,Flat", _swap_index("hnsw"), "does not match its spec"),
    ],
)
def test_tampered_memories_with_recomputed_checksums_are_refused(tmp_path, index, edit, match):
    mem = filled("faiss", n=200, index=index, **({"min_train_points": 100} if "IVF" in index else {}))
    mem.save(tmp_path / "m")
    _tamper(tmp_path / "m", edit)
    result = run_child(
        f"""
        from knn_memory import load_backend
        try:
            load_backend({str(tmp_path / "m")!r})
            print("LOADED")
        except ValueError as err:
            print("refused:", err)
        """
    )
    assert result.returncode == 0 and "refused" in result.stdout and match in result.stdout, (
        result.stdout + result.stderr[-2000:]
    )


def test_exact_memory_with_nan_keys_is_refused(tmp_path):
    mem = filled("exact")
    mem.save(tmp_path / "m")
    _tamper(tmp_path / "m", lambda s: s["keys"].view(-1).__setitem__(5, float("nan")))
    with pytest.raises(ValueError, match="saved keys contains NaN or inf"):
        load_backend(tmp_path / "m")


def test_fingerprint_sees_every_weight():
    from longllama.memory_io import weights_fingerprint

    layer = torch.nn.Linear(256, 256)  # 65536 weights: a sample of 4096 would take every 16th
    before = weights_fingerprint(layer)
    assert weights_fingerprint(layer) == before
    with torch.no_grad():
        layer.weight.view(-1)[1] += 1.0  # in place: the remembered fingerprint must not be reused
    assert weights_fingerprint(layer) != before


# ---------------------------------------------------------------------- non-finite attention inputs
@pytest.mark.parametrize("bad", ["query", "local_keys", "local_values"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_memory_attention_refuses_non_finite_inputs(bad, value):
    from knn_memory import memory_attention

    g = torch.Generator().manual_seed(0)
    t = {name: torch.randn(1, 2, 5, 8, generator=g) for name in ("query", "local_keys", "local_values")}
    memory = create_backend("exact", num_heads=2, head_dim=8)
    memory.add(torch.randn(1, 2, 6, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g))
    assert torch.isfinite(
        memory_attention(t["query"], t["local_keys"], t["local_values"], memory=memory)
    ).all()
    t[bad][0, 1, 2, 3] = value
    with pytest.raises(ValueError, match=rf"^{bad} contains NaN or inf"):
        memory_attention(t["query"], t["local_keys"], t["local_values"], memory=memory)


# ---------------------------------------------------------------------- a cache of another backend
@pytest.mark.parametrize(
    ("made_by", "used_by", "message"),
    [
        ({}, {"mem_backend": "faiss", "mem_index": "Flat", "mem_top_k": 4},
         r"backend 'exact' \(this model's: 'faiss'\)"),
        ({"mem_backend": "faiss", "mem_index": "Flat", "mem_top_k": 4}, {},
         r"backend 'faiss' \(this model's: 'exact'\)"),
        ({"mem_backend": "faiss", "mem_index": "Flat", "mem_top_k": 4},
         {"mem_backend": "faiss", "mem_index": "HNSW8", "mem_top_k": 4},
         r"index 'Flat' \(this model's: 'HNSW8'\)"),
        ({}, {"mem_dtype": "bfloat16"}, r"mem_dtype 'float32' \(this model's: 'bfloat16'\)"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("built", [True, False])
def test_a_cache_of_another_memory_is_refused(made_by, used_by, message, built):
    from tests.tiny import tiny_model

    maker, user = tiny_model(**made_by), tiny_model(**used_by)
    ids = torch.randint(3, 64, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if built:
            cache = maker(ids).past_key_values
            assert cache.memory(1) is not None
        else:
            from longllama import LongLlamaCache

            cache = LongLlamaCache(maker.config)
        with pytest.raises(ValueError, match=message):
            user(ids[:, :4], past_key_values=cache)
        maker(ids[:, :4], past_key_values=cache)  # the model that made it goes on with it
