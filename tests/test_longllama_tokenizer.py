"""A locally trained SentencePiece model, loaded through transformers' LlamaTokenizer, drives the model."""

from __future__ import annotations

import pytest
import sentencepiece as spm
import torch
from transformers import LlamaTokenizer

from longllama import LongLlamaForCausalLM, load_tokenizer

TEXT = [
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them.",
    "The pass key is 71432. Remember it. 71432 is the pass key.",
    "What is the pass key? The pass key is",
    "Digits: 0 1 2 3 4 5 6 7 8 9.",
]


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    """A directory holding ``tokenizer.model``: a 128-piece BPE model with split digits, LLaMA's special ids."""
    path = tmp_path_factory.mktemp("spm")
    corpus = path / "corpus.txt"
    corpus.write_text("\n".join(TEXT * 10))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(path / "tokenizer"),
        vocab_size=128,
        hard_vocab_limit=False,
        model_type="bpe",
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return path


def test_load_tokenizer_adds_bos_and_splits_digits(spm_dir):
    sp = spm.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    for source in (spm_dir, spm_dir / "tokenizer.model"):
        tokenizer = load_tokenizer(source)
        ids = tokenizer("The pass key is 12345").input_ids
        assert ids[0] == tokenizer.bos_token_id == 1
        assert ids[1:] == sp.encode("The pass key is 12345")  # the same pieces as SentencePiece itself
        assert tokenizer.convert_ids_to_tokens(ids)[-5:] == ["1", "2", "3", "4", "5"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == "The pass key is 12345"
    with pytest.raises(FileNotFoundError):
        load_tokenizer(spm_dir / "missing")


def test_llama_tokenizer_from_a_directory_with_bos(spm_dir):
    # transformers 5.x adds BOS only when asked to
    tokenizer = LlamaTokenizer.from_pretrained(spm_dir, add_bos_token=True)
    assert tokenizer("The sky is blue").input_ids == load_tokenizer(spm_dir)("The sky is blue").input_ids


@torch.no_grad()
def test_model_runs_on_tokenizer_ids(spm_dir, longllama_config):
    tokenizer = load_tokenizer(spm_dir)
    torch.manual_seed(0)
    model = LongLlamaForCausalLM(longllama_config(vocab_size=len(tokenizer))).eval()
    batch = tokenizer([TEXT[0], TEXT[3]], return_tensors="pt", padding=True)
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id == model.config.pad_token_id == 0  # <unk>, as LongLLaMA pads
    out = model(batch.input_ids, attention_mask=batch.attention_mask)
    assert out.logits.shape == (*batch.input_ids.shape, len(tokenizer))
    generated = model.generate(**batch, max_new_tokens=5, last_context_length=8)
    assert generated.shape == (2, batch.input_ids.shape[1] + 5)
    assert torch.equal(generated[:, : batch.input_ids.shape[1]], batch.input_ids)  # the prompt, then 5 new
    new = generated[:, -5:]
    assert tokenizer.batch_decode(new) == [tokenizer.decode(row) for row in new]


@pytest.mark.parametrize("source", ["embedded", "spm"])
def test_load_tokenizer_from_a_save_pretrained_directory(source, spm_dir, tmp_path):
    from longllama import embedded_model_path
    from longllama.passkey import prompt_text

    original = load_tokenizer(embedded_model_path() if source == "embedded" else spm_dir)
    saved = tmp_path / "saved"
    original.save_pretrained(saved)
    (saved / "tokenizer.model").unlink(missing_ok=True)
    assert (saved / "tokenizer.json").is_file()
    tokenizer = load_tokenizer(saved)
    text, key = prompt_text(1000, seed=5)  # a passkey prompt with 1000 characters of filler
    ids = tokenizer(text).input_ids
    assert ids == original(text).input_ids
    assert len(ids) > 100 and ids[0] == tokenizer.bos_token_id == 1 and ids[-1] != tokenizer.eos_token_id
    assert ids_without_bos(tokenizer, str(key)) == ids_without_bos(original, str(key))
    assert tokenizer.pad_token_id == original.pad_token_id == 0
    # the BOS/EOS defaults can still be overridden
    assert load_tokenizer(saved, add_bos_token=False)("The sky").input_ids == ids_without_bos(
        original, "The sky"
    )


def ids_without_bos(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def test_load_tokenizer_names_what_a_directory_lacks(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.model or a tokenizer\.json"):
        load_tokenizer(tmp_path)
