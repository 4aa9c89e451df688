"""``knn-memory-backend-check``: the two performance targets of the memory backends, measured.

1. Exact ``Flat`` search at 128k keys per head, 2048 queries, k = 128, d = 100 should reach at least
   0.6x the fp32 matrix-multiply rate measured in the same run. On a shared machine both rates move
   with the load, so they are measured in paired rounds (a square fp32 GEMM, then the search, back to
   back) and the median of the per-round ratios is reported. For the index alone (a matmul and the
   compiled selection, `indexes/select.py`), and for the
   whole backend search (which also gathers the k values of every query; timed once).
2. The dense backend under ``mem_attention_grouping`` (h heads x q queries) should never hold more
   than ``h x q x M`` memory scores at once. Measured by recording the score tensor of every
   ``search`` call that ``memory_attention`` makes, and with ``torch.profiler``'s memory events: the
   largest single allocation, and the peak of live bytes during the call.

    python -m benchmarks.backend_check [--keys 128k] [--heads 1] [--json out.json]

A benchmark script, not a test: exit code 0 whether targets are met or not (2 for bad arguments).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

import knn_memory
from benchmarks import measure
from benchmarks.ceilings import machine_info, matmul_gflops, search_shape_gflops
from benchmarks.results_io import DEFAULT_OUT
from benchmarks.sizes import parse_size
from indexes import faiss_threads, native
from indexes.streaming import EXACT_BLOCK, EXACT_KERNEL_KEYS, SELECT_SCORES
from knn_memory.cli import BadArguments, OneLineParser, check_writable_file, error_exit
from knn_memory.synthetic import make_memory
from knn_memory.validate import INT32_MAX, check_int

FLAT_TARGET = 0.6


def flat_check(
    n_keys: int,
    heads: int,
    queries: int,
    k: int,
    dim: int,
    seed: int = 0,
    ceiling_n: int = 2048,
    rounds: int = 3,
) -> dict:
    """Time exact Flat search and compare it with the fp32 matmul rate measured around it."""
    keys, values, q = make_memory(
        "attention", num_heads=heads, head_dim=dim, n_keys=n_keys, n_queries=queries, seed=seed
    )
    mem = knn_memory.create_backend("faiss", num_heads=heads, head_dim=dim, index="Flat", top_k=k)
    mem.add(keys, values)
    flop = 2.0 * queries * n_keys * dim * heads

    def index_search() -> None:
        for h in range(heads):
            mem.head_index(0, h).search(q[0, h], k)

    # Paired rounds: a GEMM rate, then an index search, back to back, so that both see the same load on
    # a shared machine; the ratio is taken per round and its median reported (and the best of each too).
    index_search()  # warm-up
    gemm, search, paired = [], [], []
    for _ in range(rounds):
        g = matmul_gflops(ceiling_n, torch.float32, repeats=3, budget_s=1.0)
        t = measure.time_call(index_search, single_above_s=0.0).best
        gemm.append(g)
        search.append(t)
        paired.append(flop / t / 1e9 / g)
    # The same on one thread (torch and Faiss): on an oversubscribed machine, spin-waiting OpenMP/OpenBLAS
    # threads can make two threads slower than one; this separates that from the kernel's own rate.
    g1 = matmul_gflops(ceiling_n, torch.float32, repeats=3, budget_s=1.0)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with faiss_threads(1):
            t1 = measure.time_call(index_search, single_above_s=0.0).best
    finally:
        torch.set_num_threads(torch_threads)
    backend = measure.time_call(lambda: mem.search(q), budget_s=4)
    after = matmul_gflops(ceiling_n, torch.float32, repeats=3, budget_s=1.0)
    # which exact search ran: the compiled kernel (from EXACT_KERNEL_KEYS keys, with AVX-512) or the matmul
    kernel = n_keys >= EXACT_KERNEL_KEYS and native.available() and native.isa() == "avx512"
    # the GEMM of the matmul path's shape: a block of keys against the queries cut to SELECT_SCORES scores
    block = min(EXACT_BLOCK, n_keys)
    rows = min(queries, max(1, SELECT_SCORES // block))
    shape_gemm = search_shape_gflops(rows, block, dim, repeats=3, budget_s=1.0)
    ceiling = max(*gemm, after)
    index_best = min(search)
    index_rate = flop / index_best / 1e9
    backend_rate = flop / backend.best / 1e9
    index_ratio = statistics.median(paired)
    return {
        "n_keys": n_keys,
        "heads": heads,
        "queries": queries,
        "k": k,
        "head_dim": dim,
        "rounds": rounds,
        "fp32_matmul_gflops_rounds": gemm,
        "fp32_matmul_gflops": ceiling,
        "index_search_s_rounds": search,
        "index_search_s": index_best,
        "index_gflops": index_rate,
        "index_ratio": index_ratio,
        "index_ratio_best_vs_best": index_rate / ceiling,
        "exact_path": "compiled kernel" if kernel else "matmul + selection",
        "search_shape": [rows, block, dim],
        "search_shape_gemm_gflops": shape_gemm,
        "index_vs_search_shape_gemm": index_rate / shape_gemm,
        "index_1thread_search_s": t1,
        "index_1thread_gflops": flop / t1 / 1e9,
        "index_1thread_ratio": flop / t1 / 1e9 / g1,
        "backend_search_s": backend.best,
        "backend_gflops": backend_rate,
        "backend_ratio": backend_rate / max(gemm[-1], after),
        "value_gather_s": max(backend.best - index_best, 0.0),
        "target_ratio": FLAT_TARGET,
        "index_meets_target": index_ratio >= FLAT_TARGET,
        "backend_meets_target": backend_rate / ceiling >= FLAT_TARGET,
    }


def _profile_peaks(fn) -> tuple[int, int]:
    """(largest single CPU allocation, peak of live CPU bytes) while ``fn`` runs, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    largest = max((e.self_cpu_memory_usage for e in prof.events()), default=0)
    peak = 0
    try:
        events = [
            e
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
        ]
        events.sort(key=lambda e: e.start_ns())
        live = 0
        for e in events:
            live += e.nbytes()
            peak = max(peak, live)
    except (AttributeError, RuntimeError):  # profiler internals differ across torch versions
        peak = -1
    return int(largest), int(peak)


