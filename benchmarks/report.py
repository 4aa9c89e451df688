"""``knn-memory-bench-report``: write ``benchmarks/README.md`` from the results of the benchmark tools.

    python -m benchmarks.report [benchmarks/results] [--readme benchmarks/README.md]

Reads ``scaling.jsonl`` (plots are redrawn into ``plots/``), ``backend_check.json`` and
``end_to_end.jsonl`` from the results folder and writes the report: the machine and its ceilings, the
targets (met or not, and by how much), the tables and the plots.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from pathlib import Path

from benchmarks.plots import flat_speedups, knob_label, main_rows, plot_all
from benchmarks.results_io import DEFAULT_OUT, iter_points, read_rows
from benchmarks.sharded import measured_rate, plot_projection, projection, summary_table
from benchmarks.sizes import format_size
from knn_memory.cli import BadArguments, OneLineParser, check_writable_file, error_exit

README = Path(__file__).parent / "README.md"
RECALL_TARGET = 0.95
SPEEDUP_TARGET = 10.0
FLAT_TARGET = 0.6

USAGE = """\
## Running the benchmarks

```bash
pip install -e ".[bench]"
python -m benchmarks.scaling --quick            # knn-memory-scaling: every index family at 4k and 16k keys, < 3 min
python -m benchmarks.scaling --preset medium    # 4k, 16k, 64k, 256k keys per head, and 1M with one head
python -m benchmarks.scaling --preset full      # 4k ... 1M in powers of two, PQ too, k / heads / head_dim sweeps
python -m benchmarks.scaling --sizes 64k,1M --indexes "Flat;IVF{nlist},Flat" --nprobe 32,128 \\
    --sources attention,captured:benchmarks/results/captures/embedded.pt --heads 1 --queries 2048,1
python -m benchmarks.capture [CHECKPOINT_DIR] --tokens 65536   # knn-memory-capture: keys/queries of a real model
python -m benchmarks.backend_check              # knn-memory-backend-check: the two backend targets
python -m benchmarks.end_to_end [--checkpoint DIR]   # knn-memory-end-to-end: prefill / decode vs context
python -m benchmarks.ceilings                   # knn-memory-ceilings: the machine's matmul and bandwidth
python -m benchmarks.report                     # knn-memory-bench-report: this file, from benchmarks/results
```

Every sweep appends to `benchmarks/results/scaling.jsonl` and mirrors it to `scaling.csv`; points already
there are skipped, so a long sweep runs in chunks (`--time-limit SECONDS`) and resumes by running the same
command again (`--fresh` starts over, `--list` shows what is left). `--device auto` (the default) runs on a
CUDA device where there is one (Faiss GPU holds `Flat` and `IVF*` indexes; other families are skipped there);
on a machine without one no GPU rows exist.
"""

METHOD = """\
## What is measured, and how

* **Sources.** `attention`: queries and keys from the same clustered latents through two different random
  projections (the query/key shift of real attention; the hard case for an index built on keys).
  `clustered`, `gaussian`: keys and queries from one distribution. `captured:<file>`: un-rotated memory keys
  and rotated queries recorded from a real checkpoint by `benchmarks.capture`, every (memory layer, head) one
  benchmark head.
