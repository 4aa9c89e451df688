"""``knn-memory-agreement``: measure how a backend agrees with exact dense memory attention.

    knn-memory-agreement --backend faiss:IVF256,Flat --nprobe 16 --keys 32768 --k 128
    python -m knn_memory.agreement_cli --source attention --json out.json

Prints recall@k (mean, worst 1%), attention-mass recall and relative output error per head.
Exit code 2 with one line on stderr for bad arguments.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from knn_memory.agreement import measure_agreement
from knn_memory.cli import BadArguments, OneLineParser, check_writable_file
from knn_memory.registry import available_backends, parse_backend_spec
from knn_memory.synthetic import SOURCES, make_memory


def _parser() -> OneLineParser:
    p = OneLineParser(prog="knn-memory-agreement", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--backend",
        default="faiss",
        help=f"NAME[:SPEC][:OPTION=VALUE...], NAME one of {available_backends()}, e.g. faiss:IVF256,Flat",
    )
    p.add_argument(
        "--index", default=None, help="the backend's index, e.g. IVF256,Flat (same as faiss:IVF256,Flat)"
    )
    p.add_argument("--nprobe", type=int, default=None)
    p.add_argument("--efSearch", type=int, default=None)
    p.add_argument("--k", type=int, default=128, help="entries retrieved per query")
    p.add_argument("--source", default="attention", choices=SOURCES)
    p.add_argument("--keys", type=int, default=16384, help="memory entries per head")
    p.add_argument("--queries", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=100, help="head dim (LongLLaMA-3B: 100)")
    p.add_argument("--mem-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the full per-head report to this file")
    return p


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    keys, values, queries = None, None, None
    try:
        args = _parser().parse_args(argv)
        if args.keys < 1:
            raise ValueError(f"--keys must be >= 1, got {args.keys}")
        if args.queries < 1:
            raise ValueError(f"--queries must be >= 1, got {args.queries}")
        if args.k > args.keys:
            raise ValueError(f"--k ({args.k}) must not exceed --keys ({args.keys})")
        if args.json and os.path.isdir(args.json):
            raise ValueError(f"--json {args.json!r} is a directory; give a file name")
        if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
            raise ValueError(f"--json {args.json!r}: its directory does not exist")
        if args.json:
            check_writable_file(args.json, "--json")
        keys, values, queries = make_memory(
            args.source,
            num_heads=args.heads,
            head_dim=args.dim,
            n_keys=args.keys,
            n_queries=args.queries,
            seed=args.seed,
        )
        backend, options = parse_backend_spec(args.backend)
        if args.index is not None:
            if "index" in options:
                raise ValueError(f"--index {args.index!r}: --backend {args.backend!r} names an index already")
            options["index"] = args.index
        # the backend refuses a knob it has no use for, naming it
        options |= {k: getattr(args, k) for k in ("nprobe", "efSearch") if getattr(args, k) is not None}
        report = measure_agreement(
            keys, values, queries, backend, mem_dtype=args.mem_dtype, top_k=args.k, **options
        )
    except (BadArguments, ValueError, TypeError) as err:
        print(f"knn-memory-agreement: error: {err}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as err:  # sizes too large for this machine
        if not isinstance(err, MemoryError) and "allocate" not in str(err):
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(
            f"knn-memory-agreement: error: these sizes need more memory than is available ({reason})",
            file=sys.stderr,
        )
        return 2
    print(f"{args.backend} {args.index or ''} k={report.k} source={args.source} N={args.keys} d={args.dim}")
    print(f"{'head':>4} {'recall':>8} {'rec p01':>8} {'mass':>8} {'mass p01':>8} {'rel err':>8}")
    for h in range(args.heads):
        print(
            f"{h:>4} {report.recall_mean[h]:8.4f} {report.recall_p01[h]:8.4f} {report.mass_recall_mean[h]:8.4f} "
            f"{report.mass_recall_p01[h]:8.4f} {report.rel_l2_error[h]:8.4f}"
        )
    print(json.dumps(report.summary()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), **report.to_dict()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
