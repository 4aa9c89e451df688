"""Result files of the benchmarks: JSON-lines rows read and appended, the measured points, the CSV mirror
of a scaling results file, and command lines cut to what a result may carry (no machine paths).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

CAPTURED = "captured:"
DEFAULT_OUT = Path(__file__).parent / "results"


def read_rows(path: Path) -> list[dict]:
    """Rows of a JSONL results file (a torn last line, from an interrupted run, is ignored)."""
    rows = []
    if not path.is_file():
        return rows
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def done_ids(rows: Iterable[dict]) -> set[str]:
    """Point ids that need no new run (measured, or skipped for a reason that will not change)."""
    return {r["point_id"] for r in rows if r.get("kind") == "point" and r.get("status") in ("ok", "skipped")}


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` to JSONL file ``path`` (created with its folder), one JSON object a line, synced to
    disk before returning (tensors as lists, paths as their last part)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=False, default=_json_default) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _json_default(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return value.name
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_csv(jsonl: Path, csv_path: Path) -> None:
    """Mirror every point row of ``jsonl`` into ``csv_path`` (columns: the union, in first-seen order)."""
    rows = [r for r in read_rows(jsonl) if r.get("kind") == "point"]
    columns: dict[str, None] = {}
    for r in rows:
        columns.update(dict.fromkeys(r))
    tmp = csv_path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _csv_value(v) for k, v in r.items()})
    tmp.replace(csv_path)


def _csv_value(v: object) -> object:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return v


def iter_points(path: Path) -> Iterator[dict]:
    """Measured points of a results file (for plots and reports)."""
    for r in read_rows(path):
        if r.get("kind") == "point" and r.get("status") == "ok":
            yield r


def portable_argv(argv: list[str]) -> list[str]:
    """The command line with file and folder paths cut to their last part (results carry no machine paths)."""
    out, after_path_option = [], False
    for a in argv:
        if after_path_option:
            a = Path(a).name
        elif a.startswith("--out=") or a.startswith("--readme="):
            key, _, value = a.partition("=")
            a = f"{key}={Path(value).name}"
        elif CAPTURED in a:
            a = ",".join(
                f"captured:{Path(x[len(CAPTURED) :]).name}" if x.startswith(CAPTURED) else x
                for x in a.split(",")
            )
        after_path_option = a in ("--out", "--readme")
        out.append(a)
    return out
