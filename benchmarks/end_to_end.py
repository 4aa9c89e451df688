"""``knn-memory-end-to-end``: prefill tokens/s and decode ms/token of a whole model vs context length.

    python -m benchmarks.end_to_end                         # a tiny random model, every backend
    python -m benchmarks.end_to_end --checkpoint DIR --contexts 4k,16k --backends "exact;faiss:Flat"

For each backend and context length n: one prefill call of n tokens (``last_context_length`` = half a
window, so the rest goes through memory window by window), then ``--decode`` single-token steps with
the returned cache (greedy). Reported: prefill tokens/s, decode ms/token (median, and the slowest step,
which includes a local-cache flush into memory when one happens), memory entries and bytes held by the
memory layers, and the process's peak RSS during the run (sampled; also as the rise over the RSS at its
start).

Backends are ``;``-separated: ``exact`` (upstream dense memory) or ``faiss:<factory string>`` with
optional ``:knob=value`` parts (``faiss:IVF256,Flat:nprobe=32``). Faiss backends retrieve
``--top-k`` entries per query.

Results are appended to ``<out>/end_to_end.jsonl`` (resumable like the scaling sweep).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.ceilings import machine_info
from benchmarks.measure import PeakRSS
from benchmarks.results_io import DEFAULT_OUT, append_rows, read_rows
from benchmarks.sizes import parse_size
from knn_memory.cli import BadArguments, OneLineParser, check_writable_dir, error_exit
from longllama import cli_args

DEFAULT_BACKENDS = "exact;faiss:Flat;faiss:IVF256,Flat:nprobe=32;faiss:HNSW32:efSearch=128"
TINY = {
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "max_position_embeddings": 512,
    "mem_layers": [1, 2],
}


def parse_backend(text: str) -> dict:
    """``exact`` | ``faiss:<spec>[:knob=value...]`` (any registered backend) -> from_pretrained keywords."""
    fields = {"mem_backend": None, "mem_index": None, "mem_top_k": None, "mem_index_params": None}
    return fields | cli_args.parse_backend(text, "--backends")


def tiny_model(seed: int = 0, **overrides):
    """A tiny random LongLLaMA (0.8M parameters), float32."""
    from longllama import LongLlamaConfig, LongLlamaForCausalLM

    torch.manual_seed(seed)
    config = LongLlamaConfig(**{**TINY, "last_context_length": TINY["max_position_embeddings"]}, **overrides)
    return LongLlamaForCausalLM(config).eval()


def load_model(checkpoint: str | None, settings: dict, top_k: int, seed: int):
    from longllama import LongLlamaForCausalLM

    settings = dict(settings)
    if cli_args.uses_top_k(settings):
        settings["mem_top_k"] = top_k
    if checkpoint is None:
        return tiny_model(seed, **settings)
    return LongLlamaForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32, **settings).eval()


def input_ids(model, n: int, checkpoint: str | None, seed: int) -> torch.Tensor:
    """[1, n] ids: random for the tiny model, a passkey document for a checkpoint with a tokenizer."""
    if checkpoint is not None and (Path(checkpoint) / "tokenizer.model").is_file():
        from benchmarks.capture import default_text, tokenize

        text, _ = default_text(n, seed)
        ids, _ = tokenize(Path(checkpoint), text, model.config.vocab_size, n)
        return ids
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (1, n), generator=g)


@torch.no_grad()
def measure_point(model, ids: torch.Tensor, decode_steps: int) -> dict:
    """Prefill ``ids`` then decode greedily; times, memory size and peak RSS."""
    window = model.config.max_position_embeddings
    last = max(1, window // 2)
    gc.collect()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        out = model(ids, last_context_length=last, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - t0
        cache = out.cache
        token = out.logits[:, -1:].argmax(-1)
        steps = []
        for _ in range(decode_steps):
            t0 = time.perf_counter()
            out = model(token, cache=cache, use_cache=True, logits_to_keep=1)
            steps.append(time.perf_counter() - t0)
            cache = out.cache
            token = out.logits[:, -1:].argmax(-1)
    memories = [cache.memory(layer) for layer in cache.memory_layers]
    return {
        "prefill_s": prefill,
        "prefill_tokens_per_s": ids.shape[1] / prefill,
        "decode_ms_per_token": 1e3 * statistics.median(steps) if steps else None,
        "decode_ms_max": 1e3 * max(steps) if steps else None,
        "decode_steps": len(steps),
        "memory_entries": max((len(m) for m in memories), default=0),
        "memory_bytes": sum(m.nbytes for m in memories),
        "peak_rss_mib": rss.peak_bytes / 2**20,
        "peak_rss_rise_mib": rss.delta_bytes / 2**20,
    }


def run(args: argparse.Namespace) -> list[dict]:
    out = Path(args.out) / "end_to_end.jsonl"
    done = {r["point_id"] for r in read_rows(out) if r.get("kind") == "e2e"}
    name = Path(args.checkpoint).name if args.checkpoint else "tiny-random"
    plan = [(b, n) for b in args.backends for n in args.contexts]
    plan = [(b, n) for b, n in plan if f"{name}|{b}|n={n}|top_k={args.top_k}" not in done]
    rows = []
    for backend, n in tqdm(plan, desc="end-to-end", unit="pt", file=sys.stderr, disable=args.no_progress):
        point_id = f"{name}|{backend}|n={n}|top_k={args.top_k}"
        settings = parse_backend(backend)
        model = load_model(args.checkpoint, settings, args.top_k, args.seed)
        ids = input_ids(model, n, args.checkpoint, args.seed)
        if args.warmup:
            measure_point(model, ids[:, : min(n, 2 * model.config.max_position_embeddings)], 2)
        try:
            result = measure_point(model, ids, args.decode)
            status = "ok"
        except (ValueError, RuntimeError) as err:
            result, status = {"reason": f"{type(err).__name__}: {err}"}, "error"
        cfg = model.config
        row = {
            "kind": "e2e",
            "point_id": point_id,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "model": name,
            "parameters": sum(p.numel() for p in model.parameters()),
            "layers": cfg.num_hidden_layers,
            "mem_layers": list(cfg.mem_layers),
            "heads": cfg.num_attention_heads,
            "head_dim": cfg.hidden_size // cfg.num_attention_heads,
            "window": cfg.max_position_embeddings,
            "backend": backend,
            "top_k": args.top_k if cli_args.uses_top_k(settings) else None,
            "context": n,
            "status": status,
            "threads": torch.get_num_threads(),
            **result,
        }
        append_rows(out, [row])
        rows.append(row)
        del model
    return rows


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(
        prog="knn-memory-end-to-end",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--checkpoint", default=None, help="a checkpoint directory (default: a tiny random model)")
    p.add_argument("--contexts", default="2k,8k,32k", help="context lengths in tokens (default 2k,8k,32k)")
    p.add_argument("--backends", default=DEFAULT_BACKENDS, help=f"';'-separated (default {DEFAULT_BACKENDS})")
    p.add_argument("--top-k", type=int, default=128, help="entries per query for Faiss backends")
    p.add_argument("--decode", type=int, default=16, help="decode steps after the prefill")
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--no-progress", action="store_true")
    try:
        args = p.parse_args(argv)
        args.contexts = [parse_size(c, "--contexts") for c in args.contexts.split(",") if c.strip()]
        if not args.contexts:
            raise ValueError(f"--contexts must name at least one length, got {args.contexts!r}")
        args.backends = [b.strip() for b in args.backends.split(";") if b.strip()]
        for b in args.backends:
            parse_backend(b)
        if args.checkpoint and not (Path(args.checkpoint) / "config.json").is_file():
            raise ValueError(f"{Path(args.checkpoint).name}: not a checkpoint directory (no config.json)")
        if args.top_k < 1 or args.decode < 0:
            raise ValueError(f"--top-k must be >= 1 and --decode >= 0, got {args.top_k} and {args.decode}")
        check_writable_dir(args.out, "--out")  # results are appended after each point: checked first
    except (BadArguments, ValueError, TypeError) as err:
        return error_exit("knn-memory-end-to-end", err)
    rows = run(args)
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch threads {info['torch_threads']}")
    print(
        f"{'backend':42s} {'context':>8s} {'prefill tok/s':>14s} {'decode ms/tok':>14s} {'peak RSS MiB':>13s}"
    )
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['backend']:42s} {r['context']:>8d}  error: {r['reason']}")
            continue
        print(
            f"{r['backend']:42s} {r['context']:>8d} {r['prefill_tokens_per_s']:>14.0f} "
            f"{r['decode_ms_per_token']:>14.1f} {r['peak_rss_mib']:>13.0f}"
        )
    print(json.dumps({"points": len(rows)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
