"""``knn-memory-sharded``: one memory on 1 rank against the same memory split over 2 (gloo, this machine).

    python -m benchmarks.sharded --length 64k --backend sharded:faiss:auto --ranks 1,2 --threads 1

For each world size the script starts that many ranks of itself (``RANK``/``WORLD_SIZE`` set as torchrun
does, gloo on CPU, ``--threads`` each). Every rank reads the same passkey prompt into the embedded model
with the sharded memory (the prefill, timed between barriers), answers it, then times memory attention of
``--queries`` queries per memory layer against the filled memory (search throughput). Rank 0 records:

* prefill seconds and tokens/s, and the answer (the same on every world size);
* search: queries per second through :func:`knn_memory.memory_attention` (search, merge, values);
* bytes per rank (each memory layer's ``nbytes_per_rank``, summed over layers);
* communication: the bytes each rank handed to the collectives per (query, head) of the search step,
  against the formula of :mod:`knn_memory.backends.sharded`: ``4 + 4 (d + 1)`` (+ ``4 k`` in global mode);
  and the prefill's total.

Appends to ``results.jsonl`` (one line per world size) and writes ``summary.md`` (every run recorded there)
into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from knn_memory.cli import (
    BadArguments,
    OneLineParser,
    check_writable_dir,
    error_exit,
    parse_count,
)
from longllama.cli_args import parse_backend, parse_token_count, uses_top_k

DEFAULT_OUT = Path(__file__).parent / "results" / "sharded"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def formula_bytes_per_query_head(head_dim: int, mode: str, k: int | None) -> int:
    """Bytes a rank hands to the collectives per (query, head) of one memory layer (float32)."""
    gather = 4 * k if mode == "global" and k is not None else 0
    return 4 + 4 * (head_dim + 1) + gather


@torch.no_grad()
def run_rank(args) -> dict | None:
    """One rank's measurements (rank 0 returns them; the others None)."""
    import knn_memory
    from knn_memory.process_group import ShardGroup
    from longllama import LongLlamaForCausalLM, embedded_model_path, load_tokenizer
    from longllama.passkey import make_prompt, run_passkey

    knn_memory.set_threads(args.threads)
    fields = parse_backend(args.backend)
    top_k = args.top_k if uses_top_k(fields) else None
    path = embedded_model_path()
    model = LongLlamaForCausalLM.from_pretrained(
        path, torch_dtype=torch.float32, mem_top_k=top_k, **fields
    ).eval()
    tokenizer = load_tokenizer(path)
    prompt = make_prompt(tokenizer, args.length, args.seed)
    group = ShardGroup(torch.device("cpu"))
    group.barrier()
    result = run_passkey(model, tokenizer, prompt, label=args.backend)
    group.barrier()
    # the filled memory: prefill once more into a cache we keep (run_passkey's is gone)
    group.barrier()
    start = time.perf_counter()
    out = model(prompt.input_ids)
    group.barrier()
    prefill = time.perf_counter() - start
    cache = out.cache
    config = model.config
    H = config.num_attention_heads
    d = config.hidden_size // H
    g = torch.Generator().manual_seed(args.seed)
    per_rank = [0] * group.world_size
    sent_prefill = 0
    search_seconds = 0.0
    sent_search = 0
    for layer in cache.memory_layers:
        mem = cache.memory(layer)
        per_rank = [a + b for a, b in zip(per_rank, mem.nbytes_per_rank(), strict=True)]
        sent_prefill += sum(
            mem.group.sent_bytes[op] for op in ("all_reduce_max", "all_reduce_sum", "all_gather")
        )
        q = torch.randn(1, H, args.queries, d, generator=g)
        local = torch.randn(1, H, 1, d, generator=g)
        before = sum(mem.group.sent_bytes[op] for op in ("all_reduce_max", "all_reduce_sum", "all_gather"))
        group.barrier()
        start = time.perf_counter()
        for _ in range(args.repeats):
            knn_memory.memory_attention(q, local.expand(1, H, 1, d), local.expand(1, H, 1, d), memory=mem)
        group.barrier()
        search_seconds += time.perf_counter() - start
        sent_search += (
            sum(mem.group.sent_bytes[op] for op in ("all_reduce_max", "all_reduce_sum", "all_gather"))
            - before
        )
    mem = cache.memory(cache.memory_layers[0])
    pairs = len(cache.memory_layers) * args.repeats * args.queries * H
    if group.rank != 0:
        return None
    return {
        "backend": args.backend,
        "world_size": group.world_size,
        "threads_per_rank": args.threads,
        "length": prompt.length,
        "correct": result.correct,
        "answer_prob": result.answer_prob,
        "passkey_seconds": result.seconds,
        "prefill_seconds": prefill,
        "prefill_tokens_per_s": prompt.length / prefill,
        "search_queries_per_s": len(cache.memory_layers) * args.repeats * args.queries / search_seconds,
        "memory_entries": int(mem.lengths.max()),
        "bytes_per_rank": per_rank,
        "bytes_total": sum(per_rank),
        "sent_bytes_prefill": int(sent_prefill),
        "sent_bytes_per_query_head": sent_search / pairs,
        "formula_bytes_per_query_head": formula_bytes_per_query_head(d, mem.mode, mem.top_k)
        if group.world_size > 1
        else 0,
        "mode": mem.mode,
        "top_k": mem.top_k,
        "head_dim": d,
    }


