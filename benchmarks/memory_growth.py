"""Resident memory over a long prefill: does it grow linearly, and does ``nbytes`` say how much?

    python -m benchmarks.memory_growth --tokens 256k --backend exact --backend faiss:Flat
    python -m benchmarks.memory_growth --model random --tokens 64k --backend "faiss:IVF256,Flat" --nprobe 16

Feeds a long synthetic input to a model in chunks (each chunk a continuation call, so the memory grows
window by window as in a real prefill) and, after every chunk, records

* the process's resident memory (RSS) and its peak during the chunk (``VmHWM``, reset before each chunk
  through ``/proc/self/clear_refs``; where that is not allowed, the lifetime peak),
* the memory's own account: the sum of ``nbytes`` over the memory layers' backends, plus the local cache.

Each backend runs in a fresh child process, with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``)
so that large freed blocks go back to the system and RSS after a chunk is what is still held. Reported per
backend: RSS growth and ``nbytes`` growth per memory token (least-squares slopes after the first chunk),
their ratio, and any chunk whose peak exceeds 1.5x the linear trend (plus a 16 MiB allowance for noise),
which is what copying the whole memory would look like. Writes ``memory_growth.json`` and
``memory_growth.png`` (RSS and ``nbytes`` growth against tokens, per backend) into ``--out``.

The model is the embedded default when it is there (``--model embedded``), else a small random LongLLaMA
(``--model random``, sized by ``--hidden``/``--heads``/``--layers``). Bad arguments exit with code 2 and one
line on stderr.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import knn_memory
from longllama.cli_args import (
    BadArguments,
    OneLineParser,
    backend_knobs,
    check_writable_dir,
    error_exit,
    parse_backend,
    parse_token_count,
    uses_top_k,
)

MIB = 1 << 20
SPIKE_FACTOR = 1.5
SPIKE_ALLOWANCE = 16 * MIB
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


# ---------------------------------------------------------------------- measuring (in the child)
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter of this process; False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_bytes() -> int:
    """Peak RSS since the last :func:`reset_peak` (``VmHWM``), else over the process's life."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cache_nbytes(cache) -> dict:
    """Bytes the cache accounts for: every memory layer's ``nbytes`` and the local cache's tensors."""
    memory = sum(cache.memory(i).nbytes for i in cache.memory_layers if cache.memory(i) is not None)
    local = sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        for t in (layer.keys, layer.values)
        if t is not None
    )
    return {"memory": int(memory), "local": int(local)}


