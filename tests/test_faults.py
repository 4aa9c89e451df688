"""Faults: a save killed or failing half-way, searches from several threads, Faiss in forked children.

The SIGKILL and fork cases run in a child interpreter (``python -c "import test_faults; ..."``) under a
time limit, so a hang fails the test instead of stalling the run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from tiny import tiny_model

from knn_memory import create_backend, load_backend
from knn_memory.persistence import CURRENT

HERE = Path(__file__).parent


def run_child(call: str, timeout: float, threads: int = 1) -> dict:
    """Run ``test_faults.<call>`` in a fresh interpreter; return the JSON it prints last."""
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_faults; test_faults.{call}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=HERE.parent,
            env=env,
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{call} did not finish within {timeout} s (hang)\n{err.stdout}\n{err.stderr}")
    assert proc.returncode == 0, (
        f"{call}: exit status {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def same_state(a: object, b: object) -> bool:
    """Nested states equal: tensors by value and dtype, the rest by ==."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and sorted(a) == sorted(b) and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same_state, a, b))
    return a == b


def cache_state(cache) -> dict:
    """Everything a cache holds, as one nested state."""
    return {
        "tokens": cache.seen_tokens,
        "positions": cache.positions,
        "local": [(layer.keys, layer.values) for layer in cache.layers],
        "memory": {i: cache.memory(i).state() for i in cache.memory_layers},
    }


def leftovers(path: Path) -> list[str]:
    """Temporary files and folders of interrupted saves."""
    return sorted(p.name for p in path.iterdir() if p.name.startswith((".tmp-", f".{CURRENT}.")))


# ---------------------------------------------------------------------- (a) SIGKILL during a save
def _slow_down(seconds: float) -> None:
    """Make every step of a save take ``seconds`` longer (a slow disk), so a kill can land inside it."""
    import knn_memory.persistence as persistence

    def slow(fn):
        def wrapped(*args, **kwargs):
            time.sleep(seconds)
            return fn(*args, **kwargs)

        return wrapped

    os.fsync = slow(os.fsync)
    os.replace = slow(os.replace)
    persistence.torch.save = slow(persistence.torch.save)


def kill_during_save(root: str, delays: list[float]) -> None:
    """Save version 1, then for each delay fork a child that saves version 2 slowly and SIGKILL it.

    Prints one JSON line: per delay, which version loaded afterwards and what the leftovers held.
    """
    torch.set_num_threads(1)
    root = Path(root)
    mem = root / "mem"
    model = tiny_model(mem_layers=[1, 2])
    with torch.no_grad():
        cache = model(torch.randint(3, 64, (1, 40), generator=torch.Generator().manual_seed(1))).cache
        v1 = cache_state(cache)
        model.save_memory(cache, root / "v1")
        model(
            torch.randint(3, 64, (1, 300), generator=torch.Generator().manual_seed(2)), past_key_values=cache
        )
        v2 = cache_state(cache)
    assert not same_state(v1, v2)
    outcomes = []
    for delay in delays:
        shutil.rmtree(mem, ignore_errors=True)
        shutil.copytree(root / "v1", mem)  # a saved memory copied elsewhere is a saved memory
        pid = os.fork()
        if pid == 0:  # the writer: killed before it can exit, unless the delay outlasts the save
            try:
                _slow_down(0.06)
                model.save_memory(cache, mem)
            except BaseException:
                os._exit(1)
            os._exit(0)
        deadline = time.monotonic() + 30
        while not any(p.name.startswith(".tmp-v-") for p in mem.iterdir()):
            if time.monotonic() > deadline:
                raise AssertionError("the writer never started its save")
            time.sleep(0.0005)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status)
        loaded = cache_state(model.load_memory(mem))
        version = "v1" if same_state(loaded, v1) else "v2" if same_state(loaded, v2) else "neither"
        # any partial version the writer left must not load as a memory: point CURRENT at it and try
        partial = []
        live = (mem / CURRENT).read_text().strip()
        for p in sorted(mem.iterdir()):
            if p.is_dir() and p.name != live:
                probe = root / f"probe-{len(outcomes)}-{len(partial)}"
                shutil.copytree(p, probe / "v-probe")
                (probe / CURRENT).write_text("v-probe\n")
                try:
                    ok = same_state(cache_state(model.load_memory(probe)), v2)
                    partial.append("complete v2" if ok else "LOADED WRONG")
                except ValueError:
                    partial.append("refused")
        left = leftovers(mem)
        model.save_memory(model.load_memory(mem), mem)  # the next save cleans up
        assert same_state(cache_state(model.load_memory(mem)), loaded)
        outcomes.append(
            {
                "delay": delay,
                "killed": killed,
                "exit": None if killed else os.WEXITSTATUS(status),
                "loaded": version,
                "partial": partial,
                "leftovers": left,
                "after_next_save": leftovers(mem) + sorted(p.name for p in mem.iterdir() if p.is_dir())[1:],
            }
        )
    print(json.dumps(outcomes))


