"""``longllama-passkey``: passkey retrieval accuracy vs context length, per memory backend.

    longllama-passkey --lengths 1k,4k,16k,64k --seeds 20 --backend exact --backend faiss:Flat --top-k 64
    longllama-passkey --model path/to/long_llama_3b_v1_1 --lengths 8k --last-context-length 1024

Defaults to the embedded model. ``--backend`` is any registered backend as ``name[:spec][:option=value]``:
``exact``, ``faiss:<Faiss index_factory string>``, ``faiss:auto``, ``sharded:faiss:auto`` (under
``torchrun``) (repeatable). Writes ``results.jsonl`` (one line per run; ``--resume`` skips runs already there),
``summary.json`` and ``passkey.png`` (plus ``passkey_depth.png`` for fixed ``--depths``) into ``--out``
and prints the table; ``--summarize-only`` rebuilds those from ``results.jsonl`` alone (e.g. after
merging the files of several runs). Bad arguments exit with code 2 and one line on stderr.

A run longer than a working session can be split: with ``--checkpoint-every 1m`` the prompt's memory is
saved every million tokens under ``--out``/checkpoints, and the same command with ``--resume`` continues
a stopped run from its last save (the result is the same, bit for bit; its seconds and peak RSS cover
every part)::

    longllama-passkey --lengths 10m --seeds 3 --backend faiss:auto --top-k 32 --threads 1 \
        --out runs/10m --checkpoint-every 1m --resume
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

import knn_memory
from knn_memory.process_group import ShardGroupError, process_rank
from longllama.tools.cli_args import (
    BadArguments,
    OneLineParser,
    backend_fields,
    check_writable_dir,
    error_exit,
    parse_backend_spec,
    parse_option,
    parse_token_count,
)
from longllama.tools.passkey import (
    PasskeyResult,
    PrefillCheckpoints,
    make_prompt,
    memory_settings,
    run_passkey,
    summarize,
)

INNER_PROGRESS_FROM = 32768  # prompts this long also get a bar of the tokens read within the run


def parse_length(text: str) -> int:
    """``"4k"`` -> 4096: a prompt length in tokens (at least 64)."""
    return parse_token_count(text, "--lengths", minimum=64)


def _label(backend: str, options: dict, top_k: int | None, knobs: dict) -> str:
    """``"exact (dense)"``, ``"faiss:auto/top32/max_nprobe=8"``: the backend as one results label."""
    cls = knn_memory.backend_class(backend)
    spec = cls.format_spec(options)
    name = backend if spec is None else f"{backend}:{spec}"
    if top_k is None:
        return f"{name} (dense)"
    in_spec = set(cls.parse_spec(spec)) if spec is not None else set()
    extras = {k: v for k, v in options.items() if k not in in_spec} | knobs
    extra = ",".join(f"{k}={v}" for k, v in extras.items())
    return f"{name}/top{top_k}" + (f"/{extra}" if extra else "")


def plot(summary: list[dict], path: Path) -> None:
    """Two panels over context length (log scale), one line per backend: accuracy with 95% intervals,
    and the mean seconds per run (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(12, 4.2))
    styles = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-")]
    for i, backend in enumerate(sorted({r["backend"] for r in summary})):
        rows = sorted((r for r in summary if r["backend"] == backend), key=lambda r: r["length"])
        xs = [r["length"] * 1.04**i for r in rows]  # a small offset keeps equal curves visible
        ys = [100 * r["accuracy"] for r in rows]
        # (the interval's ends may sit a rounding error inside the accuracy: error bars are never negative)
        lo = [max(0.0, 100 * (r["accuracy"] - r["ci95"][0])) for r in rows]
        hi = [max(0.0, 100 * (r["ci95"][1] - r["accuracy"])) for r in rows]
        marker, line = styles[i % len(styles)]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker=marker, linestyle=line, capsize=3, label=backend)
        ax_t.plot(
            [r["length"] for r in rows], [r["mean_seconds"] for r in rows], marker=marker, linestyle=line,
            label=backend,
        )  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("passkey accuracy (%)")
    ax.set_ylim(-3, 103)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Passkey retrieval")
    ax_t.set_xscale("log", base=2)
    ax_t.set_yscale("log")
    ax_t.set_xlabel("context length (tokens)")
    ax_t.set_ylabel("seconds per run (mean)")
    ax_t.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    ax_t.set_title("Time per run (prompt and answer)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_depths(summary: list[dict], path: Path) -> None:
    """Accuracy vs needle depth, one panel per backend, one line per context length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = sorted({r["backend"] for r in summary})
    fig, axes = plt.subplots(1, len(backends), figsize=(4.2 * len(backends), 3.6), squeeze=False, sharey=True)
    for ax, backend in zip(axes[0], backends, strict=True):
        for length in sorted({r["length"] for r in summary if r["backend"] == backend}):
            rows = sorted(
                (r for r in summary if r["backend"] == backend and r["length"] == length),
                key=lambda r: r["depth"],
            )
            ax.plot(
                [r["depth"] for r in rows], [100 * r["accuracy"] for r in rows], marker="o", label=f"{length}"
            )
        ax.set_title(backend, fontsize=9)
        ax.set_xlabel("needle depth (0 = start)")
        ax.set_ylim(-3, 103)
        ax.grid(True, alpha=0.3)
        ax.legend(title="tokens", fontsize=7)
    axes[0][0].set_ylabel("passkey accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(summary: list[dict]) -> str:
    """The summary rows as a text table (with a depth column when the rows have one).

    ``p(ans)``: the mean over runs of the lowest probability given to a correct answer token;
    ``tok/s``: the mean decode speed after the prompt (``-`` where no run recorded it).
    """
    by_depth = bool(summary) and "depth" in summary[0]
    depth_head = f" {'depth':>6}" if by_depth else ""
    lines = [
        f"{'backend':<34} {'length':>8}{depth_head} {'runs':>5} {'acc %':>6} {'95% CI':>13} {'p(ans)':>7} "
        f"{'s/run':>8} {'peak MiB':>9} {'tok/s':>6}"
    ]
    for r in summary:
        ci = f"{100 * r['ci95'][0]:.0f}-{100 * r['ci95'][1]:.0f}"
        p = r.get("mean_answer_prob")
        prob = "-" if p is None else f"{p:.3f}"
        rate = r.get("decode_tokens_per_second")
        rate = "-" if rate is None else f"{rate:.1f}"
        depth = ""
        if by_depth:
            depth = f" {'random' if r['depth'] is None else format(r['depth'], '.2f'):>6}"
        lines.append(
            f"{r['backend']:<34} {r['length']:>8}{depth} {r['runs']:>5} {100 * r['accuracy']:>6.1f} {ci:>13} "
            f"{prob:>7} {r['mean_seconds']:>8.2f} {r['peak_rss_mib']:>9.0f} {rate:>6}"
        )
    return "\n".join(lines)


def read_results(path: Path) -> list[PasskeyResult]:
    """The runs recorded in a ``results.jsonl``; ``ValueError`` naming the line that does not parse."""
    results = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            results.append(PasskeyResult(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"{path}: line {i} is not a passkey result ({err})") from None
    return results


def write_report(results: list[PasskeyResult], out: Path, args: dict) -> str:
    """Write ``summary.json``, ``passkey.png`` (and ``passkey_depth.png`` when depths were fixed); the table.

    The length table and plot count the runs with a random needle depth (all runs when none has one);
    the runs with fixed depths are summarized per depth.
    """
    fixed = [r for r in results if r.depth is not None]
    # the length table counts the random-depth runs; a depth sweep gets its own table (unless it is all)
    summary = summarize([r for r in results if r.depth is None] or results)
    depth_summary = summarize(fixed, by_depth=True) if fixed else []
    report = {"args": args, "summary": summary}
    if depth_summary:
        report["by_depth"] = depth_summary
    (out / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(summary, out / "passkey.png")
    text = format_table(summary)
    if depth_summary:
        plot_depths(depth_summary, out / "passkey_depth.png")
        text += "\n\nBy needle depth (runs with a fixed depth):\n" + format_table(depth_summary)
    return text


def _index_options(texts: list[str]) -> dict:
    """``["max_nprobe=8", "lists_per_sqrt=1.5"]`` -> ``{"max_nprobe": 8, "lists_per_sqrt": 1.5}``."""
    return dict(parse_option(text, "--index-option") for text in texts)


def _parser() -> OneLineParser:
    p = OneLineParser(prog="longllama-passkey", description="Passkey retrieval accuracy vs context length.")
    p.add_argument(
        "--model", default=None, help="LongLLaMA checkpoint directory (default: the embedded model)"
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer.model or its directory (default: --model)")
    p.add_argument("--lengths", default="1k,4k,16k", help="comma-separated token counts, e.g. 1k,4k,64k,1m")
    p.add_argument("--seeds", type=int, default=5, help="seeds per length and depth (0..N-1)")
    p.add_argument("--seed-offset", type=int, default=0)
    p.add_argument("--depths", default="random", help="needle depths in [0,1], comma-separated, or 'random'")
    p.add_argument(
        "--backend",
        action="append",
        default=None,
        help="NAME[:SPEC][:OPTION=VALUE...], e.g. exact, faiss:auto, sharded:faiss:auto (repeatable)",
    )
    p.add_argument("--top-k", type=int, default=None, help="memory entries per query (faiss default 128)")
    p.add_argument("--nprobe", type=int, default=None)
    p.add_argument("--efSearch", type=int, default=None)
    p.add_argument(
        "--index-option",
        action="append",
        default=None,
        metavar="NAME=VALUE",
        help="another option of the Faiss backend's index, e.g. max_nprobe=8 for faiss:auto (repeatable)",
    )
    p.add_argument("--last-context-length", type=int, default=None)
    p.add_argument("--mem-dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--grouping", default=None, help="mem_attention_grouping as 'heads,queries'")
    p.add_argument(
        "--threads", type=int, default=None, help="threads for torch and Faiss (each run uses this many)"
    )
    p.add_argument("--out", default="passkey_results", help="output directory")
    p.add_argument(
        "--resume",
        action="store_true",
        help="skip runs already in out/results.jsonl, and continue a run from its last --checkpoint-every save",
    )
    p.add_argument(
        "--checkpoint-every",
        default=None,
        metavar="TOKENS",
        help="save a long prompt's memory every this many tokens (e.g. 1m) under out/checkpoints/, so that "
        "--resume continues a run stopped part way (same result, bit for bit); removed once the run is done",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--summarize-only",
        action="store_true",
        help="rebuild summary.json, the plots and the table from out/results.jsonl; run nothing",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {str(out)!r} exists and is not a directory")
        results_path = out / "results.jsonl"
        if args.summarize_only:
            if not results_path.is_file():
                raise ValueError(f"--summarize-only: no {results_path} to summarize")
            check_writable_dir(out, "--out")
            print(write_report(read_results(results_path), out, vars(args)))
            return 0
        lengths = [parse_length(t) for t in args.lengths.split(",") if t.strip()]
        if not lengths:
            raise ValueError(f"--lengths must name at least one length, got {args.lengths!r}")
        backends = [parse_backend_spec(b) for b in (args.backend or ["exact"])]
        try:
            depths = [None] if args.depths == "random" else [float(d) for d in args.depths.split(",")]
        except ValueError:
            raise ValueError(f"--depths {args.depths!r} must be 'random' or numbers in [0, 1]") from None
        if any(d is not None and not 0 <= d <= 1 for d in depths):
            raise ValueError(f"--depths must lie in [0, 1], got {args.depths!r}")
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
        if args.seed_offset < 0:
            raise ValueError(f"--seed-offset must be >= 0, got {args.seed_offset}")
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        previous = read_results(results_path) if args.resume and results_path.is_file() else []
        checkpoints = None
        if args.checkpoint_every is not None:
            checkpoints = PrefillCheckpoints(
                out / "checkpoints", parse_length(args.checkpoint_every), resume=args.resume
            )
        try:
            grouping = None if args.grouping is None else tuple(int(x) for x in args.grouping.split(","))
        except ValueError:
            raise ValueError(f"--grouping {args.grouping!r} must be 'heads,queries', e.g. 4,256") from None
        from transformers.utils import logging as hf_logging

        from longllama import LongLlamaForCausalLM, embedded_model_path, load_tokenizer
        from longllama.modeling import check_memory_settings

        hf_logging.set_verbosity_error()  # keep stderr for our own one-line errors
        hf_logging.disable_progress_bar()

        model_path = Path(args.model) if args.model else embedded_model_path()
        if not (model_path / "config.json").is_file():
            raise ValueError(f"--model {str(model_path)!r} is not a checkpoint directory (no config.json)")
        overrides = {"mem_attention_grouping": grouping} if grouping else {}
        if args.mem_dtype:
            overrides["mem_dtype"] = args.mem_dtype
        if args.threads:
            knn_memory.set_threads(args.threads)
        model = LongLlamaForCausalLM.from_pretrained(
            model_path, torch_dtype=torch.float32, **overrides
        ).eval()
        tokenizer_path = Path(args.tokenizer) if args.tokenizer else model_path
        if not tokenizer_path.exists():
            raise ValueError(f"--tokenizer {str(tokenizer_path)!r} does not exist")
        tokenizer = load_tokenizer(tokenizer_path)
        params = {k: v for k, v in (("nprobe", args.nprobe), ("efSearch", args.efSearch)) if v is not None}
        options = _index_options(args.index_option or [])
        runs = []
        head_dim = model.config.hidden_size // model.config.num_attention_heads
        for backend, backend_options in backends:
            # --top-k and the search knobs apply to top-k backends (each knob to the indexes that have
            # it); a dense backend (exact) stays dense, as upstream's memory
            cls = knn_memory.backend_class(backend)
            default_k = cls.default_top_k(backend_options)
            top_k = None if default_k is None else (args.top_k or default_k)
            knobs: dict = {}
            if default_k is not None:
                accepted = cls.search_knobs(backend_options, head_dim)
                knobs = {k: v for k, v in params.items() if k in accepted} | options
            elif options:
                raise ValueError(
                    f"--index-option {sorted(options)}: backend {backend!r} is dense and takes none"
                )
            cfg = dict(backend_fields(backend, {**backend_options, **knobs}), mem_top_k=top_k)
            cfg.setdefault("mem_index", None)
            cfg.setdefault("mem_index_params", None)
            runs.append((_label(backend, backend_options, top_k, knobs), cfg))
        for _, cfg in runs:  # every backend setting is checked before the long part starts
            with memory_settings(model, **cfg):
                check_memory_settings(model.config)
        check_writable_dir(out, "--out")  # before the runs, not when their results are written
    except (BadArguments, ValueError, TypeError, OSError) as err:
        return error_exit("longllama-passkey", err)

    out.mkdir(parents=True, exist_ok=True)
    results: list[PasskeyResult] = list(previous)
    done = {(r.backend, r.length, r.seed, r.depth) for r in previous}
    jobs = [
        (label, cfg, n, seed, depth)
        for n in lengths
        for seed in range(args.seed_offset, args.seed_offset + args.seeds)
        for depth in depths
        for label, cfg in runs
        if (label, n, seed, depth) not in done
    ]
    prompts: dict[tuple, object] = {}
    # under torchrun (a sharded memory) every rank runs the same prompts; rank 0 alone reports and writes
    main_rank = process_rank() == 0
    bar = tqdm(jobs, disable=args.no_progress or not main_rank, desc="passkey")
    start = time.perf_counter()
    log = open(results_path, "a") if main_rank else None
    try:
        for label, cfg, n, seed, depth in bar:
            key = (n, seed, depth)
            if key not in prompts:
                prompts.clear()
                prompts[key] = make_prompt(tokenizer, n, seed, depth)
            if checkpoints is not None:
                checkpoints.name_for(label)
            with memory_settings(model, **cfg):
                r = run_passkey(
                    model,
                    tokenizer,
                    prompts[key],
                    last_context_length=args.last_context_length,
                    label=label,
                    progress=main_rank and not args.no_progress and n >= INNER_PROGRESS_FROM,
                    checkpoints=checkpoints,
                )
            results.append(r)
            if log is not None:
                log.write(json.dumps(asdict(r)) + "\n")
                log.flush()
            bar.set_postfix(backend=label[:20], n=n, ok=r.correct)
    except ShardGroupError as err:  # another rank died or hung: one line, not a traceback per rank
        return error_exit("longllama-passkey", err)
    finally:
        if log is not None:
            log.close()
    if not main_rank:
        return 0
    print(write_report(results, out, vars(args)))
    print(f"{len(jobs)} runs in {time.perf_counter() - start:.1f} s; results in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
