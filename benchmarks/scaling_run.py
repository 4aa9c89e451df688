"""A run of the scaling benchmark: every group of the plan not yet in the results, one row per point
appended as soon as its configuration finishes (so a run resumes), the CSV mirror kept current.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks import measure
from benchmarks.ceilings import format_ceilings, matmul_gflops, measure_ceilings
from benchmarks.results_io import append_rows, done_ids, portable_argv, read_rows, write_csv
from benchmarks.scaling_group import GroupRunner
from benchmarks.scaling_plan import build_plan
from benchmarks.sources import SourceUnavailable, source_label


@dataclass
class RunSummary:
    """What one run did: points measured, skipped and failed, its seconds, and why configurations failed."""

    run_id: str
    points_done: int = 0
    points_skipped: int = 0
    points_failed: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    failures: list[str] = field(default_factory=list)


def run(args: argparse.Namespace) -> RunSummary:
    """Run the plan of ``args`` (the CLI's options) into ``args.out``, skipping points already there."""
    out = Path(args.out)
    jsonl, csv_path = out / "scaling.jsonl", out / "scaling.csv"
    if args.fresh:
        for p in (jsonl, csv_path):
            p.unlink(missing_ok=True)
    plan = build_plan(args)
    done = done_ids(read_rows(jsonl))
    pending = [(g, [p for p in g.point_ids() if p not in done]) for g in plan]
    pending = [(g, ids) for g, ids in pending if ids]
    total = sum(len(ids) for _, ids in pending)
    run_id = time.strftime("%Y%m%d-%H%M%S")
    summary = RunSummary(run_id)
    t_start = time.perf_counter()
    if args.list:
        for _g, ids in pending:
            for p in ids:
                print(p)
        print(f"{total} points to run, {len(done)} already in {jsonl.name}")
        return summary
    if not pending:
        print(f"nothing to do: all {sum(len(g.point_ids()) for g in plan)} points are in {jsonl}")
        write_csv(jsonl, csv_path)
        return summary
    ceilings = measure_ceilings(args.device, quick=args.quick)
    print(format_ceilings(ceilings), file=sys.stderr)
    append_rows(
        jsonl,
        [
            {
                "kind": "run",
                "run_id": run_id,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "argv": portable_argv(sys.argv[1:] if args.argv is None else args.argv),
                "ceilings": ceilings.to_dict(),
                "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                "planned_points": total,
            }
        ],
    )
    bar = tqdm(total=total, unit="pt", desc="scaling", file=sys.stderr, disable=args.no_progress)
    for g, ids in pending:
        if args.time_limit and time.perf_counter() - t_start > args.time_limit:
            summary.stopped_early = True
            break
        todo = set(ids)
        runner = GroupRunner(g, ceilings, run_id, args)
        bar.set_postfix_str(f"{source_label(g.source)} N={g.n_keys} H={g.heads} d={g.head_dim} k={g.k}")
        try:
            runner.prepare()
        except SourceUnavailable as err:
            rows = [runner.skip_row(f, s, kv, q, str(err)) for f, s, kv in g.configs() for q in g.queries]
            rows = [r for r in rows if r["point_id"] in todo]
            append_rows(jsonl, rows)
            summary.points_skipped += len(rows)
            bar.update(len(rows))
            continue
        by_family: dict[tuple[str, str | None], list[dict]] = {}
        for family, spec, kv in g.configs():
            by_family.setdefault((family, spec), []).append(kv)
        for (family, spec), knob_values in by_family.items():
            ids_here = {g.point_id(family, spec, kv, q) for kv in knob_values for q in g.queries}
            if not ids_here & todo:
                continue
            bar.set_description(f"scaling {measure.index_family(spec) if spec else family}")
            try:
                rows = runner.run_config(family, spec, knob_values, todo)
                rows = [r for r in rows if r["point_id"] in todo]
            except Exception as err:  # one failing configuration must not end a long sweep
                msg = f"{type(err).__name__}: {err}"
                summary.failures.append(f"{g.point_id(family, spec, knob_values[0], g.queries[0])}: {msg}")
                if args.verbose:
                    traceback.print_exc()
                rows = [
                    {**runner.base_row(family, spec, kv, q), "status": "error", "reason": msg}
                    for kv in knob_values
                    for q in g.queries
                ]
                rows = [r for r in rows if r["point_id"] in todo]
                summary.points_failed += len(rows)
            append_rows(jsonl, rows)
            write_csv(jsonl, csv_path)
            summary.points_done += sum(r["status"] == "ok" for r in rows)
            summary.points_skipped += sum(r["status"] == "skipped" for r in rows)
            bar.update(len(rows))
        runner.release()
    bar.close()
    append_rows(
        jsonl,
        [
            {
                "kind": "run_end",
                "run_id": run_id,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "seconds": time.perf_counter() - t_start,
                "fp32_gflops_at_end": matmul_gflops(
                    1024, torch.float32, torch.device(args.device), repeats=3
                ),
                "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            }
        ],
    )
    write_csv(jsonl, csv_path)
    summary.seconds = time.perf_counter() - t_start
    return summary
