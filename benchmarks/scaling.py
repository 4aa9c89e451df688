"""``knn-memory-scaling``: retrieval speed, recall and attention agreement from 4k to 1M keys per head.

    python -m benchmarks.scaling --quick                 # under 3 minutes: a smoke run of every family
    python -m benchmarks.scaling --preset medium         # 4k .. 256k, and the 1M headline rows
    python -m benchmarks.scaling --preset full           # every size 4k .. 1M, k / heads / d sweeps
    python -m benchmarks.scaling --sizes 4k,64k,1M --indexes "Flat;IVF{nlist},Flat" --nprobe 32,128 \\
        --sources attention,captured:capture.pt --heads 1 --queries 2048,1 --k 128 --dims 100

Every point is one (source, memory size N per head, head_dim, heads, k, queries per window, backend,
index, search knob) and gives: build time, add time per 2048-key window, search time per window (all
heads; through the backend, as the model pays it, and through the indexes alone), recall@k (mean and
worst 1%), attention-mass recall and relative output error against exact dense attention, the
estimated fraction of keys scanned, bytes per stored token, and each time as achieved GFLOP/s or GB/s
and as a fraction of the machine's ceilings measured at the start of the same run.

Results are appended to ``<out>/scaling.jsonl`` (one JSON object per point, written as soon as the
configuration finishes) and mirrored to ``<out>/scaling.csv``; plots go to ``<out>/plots/``. A run
skips every point already in the JSONL, so a long sweep can be run in chunks (``--time-limit``) and
resumed by running the same command again. ``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from benchmarks.results_io import DEFAULT_OUT
from benchmarks.scaling_plan import DEFAULT_FAMILIES
from benchmarks.scaling_run import run
from benchmarks.sizes import parse_size
from benchmarks.sources import check_source
from knn_memory.cli import (
    BadArguments,
    OneLineParser,
    check_writable_dir,
    check_writable_file,
    error_exit,
)


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="knn-memory-scaling",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )

    def lst(conv):
        def parse(text: str) -> list:
            try:
                return [conv(x) for x in text.split(",") if x.strip()]
            except ValueError as err:  # argparse then names the option and keeps this reason
                raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None

        return parse

    p.add_argument("--quick", action="store_true", help="a smoke sweep that finishes in under 3 minutes")
    p.add_argument(
        "--preset",
        choices=["custom", "medium", "full"],
        default="custom",
        help="custom: the options below (default sizes 4k..1M); medium: 4k,16k,64k,256k and 1M (1 head); "
        "full: every size 4k..1M, PQ too, and k / heads / head_dim sweeps",
    )
    p.add_argument(
        "--out", default=None, help=f"results folder (default {DEFAULT_OUT.name}/, quick: .../quick)"
    )
    p.add_argument(
        "--sources", type=lst(str), default=None, help="clustered,gaussian,attention,captured:<f.pt>"
    )
    p.add_argument("--sizes", type=lst(parse_size), default=None, help="keys per head, e.g. 4k,64k,1M")
    p.add_argument(
        "--indexes",
        type=lambda s: [x for x in s.split(";") if x.strip()],
        default=None,
        help="';'-separated: exact, exact-topk, or Faiss factory strings ({nlist} = 4 sqrt(N)), each optionally "
        "with its own knob values after '@' (IVF{nlist},SQ8@8,32); default " + ";".join(DEFAULT_FAMILIES),
    )
    p.add_argument("--nprobe", type=lst(int), default=None, help="IVF nprobe sweep (default 8,32,128,512)")
    p.add_argument(
        "--efsearch", type=lst(int), default=None, help="HNSW efSearch sweep (default 128,256,512)"
    )
    p.add_argument("--k", type=lst(int), default=None, help="entries per query (default 128)")
    p.add_argument("--heads", type=lst(str), default=["auto"], help="heads per point, or auto (4/2/1 by N)")
    p.add_argument("--queries", type=lst(int), default=None, help="queries per window (default 2048,1)")
    p.add_argument("--dims", type=lst(int), default=None, help="head_dim (default 100, LongLLaMA-3B)")
    p.add_argument("--mem-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="auto", help="cpu, cuda[:N] or auto (cuda when present)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--agree-queries", type=int, default=2048, help="most queries used for agreement metrics")
    p.add_argument(
        "--max-backend-search-keys",
        type=parse_size,
        default=262144,
        help="above this N, time ANN prefill searches through the indexes only (the backend's value "
        "gather is the same for every index; Flat and exact are always timed through the backend)",
    )
    p.add_argument(
        "--time-limit", type=float, default=None, help="start no new group after this many seconds"
    )
    p.add_argument("--fresh", action="store_true", help="discard earlier results in --out first")
    p.add_argument("--list", action="store_true", help="print the points still to run and exit")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--readme", default=None, help="also write the report (e.g. benchmarks/README.md)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--verbose", action="store_true")
    return p


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    """``knn-memory-scaling``: 0 when every point ran, 1 when some failed, 2 for a bad argument."""
    try:
        args = _parser().parse_args(argv)
        args.argv = argv
        if args.device == "auto":
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.out is None:
            args.out = str(DEFAULT_OUT / "quick") if args.quick else str(DEFAULT_OUT)
        if args.quick and args.agree_queries == 2048:
            args.agree_queries = 512
        for s in args.sources or []:
            check_source(s)
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device here (GPU rows are measured only where one is)")
        if not args.list:  # results are written only after minutes of work: check the paths first
            check_writable_dir(args.out, "--out")
            if args.readme:
                check_writable_file(args.readme, "--readme")
    except (BadArguments, ValueError, TypeError) as err:
        return error_exit("knn-memory-scaling", err)
    summary = run(args)
    if args.list:
        return 0
    print(
        f"{summary.points_done} points measured, {summary.points_skipped} skipped, {summary.points_failed} failed "
        f"in {summary.seconds:.0f} s"
        + (" (stopped at --time-limit; run again to resume)" if summary.stopped_early else "")
    )
    for f in summary.failures:
        print(f"  failed: {f}", file=sys.stderr)
    out = Path(args.out)
    if not args.no_plots:
        from benchmarks.plots import plot_all

        for path in plot_all(out / "scaling.jsonl", out / "plots"):
            print(f"plot: {path}")
    if args.readme:
        from benchmarks.report import write_report

        print(f"report: {write_report(out, Path(args.readme))}")
    return 1 if summary.points_failed else 0


if __name__ == "__main__":
    sys.exit(main())