def test_sigkill_during_save_leaves_the_previous_memory(tmp_path):
    # the slowed save takes 13 steps x 60 ms after its temporary folder appears; 4 s outlasts it
    delays = [0.0, 0.01, 0.05, 0.15, 0.3, 0.5, 0.7, 4.0]
    outcomes = run_child(f"kill_during_save({str(tmp_path)!r}, {delays})", timeout=240)
    assert [o["delay"] for o in outcomes] == delays
    for o in outcomes:
        assert o["loaded"] in ("v1", "v2"), o
        assert "LOADED WRONG" not in o["partial"], o
        assert o["after_next_save"] == [], o
    # killed mid-write: the previous memory is what loads, and the partial writes were refused
    early = [o for o in outcomes if o["delay"] <= 0.05]
    assert all(o["killed"] and o["loaded"] == "v1" for o in early), early
    assert any(o["leftovers"] or "refused" in o["partial"] for o in early), early
    # a writer that finished before the kill left the new memory
    assert outcomes[-1]["loaded"] == "v2" and outcomes[-1]["exit"] == 0, outcomes[-1]


# ---------------------------------------------------------------------- (b) a write that fails
def _patch_calls(monkeypatch, target: str, fail_at: int | None = None) -> list[int]:
    """Count the calls of ``target`` ("os.fsync", "torch.save", ...); the ``fail_at``-th raises ENOSPC."""
    module, name = target.rsplit(".", 1)
    owner = {"os": os, "torch": torch}[module]
    real = getattr(owner, name)
    calls = [0]

    def patched(*args, **kwargs):
        calls[0] += 1
        if calls[0] == fail_at:
            raise OSError(28, f"No space left on device (simulated, {target} call {fail_at})")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, patched)
    return calls


@pytest.mark.parametrize("target", ["torch.save", "os.fsync", "os.replace"])
@torch.no_grad()
def test_failed_write_raises_and_keeps_the_previous_memory(tmp_path, monkeypatch, target):
    model = tiny_model(mem_layers=[1, 2])
    cache = model(torch.randint(3, 64, (1, 40), generator=torch.Generator().manual_seed(1))).cache
    v1 = cache_state(cache)
    path = tmp_path / "mem"
    model.save_memory(cache, path)
    model(torch.randint(3, 64, (1, 50), generator=torch.Generator().manual_seed(2)), past_key_values=cache)
    v2 = cache_state(cache)

    shutil.copytree(path, tmp_path / "v1")
    with monkeypatch.context() as patch:  # how many calls does one save over an existing one make?
        calls = _patch_calls(patch, target)
        model.save_memory(model.load_memory(path), path)
    assert calls[0] >= 2 and same_state(cache_state(model.load_memory(path)), v1)
    for n in range(1, calls[0] + 1):
        with monkeypatch.context() as patch:
            _patch_calls(patch, target, fail_at=n)
            with pytest.raises(OSError, match=r"simulated"):
                model.save_memory(cache, path)
        assert leftovers(path) == [], (target, n)
        loaded = cache_state(model.load_memory(path))
        # only a failure after CURRENT names the new version (its final directory fsync) leaves the new one
        after_switch = target == "os.fsync" and n == calls[0]
        assert same_state(loaded, v2 if after_switch else v1), (target, n)
        versions = [p.name for p in path.iterdir() if p.name.startswith("v-")]
        assert len(versions) == (2 if after_switch else 1), (target, n, versions)
        model.save_memory(cache, path)  # a good save cleans up
        assert len([p for p in path.iterdir() if p.name.startswith("v-")]) == 1
        assert same_state(cache_state(model.load_memory(path)), v2)
        shutil.rmtree(path)
        shutil.copytree(tmp_path / "v1", path)  # back to version 1 for the next failure


