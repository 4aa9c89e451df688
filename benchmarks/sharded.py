"""``knn-memory-sharded``: one memory on 1 rank against the same memory split over 2 (gloo, this machine).

    python -m benchmarks.sharded --length 64k --backend sharded:faiss:auto --ranks 1,2 --threads 1

For each world size the script starts that many ranks of itself (``RANK``/``WORLD_SIZE`` set as torchrun
does, gloo on CPU, ``--threads`` each). Every rank reads the same passkey prompt into the embedded model
with the sharded memory (the prefill, timed between barriers), answers it, then times memory attention of
``--queries`` queries per memory layer against the filled memory (search throughput). With ``--fill
synthetic`` no model runs: the memories (the embedded model's geometry) are filled window by window with
synthetic keys and values, and only search is timed; that is how a dense slice is measured at 1M tokens,
whose prefill would take hours. Rank 0 records:

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
    parse_option,
)
from knn_memory.process_group import free_port, local_rank_env
from knn_memory.synthetic import SOURCES, make_memory
from longllama.cli_args import parse_backend, parse_token_count, uses_top_k

DEFAULT_OUT = Path(__file__).parent / "results" / "sharded"


def formula_bytes_per_query_head(head_dim: int, mode: str, k: int | None) -> int:
    """Bytes a rank hands to the collectives per (query, head) of one memory layer (float32)."""
    gather = 4 * k if mode == "global" and k is not None else 0
    return 4 + 4 * (head_dim + 1) + gather


OPS = ("all_reduce_max", "all_reduce_sum", "all_gather")
ALLREDUCE_REPEATS = 5


def _sent(memories) -> tuple[int, float]:
    """Bytes handed to the attention collectives, and seconds spent in them, over ``memories``."""
    return (
        sum(m.group.sent_bytes[op] for m in memories for op in OPS),
        sum(m.group.seconds[op] for m in memories for op in OPS),
    )


def _search_throughput(memories, queries, args, group) -> float:
    """Seconds for ``args.repeats`` memory-attention calls per memory layer, timed between barriers.

    ``queries``: one [1, H, q, d] block per memory layer; the local window is one token."""
    import knn_memory

    seconds = 0.0
    for mem, q in zip(memories, queries, strict=True):
        H, d = q.shape[1], q.shape[3]
        local = q[:, :, :1].clone()
        group.barrier()
        start = time.perf_counter()
        for _ in range(args.repeats):
            knn_memory.memory_attention(q, local.expand(1, H, 1, d), local.expand(1, H, 1, d), memory=mem)
        group.barrier()
        seconds += time.perf_counter() - start
    return seconds


def _model_fill(args, fields: dict, top_k: int | None, group) -> tuple[list, list, dict]:
    """The memories of one passkey prompt's prefill, random query blocks, and the prefill's record."""
    from longllama import LongLlamaForCausalLM, embedded_model_path, load_tokenizer
    from longllama.tools.passkey import answer_probability, make_prompt

    path = embedded_model_path()
    model = LongLlamaForCausalLM.from_pretrained(
        path, torch_dtype=torch.float32, mem_top_k=top_k, **fields
    ).eval()
    tokenizer = load_tokenizer(path)
    prompt = make_prompt(tokenizer, args.length, args.seed)
    ids = prompt.input_ids
    # the prefill: every token but the last into the memory, timed between barriers
    group.barrier()
    start = time.perf_counter()
    cache = model(ids[:, :-1]).cache
    group.barrier()
    prefill = time.perf_counter() - start
    memories = [cache.memory(layer) for layer in cache.memory_layers]
    sent_prefill, comm_prefill = _sent(memories)
    # the answer, generated from the filled memory
    out = model.generate(
        ids,
        past_key_values=cache,
        max_new_tokens=len(prompt.answer_ids),
        min_new_tokens=len(prompt.answer_ids),
        do_sample=False,
        pad_token_id=model.config.pad_token_id,
        return_dict_in_generate=True,
        output_logits=True,
    )
    generated = out.sequences[0, ids.shape[1] :].tolist()
    config = model.config
    H = config.num_attention_heads
    d = config.hidden_size // H
    g = torch.Generator().manual_seed(args.seed)
    queries = [torch.randn(1, H, args.queries, d, generator=g) for _ in memories]
    record = {
        "fill": "model",
        "length": prompt.length,
        "correct": generated == prompt.answer_ids,
        "answer_prob": answer_probability(out.logits, generated, prompt.answer_ids),
        "prefill_seconds": prefill,
        "prefill_tokens_per_s": prompt.length / prefill,
        "prefill_comm_seconds": comm_prefill,
        "sent_bytes_prefill": int(sent_prefill),
    }
    return memories, queries, record


def _synthetic_fill(args, fields: dict, top_k: int | None, group) -> tuple[list, list, dict]:
    """Memories of the embedded model's geometry filled window by window with synthetic keys and values
    (:func:`knn_memory.synthetic.make_memory`, ``args.source``), and that source's queries.

    No model runs: this measures search over a memory whose prefill would take too long with a dense
    inner backend (``sharded:exact`` at 1M tokens). Every rank draws the same keys (the same seed) and
    the memory stripes the windows over the ranks as in a prefill."""
    from longllama import LongLlamaConfig, embedded_model_path
    from longllama.cache import create_memory

    config = LongLlamaConfig.from_pretrained(embedded_model_path(), mem_top_k=top_k, **fields)
    H = config.num_attention_heads
    d = config.hidden_size // H
    window = config.max_position_embeddings
    memories, queries = [], []
    start = time.perf_counter()
    for i, _layer in enumerate(config.mem_layers):
        mem = create_memory(config, 1, torch.device("cpu"))
        keys, values, q = make_memory(
            args.source,
            num_heads=H,
            head_dim=d,
            n_keys=args.length,
            n_queries=args.queries,
            seed=args.seed + i,
        )
        for begin in range(0, args.length, window):
            mem.add(keys[:, :, begin : begin + window], values[:, :, begin : begin + window])
        del keys, values
        memories.append(mem)
        queries.append(q)
    group.barrier()
    record = {
        "fill": f"synthetic:{args.source}",
        "length": args.length,
        "correct": None,
        "answer_prob": None,
        "prefill_seconds": None,
        "prefill_tokens_per_s": None,
        "fill_seconds": time.perf_counter() - start,
        "prefill_comm_seconds": 0.0,
        "sent_bytes_prefill": 0,
    }
    return memories, queries, record


@torch.no_grad()
def run_rank(args) -> dict | None:
    """One rank's measurements (rank 0 returns them; the others None)."""
    import knn_memory
    from knn_memory.process_group import ShardGroup

    knn_memory.set_threads(args.threads)
    fields = parse_backend(args.backend)
    if args.index_option:
        fields["mem_index_params"] = {**(fields.get("mem_index_params") or {}), **dict(args.index_option)}
    top_k = args.top_k if uses_top_k(fields) else None
    group = ShardGroup(torch.device("cpu"))
    fill = _model_fill if args.fill == "model" else _synthetic_fill
    memories, queries, record = fill(args, fields, top_k, group)
    per_rank = [sum(col) for col in zip(*(m.nbytes_per_rank() for m in memories), strict=True)]
    entries = int(memories[0].lengths.max())
    # search throughput: memory attention of a block of queries against each layer's memory
    before, before_s = _sent(memories)
    search_seconds = _search_throughput(memories, queries, args, group)
    after, after_s = _sent(memories)
    # this machine's all-reduce rate, alone: 16 MiB payload per rank, a few times
    block = torch.ones(4 * 2**20)
    group.barrier()
    start = time.perf_counter()
    for _ in range(ALLREDUCE_REPEATS):
        group.all_reduce_sum(block)
    allreduce_seconds = time.perf_counter() - start
    H, d = queries[0].shape[1], queries[0].shape[3]
    pairs = len(memories) * args.repeats * args.queries * H
    mem = memories[0]
    if group.rank != 0:
        return None
    return {
        "backend": args.backend,
        "index_options": dict(args.index_option or []),
        "world_size": group.world_size,
        "threads_per_rank": args.threads,
        **record,
        "search_queries_per_s": len(memories) * args.repeats * args.queries / search_seconds,
        "search_comm_seconds": after_s - before_s,
        "search_seconds": search_seconds,
        "memory_entries": entries,
        "bytes_per_rank": per_rank,
        "bytes_total": sum(per_rank),
        "sent_bytes_per_query_head": (after - before) / pairs,
        "formula_bytes_per_query_head": formula_bytes_per_query_head(d, mem.mode, mem.top_k)
        if group.world_size > 1
        else 0,
        "allreduce_bytes_per_s": ALLREDUCE_REPEATS * block.numel() * 4 / allreduce_seconds
        if group.world_size > 1
        else None,
        "mode": mem.mode,
        "top_k": mem.top_k,
        "head_dim": d,
        "heads": H,
        "memory_layers": len(memories),
    }


