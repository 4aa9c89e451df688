"""Synthetic long-context training documents: needles (pass keys, key-value facts) hidden in filler.

Every document has the shape of the passkey prompt used at evaluation (:mod:`longllama.tools.passkey`,
upstream LongLLaMA's, from Landmark Attention): its task line, filler, a needle, more filler, a question,
and the answer at the very end. The fillers are random sentences from small word pools, different in
every document, so the model has to learn to *find* the needle rather than memorise one filler; the
evaluation's fixed filler (``EVAL_FILLER``) never appears verbatim.

Two needle kinds:

* ``passkey``: the evaluation's needle and question (``NEEDLE``, ``QUESTION``), then the key K (in
  1..50000, as upstream);
* ``kv``: "The value of key W is K." ... "What is the value of key W? The value of key W is K", with a
  few distractor facts about other keys in the filler.

Documents are text; :func:`encode_document` tokenizes one and marks the answer tokens.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from longllama.tools.passkey import EVAL_FILLER, NEEDLE, QUESTION, TASK

_NOUNS = (
    "grass sky sun moon river tree house road city garden field stone cloud bird dog cat horse boat train "
    "window door lamp table chair book letter song story hill lake forest market bridge tower"
).split()
_ADJ = (
    "green blue yellow red white black small big old new quiet loud warm cold bright dark calm wild".split()
)
_VERBS = "walks runs sleeps waits sings shines falls grows rests turns moves stays".split()
_PLACES = "the park the shore the valley the village the station the garden the harbor the square".split(
    " the "
)
_PHRASES = (
    "Here we go.",
    "There and back again.",
    "So it goes.",
    "On and on.",
    "Day after day.",
    "Step by step.",
)
_KEYS = (
    "apple river stone cloud tiger ember maple frost coral amber lotus cedar falcon willow harbor meadow "
    "silver violet orchid canyon"
).split()


def filler_sentence(rng: random.Random) -> str:
    """One random filler sentence."""
    kind = rng.randrange(5)
    if kind == 0:
        return f"The {rng.choice(_NOUNS)} is {rng.choice(_ADJ)}."
    if kind == 1:
        return f"The {rng.choice(_ADJ)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)}."
    if kind == 2:
        place = rng.choice([p.strip() for p in _PLACES if p.strip()])
        return f"A {rng.choice(_NOUNS)} {rng.choice(_VERBS)} near the {place}."
    if kind == 3:
        return rng.choice(_PHRASES)
    return f"The {rng.choice(_NOUNS)} and the {rng.choice(_NOUNS)} are {rng.choice(_ADJ)}."


def filler_text(rng: random.Random, n_chars: int) -> str:
    """Random filler of about ``n_chars`` characters (whole sentences, joined by spaces)."""
    parts: list[str] = []
    size = 0
    while size < n_chars:
        s = filler_sentence(rng)
        parts.append(s)
        size += len(s) + 1
    return " ".join(parts)


@dataclass
class Document:
    """A training document: ``text`` ends with ``answer`` (the tokens the loss weighs most)."""

    text: str
    answer: str
    kind: str


def make_document(rng: random.Random, n_chars: int, kind: str | None = None) -> Document:
    """A document of about ``n_chars`` characters with one needle at a uniformly random depth.

    Args:
        rng: the random source (documents are reproducible from it).
        n_chars: filler characters in total (prefix + suffix).
        kind: ``"passkey"``, ``"kv"``, or None to draw one (passkey 3 times out of 4).
    """
    if kind is None:
        kind = "passkey" if rng.random() < 0.75 else "kv"
    if kind not in ("passkey", "kv"):
        raise ValueError(f"kind must be 'passkey' or 'kv', got {kind!r}")
    value = str(rng.randint(1, 50000))
    split = rng.randint(0, max(n_chars, 0))
    prefix, suffix = filler_text(rng, split), filler_text(rng, n_chars - split)
    if kind == "passkey":
        needle = NEEDLE.format(key=value)
        question = QUESTION
    else:
        key = rng.choice(_KEYS)
        needle = f"The value of key {key} is {value}."
        others = rng.sample([k for k in _KEYS if k != key], 2)
        facts = [f"The value of key {k} is {rng.randint(1, 50000)}." for k in others]
        # distractors about other keys go into the filler, on either side of the needle
        prefix = f"{facts[0]} {prefix}" if prefix else facts[0]
        suffix = f"{suffix} {facts[1]}" if suffix else facts[1]
        question = f"What is the value of key {key}? The value of key {key} is"
    text = "\n".join([TASK, prefix, needle, suffix, question]) + " " + value
    return Document(text=text, answer=value, kind=kind)


def encode_document(
    doc: Document, encode: Callable[[str], list[int]], bos_id: int
) -> tuple[list[int], list[bool]] | None:
    """Token ids of ``doc`` (BOS first) and a mask of its answer tokens.

    The answer is tokenized as it is at evaluation (``encode(answer)``, no BOS); documents where the
    in-context tokenization of the answer differs are rejected (None).
    """
    ids = [bos_id, *encode(doc.text)]
    answer = encode(doc.answer)
    if not answer or ids[-len(answer) :] != answer:
        return None
    mask = [False] * (len(ids) - len(answer)) + [True] * len(answer)
    return ids, mask


def tokenizer_corpus(n_docs: int, seed: int = 0, n_chars: int = 1500) -> list[str]:
    """Lines of text to train the tokenizer on: documents plus the evaluation prompt's pieces."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_docs):
        lines.extend(make_document(rng, n_chars).text.split("\n"))
    # the evaluation filler and prompt lines must tokenize well too (they are English, not memorised)
    lines.extend([EVAL_FILLER] * 20 + [TASK] * 20)
    return lines
