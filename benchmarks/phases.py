"""``knn-memory-phases``: where the time of one long prefill goes, phase by phase, beside each phase's floor.

    python -m benchmarks.phases --length 1m --backend faiss:auto --top-k 32 --threads 1 --out phases.json

One passkey prompt of the embedded model is read (prefill, as ``longllama-passkey`` does) and then
``--decode`` tokens are generated one at a time from the filled memory. Timers wrap the library's own
functions (inclusive and exclusive times, nested calls subtracted), so the phases add up to the wall
time:

* **model forward**: everything outside the memory: embeddings, projections, RoPE, MLPs, norms, the
  local part of attention;
* **attention over hits**: the one softmax over [local ; retrieved] around the search and the values;
* **search**: the exact phase (matmul and top-k over the key store), the box-bound list ranking, the
  list scan (the compiled lists rank inside the scan's own call: their ranking is timed with the scan);
* **value gather**: reading the k values of every query from the chunked value store, and weighting
  them (in place, on the CPU: :meth:`knn_memory.storage.RetrievedValues.weighted`);
* **key add**: assignment to lists, codes, bounds, values appended;
* **index builds**: decoding keys, k-means, re-assigning every key (the growth policy's rebuilds);
* **dispatch and Python overhead**: the backend's own code around the calls above.

The floor of each phase is its work divided by the machine's ceiling measured in the same run (with the
same thread count): FLOP over the fp32 matmul rate for the model, the search and the builds, bytes over
the memory read bandwidth for the gather, and for the add its bytes over the bandwidth plus the FLOP of
assigning each new key to its list (a product with every centroid) over the matmul rate. Dispatch has no
work of its own: its floor is 0.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import knn_memory
from benchmarks.ceilings import matmul_gflops, read_bandwidth_gbs
from benchmarks.measure import PeakRSS
from indexes import batched
from indexes.bounded_ivf import BoundedIVF
from indexes.streaming import StreamingIndex
from knn_memory.backends.faiss_index import FaissBackend
from knn_memory.storage import RetrievedValues
from longllama.cli_args import (
    BadArguments,
    OneLineParser,
    check_writable_file,
    error_exit,
    parse_backend,
    parse_token_count,
)


class Timers:
    """Inclusive and exclusive seconds per wrapped function, nested calls subtracted from their callers."""

    def __init__(self) -> None:
        self.inclusive: dict[str, float] = defaultdict(float)
        self.exclusive: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.work: dict[str, float] = defaultdict(float)  # FLOP or bytes, per phase
        # what the "auto" index's searches did: queries, lists and keys scanned, queries capped
        self.scan: dict[str, int] = defaultdict(int)
        self._stack: list[float] = []  # children's time of each open call
        # only calls on this thread are timed into the phases: a call on a worker thread (a row's
        # rebuilds side by side, the heads fanned out over a pool) runs inside a timed call of this one,
        # which its time is part of. Worker calls are counted apart, with their own inclusive seconds
        # (running side by side, they may add up to more than the wall time of the call around them)
        self._owner = threading.get_ident()
        self.lock = threading.Lock()  # the work counts and worker calls, which worker threads add to
        self.worker_calls: dict[str, int] = defaultdict(int)
        self.worker_seconds: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            if threading.get_ident() != self._owner:
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    with self.lock:
                        self.worker_seconds[name] += time.perf_counter() - start
                        self.worker_calls[name] += 1
            self._stack.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                children = self._stack.pop()
                self.inclusive[name] += spent
                self.exclusive[name] += spent - children
                self.calls[name] += 1
                if self._stack:
                    self._stack[-1] += spent

        return timed


@contextlib.contextmanager
def instrumented(timers: Timers, head_dim: int):
    """Wrap the library's memory functions with ``timers`` (and count their work) for the block."""
    patches = []

    def patch(owner, attr: str, name: str, work: Callable | None = None) -> None:
        original = getattr(owner, attr)
        timed = timers.wrap(name, original)

        def counted(*args, **kwargs):
            if work is not None:
                amount = work(*args, **kwargs)
                with timers.lock:
                    timers.work[name] += amount
            return timed(*args, **kwargs)

        patches.append((owner, attr, original))
        setattr(owner, attr, counted)

    d = head_dim

    def exact_work(self, q, k):
        return 2.0 * d * q.shape[0] * self.ntotal

    def gather_work(self):  # bytes read and written
        return 2.0 * self.ids.numel() * self.dim * self.dtype.itemsize

    def weighted_work(self, probs):  # bytes of values read
        return 1.0 * self.ids.numel() * self.dim * self.dtype.itemsize

    def add_work(self, keys, values, mask=None):  # bytes written: keys (codes + int32 ids) and values
        n = keys.shape[0] * keys.shape[1] * keys.shape[2]
        return n * (2 * d * self.mem_dtype.itemsize + 4)

    def assign_work(self, x):  # FLOP of assigning keys x [n, d] to the nearest of the lists' centroids
        return 2.0 * d * self.nlist * x.shape[0]

    def assign_many_work(table, keys, codes, parts):  # the same for a row's heads at once ([I, 7] table)
        return 2.0 * d * float(table[:, 3].sum()) * keys.shape[1]

    def build_work(self, threads=1):  # k-means over the sample + assigning every key: FLOP
        if self.policy is None:
            return 0.0
        lists = self.policy.lists_for(self.ntotal)
        sample = self.policy.train_size(self.ntotal, lists)
        return 2.0 * d * lists * (self.policy.niter * sample + self.ntotal)

    patch(knn_memory.attention, "memory_attention", "memory_attention")
    # stacked prefix windows: their searches, adds and one softmax for all of them
    patch(knn_memory.attention, "memory_attention_windows", "memory_attention")
    patch(FaissBackend, "search_for_attention", "backend.search")
    patch(FaissBackend, "add", "backend.add", add_work)
    patch(StreamingIndex, "_exact", "search.exact", exact_work)
    timed_exact_many = timers.wrap("search.exact", batched._exact_many)

    def exact_many_counting(indexes, queries, k):  # the exact search of all heads of a row at once
        out = timed_exact_many(indexes, queries, k)
        if out is not None:
            timers.work["search.exact"] += 2.0 * d * queries.shape[0] * queries.shape[1] * indexes[0].ntotal
        return out

    patches.append((batched, "_exact_many", batched._exact_many))
    batched._exact_many = exact_many_counting
    patch(StreamingIndex, "_build", "build", build_work)
    # a row's rebuilds, side by side on worker threads or one after the other (each a "build" above)
    patch(batched, "rebuild_many", "build")
    patch(StreamingIndex, "add_checked", "index.add")
    # the "auto" index is searched one (row, head) at a time (BoundedIVF.search) or all heads of a row
    # at once (indexes.batched); both rank lists by a product with their boxes (two where the rank is not
    # the bound and the scan may go past nprobe lists), then scan. The compiled lists rank inside the
    # same C call as the scan (timed as the scan); the Python lists rank with a torch matmul first
    patch(BoundedIVF, "search", "search.scan")
    patch(batched, "_compiled_search", "search.scan")
    patch(BoundedIVF, "_bound_and_rank", "search.rank")
    counted_search = BoundedIVF.searched

    def searched_counting(self, queries, stats):  # what each search did: the bounds' and the scan's FLOP
        counted_search(self, queries, stats)
        timers.scan["queries"] += queries
        timers.scan["lists_scanned"] += stats[0]
        timers.scan["keys_scanned"] += stats[1]
        timers.scan["capped"] += stats[2]
        first, cap = self._probes()
        matmuls = 2 if self.rank_shrink != 1.0 and cap > first else 1
        timers.work["search.scan"] += matmuls * 2.0 * (2 * d) * queries * self.nlist + 2.0 * d * stats[1]

    patches.append((BoundedIVF, "searched", counted_search))
    BoundedIVF.searched = searched_counting
    patch(BoundedIVF, "add", "index.bounded_add", assign_work)
    patch(batched, "_compiled_add", "index.bounded_add", assign_many_work)
    patch(StreamingIndex, "added_to", "index.add")
    patch(RetrievedValues, "gather", "gather", gather_work)
    patch(RetrievedValues, "weighted", "gather", weighted_work)
    # the model calls memory_attention through the knn_memory package
    for attr in ("memory_attention", "memory_attention_windows"):
        patches.append((knn_memory, attr, getattr(knn_memory, attr)))
        setattr(knn_memory, attr, getattr(knn_memory.attention, attr))
    try:
        yield
    finally:
        for owner, attr, original in reversed(patches):
            setattr(owner, attr, original)


