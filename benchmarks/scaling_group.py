"""The scaling benchmark's measurement of one group: its data and exact reference, then every
configuration (build, search through the backend and through the indexes alone, agreement, added
window, bytes per token), one row per point.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

import torch

import knn_memory
from benchmarks import measure
from benchmarks.ceilings import Ceilings, matmul_gflops
from benchmarks.scaling_plan import Group
from benchmarks.sources import (
    SourceUnavailable,
    capture_geometry,
    captured_path,
    is_captured,
    load_memory,
    source_label,
)

WINDOW = 2048  # keys added per window (LongLLaMA-3B's window)
SCORE_BLOCK_BYTES = 256 * 2**20  # dense backend: scores held per query block while timing
AGREE_ELEMENTS = 2**27  # agreement: queries x keys per head held at once (about 512 MiB of scores)


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
        """Load the group's keys, values and queries onto its device and fill the exact reference."""
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
        """The keys in memory (the window after them is kept for timing an add)."""
        return self.data.keys[:, :, : self.g.n_keys]

    def memory_values(self) -> torch.Tensor:
        """The values in memory."""
        return self.data.values[:, :, : self.g.n_keys]

    def agree_queries(self) -> int:
        """Queries used for the agreement metrics: the scores of q x N per head must fit in memory."""
        g = self.g
        n = int(max(min(128, g.agree_max_queries), min(g.agree_max_queries, AGREE_ELEMENTS // g.n_keys)))
        return n if self.data is None else min(n, self.data.queries.shape[2])

    def release(self) -> None:
        """Drop the group's data and reference (before the next group is built)."""
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
                self.skip_row(family, spec, kv, q, "no Faiss GPU implementation of this index")
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
                return [self.skip_row(family, spec, kv, q, reason) for kv in knob_values for q in g.queries]
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
        add = self._time_add(mem, sizes["bytes_per_token"])
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

    def base_row(self, family: str, spec: str | None, knobs: dict, q: int) -> dict:
        """The fields every row of one point carries, whatever its status."""
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

    def skip_row(self, family: str, spec: str | None, knobs: dict, q: int, reason: str) -> dict:
        """The row of a point not measured, saying why."""
        return {**self.base_row(family, spec, knobs, q), "status": "skipped", "reason": reason}

    def _measure(
        self, mem, family: str, spec: str | None, knobs: dict, q: int, index_active: bool, agreement: dict
    ) -> dict:
        g = self.g
        queries = self.data.queries[:, :, :q].contiguous()
        row = {**self.base_row(family, spec, knobs, q), "status": "ok", "index_active": index_active}
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

    def _time_add(self, mem, bytes_per_token: float) -> dict:
        """Time one more window added to ``mem``; ``bytes_per_token``: the memory's bytes per stored entry."""
        g = self.g
        keys = self.data.keys[:, :, g.n_keys : g.n_keys + WINDOW]
        values = self.data.values[:, :, g.n_keys : g.n_keys + WINDOW]
        t0 = time.perf_counter()
        mem.add(keys, values)
        if self.sync:
            self.sync()
        t = time.perf_counter() - t0
        written = bytes_per_token * WINDOW * g.heads  # what a window adds, at the memory's bytes/entry
        return {
            "add_window_s": t,
            "add_gbs": written / t / 1e9,
            "add_gbs_ratio": self.ceilings.ratio_bandwidth(written / t / 1e9),
        }

    def _bytes(self, mem, spec: str | None) -> dict:
        g = self.g
        tokens = g.n_keys * g.heads
        total = mem.nbytes
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