#: LongLLaMA-3B's memory: 3 memory layers x 32 heads x head_dim 100, 2048-token windows, top-k 128
MODEL_3B = {"memory_layers": 3, "heads": 32, "head_dim": 100, "window": 2048, "top_k": 128}
#: nominal per-GPU link rates for the projection (bytes/s): not measured here (this machine has no GPU)
NOMINAL_RATES = {"NVLink (H100/H200, ~400 GB/s per direction)": 400e9, "InfiniBand NDR (400 Gb/s)": 50e9}


def projection(
    tokens: list[int], world_size: int, measured_rate: float | None, model: dict = MODEL_3B
) -> list[dict]:
    """Communication of a prefill of ``tokens`` tokens over ``world_size`` ranks, from the formula.

    Per token, memory layer and head each rank hands the collectives ``formula_bytes_per_query_head``;
    a ring all-reduce moves ``2 (w - 1) / w`` times its payload over each rank's link, an all-gather
    ``w - 1`` times. Times are wire bytes over each rate (the measured one: this machine's gloo payload
    rate, waits included), and the collective count is what their latency multiplies.
    """
    rows = []
    L, H, d, W, k = (model[x] for x in ("memory_layers", "heads", "head_dim", "window", "top_k"))
    w = world_size
    for mode in ("union", "global"):
        reduce_payload = 4 + 4 * (d + 1)
        gather_payload = 4 * k if mode == "global" else 0
        for n in tokens:
            pairs = n * L * H
            payload = pairs * (reduce_payload + gather_payload)
            wire = pairs * (reduce_payload * 2 * (w - 1) / w + gather_payload * (w - 1))
            collectives = -(-n // W) * L * (3 if mode == "global" else 2)
            row = {
                "mode": mode,
                "tokens": n,
                "world_size": w,
                "payload_bytes_per_rank": payload,
                "wire_bytes_per_rank": wire,
                "collectives": collectives,
            }
            rates = dict(NOMINAL_RATES)
            if measured_rate:
                rates["gloo all-reduce on this machine (measured)"] = measured_rate
            row["seconds"] = {name: wire / rate for name, rate in rates.items()}
            rows.append(row)
    return rows


def plot_projection(rows: list[dict], path: Path) -> Path:
    """Wire bytes per rank and seconds at each rate against prefill tokens (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, style in (("union", "-"), ("global", "--")):
        mine = [r for r in rows if r["mode"] == mode]
        x = [r["tokens"] for r in mine]
        left.plot(x, [r["wire_bytes_per_rank"] / 1e9 for r in mine], style, marker="o", label=mode)
        for name in mine[0]["seconds"]:
            right.plot(x, [r["seconds"][name] for r in mine], style, marker="o", label=f"{mode}, {name}")
    left.set(xscale="log", yscale="log", xlabel="prefill tokens", ylabel="GB on each rank's link")
    right.set(xscale="log", yscale="log", xlabel="prefill tokens", ylabel="seconds of communication")
    w = rows[0]["world_size"]
    left.set_title(f"LongLLaMA-3B memory over {w} ranks")
    right.set_title("at each link rate")
    left.legend(fontsize=8)
    right.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def measured_rate(rows: list[dict]) -> float | None:
    """This machine's all-reduce payload rate (bytes/s), the median over the multi-rank runs recorded."""
    rates = sorted(r["allreduce_bytes_per_s"] for r in rows if r.get("allreduce_bytes_per_s"))
    return rates[len(rates) // 2] if rates else None


def _launch(args, world_size: int, timeout: float) -> dict:
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {**os.environ, **local_rank_env(rank, world_size, port, args.threads)}
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
        "| backend | fill | ranks | threads/rank | tokens | correct | prefill s | prefill tok/s | search q/s | "
        "bytes per rank (MiB) | sent B per (query, head): measured / formula | sent during prefill (MiB) | "
        "in collectives (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_rank = " + ".join(f"{b / 2**20:.1f}" for b in r["bytes_per_rank"])
        name = r["backend"] + "".join(f":{k}={v}" for k, v in (r.get("index_options") or {}).items())
        prefill = r.get("prefill_seconds")
        timing = "– | –" if prefill is None else f"{prefill:.1f} | {r['prefill_tokens_per_s']:.0f}"
        correct = "–" if r.get("correct") is None else r["correct"]
        lines.append(
            f"| {name} | {r.get('fill', 'model')} | {r['world_size']} | {r['threads_per_rank']} | {r['length']} | "
            f"{correct} | {timing} | {r['search_queries_per_s']:.0f} | "
            f"{per_rank} | {r['sent_bytes_per_query_head']:.1f} / {r['formula_bytes_per_query_head']} | "
            f"{r['sent_bytes_prefill'] / 2**20:.1f} | {r.get('prefill_comm_seconds', 0):.1f} |"
        )
    return "\n".join(lines)


def _parser() -> OneLineParser:
    p = OneLineParser(prog="knn-memory-sharded", description=__doc__.split("\n\n")[0])
    p.add_argument("--length", default="16k", help="prompt tokens, e.g. 16k, 64k (default 16k)")
    p.add_argument("--backend", default="sharded:faiss:auto", help="a sharded backend, e.g. sharded:exact")
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument(
        "--index-option",
        action="append",
        default=None,
        type=lambda t: parse_option(t, "--index-option"),
        metavar="NAME=VALUE",
        help="another option of the slices' index, e.g. max_nprobe=8 (repeatable)",
    )
    p.add_argument(
        "--fill",
        choices=("model", "synthetic"),
        default="model",
        help="fill the memory by the model's prefill of a passkey prompt (default), or with synthetic keys "
        "window by window, no model (search only; for memories whose prefill would take too long)",
    )
    p.add_argument(
        "--source",
        choices=SOURCES,
        default="attention",
        help="synthetic keys and queries (with --fill synthetic; default attention)",
    )
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
