"""``knn-memory-policy-check``: recall of the ``"auto"`` index on a model's own captured keys and queries.

    python -m benchmarks.policy_check CAPTURE.pt [--nprobe 4,8,16,32] [--top-k 32] [--out results.json]

The keys of each memory layer are streamed into a ``faiss`` backend with ``index="auto"`` one window at
a time, exactly as the model adds them, so the policy's builds and rebuilds happen as in a run. Then
the captured queries (the most recent ones, which searched the whole memory) are scored with the
agreement harness (:func:`knn_memory.compare_backends`) against the exact dense memory: recall@k,
attention-mass recall and the attention output's relative error, for each ``nprobe`` asked for (a
search knob: no rebuild between them). Also reported: the list count, the keys scanned per query
(``nprobe * N / L + L``) against the N of an exact search, and the time the builds took.

A capture of the embedded model at 1M tokens is made with
``python -m benchmarks.capture --tokens 1048640 --backend faiss:auto --store-dtype bfloat16``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

import knn_memory
from benchmarks.sources import load_capture
from knn_memory.cli import BadArguments, OneLineParser, check_writable_file, error_exit
from knn_memory.validate import check_float, check_int

QUERY_BLOCK = 64  # queries compared at once (the dense reference holds [H, block, N] scores)


def _parse_ints(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name} {text!r} must be comma-separated ints, e.g. 4,8,16") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{name} {text!r} must list positive ints")
    return values


def _merge(reports: list[knn_memory.AgreementReport], weights: list[int]) -> dict:
    """Query-weighted means over blocks of the per-head means; worst block for the p01 figures."""
    total = sum(weights)

    def mean(field: str) -> float:
        return (
            sum(
                w * sum(getattr(r, field)) / len(getattr(r, field))
                for r, w in zip(reports, weights, strict=False)
            )
            / total
        )

    return {
        "recall_mean": mean("recall_mean"),
        "recall_p01_worst": min(min(r.recall_p01) for r in reports),
        "mass_recall_mean": mean("mass_recall_mean"),
        "mass_recall_p01_worst": min(min(r.mass_recall_p01) for r in reports),
        "rel_l2_error_mean": mean("rel_l2_error"),
        "tie_recall_mean": mean("tie_recall_mean"),
    }


@torch.no_grad()
def check_layer(
    keys: torch.Tensor,
    values: torch.Tensor,
    queries: torch.Tensor,
    *,
    top_k: int,
    nprobes: list[int],
    window: int,
    policy: dict,
    mem_dtype: str = "bfloat16",
) -> list[dict]:
    """One memory layer: keys/values [H, N, d], queries [H, Q, d] -> one result row per nprobe."""
    H, N, d = keys.shape
    geometry = {"num_heads": H, "head_dim": d, "batch_size": 1, "mem_dtype": mem_dtype}
    auto = knn_memory.create_backend("faiss", **geometry, index="auto", top_k=top_k, workers=1, **policy)
    exact = knn_memory.create_backend("exact", **geometry)
    start = time.perf_counter()
    for begin in range(0, N, window):
        auto.add(keys[None, :, begin : begin + window], values[None, :, begin : begin + window])
    add_seconds = time.perf_counter() - start
    exact.add(keys[None], values[None])
    head = auto.head_index(0, 0)
    rows = []
    for nprobe in nprobes:
        auto.set_search_params(nprobe=nprobe)
        ivfs = [auto.head_index(0, h)._index for h in range(H)]
        for ivf in ivfs:
            if ivf is not None:
                ivf.stats = dict.fromkeys(ivf.stats, 0)
        reports, weights = [], []
        t0 = time.perf_counter()
        for q0 in range(0, queries.shape[1], QUERY_BLOCK):
            block = queries[None, :, q0 : q0 + QUERY_BLOCK]
            reports.append(knn_memory.compare_backends(auto, exact, block, k=top_k))
            weights.append(block.shape[2])
        lists = head.nlist
        stats = [ivf.stats for ivf in ivfs if ivf is not None]
        queries_seen = sum(st["queries"] for st in stats)
        scanned = sum(st["keys_scanned"] for st in stats) / queries_seen if queries_seen else N
        rows.append(
            {
                "keys": N,
                "queries": int(queries.shape[1]),
                "top_k": top_k,
                "nprobe": nprobe,
                "lists": lists,
                "trainings": head.trainings,
                "max_nprobe": auto.policy.max_nprobe,
                "rank_shrink": auto.policy.rank_shrink,
                "lists_per_query": sum(st["lists_scanned"] for st in stats) / max(queries_seen, 1),
                "capped_fraction": sum(st["capped"] for st in stats) / max(queries_seen, 1),
                "scanned_per_query": round(scanned),
                "scanned_fraction": scanned / N,
                "add_seconds_all_heads": add_seconds,
                "compare_seconds": time.perf_counter() - t0,
                **_merge(reports, weights),
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = OneLineParser(prog="knn-memory-policy-check", description=__doc__.split("\n\n")[0])
    p.add_argument("capture", help="a capture file written by knn-memory-capture")
    p.add_argument("--nprobe", default="4,8,16,32", help="nprobe values to score (default 4,8,16,32)")
    p.add_argument("--top-k", type=int, default=32, help="entries per query (default 32)")
    p.add_argument(
        "--queries", type=int, default=512, help="most recent queries scored per head (default 512)"
    )
    p.add_argument("--lists-per-sqrt", type=float, default=None, help="override the policy's list factor")
    p.add_argument("--max-nprobe", type=int, default=None, help="override the policy's max_nprobe")
    p.add_argument(
        "--rank-shrink",
        type=float,
        default=None,
        help="override the policy's rank_shrink (1: rank by the bound)",
    )
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    try:
        args = p.parse_args(argv)
        nprobes = _parse_ints(args.nprobe, "--nprobe")
        if args.top_k < 1 or args.queries < 1:
            raise ValueError(f"--top-k and --queries must be >= 1, got {args.top_k} and {args.queries}")
        if args.lists_per_sqrt is not None:
            check_float(args.lists_per_sqrt, "--lists-per-sqrt", 0.0, 1e6, low_open=True)
        if args.max_nprobe is not None:
            check_int(args.max_nprobe, "--max-nprobe", 1)
        if args.rank_shrink is not None:
            check_float(args.rank_shrink, "--rank-shrink", 0.0, 1.0, low_open=True)
        if args.out:  # written after every layer is scored: checked first
            check_writable_file(args.out, "--out")
        data = load_capture(args.capture)
    except (BadArguments, ValueError, TypeError, OSError) as err:
        return error_exit("knn-memory-policy-check", err)
    knn_memory.set_threads(1)
    policy = {} if args.lists_per_sqrt is None else {"lists_per_sqrt": args.lists_per_sqrt}
    if args.max_nprobe is not None:
        policy["max_nprobe"] = args.max_nprobe
    if args.rank_shrink is not None:
        policy["rank_shrink"] = args.rank_shrink
    rows = []
    for li, layer in enumerate(data["layers"]):
        keys = data["keys"][li].float()
        values = data["values"][li].float()
        queries = data["queries"][li, :, -args.queries :].float()
        for row in check_layer(
            keys,
            values,
            queries,
            top_k=args.top_k,
            nprobes=nprobes,
            window=int(data.get("window", 64)),
            policy=policy,
        ):
            row = {"layer": layer, "tokens": data.get("tokens"), **row, "policy": policy or "default"}
            rows.append(row)
            print(
                f"layer {layer} N={row['keys']} L={row['lists']} nprobe={row['nprobe']}: "
                f"recall@{row['top_k']} {row['recall_mean']:.3f} (tie-aware {row['tie_recall_mean']:.3f}, "
                f"p01 {row['recall_p01_worst']:.2f}), mass {row['mass_recall_mean']:.4f}, "
                f"lists/query {row['lists_per_query']:.1f}, capped {100 * row['capped_fraction']:.1f}%, "
                f"keys scanned {100 * row['scanned_fraction']:.2f}%"
            )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
