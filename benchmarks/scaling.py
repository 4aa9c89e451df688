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
import csv
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

import knn_memory
from benchmarks import measure
from benchmarks.ceilings import Ceilings, format_ceilings, matmul_gflops, measure_ceilings
from benchmarks.sources import (
    SourceUnavailable,
    capture_geometry,
    captured_path,
    check_source,
    is_captured,
    load_memory,
    source_label,
)
from knn_memory.cli import (
    BadArguments,
    OneLineParser,
    check_writable_dir,
    check_writable_file,
    error_exit,
    parse_count,
)

CAPTURED = "captured:"
WINDOW = 2048  # keys added per window (LongLLaMA-3B's window)
DEFAULT_OUT = Path(__file__).parent / "results"
DEFAULT_FAMILIES = ("exact", "Flat", "IVF{nlist},Flat", "HNSW32", "IVF{nlist},SQ8@8,32")
FULL_FAMILIES = (*DEFAULT_FAMILIES, "IVF{nlist},PQ25")
SCORE_BLOCK_BYTES = 256 * 2**20  # dense backend: scores held per query block while timing
AGREE_ELEMENTS = 2**27  # agreement: queries x keys per head held at once (about 512 MiB of scores)


# ---------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Group:
    """Points that share one memory: a source, N, d, H, k; every family, knob value and query count."""

    source: str
    n_keys: int
    head_dim: int
    heads: int
    k: int
    queries: tuple[int, ...]
    families: tuple[str, ...]
    nprobe: tuple[int, ...]
    efsearch: tuple[int, ...]
    mem_dtype: str = "bfloat16"
    device: str = "cpu"
    seed: int = 0
    agree_max_queries: int = 2048

    def configs(self) -> list[tuple[str, str | None, dict[str, int]]]:
        """(family template, resolved factory string or None, search knobs) for every configuration."""
        out = []
        for family in self.families:
            if family in ("exact", "exact-topk"):
                out.append((family, None, {}))
                continue
            template, _, own = family.partition("@")  # "IVF{nlist},SQ8@8,32": this family's own knob values
            spec = measure.resolve_index(template, self.n_keys)
            knob = measure.search_knob(spec)
            own_values = tuple(int(v) for v in own.split(",") if v.strip())
            if knob == "nprobe":
                nlist = measure.ivf_nlist(spec)
                values = sorted({min(v, nlist) for v in own_values or self.nprobe})
                out.extend((family, spec, {"nprobe": v}) for v in values)
            elif knob == "efSearch":
                out.extend((family, spec, {"efSearch": v}) for v in own_values or self.efsearch)
            else:
                out.append((family, spec, {}))
        return out

    def point_id(self, family: str, spec: str | None, knobs: dict[str, int], queries: int) -> str:
        backend = family if spec is None else "faiss"
        knob = ",".join(f"{k}={v}" for k, v in sorted(knobs.items())) or "-"
        return (
            f"{portable_argv([self.source])[0]}|N={self.n_keys}|d={self.head_dim}|H={self.heads}|k={self.k}|q={queries}|"
            f"{backend}|{spec or '-'}|{knob}|{self.mem_dtype}|{self.device}|seed={self.seed}"
        )

    def point_ids(self) -> list[str]:
        return [self.point_id(f, s, kn, q) for f, s, kn in self.configs() for q in self.queries]


def parse_size(text: str, name: str = "size") -> int:
    """``4096``, ``4k`` (4096), ``1M`` (1048576); ``ValueError`` naming ``name`` for anything else
    (not a number, NaN, inf, below 1 or beyond any run)."""
    return parse_count(text, name, minimum=1, what="size")


def log_sizes(low: int, high: int) -> list[int]:
    """Powers of two from ``low`` to ``high``."""
    out, n = [], low
    while n <= high:
        out.append(n)
        n *= 2
    return out


def auto_heads(n_keys: int) -> int:
    """Heads per point when ``--heads auto``: the exact scan at 1M keys costs seconds per head."""
    if n_keys <= 65536:
        return 4
    if n_keys <= 262144:
        return 2
    return 1


def default_sources(make_capture: bool = True) -> list[str]:
    """The published tables' sources: the embedded trained model's capture when the package ships that
    model (captured on first use, unless ``make_capture`` is False), and the synthetic attention-like
    source."""
    from benchmarks.capture import ensure_embedded_capture

    out = []
    embedded = ensure_embedded_capture(make=make_capture)
    if embedded is not None:
        out.append(f"captured:{embedded}")
    out.append("attention")
    return out


