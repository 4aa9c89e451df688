"""The model card of a trained run: how it was trained, its loss curve, its time.

python -m longllama.fot.model_card runs/main longllama/embedded/tiny-fot
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def loss_curve(log: list[dict], path: Path) -> None:
    """PNG of the training loss and answer-token accuracy (moving average over 20 steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(xs: list[float], w: int = 20) -> list[float]:
        out, acc = [], 0.0
        for i, x in enumerate(xs):
            acc += x - (xs[i - w] if i >= w else 0.0)
            out.append(acc / min(i + 1, w))
        return out

    steps = [m["step"] for m in log]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(steps, smooth([m["lm"] for m in log]), label="LM loss")
    ax.plot(steps, smooth([m["answer_loss"] for m in log]), label="answer loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, smooth([m["answer_acc"] for m in log]), color="tab:green", label="answer-token accuracy")
    ax2.set_ylabel("answer-token accuracy")
    ax2.set_ylim(0, 1.02)
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_model_card(run_dir: str | Path, model_dir: str | Path, command: str, extra: str = "") -> Path:
    """Write ``MODEL_CARD.md`` and ``loss_curve.png`` into ``model_dir`` from the run's logs."""
    run, out = Path(run_dir), Path(model_dir)
    cfg = json.loads((run / "train_config.json").read_text())
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    if not log:
        raise ValueError(f"run {str(run)!r} has an empty log.jsonl")
    loss_curve(log, out / "loss_curve.png")
    seconds = sum(m["seconds"] for m in log)
    tokens = sum(m["tokens"] for m in log)
    last = log[-20:]
    n_params = None
    config = json.loads((out / "config.json").read_text())
    h, inter, layers, vocab = (
        config["hidden_size"],
        config["intermediate_size"],
        config["num_hidden_layers"],
        config["vocab_size"],
    )
    n_params = 2 * vocab * h + layers * (4 * h * h + 3 * h * inter + 2 * h) + h
    text = f"""# tiny-fot: a small LongLLaMA trained with the Focused Transformer method

A {n_params / 1e6:.2f}M-parameter LongLLaMA ({layers} layers, hidden {h}, {config["num_attention_heads"]} heads of
{h // config["num_attention_heads"]}, vocabulary {vocab}, memory layers {config["mem_layers"]}), trained from
scratch on synthetic needle-in-filler documents so that every feature of this library runs out of the box
and kNN memory retrieval can be measured at a million tokens. It is not a language model of any use
beyond that.

## Training

* Command: `{command}`
* Window (`max_position_embeddings`): {cfg["window"]} tokens; documents of up to {cfg["windows_per_doc"]} windows
  ({cfg["window"] * cfg["windows_per_doc"]} tokens, ending at a random point), {cfg["docs_per_batch"]} documents per step.
* Memory during training: FoT crossbatch, mix `{cfg["mix"]}` ((positives, negatives) per document; `all` =
  every earlier window of the same document, as at inference); memory keys un-rotated (position 0).
* Steps: {len(log)}; tokens seen: {tokens / 1e6:.2f}M; wall time: {seconds / 60:.1f} min on 2 CPU cores
  ({tokens / max(seconds, 1e-9):.0f} tokens/s, shared machine).
* Optimiser: AdamW (0.9, 0.95), lr {cfg["lr"]} (warm-up {cfg["warmup"]}, cosine to 10%), weight decay
  {cfg["weight_decay"]}, gradient clip {cfg["grad_clip"]}; loss = LM mean + {cfg["answer_weight"]} x answer-token mean.
* Final (mean of last {len(last)} steps): LM loss {sum(m["lm"] for m in last) / len(last):.3f}, answer loss
  {sum(m["answer_loss"] for m in last) / len(last):.3f}, answer-token accuracy {sum(m["answer_acc"] for m in last) / len(last):.3f}.
* Tokenizer: SentencePiece BPE, {vocab} pieces, digits split, byte fallback, trained on the same synthetic text.

![loss curve](loss_curve.png)

## Full training configuration

```json
{json.dumps(cfg, indent=2)}
```
{extra}
"""
    path = out / "MODEL_CARD.md"
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m longllama.fot.model_card RUN_DIR MODEL_DIR [COMMAND]``: write the card, print its path.

    Returns 2 (after a usage line on stderr) without RUN_DIR and MODEL_DIR, else 0.
    """
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print("usage: python -m longllama.fot.model_card RUN_DIR MODEL_DIR [COMMAND]", file=sys.stderr)
        return 2
    cmd = args[2] if len(args) > 2 else "python -m longllama.fot.training --out " + args[0]
    print(write_model_card(args[0], args[1], cmd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