def _launch(args, world_size: int, timeout: float) -> dict:
    port = _free_port()
    procs = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": str(args.threads),
        }
        given = sys.argv[1:] if args.argv is None else args.argv
        argv = [sys.executable, "-m", "benchmarks.sharded", "--child", *given]
        procs.append(
            subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outputs = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise RuntimeError(f"{world_size} ranks did not finish within {timeout:.0f} s") from None
        if p.returncode != 0:
            for q in procs:
                q.kill()
            raise RuntimeError(f"a rank of {world_size} failed: {stderr.strip().splitlines()[-1:]}")
        outputs.append(stdout)
    return json.loads(outputs[0].strip().splitlines()[-1])


def summary_table(rows: list[dict]) -> str:
    lines = [
        "| backend | ranks | threads/rank | tokens | correct | prefill s | prefill tok/s | search q/s | bytes per rank "
        "(MiB) | sent B per (query, head): measured / formula | sent during prefill (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_rank = " + ".join(f"{b / 2**20:.1f}" for b in r["bytes_per_rank"])
        lines.append(
            f"| {r['backend']} | {r['world_size']} | {r['threads_per_rank']} | {r['length']} | {r['correct']} | "
            f"{r['prefill_seconds']:.1f} | {r['prefill_tokens_per_s']:.0f} | {r['search_queries_per_s']:.0f} | "
            f"{per_rank} | {r['sent_bytes_per_query_head']:.1f} / {r['formula_bytes_per_query_head']} | "
            f"{r['sent_bytes_prefill'] / 2**20:.1f} |"
        )
    return "\n".join(lines)


def _parser() -> OneLineParser:
    p = OneLineParser(prog="knn-memory-sharded", description=__doc__.split("\n\n")[0])
    p.add_argument("--length", default="16k", help="prompt tokens, e.g. 16k, 64k (default 16k)")
    p.add_argument("--backend", default="sharded:faiss:auto", help="a sharded backend, e.g. sharded:exact")
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--ranks", default="1,2", help="world sizes to compare (default 1,2)")
    p.add_argument("--threads", type=int, default=1, help="threads per rank (default 1)")
    p.add_argument("--queries", type=int, default=256, help="queries per search-throughput call")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per world size")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        args.argv = argv
        args.length = parse_token_count(args.length, "--length", minimum=64)
        if not parse_backend(args.backend)["mem_backend"] == "sharded":
            raise ValueError(f"--backend {args.backend!r} must be a sharded backend, e.g. sharded:faiss:auto")
        ranks = [parse_count(t, "--ranks", 1, 64) for t in args.ranks.split(",") if t.strip()]
        for name in ("threads", "queries", "repeats", "top_k"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if not args.child:
            out = check_writable_dir(args.out, "--out")
    except (BadArguments, ValueError) as err:
        return error_exit("knn-memory-sharded", err)
    if args.child:
        row = run_rank(args)
        if row is not None:
            print(json.dumps(row))
        return 0
    rows = []
    for w in ranks:
        print(f"{w} rank(s)...", file=sys.stderr)
        row = _launch(args, w, args.timeout)
        rows.append(row)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    print(summary_table(rows))
    # the summary covers every run recorded in this folder (earlier invocations included)
    recorded = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    (out / "summary.md").write_text(summary_table(recorded) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