def build_model(spec: dict):
    """The model the child measures, with the backend settings of ``spec`` applied."""
    import torch

    from longllama import LongLlamaConfig, LongLlamaForCausalLM

    memory = {
        "mem_backend": spec["mem_backend"],
        "mem_index": spec.get("mem_index"),
        "mem_top_k": spec.get("mem_top_k"),
        "mem_index_params": spec.get("mem_index_params"),
        "mem_attention_grouping": spec.get("grouping"),
    }
    if spec.get("mem_dtype"):
        memory["mem_dtype"] = spec["mem_dtype"]
    if spec["model"] == "embedded":
        from longllama.embedded import embedded_model_path

        return LongLlamaForCausalLM.from_pretrained(
            embedded_model_path(), torch_dtype=torch.float32, **memory
        ).eval()
    config = LongLlamaConfig(
        vocab_size=512,
        hidden_size=spec["hidden"],
        intermediate_size=2 * spec["hidden"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        max_position_embeddings=spec["window"],
        last_context_length=spec["window"] // 2,
        mem_layers=list(range(spec["layers"])),
        **{"mem_dtype": "bfloat16", **memory},
    )
    torch.manual_seed(0)
    return LongLlamaForCausalLM(config).eval()


def measure(spec: dict) -> dict:
    """Prefill ``spec["tokens"]`` tokens in chunks; one sample per chunk (run in a fresh process)."""
    import torch

    with torch.no_grad():
        return _measure(spec)


def _measure(spec: dict) -> dict:
    import torch

    model = build_model(spec)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(spec["seed"])
    cache = None
    peak_reset = reset_peak()
    samples = [{"tokens": 0, "memory_tokens": 0, "rss": rss_bytes(), "peak": peak_bytes(), "seconds": 0.0,
                "nbytes": 0, "local_nbytes": 0}]  # fmt: skip
    start = time.perf_counter()
    done = 0
    while done < spec["tokens"]:
        n = min(spec["chunk"], spec["tokens"] - done)
        ids = torch.randint(3, vocab, (1, n), generator=gen)
        if peak_reset:
            reset_peak()
        out = model.model(ids, past_key_values=cache, use_cache=True)  # the decoder: no [n, vocab] logits
        cache = out.cache
        del out, ids
        done += n
        account = cache_nbytes(cache)
        samples.append(
            {
                "tokens": done,
                "memory_tokens": max(cache.memory_lengths()),
                "rss": rss_bytes(),
                "peak": peak_bytes(),
                "seconds": time.perf_counter() - start,
                "nbytes": account["memory"],
                "local_nbytes": account["local"],
            }
        )
    config = model.config.to_dict()
    config.pop("_name_or_path", None)  # a path on the measuring machine; the spec names the model
    return {"spec": spec, "samples": samples, "peak_per_chunk": peak_reset, "config": config}


# ---------------------------------------------------------------------- analysis (in the parent)
def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against xs (0 with fewer than two distinct xs)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0


def analyse(run: dict) -> dict:
    """Bytes per memory token (RSS and ``nbytes``), their ratio, and chunks whose peak breaks the trend."""
    samples = run["samples"]
    base = samples[1] if len(samples) > 2 else samples[0]  # after the first chunk: one-time set-up excluded
    later = [s for s in samples if s["tokens"] >= base["tokens"]]
    xs = [s["memory_tokens"] for s in later]
    rss_per_token = slope(xs, [s["rss"] for s in later])
    nbytes_per_token = slope(xs, [s["nbytes"] for s in later])
    last = samples[-1]
    rss_growth = last["rss"] - base["rss"]
    nbytes_growth = last["nbytes"] - base["nbytes"]
    zero = samples[0]
    trend = max(rss_per_token, nbytes_per_token, 0.0)
    spikes = []
    for s in samples[2:]:
        over = s["peak"] - zero["rss"]
        limit = SPIKE_FACTOR * max(s["rss"] - zero["rss"], trend * s["memory_tokens"]) + SPIKE_ALLOWANCE
        if run["peak_per_chunk"] and over > limit:
            spikes.append({"tokens": s["tokens"], "peak_growth": over, "limit": limit})
    # linearity: the largest RSS increase of one chunk against the mean increase per chunk
    steps = [b["rss"] - a["rss"] for a, b in itertools.pairwise(later)]
    mean_step = sum(steps) / len(steps) if steps else 0
    peak_growth = max(s["peak"] for s in samples[1:]) - zero["rss"] if len(samples) > 1 else 0
    return {
        "backend": run["spec"]["label"],
        "tokens": last["tokens"],
        "memory_tokens": last["memory_tokens"],
        "rss_growth_bytes": rss_growth,
        "nbytes_growth_bytes": nbytes_growth,
        "rss_bytes_per_token": rss_per_token,
        "nbytes_bytes_per_token": nbytes_per_token,
        "rss_over_nbytes": rss_growth / nbytes_growth if nbytes_growth else None,
        "max_peak_over_final_growth": peak_growth / max(last["rss"] - zero["rss"], 1),
        "max_step_over_mean": max(steps) / mean_step if steps and mean_step > 0 else None,
        "spikes": spikes,
        "peak_per_chunk": run["peak_per_chunk"],
        "seconds": last["seconds"],
    }


def plot(runs: list[dict], path: Path) -> None:
    """Growth of RSS (solid), ``nbytes`` (dashed) and per-chunk peak (dotted) against tokens, per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, run in enumerate(runs):
        color = f"C{i}"
        s = run["samples"][1:]  # from the end of the first chunk: one-time set-up excluded
        rss0, nbytes0 = s[0]["rss"], s[0]["nbytes"]
        xs = [x["tokens"] / 1024 for x in s]
        ax.plot(xs, [(x["rss"] - rss0) / MIB for x in s], color=color, label=f"{run['spec']['label']}: RSS")
        ax.plot(xs, [(x["nbytes"] - nbytes0) / MIB for x in s], color=color, linestyle="--", label="nbytes")
        if run["peak_per_chunk"]:
            ax.plot(
                xs[1:], [(x["peak"] - rss0) / MIB for x in s[1:]], color=color, linestyle=":", label="peak"
            )
    ax.set_xlabel("tokens prefilled (k)")
    ax.set_ylabel("growth since the first chunk (MiB)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Memory over a long prefill")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(rows: list[dict]) -> str:
    lines = [
        f"{'backend':<28} {'tokens':>8} {'RSS B/tok':>10} {'nbytes B/tok':>12} {'RSS/nbytes':>10} "
        f"{'peak/final':>10} {'max step':>8} {'spikes':>6} {'s':>7}"
    ]
    for r in rows:
        ratio = "-" if r["rss_over_nbytes"] is None else f"{r['rss_over_nbytes']:.3f}"
        step = "-" if r["max_step_over_mean"] is None else f"{r['max_step_over_mean']:.2f}"
        lines.append(
            f"{r['backend']:<28} {r['tokens']:>8} {r['rss_bytes_per_token']:>10.0f} "
            f"{r['nbytes_bytes_per_token']:>12.0f} {ratio:>10} {r['max_peak_over_final_growth']:>10.2f} "
            f"{step:>8} {len(r['spikes']):>6} {r['seconds']:>7.1f}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="memory_growth", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="256k", help="tokens to prefill, e.g. 64k, 256k, 1m")
    p.add_argument("--chunk", type=int, default=4096, help="tokens per model call")
    p.add_argument("--backend", action="append", default=None, help="exact | faiss:<index> (repeatable)")
    p.add_argument("--top-k", type=int, default=None, help="memory entries per query (faiss default 128)")
    p.add_argument("--nprobe", type=int, default=None)
    p.add_argument("--efSearch", type=int, default=None)
    p.add_argument("--grouping", default=None, help="mem_attention_grouping as 'heads,queries'")
    p.add_argument("--mem-dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument(
        "--model", default=None, choices=["embedded", "random"], help="default: embedded if present"
    )
    p.add_argument("--hidden", type=int, default=256, help="random model: hidden size")
    p.add_argument("--heads", type=int, default=4, help="random model: attention heads")
    p.add_argument("--layers", type=int, default=2, help="random model: layers (all memory layers)")
    p.add_argument("--window", type=int, default=256, help="random model: max_position_embeddings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="memory_growth_results", help="output directory")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: measure one spec (JSON)
    return p


def _specs(args: argparse.Namespace) -> list[dict]:
    tokens = parse_token_count(args.tokens, "--tokens")
    if args.chunk < 1:
        raise ValueError(f"--chunk must be >= 1, got {args.chunk}")
    for name in ("hidden", "heads", "layers", "window"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.hidden % args.heads:
        raise ValueError(f"--hidden ({args.hidden}) must be a multiple of --heads ({args.heads})")
    grouping = None
    if args.grouping:
        try:
            grouping = [int(x) for x in args.grouping.split(",")]
        except ValueError:
            raise ValueError(f"--grouping {args.grouping!r} must be 'heads,queries', e.g. 4,256") from None
    model = args.model
    if model is None or model == "embedded":
        from longllama.embedded import EMBEDDED_DIR

        if not (EMBEDDED_DIR / "config.json").is_file():
            if model == "embedded":
                raise ValueError("--model embedded: the embedded model is not installed; use --model random")
            model = "random"
        else:
            model = "embedded"
    if model == "embedded":
        from longllama.embedded import EMBEDDED_DIR

        config = json.loads((EMBEDDED_DIR / "config.json").read_text())
        head_dim = config["hidden_size"] // config["num_attention_heads"]
    else:
        head_dim = args.hidden // args.heads
    specs = []
    for text in args.backend or ["exact", "faiss:Flat"]:
        settings = parse_backend(text)
        # each search knob goes to the indexes that have it
        params = settings.get("mem_index_params") or {}
        params |= backend_knobs(settings, head_dim, {"nprobe": args.nprobe, "efSearch": args.efSearch})
        spec = {
            "mem_index": None,
            **settings,
            "label": text,
            "mem_top_k": args.top_k if uses_top_k(settings) else None,
            "mem_index_params": params or None,
            "grouping": grouping,
            "mem_dtype": args.mem_dtype,
            "model": model,
            "hidden": args.hidden,
            "heads": args.heads,
            "layers": args.layers,
            "window": args.window,
            "head_dim": head_dim,
            "tokens": tokens,
            "chunk": args.chunk,
            "seed": args.seed,
        }
        specs.append(spec)
    return specs


def run_child(spec: dict, timeout: float | None = None) -> dict:
    """Measure ``spec`` in a fresh interpreter (own RSS, fixed mmap threshold); its JSON result."""
    env = {**os.environ, **MALLOC_ENV}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory_growth", "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {spec['label']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.child:
            print(json.dumps(measure(json.loads(args.child))))
            return 0
        specs = _specs(args)
        for spec in specs:  # every backend setting is checked before the long part starts
            knn_memory.create_backend(
                spec["mem_backend"],
                num_heads=1,
                head_dim=spec["head_dim"],
                top_k=spec["mem_top_k"],
                index=spec.get("mem_index"),
                **(spec["mem_index_params"] or {}),
            )
        out = check_writable_dir(args.out, "--out")  # before the measurements, not after them
    except (BadArguments, ValueError, TypeError) as err:
        return error_exit("memory_growth", err)

    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for spec in specs:
        print(f"measuring {spec['label']} ({spec['model']} model, {spec['tokens']} tokens) ...", flush=True)
        runs.append(run_child(spec))
    rows = [analyse(run) for run in runs]
    (out / "memory_growth.json").write_text(json.dumps({"results": rows, "runs": runs}, indent=1) + "\n")
    plot(runs, out / "memory_growth.png")
    print(format_table(rows))
    for r in rows:
        for s in r["spikes"]:
            print(
                f"SPIKE {r['backend']} at {s['tokens']} tokens: peak growth {s['peak_growth'] / MIB:.1f} MiB "
                f"> {s['limit'] / MIB:.1f} MiB"
            )
    print(f"results in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
