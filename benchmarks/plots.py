"""PNG plots of a scaling results file.

* ``latency_vs_n_<source>.png``: search time per window per head against N, log-log, one line per
  backend / index / knob: prefill through the backend, prefill through the indexes alone, decode;
* ``pareto_<source>.png``: recall@k against speed-up over exact ``Flat`` (index-level search time), one
  panel per N, with the Pareto front and the 0.95-recall / 10x targets;
* ``bytes_per_token.png``: bytes per stored token per head for each backend, split into keys, index and
  values, against dense bf16 keys + values.

    python -m benchmarks.plots benchmarks/results/scaling.jsonl [--out benchmarks/results/plots]
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from benchmarks.results_io import iter_points
from benchmarks.sizes import format_size

FAMILY_COLORS = {
    "exact": "#222222",
    "exact-topk": "#777777",
    "Flat": "#1f77b4",
    "IVF,Flat": "#2ca02c",
    "HNSW32": "#d62728",
    "IVF,SQ8": "#9467bd",
    "IVF,PQ25": "#8c564b",
    "SQ8": "#e377c2",
}
_EXTRA_COLORS = ["#ff7f0e", "#17becf", "#bcbd22", "#7f7f7f"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X"]


def _color(family: str) -> str:
    if family not in FAMILY_COLORS:
        FAMILY_COLORS[family] = _EXTRA_COLORS[len(FAMILY_COLORS) % len(_EXTRA_COLORS)]
    return FAMILY_COLORS[family]


def knob_label(r: dict) -> str:
    """The search knob of a result row as a label (``nprobe=32``, ``ef=256``), or ``""`` when it has none."""
    if r.get("nprobe"):
        return f"nprobe={r['nprobe']}"
    if r.get("efSearch"):
        return f"ef={r['efSearch']}"
    return ""


def _label(r: dict) -> str:
    knob = knob_label(r)
    return f"{r['family']} {knob}".strip()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def main_geometry(rows: list[dict]) -> tuple[int, int]:
    """The most common (head_dim, k): the main sweep, as opposed to the k / head_dim side sweeps."""
    counts = Counter((r["head_dim"], r["k"]) for r in rows)
    return counts.most_common(1)[0][0]


def main_rows(rows: list[dict]) -> list[dict]:
    """Rows of the main sweep; with several head counts at one N, the fewest heads (the size sweep's)."""
    if not rows:
        return []
    d, k = main_geometry(rows)
    rows = [r for r in rows if r["head_dim"] == d and r["k"] == k]
    best: dict[tuple, dict] = {}
    heads_at: dict[tuple, Counter] = defaultdict(Counter)
    for r in rows:
        heads_at[(r["source"], r["n_keys"])][r["heads"]] += 1
    for r in rows:
        common = heads_at[(r["source"], r["n_keys"])].most_common(1)[0][0]
        if r["heads"] == common:
            best[(r["source"], r["n_keys"], r["queries"], r["index"], knob_label(r), r["backend"])] = r
    return list(best.values())


def flat_speedups(rows: list[dict]) -> dict[int, float]:
    """Index-level speed-up over exact Flat of each row (id(row) -> x), where a Flat row matches."""
    flat = {}
    for r in rows:
        if r["index"] == "Flat" and r.get("index_search_s"):
            flat[(r["source"], r["n_keys"], r["heads"], r["queries"], r["k"], r["head_dim"])] = r[
                "index_search_s"
            ]
    out = {}
    for r in rows:
        t = r.get("index_search_s") or (r.get("search_s") if r["backend"] != "faiss" else None)
        ref = flat.get((r["source"], r["n_keys"], r["heads"], r["queries"], r["k"], r["head_dim"]))
        if t and ref:
            out[id(r)] = ref / t
    return out


def plot_latency(rows: list[dict], source: str, path: Path) -> Path:
    rows = [r for r in rows if r["source"] == source]
    qmax = max(r["queries"] for r in rows)
    panels = [
        (f"prefill ({qmax} queries): through the backend", qmax, "search_s"),
        (f"prefill ({qmax} queries): indexes only (exact: dense backend)", qmax, "index_search_s"),
        ("decode (1 query): through the backend", 1, "search_s"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5), sharex=True)
    series: dict[str, list[tuple[int, float, str]]] = defaultdict(list)
    for ax, (title, q, field) in zip(axes, panels, strict=True):
        series.clear()
        for r in rows:
            if r["queries"] != q:
                continue
            t = r.get(field)
            if field == "index_search_s" and r["backend"] != "faiss":
                t = r.get("search_s")  # the dense backend has no index: its own search, for reference
            if not t:
                continue
            series[_label(r)].append((r["n_keys"], t / r["heads"], r["family"]))
        knob_rank: dict[str, int] = defaultdict(int)
        for label in sorted(series, key=_sort_key):
            pts = sorted(series[label])
            family = pts[0][2]
            m = MARKERS[knob_rank[family] % len(MARKERS)]
            knob_rank[family] += 1
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker=m,
                color=_color(family),
                label=label,
                alpha=0.9,
                linewidth=1.4,
                markersize=5,
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("keys per head (N)")
        ax.grid(True, which="both", alpha=0.25)
        if series:
            ax.legend(fontsize=7, ncol=2, loc="upper left")
    axes[0].set_ylabel("seconds per window per head")
    fig.suptitle(f"Search time vs memory size, {source}", fontsize=13)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _sort_key(label: str) -> tuple:
    family, _, knob = label.partition(" ")
    num = re.findall(r"\d+", knob)
    return (family, int(num[0]) if num else 0)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (speed-up, recall) not beaten on both axes, by increasing speed-up."""
    front = []
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return sorted(front)


def plot_pareto(rows: list[dict], source: str, path: Path) -> Path | None:
    qmax = max(r["queries"] for r in rows if r["source"] == source)
    rows = [r for r in rows if r["source"] == source and r["queries"] == qmax]
    speed = flat_speedups(rows)
    sizes = sorted({r["n_keys"] for r in rows if id(r) in speed})
    if not sizes:
        return None
    cols = min(3, len(sizes))
    nrows = math.ceil(len(sizes) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.6 * cols, 4.3 * nrows), squeeze=False)
    for ax in axes.flat[len(sizes) :]:
        ax.axis("off")
    for ax, n in zip(axes.flat, sizes, strict=False):
        here = [r for r in rows if r["n_keys"] == n and id(r) in speed and r.get("recall_mean") is not None]
        by_family: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
        for r in here:
            by_family[r["family"]].append((speed[id(r)], r["recall_mean"], knob_label(r)))
        for family, pts in sorted(by_family.items()):
            pts.sort()
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                color=_color(family),
                label=family,
                linewidth=1.2,
            )
            for x, y, knob in pts:
                if knob:
                    ax.annotate(
                        knob.split("=")[1], (x, y), fontsize=6, xytext=(3, -8), textcoords="offset points"
                    )
        front = pareto_front([(p[0], p[1]) for pts in by_family.values() for p in pts])
        if len(front) > 1:
            ax.plot(
                [p[0] for p in front], [p[1] for p in front], "k--", linewidth=0.8, alpha=0.6, label="Pareto"
            )
        ax.axhline(0.95, color="grey", linestyle=":", linewidth=1)
        ax.axvline(10, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        heads = here[0]["heads"] if here else "?"
        ax.set_title(f"N = {format_size(n)} keys/head ({heads} head{'s' if heads != 1 else ''})", fontsize=10)
        ax.set_xlabel("speed-up over exact Flat (index search)")
        ax.set_ylabel(f"recall@{here[0]['k'] if here else 'k'} (mean)")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(
        f"Recall vs speed-up, {source}, {qmax} queries per window (dotted: 0.95 recall, 10x)", fontsize=12
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bytes(rows: list[dict], path: Path) -> Path | None:
    if not rows:
        return None
    per_family: dict[str, dict] = {}
    for r in rows:
        if r.get("bytes_per_token") is None:
            continue
        key = r["family"]
        if key not in per_family or r["n_keys"] > per_family[key]["n_keys"]:
            per_family[key] = r
    if not per_family:
        return None
    families = sorted(per_family, key=lambda f: per_family[f]["bytes_per_token"])
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(families) + 1.8))
    y = range(len(families))
    keys = [per_family[f]["bytes_per_token_keys"] for f in families]
    index = [per_family[f]["bytes_per_token_index"] for f in families]
    values = [per_family[f]["bytes_per_token_values"] for f in families]
    ax.barh(y, keys, color="#4c72b0", label="keys (exact: mem dtype; Faiss backend: float32 copy)")
    ax.barh(y, index, left=keys, color="#dd8452", label="index codes, ids, lists / graph links")
    ax.barh(
        y, values, left=[a + b for a, b in zip(keys, index, strict=True)], color="#55a868", label="values"
    )
    lean = [per_family[f]["bytes_per_token_index_and_values"] for f in families]
    ax.scatter(lean, list(y), marker="|", s=300, color="black", label="index + values only", zorder=3)
    dense = per_family[families[0]]["dense_bf16_kv_bytes_per_token"]
    ax.axvline(dense, color="red", linestyle="--", label=f"dense bf16 K+V ({dense:.0f} B)")
    ax.set_yticks(list(y))
    ax.set_yticklabels([f"{f} (N={format_size(per_family[f]['n_keys'])})" for f in families])
    d = per_family[families[0]]["head_dim"]
    ax.set_xlabel(f"bytes per stored token per head (head_dim {d})")
    ax.set_title("Memory per stored token, as implemented")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, axis="x", alpha=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(results: Path, out: Path) -> list[Path]:
    """Every plot of ``results`` (a scaling JSONL) into folder ``out``; returns the files written."""
    rows = main_rows(list(iter_points(results)))
    if not rows:
        return []
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for source in sorted({r["source"] for r in rows}):
        written.append(plot_latency(rows, source, out / f"latency_vs_n_{_slug(source)}.png"))
        p = plot_pareto(rows, source, out / f"pareto_{_slug(source)}.png")
        if p:
            written.append(p)
    p = plot_bytes(rows, out / "bytes_per_token.png")
    if p:
        written.append(p)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="knn-memory-plots", description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="a scaling.jsonl")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: plots/ beside the results)")
    args = p.parse_args(argv)
    results = Path(args.results)
    for path in plot_all(results, Path(args.out) if args.out else results.parent / "plots"):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
