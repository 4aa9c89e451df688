"""Passkey retrieval: find a number hidden in up to millions of tokens of filler.

The prompt is upstream LongLLaMA's (from Landmark Attention), built the same way: the task line
(``TASK``), filler made of ``EVAL_FILLER`` repeated and cut by characters, the needle (``NEEDLE``, naming
the key K) at a chosen depth, more filler, and the question (``QUESTION``), lines joined by newlines. K
is drawn from 1..50000 with numpy's legacy RNG seeded by the seed, as upstream. Lengths are asked for in
tokens: the number of filler characters is fitted to the tokenizer so the prompt has about that many
tokens (the exact count is reported). Peak memory is measured with :class:`~longllama.tools.peak_rss.PeakRSS`.

Decoding is greedy for as many tokens as the answer has; a run is correct iff every generated token
equals the answer's tokens (``tokenizer(str(K))`` without BOS), as upstream scores it.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers

from longllama.tools.peak_rss import PeakRSS

# the prompt's text, the one copy of it (FoT training's documents take the same task line, needle and
# question, see longllama.fot.training_data)
TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
EVAL_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


def _filler(n_chars: int) -> str:
    repeats = n_chars // (len(EVAL_FILLER) + 1) + 1
    return " ".join([EVAL_FILLER] * repeats)[:n_chars]


def prompt_text(n_garbage: int, seed: int, depth: float | None = None) -> tuple[str, int]:
    """The prompt with ``n_garbage`` filler characters and its pass key.

    ``depth`` in [0, 1] places the needle at that fraction of the filler; None draws it uniformly
    (upstream); the key is drawn as upstream does, without touching numpy's global RNG.
    """
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1] or be None, got {depth!r}")
    rng = np.random.RandomState(seed)  # the legacy generator: upstream's np.random.seed(seed) draws
    split = int(rng.randint(0, max(n_garbage, 1)))
    key = int(rng.randint(1, 50000))
    if depth is not None:
        split = round(depth * n_garbage)
    garbage = _filler(n_garbage)
    lines = [TASK, garbage[:split], NEEDLE.format(key=key), garbage[split:], QUESTION]
    return "\n".join(lines), key


@dataclass
class PasskeyPrompt:
    """A tokenized passkey prompt."""

    input_ids: torch.Tensor  # [1, T]
    answer_ids: list[int]
    key: int
    n_tokens: int  # measured
    length: int  # asked for
    depth: float | None
    seed: int


def make_prompt(tokenizer, n_tokens: int, seed: int, depth: float | None = None) -> PasskeyPrompt:
    """A prompt of about ``n_tokens`` tokens (BOS included) for ``tokenizer``.

    The filler length in characters is fitted from the tokenizer's rate on the filler, then corrected
    once from the measured length.
    """
    if not isinstance(n_tokens, int) or n_tokens < 64:
        raise ValueError(f"n_tokens must be an int >= 64, got {n_tokens!r}")
    base = len(tokenizer(prompt_text(0, seed, depth)[0]).input_ids)
    sample = _filler(20000)
    rate = len(tokenizer(sample, add_special_tokens=False).input_ids) / len(sample)  # tokens per char
    n_garbage = max(0, int((n_tokens - base) / rate))
    for _ in range(2):
        text, key = prompt_text(n_garbage, seed, depth)
        ids = tokenizer(text).input_ids
        if abs(len(ids) - n_tokens) <= max(2, n_tokens // 500):
            break
        n_garbage = max(0, n_garbage + int((n_tokens - len(ids)) / rate))
    answer = tokenizer(str(key), add_special_tokens=False).input_ids
    return PasskeyPrompt(
        input_ids=torch.tensor([ids]),
        answer_ids=list(answer),
        key=key,
        n_tokens=len(ids),
        length=n_tokens,
        depth=depth,
        seed=seed,
    )


@dataclass
class PasskeyResult:
    """One passkey run."""

    backend: str
    length: int
    n_tokens: int
    seed: int
    depth: float | None
    key: int
    answer: str
    output: str
    correct: bool
    seconds: float
    peak_rss_bytes: int
    # the lowest probability the model gave a correct answer token while following its own greedy output
    # (at the first wrong token, that step's probability of the right one); None in older result files
    answer_prob: float | None = None
    # generated tokens per second after the prompt: the answer's tokens after the first (whose forward
    # pass is the prefill), each one step over a memory of ~n_tokens entries; None in older result
    # files or for a one-token answer
    decode_tokens_per_second: float | None = None


class PrefillCheckpoints:
    """Save a long prompt's memory as it is read, so that a run stopped part way continues later.

    The prompt's prefix is read in pieces of ``every`` tokens (whole windows), each piece a call of the
    model with ``use_cache=False`` and ``last_context_length`` of one window, so that every piece's
    windows go to memory exactly where one call would have cut them (the model's ``"start"`` window
    alignment); ``generate()`` then reads the rest (the last windows and the final one) from that memory.
    After every piece the memory (:meth:`~longllama.LongLlamaForCausalLM.save_memory`) and a small
    ``progress.json`` (tokens read, seconds spent, peak RSS so far, the prompt's identity) are written to
    ``directory / <run name>``; a later run of the same prompt, backend and model loads them and goes on.
    The run's folder is removed once its result exists.

    Args:
        directory: where the runs' folders go (created when first needed).
        every: prompt tokens between two saves (rounded down to whole windows, at least one window).
    """

    def __init__(self, directory: str | Path, every: int, resume: bool = True) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"checkpoint interval must be a positive number of tokens, got {every!r}")
        self.directory = Path(directory)
        self.every = every
        self.continue_saved = resume  # False: a run starts afresh, removing what an earlier one saved
        self.name = "run"  # the run's folder name: the caller sets it per run (e.g. from the backend label)

    def name_for(self, label: str) -> None:
        """Name the next run's folder after ``label`` (characters other than letters, digits, ``.-=`` become ``_``)."""
        import re

        self.name = re.sub(r"[^A-Za-z0-9.=-]+", "_", label) or "run"

    def folder(self, prompt: PasskeyPrompt) -> Path:
        return self.directory / f"{self.name}-{prompt.length}-{prompt.seed}-{prompt.depth}"

    def stops(self, config, n_tokens: int, last_context_length: int, done: int) -> list[int]:
        """Token counts after each piece still to read: multiples of the window up to the last whole
        window before the final ``last_context_length`` tokens (empty when nothing is left to read)."""
        if config.window_alignment != "start":
            raise ValueError(
                "prefill checkpoints need window_alignment='start' (the pieces' windows must fall where "
                f"one call's would), got {config.window_alignment!r}"
            )
        window = config.max_position_embeddings
        end = max(n_tokens - min(n_tokens, last_context_length), 0) // window * window
        step = max(window, self.every // window * window)
        return list(range(done + step, end, step)) + ([end] if end > done else [])

    @staticmethod
    def read(model, input_ids: torch.Tensor, begin: int, end: int, cache):
        """Tokens ``begin:end`` of the prompt into memory (whole windows); returns the cache."""
        window = model.config.max_position_embeddings
        out = model.model(
            input_ids[:, begin:end].to(model.device),
            past_key_values=cache,
            use_cache=False,
            last_context_length=window,
            hidden_to_keep=1,
        )
        return out.cache

    def save(self, model, prompt: PasskeyPrompt, cache, done: int, seconds: float, peak: int) -> None:
        import json

        folder = self.folder(prompt)
        model.save_memory(cache, folder / "memory")
        record = {
            "tokens": done,
            "seconds": seconds,
            "peak_rss_bytes": peak,
            "prompt": {
                "n_tokens": prompt.n_tokens,
                "seed": prompt.seed,
                "key": prompt.key,
                "depth": prompt.depth,
            },
        }
        tmp = folder / "progress.json.tmp"
        tmp.write_text(json.dumps(record))
        tmp.replace(folder / "progress.json")

    def resume(self, model, prompt: PasskeyPrompt) -> tuple[int, float, int, object]:
        """(tokens read, seconds spent, peak RSS, cache) of a saved run of ``prompt``, or (0, 0.0, 0, None)."""
        import json

        folder = self.folder(prompt)
        if not self.continue_saved:
            self.clear(prompt)
            return 0, 0.0, 0, None
        try:
            record = json.loads((folder / "progress.json").read_text())
        except (OSError, ValueError):
            return 0, 0.0, 0, None
        mine = {"n_tokens": prompt.n_tokens, "seed": prompt.seed, "key": prompt.key, "depth": prompt.depth}
        if record.get("prompt") != mine:
            raise ValueError(
                f"{folder} holds a checkpoint of another prompt ({record.get('prompt')}, not {mine})"
            )
        cache = model.load_memory(folder / "memory")
        if cache.seen_tokens != record["tokens"]:
            raise ValueError(
                f"{folder}: the saved memory read {cache.seen_tokens} tokens, progress says {record['tokens']}"
            )
        return int(record["tokens"]), float(record["seconds"]), int(record["peak_rss_bytes"]), cache

    def clear(self, prompt: PasskeyPrompt) -> None:
        import shutil

        shutil.rmtree(self.folder(prompt), ignore_errors=True)


# generate()'s name for a cache to continue from: ``cache`` in transformers 5 (``past_key_values`` there
# warns of its removal), ``past_key_values`` before
_CACHE_ARGUMENT = "cache" if int(transformers.__version__.split(".")[0]) >= 5 else "past_key_values"


@torch.no_grad()
def run_passkey(
    model,
    tokenizer,
    prompt: PasskeyPrompt,
    *,
    last_context_length: int | None = None,
    label: str = "",
    progress: bool = False,
    checkpoints: PrefillCheckpoints | None = None,
) -> PasskeyResult:
    """Greedy-decode the answer of ``prompt`` and score it exactly as upstream.

    ``progress`` shows a bar of the tokens the model has read (prefill windows and generated tokens).
    With ``checkpoints``, the prompt's memory is saved every ``checkpoints.every`` tokens and a run that
    finds a checkpoint of the same prompt continues from it (:class:`PrefillCheckpoints`); the result is
    the same, bit for bit, and ``seconds`` and the peak RSS cover every part of the run.
    """
    done, spent, peak, cache = 0, 0.0, 0, None
    if checkpoints is not None:
        done, spent, peak, cache = checkpoints.resume(model, prompt)
    with (
        PeakRSS(interval_s=0.02) as rss,
        _token_progress(model, prompt, progress, label, start=done),
    ):
        if checkpoints is not None:
            last = last_context_length or model.config.last_context_length
            stops = checkpoints.stops(model.config, prompt.n_tokens, last, done)
            for end in stops:
                start = time.perf_counter()
                cache = checkpoints.read(model, prompt.input_ids, done, end, cache)
                spent += time.perf_counter() - start
                done = end
                if end != stops[-1]:  # the last piece goes straight on to generate()
                    checkpoints.save(model, prompt, cache, done, spent, max(peak, rss.peak_bytes))
        with _step_clock(model) as steps:
            start = time.perf_counter()
            out = model.generate(
                prompt.input_ids.to(model.device),
                max_new_tokens=len(prompt.answer_ids),
                min_new_tokens=len(prompt.answer_ids),
                num_beams=1,
                do_sample=False,
                last_context_length=last_context_length,
                pad_token_id=model.config.pad_token_id,
                return_dict_in_generate=True,
                output_logits=True,
                **({} if cache is None else {_CACHE_ARGUMENT: cache}),
            )
            seconds = spent + time.perf_counter() - start
    if checkpoints is not None:
        checkpoints.clear(prompt)
    generated = out.sequences[0, prompt.input_ids.shape[1] :].tolist()
    return PasskeyResult(
        backend=label,
        length=prompt.length,
        n_tokens=prompt.n_tokens,
        seed=prompt.seed,
        depth=prompt.depth,
        key=prompt.key,
        answer=str(prompt.key),
        output=tokenizer.decode(generated, skip_special_tokens=True).strip(),
        correct=generated == prompt.answer_ids,
        seconds=seconds,
        peak_rss_bytes=max(peak, rss.peak_bytes),
        answer_prob=answer_probability(out.logits, generated, prompt.answer_ids),
        decode_tokens_per_second=_decode_rate(steps),
    )


@contextlib.contextmanager
def _step_clock(model):
    """The time each forward call of ``model`` ended at (generate: the prefill, then one per new token)."""
    ends: list[float] = []
    handle = model.register_forward_hook(lambda module, args, output: ends.append(time.perf_counter()))
    try:
        yield ends
    finally:
        handle.remove()


def _decode_rate(ends: list[float]) -> float | None:
    """Tokens per second of the steps after the prefill (from the end times of all calls), or None
    without such a step."""
    if len(ends) < 2:
        return None
    return (len(ends) - 1) / (ends[-1] - ends[0])


def answer_probability(logits: tuple[torch.Tensor, ...], generated: list[int], answer: list[int]) -> float:
    """Lowest softmax probability of a correct answer token along the greedy output.

    Args:
        logits: per generated step, the raw next-token logits [1, V].
        generated, answer: token ids of the greedy output and of the right answer.

    Steps are scored while the output still matches the answer; the first wrong step contributes the
    probability it gave the right token, and scoring stops there (later steps follow a wrong prefix).
    """
    lowest = 1.0
    for scores, got, want in zip(logits, generated, answer, strict=False):
        lowest = min(lowest, torch.softmax(scores[0].float(), dim=-1)[want].item())
        if got != want:
            break
    return lowest


@contextlib.contextmanager
def _token_progress(model, prompt: PasskeyPrompt, enabled: bool, label: str, start: int = 0):
    """A tqdm bar fed by a forward hook on the first decoder layer: one update per window or step
    (``start``: tokens already read, by a run this one continues)."""
    if not enabled:
        yield
        return
    from tqdm import tqdm

    total = prompt.n_tokens + len(prompt.answer_ids)
    bar = tqdm(
        total=total,
        initial=start,
        unit="tok",
        unit_scale=True,
        leave=False,
        desc=f"{label or 'run'} {prompt.length}",
    )

    def count(module, args, kwargs, output):
        hidden = args[0] if args else kwargs.get("hidden_states")
        # prefix windows may run stacked along the batch ([G * B, n, D]): G * n tokens of the prompt
        tokens = hidden.shape[0] // prompt.input_ids.shape[0] * hidden.shape[1]
        bar.update(min(int(tokens), total - bar.n))

    handle = model.model.layers[0].register_forward_hook(count, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        bar.close()


@contextlib.contextmanager
def memory_settings(model, **settings):
    """Temporarily set memory fields of ``model.config`` (``mem_backend``, ``mem_index``, ``mem_top_k``...)."""
    before = {name: getattr(model.config, name) for name in settings}
    try:
        for name, value in settings.items():
            setattr(model.config, name, value)
        yield
    finally:
        for name, value in before.items():
            setattr(model.config, name, value)


def summarize(results: list[PasskeyResult], by_depth: bool = False) -> list[dict]:
    """Accuracy per (backend, length), or per (backend, length, depth) with ``by_depth``.

    Rows hold n runs, accuracy, a 95% Wilson interval, mean time and peak RSS; a depth of ``None``
    (drawn at random per seed) is its own group.
    """
    groups: dict[tuple, list[PasskeyResult]] = {}
    for r in results:
        key = (r.backend, r.length, r.depth) if by_depth else (r.backend, r.length)
        groups.setdefault(key, []).append(r)
    rows = []

    def order(key: tuple) -> tuple:  # random depth (None) first
        return (*key[:2], *(-1.0 if d is None else d for d in key[2:]))

    for key, rs in sorted(groups.items(), key=lambda kv: order(kv[0])):
        n = len(rs)
        acc = sum(r.correct for r in rs) / n
        lo, hi = _wilson(acc, n)
        row = {"backend": key[0], "length": key[1]}
        if by_depth:
            row["depth"] = key[2]
        rows.append(
            {
                **row,
                "runs": n,
                "accuracy": acc,
                "ci95": [lo, hi],
                "mean_seconds": sum(r.seconds for r in rs) / n,
                "mean_answer_prob": _mean([r.answer_prob for r in rs if r.answer_prob is not None]),
                "decode_tokens_per_second": _mean(
                    [r.decode_tokens_per_second for r in rs if r.decode_tokens_per_second is not None]
                ),
                "peak_rss_mib": max(r.peak_rss_bytes for r in rs) / 2**20,
            }
        )
    return rows


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)