def grouping_check(
    memory: int, heads: int, queries: int, local: int, dim: int, grouping: tuple[int, int] | None
) -> dict:
    """Scores held by dense memory attention with ``grouping`` (h heads, q queries per block)."""
    g = torch.Generator().manual_seed(0)
    mem = knn_memory.create_backend("exact", num_heads=heads, head_dim=dim, mem_dtype="bfloat16")
    mem.add(torch.randn(1, heads, memory, dim, generator=g), torch.randn(1, heads, memory, dim, generator=g))
    q = torch.randn(1, heads, queries, dim, generator=g)
    loc = torch.randn(1, heads, local, dim, generator=g)
    seen: list[int] = []
    search = mem.search

    def spy(*args, **kwargs):
        hits = search(*args, **kwargs)
        seen.append(hits.scores.numel())
        return hits

    mem.search = spy  # instance attribute: only this memory is observed
    largest, peak = _profile_peaks(
        lambda: knn_memory.memory_attention(q, loc, loc, memory=mem, grouping=grouping)
    )
    gh, gq = grouping or (heads, queries)
    gh, gq = min(gh, heads), min(gq, queries)
    bound = gh * gq * memory
    bound_with_local = gh * gq * (memory + local)
    return {
        "grouping": list(grouping) if grouping else None,
        "heads": heads,
        "queries": queries,
        "memory": memory,
        "local": local,
        "search_calls": len(seen),
        "largest_scores_elements": max(seen) if seen else 0,
        "bound_elements": bound,
        "scores_within_bound": bool(seen) and max(seen) <= bound,
        "largest_allocation_bytes": largest,
        "bound_with_local_bytes": 4 * bound_with_local,
        "allocation_within_bound": largest <= 4 * bound_with_local,
        "peak_live_bytes": peak,
        "peak_live_in_bounds": peak / (4 * bound_with_local) if peak > 0 else None,
    }


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="knn-memory-backend-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=parse_size, default=131072, help="keys per head for the Flat check (128k)")
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--queries", type=int, default=2048)
    p.add_argument("--k", type=int, default=128)
    p.add_argument("--dim", type=int, default=100)
    p.add_argument("--group-memory", type=parse_size, default=16384, help="memory size of the grouping check")
    p.add_argument("--group-heads", type=int, default=4)
    p.add_argument("--group-queries", type=int, default=512)
    p.add_argument("--json", default=str(DEFAULT_OUT / "backend_check.json"), help="'' to skip")
    try:
        args = p.parse_args(argv)
        for name in ("keys", "heads", "queries", "k", "dim", "group_memory", "group_heads", "group_queries"):
            check_int(getattr(args, name), "--" + name.replace("_", "-"), 1, INT32_MAX)
        if args.k > args.keys:
            raise ValueError(f"--k ({args.k}) must not exceed --keys ({args.keys})")
        if args.json:  # written after minutes of work: checked first
            check_writable_file(args.json, "--json")
    except (BadArguments, ValueError, TypeError) as err:
        return error_exit("knn-memory-backend-check", err)
    t0 = time.perf_counter()
    flat = flat_check(args.keys, args.heads, args.queries, args.k, args.dim)
    print(
        f"Flat search, {args.keys} keys/head x {args.heads} head(s), {args.queries} queries, k={args.k}, "
        f"d={args.dim}; fp32 matmul {', '.join(f'{g:.0f}' for g in flat['fp32_matmul_gflops_rounds'])} GFLOP/s "
        f"in {flat['rounds']} rounds, each just before an index search "
        f"({', '.join(f'{t:.3f}' for t in flat['index_search_s_rounds'])} s)"
    )
    for what, key, how in (
        ("index alone", "index", "median of paired rounds"),
        ("backend (with value gather)", "backend", "vs the GEMM around it"),
    ):
        ok = "MET" if flat[f"{key}_meets_target"] else "NOT MET"
        print(
            f"  {what:28s} {flat[f'{key}_search_s']:.3f} s  {flat[f'{key}_gflops']:.0f} GFLOP/s  "
            f"= {flat[f'{key}_ratio']:.2f}x the fp32 matmul rate ({how}; target >= {FLAT_TARGET}x: {ok})"
        )
    print(
        f"  {'index, 1 thread':28s} {flat['index_1thread_search_s']:.3f} s  "
        f"{flat['index_1thread_gflops']:.0f} GFLOP/s  = {flat['index_1thread_ratio']:.2f}x the (2-thread) fp32 "
        "matmul rate (for comparison)"
    )
    r, b, d = flat["search_shape"]
    print(
        f"  exact search by the {flat['exact_path']}; the GEMM of the matmul path's shape ([{r}, {d}] x "
        f"[{d}, {b}]) runs at {flat['search_shape_gemm_gflops']:.0f} GFLOP/s: the index search reaches "
        f"{flat['index_vs_search_shape_gemm']:.2f}x of it"
    )
    groups = []
    L = 256
    for grouping in (None, (1, 128), (2, 256)):
        r = grouping_check(args.group_memory, args.group_heads, args.group_queries, L, args.dim, grouping)
        groups.append(r)
        name = f"grouping={tuple(grouping)}" if grouping else "no grouping"
        print(
            f"Dense backend, {name}: {r['heads']} heads x {r['queries']} queries x M={r['memory']} "
            f"(+{L} local keys)"
        )
        ok = "MET" if r["scores_within_bound"] else "NOT MET"
        print(
            f"  largest scores tensor {r['largest_scores_elements']:,} elements vs bound h*q*M = "
            f"{r['bound_elements']:,} ({ok}; {r['search_calls']} search calls)"
        )
        ok = "MET" if r["allocation_within_bound"] else "NOT MET"
        live = f"{r['peak_live_in_bounds']:.1f}x that" if r["peak_live_in_bounds"] else "n/a"
        print(
            f"  largest single allocation {_fmt_bytes(r['largest_allocation_bytes'])} vs h*q*(M+local) fp32 "
            f"{_fmt_bytes(r['bound_with_local_bytes'])} ({ok}); peak live during the call "
            f"{_fmt_bytes(max(r['peak_live_bytes'], 0))} ({live})"
        )
    result = {
        "kind": "backend_check",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "seconds": time.perf_counter() - t0,
        "machine": machine_info(),
        "flat": flat,
        "grouping": groups,
    }
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        print(f"written: {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
