"""The passkey experiment as lm-evaluation-harness tasks (``pip install "knn-memory[eval]"``).

``passkey/`` in this folder holds two task configs whose documents this module generates locally, with
the prompts of :mod:`longllama.tools.passkey` (no download):

* ``longllama_passkey``: greedy generation; ``exact_match`` is 1 when the answer comes first in the
  generated text (as ``longllama-passkey`` scores a run), ``number_match`` when the whole leading number
  is the answer;
* ``longllama_passkey_loglikelihood``: the log-likelihood of the answer after the prompt; ``acc`` is 1
  when the answer is the greedy continuation.

Task options go in lm-eval's ``--metadata`` (or the ``metadata`` of ``simple_evaluate``/``TaskManager``):
``lengths`` (prompt lengths in tokens, default ``[1024, 4096]``), ``num_samples`` (prompts per length,
default 10, seeds 0..N-1), ``depth`` (needle depth in [0, 1], default random), ``tokenizer`` (default:
``pretrained`` from ``--model_args``, else the embedded model's).

lm-eval cuts every prompt to the model's ``max_length``, which it reads from ``max_position_embeddings``
(LongLLaMA's window, not a context limit) unless ``max_length`` is given in ``--model_args``. When the
model is given by path, the dataset refuses lengths that would be cut, instead of letting lm-eval
evaluate truncated prompts.

    lm_eval --model hf --include_path "$(python -m longllama.lm_eval_tasks)" --tasks longllama_passkey \\
        --model_args pretrained=PATH,trust_remote_code=True,max_length=70000 --batch_size 1 \\
        --metadata '{"lengths": [1024, 16384], "num_samples": 5}'
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).resolve().parent
DEFAULT_LENGTHS = (1024, 4096)
DEFAULT_NUM_SAMPLES = 10
# tokens lm-eval generates for the generate_until task (its generation_kwargs.max_gen_toks)
MAX_GEN_TOKS = 8
# config fields lm-eval reads, in its order, as the model's maximum length when none is given
_LENGTH_FIELDS = ("n_positions", "max_position_embeddings", "n_ctx")


def _lengths(value: object) -> list[int]:
    if isinstance(value, str):
        value = [v for v in value.replace(";", ",").split(",") if v.strip()]
    elif isinstance(value, int):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"lengths must be a list of ints >= 64 (prompt tokens), got {value!r}")
    out = []
    for v in value:
        n = int(v) if isinstance(v, str) and v.strip().isdigit() else v
        if not isinstance(n, int) or isinstance(n, bool) or n < 64:
            raise ValueError(f"lengths must be a list of ints >= 64 (prompt tokens), got {value!r}")
        out.append(n)
    return out


def passkey_documents(
    tokenizer, lengths: list[int], num_samples: int, depth: float | None = None
) -> list[dict[str, Any]]:
    """Passkey prompts of about each length (seeds ``0..num_samples-1``), as lm-eval documents.

    Returns dicts with ``input`` (the prompt text, without BOS; it ends with "The pass key is"),
    ``answer`` (the pass key, digits), ``n_tokens`` (the prompt's tokens with BOS), ``length`` and ``seed``.
    """
    from longllama.tools.passkey import make_prompt

    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    docs = []
    for length in _lengths(lengths):
        for seed in range(num_samples):
            prompt = make_prompt(tokenizer, length, seed, depth)
            text = tokenizer.decode(prompt.input_ids[0], skip_special_tokens=True)
            if tokenizer(text).input_ids != prompt.input_ids[0].tolist():
                raise ValueError(
                    f"the passkey prompt (length {length}, seed {seed}) does not decode losslessly"
                )
            docs.append(
                {
                    "input": text,
                    "answer": str(prompt.key),
                    "n_tokens": prompt.n_tokens,
                    "length": length,
                    "seed": seed,
                }
            )
    return docs


def _configured_max_length(pretrained: str) -> int | None:
    """The length lm-eval would read from a local checkpoint's config.json (None if it cannot tell)."""
    config_file = Path(pretrained) / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    for name in _LENGTH_FIELDS:
        if config.get(name) is not None:
            return int(config[name])
    return None


def check_max_length(docs: list[dict[str, Any]], model_args: dict[str, Any]) -> None:
    """Refuse prompts that lm-eval would cut to ``max_length`` (given, or read from the config).

    Raises:
        ValueError: the longest prompt plus the generated tokens exceeds the length lm-eval will use.
    """
    max_length = model_args.get("max_length")
    source = "max_length in --model_args"
    if max_length is None and isinstance(model_args.get("pretrained"), (str, os.PathLike)):
        max_length = _configured_max_length(os.fspath(model_args["pretrained"]))
        source = "the model config's max_position_embeddings (its window, for LongLLaMA)"
    if max_length is None:
        return
    longest = max(doc["n_tokens"] for doc in docs) + MAX_GEN_TOKS
    if int(max_length) < longest:
        raise ValueError(
            f"lm-eval would cut the passkey prompts to max_length={max_length} tokens (from {source}), but "
            f"they need {longest} (longest prompt + {MAX_GEN_TOKS} generated); pass max_length={longest} or "
            "more in --model_args (e.g. pretrained=PATH,trust_remote_code=True,max_length=N)"
        )


def passkey_dataset(**metadata: Any):
    """lm-eval's ``custom_dataset``: ``{"test": datasets.Dataset}`` of :func:`passkey_documents`.

    ``metadata`` is the task metadata merged with ``--model_args`` and ``--metadata`` (see the module
    docstring for the keys read; others are ignored).
    """
    import datasets

    from longllama.embedded import embedded_model_path
    from longllama.tokenizer import load_tokenizer

    source = metadata.get("tokenizer") or metadata.get("pretrained")
    tokenizer = load_tokenizer(source if isinstance(source, (str, os.PathLike)) else embedded_model_path())
    docs = passkey_documents(
        tokenizer,
        _lengths(metadata.get("lengths", list(DEFAULT_LENGTHS))),
        metadata.get("num_samples", DEFAULT_NUM_SAMPLES),
        metadata.get("depth"),
    )
    check_max_length(docs, metadata)
    return {"test": datasets.Dataset.from_list(docs, split=datasets.Split.TEST)}


def score_generation(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """lm-eval's ``process_results`` for the generate_until task.

    ``exact_match``: the generated text (leading spaces dropped) starts with the answer, as
    ``longllama-passkey`` scores a run (its first answer-length tokens are the answer's);
    ``number_match``: the leading number of the generated text is the answer, nothing more.
    """
    generated = results[0].lstrip()
    number = re.match(r"\d+", generated)
    return {
        "exact_match": float(generated.startswith(doc["answer"])),
        "number_match": float(number is not None and number.group() == doc["answer"]),
    }


def main(argv: list[str] | None = None) -> int:
    """Print the folder to pass to lm-eval's ``--include_path``, or write passkey documents as JSON lines."""
    p = argparse.ArgumentParser(
        prog="python -m longllama.lm_eval_tasks",
        description="lm-evaluation-harness tasks of this library: prints the folder for lm-eval's "
        "--include_path (tasks longllama_passkey, longllama_passkey_loglikelihood), or with --jsonl writes "
        "the passkey documents those tasks generate.",
    )
    p.add_argument("--jsonl", metavar="FILE", help="write the passkey documents to FILE instead")
    p.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)), help="prompt lengths in tokens")
    p.add_argument("--num-samples", type=int, default=DEFAULT_NUM_SAMPLES, help="prompts per length")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the embedded model's)")
    args = p.parse_args(argv)
    if args.jsonl is None:
        print(TASKS_DIR)
        return 0
    from longllama.embedded import embedded_model_path
    from longllama.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(args.tokenizer or embedded_model_path())
        docs = passkey_documents(tokenizer, _lengths(args.lengths), args.num_samples)
    except (ValueError, FileNotFoundError) as err:
        p.error(str(err))
    with open(args.jsonl, "w") as f:
        f.writelines(json.dumps(doc) + "\n" for doc in docs)
    return 0