def model_flop_per_token(config) -> float:
    """Matmul FLOP per token of the model outside the memory (projections, MLP, head, local attention)."""
    D, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    per_layer = 2 * (4 * D * D + 3 * D * inter)
    local = 2 * 2 * D * config.max_position_embeddings / 2  # q·k and p·v over half a window on average
    return layers * (per_layer + local)


def phase_table(
    timers: Timers, wall: float, flop_rate: float, bandwidth: float, model_flop: float
) -> list[dict]:
    ex, work = timers.exclusive, timers.work
    memory = sum(ex.values())  # every timed call is the memory's, nested or not
    rows = [
        ("model forward", wall - memory, model_flop / flop_rate),
        ("attention over hits", ex["memory_attention"], None),
        ("search: exact phase", ex["search.exact"], work["search.exact"] / flop_rate),
        ("search: list ranking", ex["search.rank"], None),
        ("search: list scan", ex["search.scan"], work["search.scan"] / flop_rate),
        ("value gather", ex["gather"], work["gather"] / bandwidth),
        (
            "key add",
            ex["backend.add"] + ex["index.add"] + ex["index.bounded_add"],
            work["backend.add"] / bandwidth + work["index.bounded_add"] / flop_rate,
        ),
        ("index builds", ex["build"], work["build"] / flop_rate),
        ("dispatch and Python overhead", ex["backend.search"], 0.0),
    ]
    out = []
    for name, seconds, floor in rows:
        out.append({"phase": name, "seconds": seconds, "share": seconds / wall, "floor_seconds": floor})
    # the box bounds are FLOP counted with the scan; attention over hits is small matmuls (no floor given)
    return out