def _source_geometry(
    source: str, sizes: list[int], dims: list[int]
) -> tuple[list[int], list[int], int | None]:
    """Sizes and head_dims a source can serve (a capture: its own head_dim, at most its keys) and its head
    count limit."""
    if not is_captured(source):
        return sizes, dims, None
    geo = capture_geometry(captured_path(source))
    fitting = [n for n in sizes if n <= geo["keys"]]
    if not fitting:
        fitting = [2 ** int(math.log2(geo["keys"]))] if geo["keys"] >= 1 else []
    return fitting, [geo["head_dim"]], geo["heads"]


def build_plan(args: argparse.Namespace) -> list[Group]:
    """The groups a run covers: an explicit sweep from the options, or a preset."""
    common = {
        "mem_dtype": args.mem_dtype,
        "device": args.device,
        "seed": args.seed,
        "agree_max_queries": args.agree_queries,
    }
    preset = "quick" if args.quick else args.preset
    nprobe = tuple(args.nprobe) if args.nprobe else (8, 32, 128, 512)
    efs = tuple(args.efsearch) if args.efsearch else (128, 256, 512)
    sources = args.sources or (
        ["attention"] if preset in ("quick", "custom") else default_sources(make_capture=not args.list)
    )

    def grid(sizes, families, heads=None, ks=None, dims=None, queries=None, srcs=None, npr=None, ef=None):
        groups = []
        for source in srcs or sources:
            sizes_s, dims_s, max_heads = _source_geometry(source, sizes, dims or args.dims or [100])
            for d in dims_s:
                for k in ks or args.k or [128]:
                    for n in sizes_s:
                        for h in heads or _heads(args.heads, n):
                            h = min(h, max_heads or h)
                            groups.append(
                                Group(
                                    source=source,
                                    n_keys=n,
                                    head_dim=d,
                                    heads=h,
                                    k=k,
                                    queries=tuple(queries or args.queries or [2048, 1]),
                                    families=tuple(families),
                                    nprobe=npr or nprobe,
                                    efsearch=ef or efs,
                                    **common,
                                )
                            )
        return groups

    families = tuple(args.indexes) if args.indexes else None
    if preset == "quick":
        return grid(
            args.sizes or [4096, 16384],
            families or DEFAULT_FAMILIES,
            heads=[1] if args.heads == ["auto"] else None,
            npr=tuple(args.nprobe) if args.nprobe else (8, 32, 128),
            ef=tuple(args.efsearch) if args.efsearch else (128, 256),
        )
    if preset == "custom":
        return grid(args.sizes or log_sizes(4096, 2**20), families or DEFAULT_FAMILIES)
    if preset == "medium":
        plan = grid(args.sizes or log_sizes(4096, 262144)[::2], families or DEFAULT_FAMILIES)
        plan += grid([2**20], families or DEFAULT_FAMILIES, heads=[1])
        return plan
    # full: every size, every family (PQ too), then the k, heads and head_dim sweeps at one size
    plan = grid(args.sizes or log_sizes(4096, 2**20), families or FULL_FAMILIES)
    side = ("exact", "Flat", "IVF{nlist},Flat", "HNSW32")
    plan += grid([65536], side, ks=[32, 512, 1024], srcs=["attention"])
    plan += grid([16384], side, heads=[1, 8, 32], ks=[128], srcs=["attention"])
    plan += grid([65536], side, dims=[64, 128], ks=[128], srcs=["attention"])
    return plan


def _heads(spec: list[str] | None, n_keys: int) -> list[int]:
    if not spec or spec == ["auto"]:
        return [auto_heads(n_keys)]
    return [int(h) for h in spec]


# ---------------------------------------------------------------------------------------------- results
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


