"""The scaling benchmark's plan: which groups of points a run covers (an explicit sweep or a preset).

A :class:`Group` is the points that share one memory (source, N, head_dim, heads, k); its
configurations are every index family and search-knob value, each measured at every query count.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from benchmarks import measure
from benchmarks.results_io import portable_argv
from benchmarks.sources import capture_geometry, captured_path, is_captured

DEFAULT_FAMILIES = ("exact", "Flat", "IVF{nlist},Flat", "HNSW32", "IVF{nlist},SQ8@8,32")
FULL_FAMILIES = (*DEFAULT_FAMILIES, "IVF{nlist},PQ25")


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
        """The id of one point of this group (what a resumed run looks up in the results)."""
        backend = family if spec is None else "faiss"
        knob = ",".join(f"{k}={v}" for k, v in sorted(knobs.items())) or "-"
        return (
            f"{portable_argv([self.source])[0]}|N={self.n_keys}|d={self.head_dim}|H={self.heads}|k={self.k}|q={queries}|"
            f"{backend}|{spec or '-'}|{knob}|{self.mem_dtype}|{self.device}|seed={self.seed}"
        )

    def point_ids(self) -> list[str]:
        """The ids of every point of this group."""
        return [self.point_id(f, s, kn, q) for f, s, kn in self.configs() for q in self.queries]


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
