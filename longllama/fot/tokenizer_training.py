"""Train the SentencePiece tokenizer of the embedded model on the synthetic training text.

BPE (a unigram model at this vocabulary size collapses towards single characters), digits split into
single tokens as OpenLLaMA's tokenizer does, byte fallback for anything unseen (a newline becomes
``<0x0A>``, as in OpenLLaMA), ids pad/bos/eos/unk = 0/1/2/3 (LongLLaMA's config uses pad 0, bos 1,
eos 2). The output directory loads with ``transformers.LlamaTokenizer.from_pretrained(dir)``, which
then adds BOS like upstream.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import sentencepiece as spm

from longllama.fot.training_data import tokenizer_corpus


def train_tokenizer(out_dir: str | Path, *, vocab_size: int = 512, n_docs: int = 3000, seed: int = 0) -> Path:
    """Train and write ``tokenizer.model`` + ``tokenizer_config.json`` into ``out_dir``; returns the dir."""
    if not isinstance(vocab_size, int) or vocab_size < 300:
        raise ValueError(f"vocab_size must be an int >= 300 (256 byte pieces + specials), got {vocab_size!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus(n_docs, seed=seed)),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        split_digits=True,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        num_threads=1,
        minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "model_max_length": 1 << 30,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
