"""Focused Transformer (FoT) training of a small LongLLaMA on synthetic long-context documents.

One step: draw D documents (needles in filler, :mod:`longllama.fot.training_data`), split each into windows
of ``W = max_position_embeddings`` tokens, run every window as one row of a batch, and let the memory
layers attend to the crossbatch memory of :mod:`longllama.fot.crossbatch` (earlier windows of the same
document, plus negatives from other documents). All windows of a document run in parallel, which
computes exactly what sequential inference with a dense memory computes, with gradients flowing
through memory into earlier windows.

Loss: next-token cross-entropy over the concatenated windows (a window's last token predicts the next
window's first), plus ``answer_weight`` times the mean over the answer tokens.

    python -m longllama.fot.training --out runs/tiny --steps 1500

Checkpoints (``checkpoint.pt``) are written atomically every ``--save-every`` steps; ``--resume``
continues a run exactly (model, optimizer, schedule, step, loss log; data is a function of the step).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from knn_memory.validate import check_float, check_int
from longllama.configuration import LongLlamaConfig
from longllama.fot.crossbatch import CrossBatchPlan, make_plan, parse_mix
from longllama.fot.tokenizer_training import train_tokenizer
from longllama.fot.training_data import encode_document, make_document
from longllama.modeling import LongLlamaForCausalLM
from longllama.tokenizer import SAVED_TOKENIZER_FILE, load_tokenizer
from longllama.tools.cli_args import BadArguments, OneLineParser, check_writable_dir, error_exit


@dataclass
class TrainConfig:
    """Everything a run depends on (saved with every checkpoint and in the model card)."""

    # model
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    window: int = 128  # max_position_embeddings: window, RoPE size and local-cache capacity
    mem_layers: list[int] = field(default_factory=lambda: [1, 2])
    # data
    windows_per_doc: int = 4
    docs_per_batch: int = 16
    min_doc_tokens: int = 64
    tokenizer_docs: int = 3000  # synthetic documents the SentencePiece tokenizer is trained on
    # FoT crossbatch: (positives, negatives) per document, cycled; None positives = all earlier windows
    mix: str = "all:0"
    # optimisation
    steps: int = 1500
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.1
    answer_weight: float = 2.0
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 2
    save_every: int = 100
    # continue from a trained LongLLaMA directory (its weights and tokenizer) instead of from scratch
    init_from: str | None = None


#: fields of ``TrainConfig`` and the smallest value each may take (ints)
_INT_LOWS = {
    "vocab_size": 1, "hidden_size": 1, "intermediate_size": 1, "num_hidden_layers": 1,
    "num_attention_heads": 1, "window": 2, "windows_per_doc": 1, "docs_per_batch": 1, "min_doc_tokens": 1,
    "tokenizer_docs": 1, "steps": 1, "warmup": 0, "seed": 0, "threads": 1, "save_every": 1,
}  # fmt: skip


def check_train_config(cfg: TrainConfig, flags: bool = False) -> None:
    """Refuse a run setting no run can use (``threads=0``, ``save_every=0``, a negative ``warmup`` or
    ``grad_clip``...) before any work; ``flags``: name them as command-line options (``--save-every``).

    Raises:
        TypeError, ValueError: naming the field, the value and what is expected.
    """

    def name(field_name: str) -> str:
        return "--" + field_name.replace("_", "-") if flags else field_name

    for f, low in _INT_LOWS.items():
        check_int(getattr(cfg, f), name(f), low, 2**31 - 1)
    check_float(cfg.lr, name("lr"), 0.0, 10.0, low_open=True)
    check_float(cfg.grad_clip, name("grad_clip"), 0.0, low_open=True)
    check_float(cfg.weight_decay, name("weight_decay"), 0.0)
    check_float(cfg.answer_weight, name("answer_weight"), 0.0)
    if not cfg.mem_layers or not all(
        isinstance(i, int) and 0 <= i < cfg.num_hidden_layers for i in cfg.mem_layers
    ):
        raise ValueError(
            f"{name('mem_layers')} must name layers in [0, {cfg.num_hidden_layers - 1}], got {cfg.mem_layers}"
        )


def model_config(cfg: TrainConfig) -> LongLlamaConfig:
    """The LongLLaMA config of the trained model."""
    return LongLlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.window,
        mem_layers=list(cfg.mem_layers),
        mem_dtype="bfloat16",
        last_context_length=cfg.window // 2,  # room for generated tokens before the local cache flushes
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        initializer_range=0.02,
    )


@dataclass
class Batch:
    """One training batch, windows as rows."""

    input_ids: torch.Tensor  # [R, W]
    mask: torch.Tensor  # [R, W] bool
    targets: torch.Tensor  # [R, W] next token (-100 where none)
    answer: torch.Tensor  # [R, W] bool: the target is an answer token
    plan: CrossBatchPlan


def make_batch(cfg: TrainConfig, tokenizer, step: int) -> Batch:
    """The batch of ``step`` (a pure function of the seed and the step, so runs resume exactly)."""
    rng = random.Random(cfg.seed * 1_000_003 + step)
    W, nw = cfg.window, cfg.windows_per_doc
    max_len = W * nw

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    docs = []
    attempts = 0
    shortest = None
    while len(docs) < cfg.docs_per_batch:
        attempts += 1
        if attempts > 100 * cfg.docs_per_batch:
            raise ValueError(
                f"documents do not fit in window x windows_per_doc = {max_len} tokens: the shortest of "
                f"{attempts - 1} tries had {shortest} tokens (a smaller --vocab-size makes documents longer); "
                "raise --window or --windows-per-doc"
            )
        # random document end: anywhere from min_doc_tokens to the full nw windows
        target = rng.randint(cfg.min_doc_tokens, max_len)
        n_chars = max(0, int((target - 60) * 2.8))
        out = encode_document(make_document(rng, n_chars), encode, tokenizer.bos_token_id)
        if out is not None:
            shortest = len(out[0]) if shortest is None else min(shortest, len(out[0]))
        if out is None or len(out[0]) > max_len:
            continue
        docs.append(out)
    rows: list[tuple[int, int]] = []
    ids, mask, targets, answer = [], [], [], []
    for j, (tokens, ans_mask) in enumerate(docs):
        n = len(tokens)
        for w in range(math.ceil(n / W)):
            lo, hi = w * W, min((w + 1) * W, n)
            row_ids = tokens[lo:hi] + [0] * (W - (hi - lo))
            row_mask = [True] * (hi - lo) + [False] * (W - (hi - lo))
            nxt = [tokens[t + 1] if t + 1 < n else -100 for t in range(lo, hi)] + [-100] * (W - (hi - lo))
            ans = [ans_mask[t + 1] if t + 1 < n else False for t in range(lo, hi)] + [False] * (W - (hi - lo))
            rows.append((j, w))
            ids.append(row_ids)
            mask.append(row_mask)
            targets.append(nxt)
            answer.append(ans)
    plan = make_plan(rows, parse_mix(cfg.mix), rng)
    return Batch(
        input_ids=torch.tensor(ids),
        mask=torch.tensor(mask),
        targets=torch.tensor(targets),
        answer=torch.tensor(answer),
        plan=plan,
    )


def crossbatch_logits(
    model: LongLlamaForCausalLM, input_ids: torch.Tensor, mask: torch.Tensor, plan: CrossBatchPlan
) -> torch.Tensor:
    """Logits [R, W, V] of R windows run side by side, memory layers attending to ``plan``'s sources.

    Args:
        input_ids: [R, W] one window per row (W = ``max_position_embeddings``).
        mask: [R, W] bool, True for real tokens (padding at the end of a document's last window).
        plan: the crossbatch plan of the R rows.

    Each row is one no-local-cache window (positions 0..W-1, causal + padding mask), exactly as a prefix
    window at inference; the model's own forward runs it, its memory layers attending to
    ``plan.memory`` (the model's ``memory_override`` hook); nothing is stored anywhere.
    """
    W = input_ids.shape[1]
    out = model(
        input_ids,
        attention_mask=mask.long(),
        use_cache=False,
        last_context_length=W,
        memory_override=plan.memory,
        return_dict=True,
    )
    return out.logits


def batch_loss(
    model: LongLlamaForCausalLM, batch: Batch, answer_weight: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of a batch and its metrics (LM loss, answer loss, answer-token accuracy)."""
    logits = crossbatch_logits(model, batch.input_ids, batch.mask, batch.plan)  # [R, W, V]
    V = logits.shape[-1]
    ce = F.cross_entropy(logits.reshape(-1, V).float(), batch.targets.reshape(-1), reduction="none")
    ce = ce.view_as(batch.targets.float())
    has_target = batch.targets != -100
    lm = (ce * has_target).sum() / has_target.sum().clamp_min(1)
    ans = batch.answer
    ans_loss = (ce * ans).sum() / ans.sum().clamp_min(1)
    loss = lm + answer_weight * ans_loss
    with torch.no_grad():
        pred = logits.argmax(dim=-1)
        ans_acc = ((pred == batch.targets) & ans).sum().item() / max(int(ans.sum()), 1)
    return loss, {"loss": loss.item(), "lm": lm.item(), "answer_loss": ans_loss.item(), "answer_acc": ans_acc}


def _lr(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_CHECKPOINT_KEYS = ("model", "optimizer", "torch_rng", "step", "log", "train_config")


def load_checkpoint(path: Path) -> dict:
    """Read a ``checkpoint.pt`` as plain data only (``weights_only=True``: a crafted file cannot run code).

    Raises:
        ValueError: the file is missing, unreadable, holds anything but tensors and plain values, or
            lacks a checkpoint's entries.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"no checkpoint at {str(path)!r}") from None
    except Exception as err:  # UnpicklingError for anything but plain data, or a damaged file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"checkpoint {str(path)!r} cannot be read as plain data ({reason})") from None
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} is not a training checkpoint (missing {missing})")
    if not isinstance(ckpt["train_config"], dict) or not isinstance(ckpt["step"], int):
        raise ValueError(f"checkpoint {str(path)!r} has a malformed train_config or step")
    return ckpt


def train(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> Path:
    """Train (or resume) a run in ``out_dir``; writes ``model/`` (checkpoint + tokenizer) at the end.

    ``stop_after`` ends the run after that many steps of the schedule planned for ``cfg.steps``
    (the learning rate follows the full schedule).

    Returns the ``model/`` directory, loadable with ``LongLlamaForCausalLM.from_pretrained``.
    """
    check_train_config(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tok_dir = out / "tokenizer"
    if cfg.init_from is not None:
        model = initial_model(cfg, tok_dir)
    else:
        if not (tok_dir / "tokenizer.model").is_file():
            train_tokenizer(tok_dir, vocab_size=cfg.vocab_size, n_docs=cfg.tokenizer_docs, seed=cfg.seed)
        model = LongLlamaForCausalLM(model_config(cfg))
    tokenizer = load_tokenizer(tok_dir)
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    log: list[dict] = []
    start_step = 0
    ckpt_path = out / "checkpoint.pt"
    if resume and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["train_config"] != asdict(cfg):
            raise ValueError("--resume: the checkpoint was made with a different training config")
        model.load_state_dict(ckpt["model"])
        optim.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        start_step, log = ckpt["step"], ckpt["log"]
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(range(start_step, end), initial=start_step, total=end, disable=not progress)
    t_last, tokens = time.perf_counter(), 0
    for step in bar:
        batch = make_batch(cfg, tokenizer, step)
        for group in optim.param_groups:
            group["lr"] = _lr(cfg, step)
        loss, metrics = batch_loss(model, batch, cfg.answer_weight)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optim.step()
        tokens += int(batch.mask.sum())
        now = time.perf_counter()
        metrics.update(step=step + 1, lr=_lr(cfg, step), seconds=now - t_last, tokens=int(batch.mask.sum()))
        log.append(metrics)
        bar.set_postfix(
            loss=f"{metrics['loss']:.3f}",
            ans_acc=f"{metrics['answer_acc']:.2f}",
            tok_s=f"{tokens / (now - t_last):.0f}",
        )
        t_last, tokens = now, 0
        if (step + 1) % cfg.save_every == 0 or step + 1 == end:
            _atomic_save(
                {
                    "model": model.state_dict(),
                    "optimizer": optim.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "step": step + 1,
                    "log": log,
                    "train_config": asdict(cfg),
                },
                ckpt_path,
            )
    return export(out, model, log)


# the tokenizer files a run copies from --init-from and into its exported model, where present
TOKENIZER_FILES = (
    "tokenizer.model",
    SAVED_TOKENIZER_FILE,
    "tokenizer_config.json",
    "special_tokens_map.json",
)

_SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "mem_layers",
)


def initial_model(cfg: TrainConfig, tok_dir: Path) -> LongLlamaForCausalLM:
    """The model of ``cfg.init_from`` (its tokenizer copied to ``tok_dir``); its shape must be ``cfg``'s."""
    source = Path(cfg.init_from)
    has_tokenizer = (source / "tokenizer.model").is_file() or (source / SAVED_TOKENIZER_FILE).is_file()
    if not (source / "config.json").is_file() or not has_tokenizer:
        raise ValueError(
            f"init_from {str(source)!r} must be a LongLLaMA directory with config.json and tokenizer.model "
            f"(SentencePiece) or {SAVED_TOKENIZER_FILE} (written by tokenizer.save_pretrained)"
        )
    trained = LongLlamaForCausalLM.from_pretrained(source, torch_dtype=torch.float32)
    want, have = model_config(cfg), trained.config
    wrong = [f"{f}: {getattr(have, f)!r} (the run asks for {getattr(want, f)!r})" for f in _SHAPE_FIELDS
             if getattr(have, f) != getattr(want, f)]  # fmt: skip
    if wrong:
        raise ValueError(f"init_from {str(source)!r} has another shape: " + "; ".join(wrong))
    tok_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, tok_dir / name)
    model = LongLlamaForCausalLM(want)
    model.load_state_dict(trained.state_dict())
    return model


def export(out: Path, model: LongLlamaForCausalLM, log: list[dict]) -> Path:
    """Write the run's log and ``out/model`` (safetensors weights, config, the run's tokenizer files)."""
    (out / "log.jsonl").write_text("".join(json.dumps(m) + "\n" for m in log))
    model_dir = out / "model"
    model.eval()
    model.save_pretrained(model_dir, safe_serialization=True)
    # the tokenizer as the run has it: the SentencePiece model itself, as upstream ships, or the files a
    # tokenizer.save_pretrained directory holds when the run started from one
    for name in TOKENIZER_FILES:
        if (out / "tokenizer" / name).is_file():
            shutil.copyfile(out / "tokenizer" / name, model_dir / name)
    return model_dir


def export_checkpoint(run_dir: str | Path) -> Path:
    """``out/model`` from the run's latest checkpoint (a run stopped early is still usable)."""
    out = Path(run_dir)
    ckpt = load_checkpoint(out / "checkpoint.pt")
    try:
        cfg = TrainConfig(**ckpt["train_config"])
        model = LongLlamaForCausalLM(model_config(cfg))
        model.load_state_dict(ckpt["model"])
    except (TypeError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0]
        raise ValueError(
            f"checkpoint {str(out / 'checkpoint.pt')!r} does not match its config ({reason})"
        ) from None
    return export(out, model, ckpt["log"])


def main(argv: list[str] | None = None) -> int:
    defaults = TrainConfig()
    p = OneLineParser(prog="longllama-train", description="FoT training of a small LongLLaMA.")
    p.add_argument("--out", required=True, help="run directory (checkpoints, logs, final model/)")
    p.add_argument("--resume", action="store_true", help="continue from out/checkpoint.pt")
    p.add_argument("--export", action="store_true", help="only write out/model from out/checkpoint.pt")
    p.add_argument("--stop-after", type=int, default=None, help="end after this many steps of the schedule")
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if name == "init_from":
            p.add_argument(
                flag, default=None, help="continue from this LongLLaMA directory (weights + tokenizer)"
            )
        elif isinstance(value, list):
            p.add_argument(flag, type=lambda s: [int(x) for x in s.split(",")], default=value)
        else:
            p.add_argument(flag, type=type(value), default=value)
    try:
        args = p.parse_args(argv)
        cfg = TrainConfig(**{k: getattr(args, k) for k in asdict(defaults)})
        parse_mix(cfg.mix)
        if not args.export:
            check_train_config(cfg, flags=True)
        if args.stop_after is not None:
            check_int(args.stop_after, "--stop-after", 1, 2**31 - 1)
        check_writable_dir(args.out, "--out")
    except (BadArguments, ValueError, TypeError) as err:
        return error_exit("longllama-train", err)
    try:
        model_dir = (
            export_checkpoint(args.out)
            if args.export
            else train(cfg, args.out, resume=args.resume, stop_after=args.stop_after)
        )
    except ValueError as err:
        return error_exit("longllama-train", err)
    print(f"model written to {model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