def test_failed_backend_save_keeps_the_previous_memory(tmp_path, monkeypatch):
    mem = create_backend("faiss", num_heads=2, head_dim=8, index="IVF2,Flat", top_k=4)
    g = torch.Generator().manual_seed(0)
    mem.add(torch.randn(1, 2, 100, 8, generator=g), torch.randn(1, 2, 100, 8, generator=g))
    mem.save(tmp_path / "m")
    before = load_backend(tmp_path / "m").state()
    mem.add(torch.randn(1, 2, 30, 8, generator=g), torch.randn(1, 2, 30, 8, generator=g))
    _patch_calls(monkeypatch, "os.replace", fail_at=1)
    with pytest.raises(OSError, match=r"simulated"):
        mem.save(tmp_path / "m")
    assert leftovers(tmp_path / "m") == []
    assert same_state(load_backend(tmp_path / "m").state(), before)


# ---------------------------------------------------------------------- (c) concurrent searches
def test_concurrent_searches_equal_sequential():
    g = torch.Generator().manual_seed(3)
    B, H, d = 2, 4, 16
    memories = [
        create_backend("faiss", num_heads=H, head_dim=d, batch_size=B, index="IVF4,Flat", nprobe=2, top_k=5, workers=2),
        create_backend("faiss", num_heads=H, head_dim=d, batch_size=B, index="HNSW8", top_k=5, workers=3),
        create_backend("faiss", num_heads=H, head_dim=d, batch_size=B, index="Flat", top_k=7, workers=4),
        create_backend("exact", num_heads=H, head_dim=d, batch_size=B, mem_dtype="float32"),
        create_backend("exact", num_heads=H, head_dim=d, batch_size=B, mem_dtype="float32", top_k=6),
    ]  # fmt: skip
    keys, values = torch.randn(B, H, 400, d, generator=g), torch.randn(B, H, 400, d, generator=g)
    for mem in memories:
        mem.add(keys, values)
    jobs = [(i % len(memories), torch.randn(B, H, 9, d, generator=g)) for i in range(60)]

    def search(job):
        hits = memories[job[0]].search(job[1])
        return (
            hits.ids,
            hits.scores,
            hits.values if hits.values is not None else torch.cat(hits.value_chunks, -2),
        )

    sequential = [search(job) for job in jobs]
    results: dict[int, tuple] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(t: int) -> None:
        try:
            start.wait()
            for j in range(t, len(jobs), 4):
                results[j] = search(jobs[j])
        except BaseException as err:  # reported below, with the thread's failure
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not any(th.is_alive() for th in threads), "a search thread hung"
    assert not errors, errors
    assert sorted(results) == list(range(len(jobs)))
    for j, expected in enumerate(sequential):
        for a, b in zip(expected, results[j], strict=True):
            assert torch.equal(a, b), j


# ---------------------------------------------------------------------- (d) Faiss after fork
class SearchDataset(torch.utils.data.Dataset):
    """Each item is a search of a memory: inherited through fork, or loaded from ``path`` in the worker."""

    def __init__(self, memory=None, path: str | None = None, queries: torch.Tensor | None = None) -> None:
        self.memory, self.path, self.queries = memory, path, queries

    def __len__(self) -> int:
        return self.queries.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.memory is None:
            self.memory = load_backend(self.path)
        import faiss

        return self.memory.search(self.queries[i]).ids, faiss.omp_get_max_threads()