# ---------------------------------------------------------------------------------------------- one group
class GroupRunner:
    """Builds the data and the exact reference of one group, then measures each configuration."""

    def __init__(self, group: Group, ceilings: Ceilings, run_id: str, args: argparse.Namespace) -> None:
        self.g = group
        self.ceilings = ceilings
        self.run_id = run_id
        self.max_backend_search_keys = args.max_backend_search_keys
        self.dev = torch.device(group.device)
        self.sync = (lambda: torch.cuda.synchronize(self.dev)) if self.dev.type == "cuda" else None
        self.data = None
        self.reference = None
        self.context: dict = {}

    # ------------------------------------------------------------------ shared data
    def prepare(self) -> None:
        g = self.g
        n_queries = max(max(g.queries), self.agree_queries())
        if is_captured(g.source):  # a capture holds a fixed number of queries: agree on fewer if need be
            n_queries = max(
                max(g.queries), min(n_queries, capture_geometry(captured_path(g.source))["queries"])
            )
        try:
            data = load_memory(
                g.source,
                num_heads=g.heads,
                head_dim=g.head_dim,
                n_keys=g.n_keys + WINDOW,
                n_queries=n_queries,
                seed=g.seed,
            )
        except SourceUnavailable:
            if not is_captured(g.source):
                raise
            # a capture too short for the extra window: time the add with its last window again
            data = load_memory(
                g.source, num_heads=g.heads, head_dim=g.head_dim, n_keys=g.n_keys, n_queries=n_queries
            )
            data.keys = torch.cat([data.keys, data.keys[:, :, -WINDOW:]], dim=2)
            data.values = torch.cat([data.values, data.values[:, :, -WINDOW:]], dim=2)
        self.data = replace(
            data,
            keys=data.keys.to(self.dev),
            values=data.values.to(self.dev),
            queries=data.queries.to(self.dev),
        )
        self.reference = knn_memory.create_backend(
            "exact", num_heads=g.heads, head_dim=g.head_dim, mem_dtype=g.mem_dtype, device=self.dev
        )
        self.reference.add(self.memory_keys(), self.memory_values())
        self.context = {
            "fp32_gflops_at_group": matmul_gflops(1024, torch.float32, self.dev, repeats=3, budget_s=0.5),
            "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        }

    def memory_keys(self) -> torch.Tensor:
        return self.data.keys[:, :, : self.g.n_keys]

    def memory_values(self) -> torch.Tensor:
        return self.data.values[:, :, : self.g.n_keys]

    def agree_queries(self) -> int:
        """Queries used for the agreement metrics: the scores of q x N per head must fit in memory."""
        g = self.g
        n = int(max(min(128, g.agree_max_queries), min(g.agree_max_queries, AGREE_ELEMENTS // g.n_keys)))
        return n if self.data is None else min(n, self.data.queries.shape[2])

    def release(self) -> None:
        self.data = None
        self.reference = None

    # ------------------------------------------------------------------ one configuration
    def run_config(
        self, family: str, spec: str | None, knob_values: list[dict], todo: set[str]
    ) -> list[dict]:
        """Build one memory, measure every knob value and query count, then time one added window."""
        g = self.g
        backend_name = "exact" if spec is None else "faiss"
        options: dict = {"top_k": g.k if family == "exact-topk" else (None if spec is None else g.k)}
        if spec is not None:
            options["index"] = spec
            nlist = measure.ivf_nlist(spec)
            if nlist:
                options["train_sample"] = 64 * nlist
        if self.dev.type == "cuda" and spec is not None and not (spec == "Flat" or spec.startswith("IVF")):
            return [
                self._skip(family, spec, kv, q, "no Faiss GPU implementation of this index")
                for kv in knob_values
                for q in g.queries
            ]
        if spec is not None:
            spec_info = knn_memory.create_backend(
                "faiss",
                num_heads=1,
                head_dim=g.head_dim,
                index=spec,
                train_sample=options.get("train_sample"),
            ).index_spec
            if spec_info.min_train_points > g.n_keys:
                reason = (
                    f"{spec} needs {spec_info.min_train_points} keys to train; with {g.n_keys} it would "
                    "search exactly (not measured as this index)"
                )
                return [self._skip(family, spec, kv, q, reason) for kv in knob_values for q in g.queries]
        mem = knn_memory.create_backend(
            backend_name,
            num_heads=g.heads,
            head_dim=g.head_dim,
            mem_dtype=g.mem_dtype,
            device=self.dev,
            **options,
            **(knob_values[0] if spec is not None else {}),
        )
        build = measure.time_call(
            lambda: mem.add(self.memory_keys(), self.memory_values()), single_above_s=0.0, sync=self.sync
        )
        index_active = spec is None or spec == "Flat" or mem.head_index(0, 0).uses_index
        sizes = self._bytes(mem, spec)
        rows = []
        for kv in knob_values:
            if any(g.point_id(family, spec, kv, q) in todo for q in g.queries):
                mem = with_search_params(mem, kv)
                agreement = self._agreement(mem, family, spec)
                for q in g.queries:
                    rows.append(self._measure(mem, family, spec, kv, q, index_active, agreement))
        add = self._time_add(mem)
        mem = None  # free it before the next configuration is built
        train_points = min(g.n_keys, options.get("train_sample", 0))
        bflop = (
            measure.build_flop(spec, g.n_keys, g.head_dim, g.heads, train_points) if index_active else None
        )
        for row in rows:
            row.update(
                {
                    "build_s": build.median,
                    "build_gflops": bflop / build.median / 1e9 if bflop else None,
                    "build_gflops_ratio": self.ceilings.ratio_flops(bflop / build.median / 1e9)
                    if bflop
                    else None,
                    **add,
                    **sizes,
                }
            )
        return rows

    def _base(self, family: str, spec: str | None, knobs: dict, q: int) -> dict:
        g = self.g
        return {
            "kind": "point",
            "point_id": g.point_id(family, spec, knobs, q),
            "run_id": self.run_id,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "source": source_label(g.source),
            "n_keys": g.n_keys,
            "head_dim": g.head_dim,
            "heads": g.heads,
            "k": g.k,
            "queries": q,
            "backend": family if spec is None else "faiss",
            "index": spec or "-",
            "family": measure.index_family(spec) if family != "exact-topk" else "exact-topk",
            "nprobe": knobs.get("nprobe"),
            "efSearch": knobs.get("efSearch"),
            "mem_dtype": g.mem_dtype,
            "device": g.device,
            "seed": g.seed,
        }

    def _skip(self, family: str, spec: str | None, knobs: dict, q: int, reason: str) -> dict:
        return {**self._base(family, spec, knobs, q), "status": "skipped", "reason": reason}

    def _measure(
        self, mem, family: str, spec: str | None, knobs: dict, q: int, index_active: bool, agreement: dict
    ) -> dict:
        g = self.g
        queries = self.data.queries[:, :, :q].contiguous()
        row = {**self._base(family, spec, knobs, q), "status": "ok", "index_active": index_active}
        work = measure.search_work(
            spec if family != "exact-topk" else None,
            n_keys=g.n_keys,
            head_dim=g.head_dim,
            heads=g.heads,
            queries=q,
            k=g.k,
            nprobe=knobs.get("nprobe"),
            ef=knobs.get("efSearch"),
            index_active=index_active,
            mem_dtype_bytes=measure.dtype_bytes(g.mem_dtype),
        )
        row.update(work)
        # search through the backend: what a memory layer pays (values gathered too)
        slow = spec is not None and spec != "Flat" and g.n_keys > self.max_backend_search_keys and q > 1
        if slow:
            row["search_s"] = None
            row["search_note"] = f"backend search not timed above {self.max_backend_search_keys} keys"
        else:
            t = measure.time_call(lambda: self._search(mem, queries, spec), sync=self.sync)
            row.update(t.to_dict("search"))
        # search through the indexes alone (Faiss backend): one head after the other
        if spec is not None:
            t = measure.time_call(lambda: self._index_search(mem, queries), sync=self.sync)
            row.update(t.to_dict("index_search"))
        ref_time = row.get("search_s") or row.get("index_search_s")
        if ref_time:
            gflops = work["search_flop"] / ref_time / 1e9
            gbs = work["search_bytes"] / ref_time / 1e9
            row.update(
                {
                    "search_gflops": gflops,
                    "search_gflops_ratio": self.ceilings.ratio_flops(gflops),
                    "search_gbs": gbs,
                    "search_gbs_ratio": self.ceilings.ratio_bandwidth(gbs),
                }
            )
        if spec is not None and row.get("index_search_s"):
            gflops = work["search_flop"] / row["index_search_s"] / 1e9
            row["index_search_gflops"] = gflops
            row["index_search_gflops_ratio"] = self.ceilings.ratio_flops(gflops)
            gbs = work["search_bytes"] / row["index_search_s"] / 1e9
            row["index_search_gbs"] = gbs
            row["index_search_gbs_ratio"] = self.ceilings.ratio_bandwidth(gbs)
        row.update(agreement)
        row.update(self.context)
        row["ceiling_fp32_gflops"] = self.ceilings.matmul_fp32_gflops
        row["ceiling_bf16_gflops"] = self.ceilings.matmul_bf16_gflops
        row["ceiling_read_gbs"] = self.ceilings.mem_read_gbs
        return row

    def _search(self, mem, queries: torch.Tensor, spec: str | None) -> None:
        if spec is not None:
            mem.search(queries)
            return
        # dense backend: the [B, H, q, N] scores of a whole window may not fit; search query blocks
        g = self.g
        per_query = g.heads * g.n_keys * 4
        block = max(1, SCORE_BLOCK_BYTES // per_query)
        for q0 in range(0, queries.shape[2], block):
            mem.search(queries[:, :, q0 : q0 + block])

    def _index_search(self, mem, queries: torch.Tensor) -> None:
        for h in range(self.g.heads):
            mem.head_index(0, h).search(queries[0, h], self.g.k)

    def _agreement(self, mem, family: str, spec: str | None) -> dict:
        g = self.g
        if family == "exact":
            return {
                "agreement_queries": 0,
                "recall_mean": 1.0,
                "recall_p01": 1.0,
                "mass_recall_mean": 1.0,
                "mass_recall_p01": 1.0,
                "rel_err_mean": 0.0,
                "rel_err_worst": 0.0,
                "agreement_note": "the reference itself",
            }
        nq = self.agree_queries()
        report = knn_memory.compare_backends(mem, self.reference, self.data.queries[:, :, :nq], k=g.k)
        s = report.summary()
        return {
            "agreement_queries": nq,
            "recall_mean": s["recall_mean"],
            "recall_p01": s["recall_p01_worst_head"],
            "mass_recall_mean": s["mass_recall_mean"],
            "mass_recall_p01": s["mass_recall_p01_worst_head"],
            "rel_err_mean": s["rel_l2_error_mean"],
            "rel_err_worst": s["rel_l2_error_worst_head"],
        }

    def _time_add(self, mem) -> dict:
        g = self.g
        keys = self.data.keys[:, :, g.n_keys : g.n_keys + WINDOW]
        values = self.data.values[:, :, g.n_keys : g.n_keys + WINDOW]
        t0 = time.perf_counter()
        mem.add(keys, values)
        if self.sync:
            self.sync()
        t = time.perf_counter() - t0
        written = self._bytes_per_token * WINDOW * g.heads  # what a window adds, at the memory's bytes/entry
        return {
            "add_window_s": t,
            "add_gbs": written / t / 1e9,
            "add_gbs_ratio": self.ceilings.ratio_bandwidth(written / t / 1e9),
        }

    def _bytes(self, mem, spec: str | None) -> dict:
        g = self.g
        tokens = g.n_keys * g.heads
        total = mem.nbytes
        self._bytes_per_token = total / tokens
        value_bytes = g.head_dim * measure.dtype_bytes(g.mem_dtype)
        dense = 2 * g.head_dim * 2  # bf16 keys + values
        if spec is None:
            keys = g.head_dim * measure.dtype_bytes(g.mem_dtype)
            index = 0.0
        else:
            keys = g.head_dim * 4  # the float32 copy every Faiss-backend index keeps
            index = sum(mem.head_index(0, h).nbytes for h in range(g.heads)) / tokens - keys
            index = max(index, 0.0)
        per_token = total / tokens
        lean = value_bytes + (index if index > 0 else keys)
        return {
            "bytes_per_token": per_token,
            "bytes_per_token_keys": keys,
            "bytes_per_token_index": index,
            "bytes_per_token_values": per_token - keys - index,
            "bytes_per_token_index_and_values": lean,
            "dense_bf16_kv_bytes_per_token": dense,
            "bytes_vs_dense_bf16": per_token / dense,
        }


def with_search_params(mem, knobs: dict[str, int]):
    """``mem`` with other search knobs (``nprobe``/``efSearch``), set in place without retraining."""
    if not knobs or getattr(mem, "index", None) is None:
        return mem
    mem.set_search_params(**knobs)
    return mem


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


# ---------------------------------------------------------------------------------------------- the run
@dataclass
class RunSummary:
    run_id: str
    points_done: int = 0
    points_skipped: int = 0
    points_failed: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    failures: list[str] = field(default_factory=list)


def run(args: argparse.Namespace) -> RunSummary:
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
            rows = [runner._skip(f, s, kv, q, str(err)) for f, s, kv in g.configs() for q in g.queries]
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
                    {**runner._base(family, spec, kv, q), "status": "error", "reason": msg}
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


def iter_points(path: Path) -> Iterator[dict]:
    """Measured points of a results file (for plots and reports)."""
    for r in read_rows(path):
        if r.get("kind") == "point" and r.get("status") == "ok":
            yield r


if __name__ == "__main__":
    sys.exit(main())