def format_table(rows: list[dict], wall: float) -> str:
    lines = [f"{'phase':<30} {'seconds':>9} {'share':>7} {'floor s':>9} {'x floor':>8}"]
    for r in rows:
        floor = r["floor_seconds"]
        ratio = "-" if not floor else f"{r['seconds'] / floor:.1f}"
        lines.append(
            f"{r['phase']:<30} {r['seconds']:>9.1f} {100 * r['share']:>6.1f}% "
            f"{'-' if floor is None else f'{floor:.1f}':>9} {ratio:>8}"
        )
    lines.append(f"{'total (wall)':<30} {wall:>9.1f}")
    return "\n".join(lines)


@torch.no_grad()
def run(
    length: int, backend: str, top_k: int, nprobe: int | None, threads: int, seed: int, decode: int
) -> dict:
    from longllama import LongLlamaForCausalLM, embedded_model_path, load_tokenizer
    from longllama.passkey import make_prompt

    knn_memory.set_threads(threads)
    flop_rate = matmul_gflops(1024, torch.float32) * 1e9
    bandwidth = read_bandwidth_gbs(512) * 1e9
    settings = parse_backend(backend)
    params = {
        **(settings.pop("mem_index_params", None) or {}),
        **({"nprobe": nprobe} if nprobe else {}),
    } or None
    path = embedded_model_path()
    tokenizer = load_tokenizer(path)
    model = LongLlamaForCausalLM.from_pretrained(
        path, torch_dtype=torch.float32, mem_top_k=top_k, mem_index_params=params, **settings
    ).eval()
    config = model.config
    prompt = make_prompt(tokenizer, length, seed)
    ids = prompt.input_ids
    timers = Timers()
    with (
        PeakRSS(interval_s=0.05) as rss,
        instrumented(timers, config.hidden_size // config.num_attention_heads),
    ):
        start = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        wall = time.perf_counter() - start
        prefill = dict(timers.exclusive), dict(timers.inclusive), dict(timers.work)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(decode):
            out = model(token, cache=out.cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        decode_seconds = time.perf_counter() - t0
    # the phases are the prefill's: its times and its work (the decode's searches and adds left out)
    timers.exclusive, timers.inclusive = defaultdict(float, prefill[0]), defaultdict(float, prefill[1])
    timers.work = defaultdict(float, prefill[2])
    tokens = ids.shape[1]
    rows = phase_table(timers, wall, flop_rate, bandwidth, model_flop_per_token(config) * tokens)
    memory = out.cache.memory(config.mem_layers[0])
    return {
        "length": length,
        "tokens": tokens,
        "backend": backend,
        "top_k": top_k,
        "nprobe": nprobe,
        "threads": threads,
        "prefill_seconds": wall,
        "phases": rows,
        "calls": dict(timers.calls),
        "work": dict(timers.work),  # what each floor is computed from: FLOP, or bytes for gather and add
        # calls on worker threads, inside the phases above (inclusive seconds, summed over the threads)
        "worker_threads": {
            name: {"calls": timers.worker_calls[name], "seconds": timers.worker_seconds[name]}
            for name in sorted(timers.worker_calls)
        },
        "scan": dict(timers.scan),
        "decode_tokens": decode,
        "decode_tokens_per_second": decode / decode_seconds if decode else None,
        "memory_entries_per_head": int(memory.lengths[0]),
        "lists_per_head": memory.head_index(0, 0).nlist if isinstance(memory, FaissBackend) else None,
        "peak_rss_mib": rss.peak_bytes / 2**20,
        "ceilings": {"matmul_fp32_gflops": flop_rate / 1e9, "mem_read_gbs": bandwidth / 1e9},
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = OneLineParser(prog="knn-memory-phases", description=__doc__.split("\n\n")[0])
    p.add_argument("--length", default="1m", help="prompt length in tokens, e.g. 64k, 1m (default 1m)")
    p.add_argument("--backend", default="faiss:auto", help="exact, or faiss:<index> (default faiss:auto)")
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--nprobe", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decode", type=int, default=32, help="tokens generated after the prefill (default 32)")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    try:
        args = p.parse_args(argv)
        length = parse_token_count(args.length, "--length", minimum=64)
        parse_backend(args.backend)
        for name in ("top_k", "threads"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if args.nprobe is not None and args.nprobe < 1:
            raise ValueError(f"--nprobe must be >= 1, got {args.nprobe}")
        if args.decode < 0:
            raise ValueError(f"--decode must be >= 0, got {args.decode}")
        if args.out:  # written after the prefill: checked first
            check_writable_file(args.out, "--out")
    except (BadArguments, ValueError, OSError) as err:
        return error_exit("knn-memory-phases", err)
    result = run(length, args.backend, args.top_k, args.nprobe, args.threads, args.seed, args.decode)
    print(format_table(result["phases"], result["prefill_seconds"]))
    if result["decode_tokens_per_second"]:
        print(f"decode: {result['decode_tokens_per_second']:.1f} tokens/s after {result['tokens']} tokens")
    print(f"peak RSS {result['peak_rss_mib']:.0f} MiB; ceilings {result['ceilings']}")
    if result["worker_threads"]:
        print(
            "on worker threads, inside the phases above (seconds summed over the threads): "
            + ", ".join(
                f"{n} {w['seconds']:.1f} s ({w['calls']} calls)" for n, w in result["worker_threads"].items()
            )
        )
    scan = result["scan"]
    if scan.get("queries"):
        q = scan["queries"]
        print(
            f"auto index searches: {q} queries, {scan['lists_scanned'] / q:.1f} lists and "
            f"{scan['keys_scanned'] / q:.0f} keys scanned per query, {100 * scan['capped'] / q:.1f}% capped"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