def _two_threads(worker_id: int) -> None:
    """DataLoader workers run single-threaded; a worker that did not fork a busy parent may use more."""
    import faiss

    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)


def fork_after_multithreaded_faiss(root: str) -> None:
    """Use Faiss (and torch) with 2 threads and a running head pool, then fork three ways. Prints JSON."""
    import faiss
    import numpy as np

    from indexes import fork_safe_context

    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    x = np.random.default_rng(0).random((20000, 32), dtype=np.float32)
    faiss.knn(x[:2000], x, 4)  # OpenMP team of 2 now exists
    a = torch.randn(500, 500)
    (a @ a).sum()
    g = torch.Generator().manual_seed(0)
    mem = create_backend("faiss", num_heads=4, head_dim=16, index="IVF4,Flat", nprobe=2, top_k=3, workers=2)
    mem.add(torch.randn(1, 4, 600, 16, generator=g), torch.randn(1, 4, 600, 16, generator=g))
    queries = torch.randn(6, 1, 4, 5, 16, generator=g)
    expected = [mem.search(q).ids for q in queries]  # the head pool's threads are running too
    mem.save(Path(root) / "mem")
    out = {}

    # 1. os.fork: the child searches (head pool and OpenMP) and uses torch
    pid = os.fork()
    if pid == 0:
        ok = all(torch.equal(mem.search(q).ids, e) for q, e in zip(queries, expected, strict=True))
        faiss.knn(x[:2000], x, 4)
        (a @ a).sum()
        os._exit(0 if ok else 1)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            out["os_fork"] = (
                "ok" if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 else f"status {status}"
            )
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            out["os_fork"] = "hung"
            break
        time.sleep(0.01)

    # 2. DataLoader workers, forked (the default start method on Linux)
    def collect(loader) -> tuple[bool, list[int]]:
        got = list(loader)
        same = all(torch.equal(ids[0], e) for (ids, _), e in zip(got, expected, strict=True))
        return same, sorted({int(n) for _, n in got})

    loader = torch.utils.data.DataLoader(
        SearchDataset(memory=mem, queries=queries), batch_size=1, num_workers=2, timeout=60
    )
    out["dataloader_fork"] = collect(loader)

    # 3. DataLoader workers from a fork server: they load the saved memory and may use several threads
    loader = torch.utils.data.DataLoader(
        SearchDataset(path=str(Path(root) / "mem"), queries=queries),
        batch_size=1,
        num_workers=2,
        timeout=120,
        multiprocessing_context=fork_safe_context(),
        worker_init_fn=_two_threads,
    )
    out["dataloader_forkserver"] = collect(loader)
    print(json.dumps(out))


def test_faiss_after_fork_does_not_hang(tmp_path):
    out = run_child(f"fork_after_multithreaded_faiss({str(tmp_path)!r})", timeout=300, threads=2)
    assert out["os_fork"] == "ok"
    same, threads = out["dataloader_fork"]
    assert same and threads == [1]  # forked workers run Faiss single-threaded (the fork hook)
    same, threads = out["dataloader_forkserver"]
    assert same and threads == [2]  # workers from the fork server search with 2 OpenMP threads


def test_fork_safe_context_refuses_fork():
    from indexes import fork_safe_context

    assert fork_safe_context().get_start_method() == "forkserver"
    assert fork_safe_context("spawn").get_start_method() == "spawn"
    with pytest.raises(ValueError, match=r"method must be one of .*got 'fork'"):
        fork_safe_context("fork")
    with pytest.raises(ValueError, match=r"got 'threads'"):
        fork_safe_context("threads")


def test_fault_helpers_detect_differences():
    assert same_state({"a": [torch.ones(2)]}, {"a": [torch.ones(2)]})
    assert not same_state({"a": [torch.ones(2)]}, {"a": [torch.zeros(2)]})
    assert not same_state(torch.ones(2), torch.ones(2, dtype=torch.float64))