* **A point** is one memory (N keys per head, H heads, head_dim d, bf16 memory as the model's default) built
  in one `add` (the *build* time: training included), searched with a window of q queries per head (2048:
  prefill; 1: a decode step), then one more 2048-key window added (the *add* time).
* **Search time** is the wall time of one window, all heads: *through the backend* (`MemoryBackend.search`,
  what a memory layer pays: index search plus the gather of the k values of every query), and *indexes only*
  (each head's index searched in turn). Small points are the median of 3-9 repeats after a warm-up; a call
  of 0.5 s or more is timed once.
* **Agreement** with exact dense attention (`knn_memory.compare_backends`, memory-only attention): recall@k
  (mean, and the worst 1% of queries of the worst head), attention-mass recall (share of the exact softmax
  mass the retrieved keys hold), relative L2 error of the attention output. Computed on up to 2048 queries,
  fewer at large N so that the exact scores fit in memory (the `agreement_queries` column). Exact `Flat`
  top-k has an error too: that is the top-k truncation itself.
* **Fraction scanned** is estimated from the index parameters: IVF `nprobe/nlist`; HNSW
  `max(efSearch,k) * M * ln(N) / (8 N)` (the usual `efSearch*M*ln N/N` divided by 8, which matches Faiss's
  own distance counters on i.i.d. keys at 16k-64k within about +-40%); exact and `Flat` 1.
* **Achieved rates.** Search GFLOP/s counts `2 d` FLOP per scanned key and query (plus the IVF coarse
  quantiser) and is compared with the fp32 matmul ceiling; search GB/s counts the bytes of keys or codes
  visited (Flat: once per 4096-query block; IVF and graphs: once per query) and is compared with the memory
  read ceiling (the relevant one for decode). Build GFLOP/s uses k-means (10 iterations) plus assignment for
  IVF. Add GB/s is the bytes one window adds. All of these are estimates of the work, not counters.
* **Ceilings** are measured at the start of every run: best-of-repeats square fp32 and bf16 `torch.matmul`,
  and `torch.sum` over 1 GiB. The machine is shared and noisy: each group also records a quick fp32 matmul
  rate and the load average at that moment (`fp32_gflops_at_group`, `load_avg_1m` in the CSV).
* **Bytes per stored token** (per head): `MemoryBackend.nbytes / (N * H)`, split into keys, index and values.
  The Faiss backend keeps a float32 copy of every key besides its index (for retraining and exact search
  before training), so *as implemented* every Faiss index costs more than dense bf16 K+V; the
  "index + values" column is what the index and values alone take.
"""


def _f(v, fmt: str = ".3g", none: str = "–") -> str:
    if v is None:
        return none
    if isinstance(v, float) and v != v:  # NaN
        return none
    return format(v, fmt)


def _index(r: dict) -> str:
    return r["index"] if r["index"] != "-" else f"{r['family']} (dense)"


def _latest_run(rows: list[dict]) -> dict | None:
    runs = [r for r in rows if r.get("kind") == "run"]
    return runs[-1] if runs else None


def _machine_section(all_rows: list[dict], check: dict | None) -> list[str]:
    run = _latest_run(all_rows)
    lines = ["## Machine and ceilings", ""]
    if run is None:
        return [*lines, "No scaling run yet.", ""]
    c = run["ceilings"]
    m = c.get("machine", {})
    gpu = m.get("gpu")
    lines += [
        f"Latest run {run['run_id']} on **{m.get('cpu', '?')}**, {m.get('cores', '?')} cores "
        f"({m.get('cpu_capability', '?')}), {m.get('ram_gib', '?')} GiB RAM, "
        f"{'GPU ' + gpu if gpu else 'no GPU'}; Python {m.get('python', '?')}, torch {m.get('torch', '?')}, "
        f"Faiss {m.get('faiss', '?')}.",
        "",
        "| ceiling (measured in the run) | value |",
        "|---|---|",
        f"| fp32 matmul (square {c['matmul_n']}) | {c['matmul_fp32_gflops']:.0f} GFLOP/s |",
        f"| bf16 matmul (square {c['matmul_n']}) | {c['matmul_bf16_gflops']:.0f} GFLOP/s |",
        f"| fp32 GEMM of the exact-search shape (2048 x N x 100) | {c['search_shape_fp32_gflops']:.0f} GFLOP/s |",
        f"| memory read (`sum` over {c['read_mib']} MiB) | {c['mem_read_gbs']:.1f} GB/s |",
        "",
    ]
    runs = [r for r in all_rows if r.get("kind") == "run"]
    if runs:
        lines += [
            "The tables combine these runs (a sweep resumed in chunks); each row's ratios use its own run's "
            "ceilings:",
            "",
            "| run | command (`python -m benchmarks.scaling ...`) | fp32 GFLOP/s | bf16 GFLOP/s | read GB/s | "
            "load avg at start |",
            "|---|---|---|---|---|---|",
        ]
        for r in runs:
            cc = r["ceilings"]
            argv = " ".join(a if " " not in a and ";" not in a else f'"{a}"' for a in r.get("argv") or [])
            lines.append(
                f"| {r['run_id']} | `{argv}` | {cc['matmul_fp32_gflops']:.0f} | {cc['matmul_bf16_gflops']:.0f} | "
                f"{cc['mem_read_gbs']:.1f} | {_f(r.get('load_avg_1m'), '.1f')} |"
            )
        lines.append("")
    lines += [
        "GPU: "
        + ("rows with `device` cuda are from the GPU." if gpu else "none here, so there are no GPU rows."),
        "",
    ]
    return lines


def _flat_target(points: list[dict], check: dict | None) -> list[str]:
    lines = [f"### Exact `Flat` at >= {FLAT_TARGET}x the fp32 matmul rate", ""]
    if check:
        f = check["flat"]
        lines += [
            f"`benchmarks.backend_check` ({f['n_keys']} keys/head, {f['heads']} head(s), {f['queries']} queries, "
            f"k={f['k']}, d={f['head_dim']}). The fp32 matmul rate was measured just before each of "
            f"{f.get('rounds', 1)} index searches ({', '.join(f'{g:.0f}' for g in f.get('fp32_matmul_gflops_rounds', []))} "
            f"GFLOP/s); the index ratio is the median of the per-round ratios:",
            "",
            "| search | time | GFLOP/s | x fp32 ceiling | target |",
            "|---|---|---|---|---|",
            f"| index alone | {f['index_search_s']:.3f} s | {f['index_gflops']:.0f} | {f['index_ratio']:.2f} | "
            f"{'met' if f['index_meets_target'] else 'not met'} |",
            f"| index, 1 thread (for comparison) | {f.get('index_1thread_search_s', float('nan')):.3f} s | "
            f"{f.get('index_1thread_gflops', float('nan')):.0f} | {f.get('index_1thread_ratio', float('nan')):.2f} | – |",
            f"| backend (with value gather) | {f['backend_search_s']:.3f} s | {f['backend_gflops']:.0f} | "
            f"{f['backend_ratio']:.2f} | {'met' if f['backend_meets_target'] else 'not met'} |",
            "",
        ]
        if f.get("search_shape_gemm_gflops") and f.get("exact_path") == "compiled kernel":
            r, b, d = f["search_shape"]
            lines += [
                "The search ran in the compiled exact kernel (`indexes.native.exact_top_k`: keys scored in "
                "packed tiles, only the scores that can enter the top-k kept; no score matrix). The GEMM "
                f"that the matmul path would run ([{r}, {d}] x [{d}, {b}]: a block of keys against the "
                f"queries cut to a bounded score matrix) ran at {f['search_shape_gemm_gflops']:.0f} GFLOP/s "
                f"in the same run; the kernel reached {f['index_vs_search_shape_gemm']:.2f}x of it, "
                "selection included.",
                "",
            ]
        elif f.get("search_shape_gemm_gflops"):
            r, b, d = f["search_shape"]
            lines += [
                f"The GEMM of the search's own shape ([{r}, {d}] x [{d}, {b}]: a block of keys against the "
                f"queries cut to a bounded score matrix) ran at {f['search_shape_gemm_gflops']:.0f} GFLOP/s in "
                f"the same run, so the index search reached {f['index_vs_search_shape_gemm']:.2f}x of the "
                f"matmul it is built on, itself {f['search_shape_gemm_gflops'] / f['fp32_matmul_gflops']:.2f}x "
                "the square GEMM's rate.",
                "",
            ]
    flat = [
        r for r in points if r["index"] == "Flat" and r["queries"] >= 1024 and r.get("index_search_gflops")
    ]
    if flat:
        lines += [
            "In the scaling sweep (prefill windows, index-level search, ratio to that run's fp32 ceiling):",
            "",
            "| source | N | heads | index search s | GFLOP/s | x ceiling | fp32 GFLOP/s at the point |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in sorted(flat, key=lambda r: (r["source"], r["n_keys"])):
            lines.append(
                f"| {r['source']} | {format_size(r['n_keys'])} | {r['heads']} | {r['index_search_s']:.3f} | "
                f"{r['index_search_gflops']:.0f} | {r['index_search_gflops_ratio']:.2f} | "
                f"{_f(r.get('fp32_gflops_at_group'), '.0f')} |"
            )
        lines.append("")
    return lines


def _million_target(points: list[dict]) -> list[str]:
    lines = [
        f"### At 1M keys per head: recall@128 >= {RECALL_TARGET} on the attention-like source at >= "
        f"{SPEEDUP_TARGET:.0f}x exact `Flat`",
        "",
    ]
    cand = [
        r
        for r in points
        if r["source"] == "attention" and r["head_dim"] == 100 and r["k"] == 128 and r["queries"] == 2048
    ]
    if not cand:
        return [*lines, "No attention-source prefill rows at d=100, k=128 yet.", ""]
    n_max = max(r["n_keys"] for r in cand)
    here = [r for r in cand if r["n_keys"] == n_max]
    speed = flat_speedups(here)
    if n_max != 2**20:
        lines += [f"Not measured at 1M yet; the largest N measured is {format_size(n_max)}:", ""]
    lines += [
        "Speed-up is index-level search time of exact `Flat` over that of the configuration (same heads, same "
        "window); recall is the mean over queries and heads.",
        "",
        "| index | knob | recall@128 | worst 1% | mass recall | speed-up vs Flat | scanned (est.) | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ann = [r for r in here if r["backend"] == "faiss" and r["index"] != "Flat" and id(r) in speed]
    for r in sorted(ann, key=lambda r: -(r["recall_mean"] or 0) * min(speed[id(r)], SPEEDUP_TARGET)):
        s, rec = speed[id(r)], r["recall_mean"]
        if rec >= RECALL_TARGET and s >= SPEEDUP_TARGET:
            status = "**met**"
        else:
            miss = []
            if rec < RECALL_TARGET:
                miss.append(f"recall short by {RECALL_TARGET - rec:.3f}")
            if s < SPEEDUP_TARGET:
                miss.append(f"{SPEEDUP_TARGET / s:.1f}x too slow")
            status = "missed: " + ", ".join(miss)
        lines.append(
            f"| {r['index']} | {knob_label(r) or '–'} | {rec:.3f} | {_f(r['recall_p01'], '.3f')} | "
            f"{_f(r['mass_recall_mean'], '.3f')} | {s:.1f}x | {_f(r['fraction_scanned'], '.3f')} | {status} |"
        )
    met = [r for r in ann if r["recall_mean"] >= RECALL_TARGET and speed[id(r)] >= SPEEDUP_TARGET]
    lines += ["", f"**{'Met' if met else 'Not met'}** at N = {format_size(n_max)}: "]
    if met:
        best = max(met, key=lambda r: speed[id(r)])
        lines[-1] += (
            f"`{best['index']}` {knob_label(best)} reaches {best['recall_mean']:.3f} at {speed[id(best)]:.1f}x."
        )
    else:
        at_recall = [r for r in ann if r["recall_mean"] >= RECALL_TARGET]
        fastest = max(at_recall, key=lambda r: speed[id(r)]) if at_recall else None
        best_fast = [r for r in ann if speed[id(r)] >= SPEEDUP_TARGET]
        best_rec = max(best_fast, key=lambda r: r["recall_mean"]) if best_fast else None
        parts = []
        if fastest:
            parts.append(
                f"the fastest configuration with recall >= {RECALL_TARGET} is `{fastest['index']}` "
                f"{knob_label(fastest)} at {speed[id(fastest)]:.1f}x"
            )
        if best_rec:
            parts.append(
                f"the best recall at >= {SPEEDUP_TARGET:.0f}x is `{best_rec['index']}` {knob_label(best_rec)} with "
                f"{best_rec['recall_mean']:.3f}"
            )
        lines[-1] += ("; ".join(parts) or "no configuration was measured") + "."
    slow = [r for r in here if r["backend"] == "faiss" and r.get("search_s") is None and r.get("search_note")]
    if slow:
        lines += [
            "",
            f"Through the backend (values gathered), ANN prefill searches at this N were not timed "
            f"({slow[0]['search_note']}); exact `Flat` was: see the table below.",
        ]
    lines.append("")
    return lines


def _bytes_section(points: list[dict]) -> list[str]:
    per: dict[str, dict] = {}
    for r in points:
        if r.get("bytes_per_token") is None:
            continue
        if r["family"] not in per or r["n_keys"] > per[r["family"]]["n_keys"]:
            per[r["family"]] = r
    if not per:
        return []
    lines = [
        "### Bytes per stored token (per head) against dense bf16 keys + values",
        "",
        "| backend / index | N | total B/token | keys | index | values | x dense bf16 | index + values only |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for fam, r in sorted(per.items(), key=lambda kv: kv[1]["bytes_per_token"]):
        lines.append(
            f"| {fam} | {format_size(r['n_keys'])} | {r['bytes_per_token']:.0f} | {r['bytes_per_token_keys']:.0f} | "
            f"{r['bytes_per_token_index']:.0f} | {r['bytes_per_token_values']:.0f} | {r['bytes_vs_dense_bf16']:.2f} | "
            f"{r['bytes_per_token_index_and_values']:.0f} |"
        )
    d = next(iter(per.values()))["head_dim"]
    lines += ["", f"Dense bf16 K+V at head_dim {d}: {4 * d} B per token per head.", ""]
    return lines


def _table(points: list[dict], prefill: bool) -> list[str]:
    rows = [r for r in points if (r["queries"] > 1) == prefill]
    if not rows:
        return []
    speed = flat_speedups(rows)
    if prefill:
        head = (
            "| source | N | H | q | index | knob | build s | add ms/window | search s | index search s | "
            "GFLOP/s (x fp32) | recall@k | worst 1% | mass recall | rel. err | scanned | B/token | speed-up |"
        )
        sep = "|---" * 18 + "|"
    else:
        head = (
            "| source | N | H | index | knob | search ms | index search ms | GB/s (x read) | recall@k | "
            "mass recall | scanned | speed-up |"
        )
        sep = "|---" * 12 + "|"
    lines = [head, sep]
    order = {"exact": 0, "Flat": 1}
    for r in sorted(
        rows,
        key=lambda r: (
            r["source"],
            r["n_keys"],
            r["heads"],
            order.get(r["family"], 2),
            r["index"],
            r.get("nprobe") or 0,
            r.get("efSearch") or 0,
        ),
    ):
        s = speed.get(id(r))
        gfl = r.get("index_search_gflops") if r["backend"] == "faiss" else r.get("search_gflops")
        gfl_ratio = (
            r.get("index_search_gflops_ratio") if r["backend"] == "faiss" else r.get("search_gflops_ratio")
        )
        if prefill:
            lines.append(
                f"| {r['source']} | {format_size(r['n_keys'])} | {r['heads']} | {r['queries']} | {_index(r)} | "
                f"{knob_label(r) or '–'} | {_f(r.get('build_s'), '.3g')} | {_f(1e3 * r['add_window_s'] if r.get('add_window_s') else None, '.3g')} | "
                f"{_f(r.get('search_s'), '.3g')} | {_f(r.get('index_search_s'), '.3g')} | "
                f"{_f(gfl, '.0f')} ({_f(gfl_ratio, '.2f')}) | {_f(r.get('recall_mean'), '.3f')} | "
                f"{_f(r.get('recall_p01'), '.3f')} | {_f(r.get('mass_recall_mean'), '.3f')} | "
                f"{_f(r.get('rel_err_mean'), '.3f')} | {_f(r.get('fraction_scanned'), '.3f')} | "
                f"{_f(r.get('bytes_per_token'), '.0f')} | {_f(s, '.1f')}{'x' if s else ''} |"
            )
        else:
            gbs = r.get("index_search_gbs") if r["backend"] == "faiss" else r.get("search_gbs")
            gbs_ratio = (
                r.get("index_search_gbs_ratio") if r["backend"] == "faiss" else r.get("search_gbs_ratio")
            )
            lines.append(
                f"| {r['source']} | {format_size(r['n_keys'])} | {r['heads']} | {_index(r)} | {knob_label(r) or '–'} | "
                f"{_f(1e3 * r['search_s'] if r.get('search_s') else None, '.3g')} | "
                f"{_f(1e3 * r['index_search_s'] if r.get('index_search_s') else None, '.3g')} | "
                f"{_f(gbs, '.1f')} ({_f(gbs_ratio, '.2f')}) | {_f(r.get('recall_mean'), '.3f')} | "
                f"{_f(r.get('mass_recall_mean'), '.3f')} | {_f(r.get('fraction_scanned'), '.3f')} | "
                f"{_f(s, '.1f')}{'x' if s else ''} |"
            )
    lines.append("")
    return lines


def _findings(
    points: list[dict], check: dict | None, all_rows: list[dict], side: list[dict] | None = None
) -> list[str]:
    """Bullet points computed from the results (each only when its data is there)."""
    out = []
    loads = [r.get("load_avg_1m") for r in all_rows if r.get("kind") == "run" and r.get("load_avg_1m")]
    cores = (_latest_run(all_rows) or {}).get("ceilings", {}).get("machine", {}).get("cores")
    if loads and cores and max(loads) > cores:
        out.append(
            f"**The machine was shared while these ran**: load average {min(loads):.1f}-{max(loads):.1f} on "
            f"{cores} cores at the start of the runs. Absolute times are therefore slow and noisy; compare rows "
            "of one group (same N, measured minutes apart), and read rates against the ceilings and the "
            "`fp32_gflops_at_group` column."
        )
    if check and check["flat"].get("index_1thread_search_s"):
        f = check["flat"]
        out.append(
            f"The exact `Flat` search (`benchmarks.backend_check`) took {f['index_search_s']:.2f} s with the default "
            f"threads (one per core) and {f['index_1thread_search_s']:.2f} s on one thread "
            f"({f['index_1thread_search_s'] / f['index_search_s']:.1f}x)"
            + (
                ", in the compiled exact kernel (no score matrix)."
                if f.get("exact_path") == "compiled kernel"
                else ". Its ratio to the square fp32 GEMM below is bounded by the GEMM of its own shape (see there)."
            )
        )
    gather = [
        r
        for r in points
        if r["index"] == "Flat" and r["queries"] > 1 and r.get("search_s") and r.get("index_search_s")
    ]
    if gather:
        big = max(gather, key=lambda r: r["n_keys"])
        out.append(
            f"**Backend search is dominated by the value gather**: at N = {format_size(big['n_keys'])}, exact `Flat` "
            f"took {big['search_s']:.1f} s through the backend against {big['index_search_s']:.1f} s in the index "
            f"({1 - big['index_search_s'] / big['search_s']:.0%} outside it). The gather of the k retrieved values "
            "costs the same for every index, so it also caps what any ANN index can save end to end; ANN "
            "speed-ups in this report are index-level."
        )
    faiss_rows = [r for r in points if r["backend"] == "faiss" and r.get("bytes_per_token")]
    if faiss_rows:
        r = max(faiss_rows, key=lambda r: r["bytes_per_token"])
        out.append(
            "**Every Faiss index costs more memory than dense bf16 K+V as implemented**: the backend keeps a "
            f"float32 copy of each key ({r['bytes_per_token_keys']:.0f} B/token) besides the index, e.g. "
            f"`{r['index']}` {r['bytes_per_token']:.0f} B/token vs {r['dense_bf16_kv_bytes_per_token']:.0f} dense."
        )
    hnsw = [
        r
        for r in points
        if r["family"].startswith("HNSW") and r["queries"] > 1 and r["source"] == "attention"
    ]
    if hnsw:
        r = max(hnsw, key=lambda r: (r["n_keys"], r.get("efSearch") or 0))
        out.append(
            f"HNSW (inner product) loses recall on the attention-like source as N grows: {r['recall_mean']:.2f} "
            f"at N = {format_size(r['n_keys'])}, efSearch {r.get('efSearch')}; IVF holds up far better there."
        )
    measured = points + (side or [])
    captured = [
        r
        for r in measured
        if r["source"].startswith("captured") and r["queries"] > 1 and r.get("recall_mean")
    ]
    if captured:
        n = max(r["n_keys"] for r in captured)
        at_n = sorted((r for r in captured if r["n_keys"] == n), key=_index)
        out.append(
            f"On keys and queries captured from the embedded model ({captured[0]['source']}, N = {format_size(n)}, "
            f"d = {captured[0].get('head_dim', '?')}), recall@k: "
            + ", ".join(
                f"{_index(r)} {knob_label(r)} {r['recall_mean']:.2f}".replace("  ", " ") for r in at_n
            )
            + "."
        )
    if not captured:
        out.append(
            "The package ships a trained model now, but its captured keys and queries are not in these tables "
            "yet (only synthetic sources were run here): `python -m benchmarks.capture` records them and the "
            "`medium`/`full` presets then include that source by default."
        )
    if not out:
        return []
    return ["## Reading these numbers", "", *[f"* {b}" for b in out], ""]


def _gather_section(points: list[dict], check: dict | None = None) -> list[str]:
    """Where a backend search spends its time beyond the index: the gather of the retrieved values."""
    rows = [
        r
        for r in points
        if r["index"] == "Flat" and r["queries"] > 1 and r.get("search_s") and r.get("index_search_s")
    ]
    if not rows:
        return []
    lines = [
        "### Backend search vs index search (exact `Flat`, prefill)",
        "",
        "The backend's search returns the k values of every query besides the ids and scores; the difference "
        "between the two timings is that gather (and the fan-out over heads).",
        "",
        "| source | N | heads | backend search s | index search s | outside the index |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["source"], r["n_keys"])):
        share = 1 - r["index_search_s"] / r["search_s"]
        lines.append(
            f"| {r['source']} | {format_size(r['n_keys'])} | {r['heads']} | {r['search_s']:.3g} | "
            f"{r['index_search_s']:.3g} | {max(share, 0):.0%} |"
        )
    lines.append("")
    flat = (check or {}).get("flat") or {}
    if flat.get("backend_search_s") and flat.get("index_search_s"):
        times = sorted(r["time"] for r in rows if r.get("time"))
        span = f" were measured {times[0][:16]} to {times[-1][:16]}" if times else ""
        share = max(1 - flat["index_search_s"] / flat["backend_search_s"], 0)
        lines += [
            f"These sweep rows{span}; `benchmarks.backend_check` at {check.get('time', '?')[:16]} "
            f"({format_size(flat['n_keys'])} keys, {flat['queries']} queries, k={flat['k']}): backend "
            f"{flat['backend_search_s']:.3g} s, index {flat['index_search_s']:.3g} s, value gather "
            f"{flat.get('value_gather_s', 0):.3g} s ({share:.0%} outside the index).",
            "",
        ]
    return lines


def _e2e_section(path: Path) -> list[str]:
    rows = [r for r in read_rows(path) if r.get("kind") == "e2e" and r.get("status") == "ok"]
    if not rows:
        return []
    lines = [
        "## End to end (whole model)",
        "",
        f"Model `{rows[-1]['model']}`: {rows[-1]['parameters']:,} parameters, {rows[-1]['layers']} layers, memory "
        f"layers {rows[-1]['mem_layers']}, {rows[-1]['heads']} heads x {rows[-1]['head_dim']}, window "
        f"{rows[-1]['window']}; prefill with `last_context_length` = half a window, then greedy decode steps. "
        "Measured on the same shared machine: with milliseconds per step, decode figures mostly show the load.",
        "",
        "| model | backend | context | prefill tokens/s | decode ms/token (median) | slowest step ms | memory MiB | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    latest: dict[str, dict] = {}
    for r in rows:
        latest[r["point_id"]] = r
    for r in sorted(latest.values(), key=lambda r: (r["model"], r["context"], r["backend"])):
        lines.append(
            f"| {r['model']} | {r['backend']} | {format_size(r['context'])} | {r['prefill_tokens_per_s']:.0f} | "
            f"{_f(r['decode_ms_per_token'], '.1f')} | {_f(r['decode_ms_max'], '.1f')} | "
            f"{r['memory_bytes'] / 2**20:.1f} | {r['peak_rss_mib']:.0f} |"
        )
    lines.append("")
    return lines


def _grouping_section(check: dict | None) -> list[str]:
    if not check:
        return []
    lines = [
        "### Dense backend with grouping: scores held at once",
        "",
        "`memory_attention(..., grouping=(h, q))` over the exact backend; the score tensors each `search` returns "
        "are recorded, and `torch.profiler` gives the largest single allocation and the peak of live bytes.",
        "",
        "| grouping | heads x queries x M (+local) | largest scores tensor | bound h*q*M | largest allocation | "
        "bound h*q*(M+local) fp32 | peak live | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in check["grouping"]:
        live = g.get("peak_live_in_bounds")
        lines.append(
            f"| {tuple(g['grouping']) if g['grouping'] else 'none'} | {g['heads']} x {g['queries']} x {g['memory']} "
            f"(+{g['local']}) | {g['largest_scores_elements']:,} | {g['bound_elements']:,} | "
            f"{g['largest_allocation_bytes'] / 2**20:.1f} MiB | {g['bound_with_local_bytes'] / 2**20:.1f} MiB | "
            f"{g['peak_live_bytes'] / 2**20:.1f} MiB ({_f(live, '.1f')}x bound) | "
            f"{'yes' if g['scores_within_bound'] and g['allocation_within_bound'] else 'no'} |"
        )
    lines += [
        "",
        "No single score tensor exceeds the bound. Without autograd the memory scores are scaled and clamped in "
        "place inside the joint [local | memory] buffer and the search's own scores are freed before the "
        "softmax, so two score-sized tensors (the joint buffer and the softmax output) are alive at once; "
        "under autograd the copies the backward pass needs stay (about 4x).",
        "",
    ]
    return lines


def _memory_growth_section(folder: Path, readme: Path) -> list[str]:
    """Bytes per memory token per backend over a long prefill (``benchmarks.memory_growth`` runs)."""
    runs = sorted(folder.glob("*/memory_growth.json")) if folder.is_dir() else []
    if not runs:
        return []
    lines = [
        "## Memory per token over a long prefill (whole model)",
        "",
        "`python -m benchmarks.memory_growth` prefills the model in 4096-token calls, each backend in a fresh "
        "process, and fits bytes per memory token to the resident memory (RSS) and to the backends' own "
        "`nbytes` after every call. *peak/final* is the highest per-call peak RSS growth over the final RSS "
        "growth: transient scratch (scores) shows there, a copy of the whole memory would show as >= 2 at every "
        "size. One folder per run under `benchmarks/results/memory_growth/`.",
        "",
        "| run | model | backend | tokens | nbytes B/token | per layer-head | RSS B/token | RSS/nbytes | "
        "peak/final | spikes | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in runs:
        data = json.loads(path.read_text())
        for row, run in zip(data["results"], data["runs"], strict=True):
            config = run.get("config", {})
            slots = len(config.get("mem_layers") or [1]) * config.get("num_attention_heads", 1)
            ratio = row["rss_over_nbytes"]
            lines.append(
                f"| {path.parent.name} | {run['spec'].get('model', '?')} | {row['backend']} | "
                f"{format_size(row['tokens'])} | {row['nbytes_bytes_per_token']:.0f} | "
                f"{row['nbytes_bytes_per_token'] / slots:.0f} | {row['rss_bytes_per_token']:.0f} | "
                f"{_f(ratio, '.2f')} | {row['max_peak_over_final_growth']:.2f} | {len(row['spikes'])} | "
                f"{row['seconds']:.0f} |"
            )
    lines.append("")
    for path in runs:
        note = path.parent / "note.txt"
        if note.is_file():
            lines.append(f"* `{path.parent.name}`: {' '.join(note.read_text().split())}")
    lines.append("")
    for path in runs:
        png = path.parent / "memory_growth.png"
        if png.is_file():
            lines += [f"![{path.parent.name}]({os.path.relpath(png, readme.parent)})", ""]
    return lines


def _policy_section(folder: Path) -> list[str]:
    """Recall of the ``"auto"`` index on captured keys and queries (``benchmarks.policy_check`` runs)."""
    runs = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not runs:
        return []
    lines = [
        "## The `auto` index on the model's own keys and queries",
        "",
        '`python -m benchmarks.policy_check CAPTURE` streams a capture\'s keys into `faiss` with `index="auto"` '
        "a window at a time (so its builds happen as in a run) and scores the most recent captured queries "
        "against exact dense memory. *tie-aware* recall counts a retrieved key as a hit when it scores at "
        "least the exact k-th score (a repeated text makes many keys equal, and plain recall then counts "
        "an equal key as a miss). *lists/query* and *keys scanned* are what the searches actually read: "
        "each query scans `nprobe` lists, then goes on list by list while a list it has not scanned could "
        "still hold a better key, up to `max_nprobe` (*capped*: queries that reached it). *rank* is the "
        "policy's `rank_shrink`: lists are ranked by the bound of their box shrunk about its centre by it "
        "(1: the box's own bound; rows without it were measured before the shrunk ranking, with 1). "
        "*mass* is the share of the exact memory softmax held by the retrieved keys (low for every top-32 "
        "here: these queries spread their attention over thousands of keys).",
        "",
        "| capture | layer | keys N | lists L | nprobe | max_nprobe | rank | recall@k | tie-aware | mass | "
        "lists/query | keys scanned | capped |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in runs:
        for r in json.loads(path.read_text()):
            lines.append(
                f"| {path.stem} | {r['layer']} | {format_size(r['keys'])} | {r['lists']} | {r['nprobe']} | "
                f"{r.get('max_nprobe', '-')} | {r.get('rank_shrink', '-')} | {r['recall_mean']:.3f} | "
                f"{_f(r.get('tie_recall_mean'), '.3f')} | "
                f"{r['mass_recall_mean']:.4f} | {_f(r.get('lists_per_query'), '.1f')} | "
                f"{100 * r['scanned_fraction']:.2f}% | {_f(100 * r.get('capped_fraction', 0), '.1f')}% |"
            )
    return [*lines, ""]


def _phases_section(folder: Path) -> list[str]:
    """One long prefill split into phases, beside each phase's floor (``benchmarks.phases`` runs)."""
    runs = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not runs:
        return []
    lines = [
        "## Where the time of one long prefill goes",
        "",
        "`python -m benchmarks.phases` reads one passkey prompt of the embedded model and times the "
        "library's own functions (nested calls subtracted, so the phases add up to the wall time). The "
        "floor of a phase is its work over this machine's ceiling measured in the same run with the same "
        "threads: FLOP over the fp32 matmul rate (model, search, builds), bytes over the memory read rate "
        "(gather, add). *x floor* is how far the phase is from it. The key add also assigns each key to "
        "its list (a product with every centroid): profiles that record their `work` count that FLOP in "
        "the add's floor; earlier ones count its bytes only, which overstates its distance from the floor.",
        "",
    ]
    for path in runs:
        r = json.loads(path.read_text())
        c = r["ceilings"]
        lines += [
            f"### {path.stem}: {format_size(r['tokens'])} tokens, `{r['backend']}` top-{r['top_k']}, "
            f"{r['threads']} thread(s)",
            "",
            f"Prefill {r['prefill_seconds']:.0f} s; decode {_f(r.get('decode_tokens_per_second'), '.1f')} "
            f"tokens/s after it; {r['memory_entries_per_head']} keys per head in {r.get('lists_per_head') or '-'} "
            f"lists; peak RSS {r['peak_rss_mib']:.0f} MiB; ceilings: fp32 matmul "
            f"{c['matmul_fp32_gflops']:.0f} GFLOP/s, memory read {c['mem_read_gbs']:.1f} GB/s.",
            "",
            "| phase | seconds | share | floor (s) | x floor |",
            "|---|---|---|---|---|",
        ]
        for p in r["phases"]:
            floor = p["floor_seconds"]
            ratio = "–" if not floor else f"{p['seconds'] / floor:.1f}"
            lines.append(
                f"| {p['phase']} | {p['seconds']:.1f} | {100 * p['share']:.1f}% | {_f(floor, '.1f')} | {ratio} |"
            )
        if r.get("worker_threads"):
            lines += [
                "",
                "On worker threads, inside the phases above (their own seconds, summed over the threads): "
                + ", ".join(
                    f"`{name}` {w['seconds']:.1f} s ({w['calls']} calls)"
                    for name, w in r["worker_threads"].items()
                )
                + ".",
            ]
        lines.append("")
    return lines


def _sharded_section(folder: Path, readme: Path) -> list[str]:
    """One memory on 1 rank against the same memory over 2 (``benchmarks.sharded`` runs)."""
    path = folder / "results.jsonl"
    rows = read_rows(path) if path.is_file() else []
    if not rows:
        return []
    speedups = []
    by_setting: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for r in rows:
        key = (r["backend"], str(r.get("index_options") or {}), r["length"], r.get("fill", "model"))
        by_setting[key][r["world_size"]] = r
    for (backend, options, length, fill), runs in sorted(by_setting.items()):
        if 1 in runs and 2 in runs:
            one, two = runs[1], runs[2]
            share = max(two["bytes_per_rank"]) / one["bytes_total"]
            label = backend + ("" if options == "{}" else f" {options}")
            prefill = (
                f", prefill {one['prefill_seconds'] / two['prefill_seconds']:.2f}x"
                if one.get("prefill_seconds") and two.get("prefill_seconds")
                else f"; memory filled with synthetic `{fill.split(':', 1)[-1]}` keys, no model"
            )
            speedups.append(
                f"* `{label}` at {format_size(length)} tokens: 2 ranks "
                f"search {two['search_queries_per_s'] / one['search_queries_per_s']:.2f}x as fast as 1 "
                f"(target 1.6x){prefill}; the larger rank holds {100 * share:.0f}% of the memory."
            )
    rate = measured_rate(rows)
    plan = projection([2**20, 10 * 2**20], 8, rate)
    plot = plot_projection(
        projection([2**16, 2**18, 2**20, 4 * 2**20, 10 * 2**20], 8, rate), folder / "projection.png"
    )
    proj = [
        "| mode | prefill tokens | payload per rank (GB) | wire per rank (GB) | collectives | "
        + " | ".join(f"s at {name}" for name in plan[0]["seconds"])
        + " |",
        "|---|---|---|---|---|" + "---|" * len(plan[0]["seconds"]),
    ]
    for p in plan:
        proj.append(
            f"| {p['mode']} | {format_size(p['tokens'])} | {p['payload_bytes_per_rank'] / 1e9:.1f} | "
            f"{p['wire_bytes_per_rank'] / 1e9:.1f} | {p['collectives']} | "
            + " | ".join(f"{sec:.2f}" for sec in p["seconds"].values())
            + " |"
        )
    return [
        "## One memory over 1 and 2 ranks (`sharded`)",
        "",
        "`python -m benchmarks.sharded` starts each world size's ranks (gloo on this machine's CPU cores, one "
        "thread each), reads one passkey prompt of the embedded model with the memory split over them, and "
        "then times memory attention of a block of queries per memory layer against the filled memory. "
        "Rows with *fill* `synthetic:...` skip the model (`--fill synthetic`): the memory, of the embedded "
        "model's geometry, is filled window by window with synthetic keys (`knn_memory.synthetic`, "
        "queries outside the keys' distribution) and only search is timed; that is how a dense memory "
        "is measured at 1M tokens, whose prefill would take hours. "
        "*sent B per (query, head)* is what a rank handed to the collectives per query, head and memory "
        "layer during the search step, beside the formula `4 + 4 (d + 1)` (`+ 4 k` in `global` mode): it "
        "does not depend on the memory size. *sent during prefill* is the whole prefill's.",
        "",
        summary_table(rows),
        "",
        *speedups,
        "",
        "### Projected: LongLLaMA-3B's memory over 8 GPUs",
        "",
        "From the formula (3 memory layers x 32 heads x head_dim 100, 2048-token windows, top-128 in "
        "`global` mode), what each rank moves during a prefill: the payload it hands the collectives, and "
        "what a ring all-reduce (`2 (w - 1) / w` x payload) and an all-gather (`(w - 1)` x payload) put on "
        "its link. Seconds at nominal link rates (not measured here: no GPU) and at this machine's gloo "
        "rate measured in the runs above (an all-reduce of 16 MiB between two ranks, timed alone). "
        "The memory's size does not enter: the cost grows with the tokens processed, not with the tokens "
        "held.",
        "",
        *proj,
        "",
        f"![communication projection]({os.path.relpath(plot, readme.parent)})",
        "",
    ]


def _plots_section(readme: Path, plots: list[Path]) -> list[str]:
    if not plots:
        return []
    lines = ["## Plots", ""]
    for p in plots:
        rel = os.path.relpath(p, readme.parent)
        lines += [f"![{p.stem}]({rel})", ""]
    return lines


def write_report(results: Path = DEFAULT_OUT, readme: Path = README) -> Path:
    """Write ``readme`` from the results in folder ``results``; returns its path."""
    results, readme = Path(results), Path(readme)
    all_rows = read_rows(results / "scaling.jsonl")
    points = main_rows(list(iter_points(results / "scaling.jsonl")))
    side = [r for r in iter_points(results / "scaling.jsonl") if r not in points]
    plots = plot_all(results / "scaling.jsonl", results / "plots") if points else []
    check_path = results / "backend_check.json"
    check = json.loads(check_path.read_text()) if check_path.is_file() else None
    lines = [
        "# Retrieval-scaling benchmarks",
        "",
        "Speed, recall and attention agreement of the kNN memory backends from 4k to 1M keys per head, against "
        "this machine's own ceilings. Generated by `python -m benchmarks.report` from `benchmarks/results/`; "
        "every number below comes from those files.",
        "",
        *_machine_section(all_rows, check),
        *_findings(points, check, all_rows, side),
        "## Targets",
        "",
        *_flat_target(points, check),
        *_million_target(points),
        *_bytes_section(points),
        *_grouping_section(check),
        *_gather_section(points, check),
    ]
    by_source = defaultdict(list)
    for r in points:
        by_source[r["source"]].append(r)
    lines += ["## Results: prefill windows", ""]
    for source, rows in sorted(by_source.items()):
        lines += [f"### {source}", "", *_table(rows, prefill=True)]
    lines += ["## Results: decode steps (1 query per head)", ""]
    for source, rows in sorted(by_source.items()):
        lines += [f"### {source}", "", *_table(rows, prefill=False)]
    if side:
        lines += ["## Side sweeps (k, heads, head_dim)", "", *_table(side, prefill=True)]
    lines += _plots_section(readme, plots)
    lines += _e2e_section(results / "end_to_end.jsonl")
    lines += _memory_growth_section(results / "memory_growth", readme)
    lines += _policy_section(results / "policy_check")
    lines += _phases_section(results / "phases")
    lines += _sharded_section(results / "sharded", readme)
    lines += [METHOD, USAGE]
    readme.write_text("\n".join(lines).rstrip() + "\n")
    return readme


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="knn-memory-bench-report", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="?", default=str(DEFAULT_OUT), help="results folder")
    p.add_argument("--readme", default=str(README), help="the file to write")
    try:
        args = p.parse_args(argv)
        if not Path(args.results).is_dir():
            raise ValueError(f"results: no results folder {Path(args.results).name}")
        check_writable_file(args.readme, "--readme")
    except (BadArguments, ValueError) as err:
        return error_exit("knn-memory-bench-report", err)
    print(write_report(Path(args.results), Path(args.readme)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
