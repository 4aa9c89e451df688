"""Bad input to the model, the tokenizer loader and the agreement CLI: a clear ValueError/TypeError (or
exit code 2 and one line), and a refused call leaves the cache as it was."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

from knn_memory.agreement_cli import main as agreement_main
from longllama import LongLlamaConfig, LongLlamaForCausalLM, load_tokenizer


@pytest.fixture(scope="module")
def model():
    return tiny_model(num_hidden_layers=2)


IDS = torch.randint(3, 64, (2, 20), generator=torch.Generator().manual_seed(0))

CASES = [
    ("ids-float", dict(input_ids=IDS.float()), TypeError, r"input_ids must hold integer token ids, got dtype torch\.float32"),
    ("ids-bool", dict(input_ids=IDS.bool()), TypeError, r"input_ids must hold integer token ids, got dtype torch\.bool"),
    ("ids-list", dict(input_ids=[[1, 2]]), TypeError, r"input_ids must be an integer torch\.Tensor \[B, n\], got list"),
    ("ids-above-vocab", dict(input_ids=IDS + 60), ValueError, r"input_ids must lie in \[0, vocab_size=64\), got values in \[6\d, \d+\]"),
    ("ids-negative", dict(input_ids=IDS - 70), ValueError, r"input_ids must lie in \[0, vocab_size=64\)"),
    ("ids-device", dict(input_ids=IDS.to("meta")), ValueError, r"input_ids are on meta, but the model is on cpu"),
    ("ids-1d", dict(input_ids=IDS[0]), ValueError, r"input_ids must be \[B, n\], got shape \[20\]"),
    ("ids-empty", dict(input_ids=IDS[:, :0]), ValueError, r"the input is empty \(0 tokens\)"),
    ("batch-0", dict(input_ids=IDS[:0]), ValueError, r"the input is empty \(batch size 0\)"),
    ("embeds-width", dict(inputs_embeds=torch.randn(2, 5, 31)), ValueError, r"inputs_embeds must be \[B, n, D=32\], got shape \[2, 5, 31\]"),
    ("embeds-dtype", dict(inputs_embeds=torch.randn(2, 5, 32, dtype=torch.float64)), TypeError,
     r"inputs_embeds must have the model's dtype torch\.float32, got torch\.float64"),
    ("embeds-nan", dict(inputs_embeds=torch.full((2, 5, 32), float("nan"))), ValueError, r"inputs_embeds contain NaN or inf"),
    ("mask-list", dict(input_ids=IDS, attention_mask=[[1] * 20] * 2), TypeError,
     r"attention_mask must be a torch\.Tensor \[B, local \+ n\], got list"),
    ("positions-float", dict(input_ids=IDS, position_ids=torch.arange(20.0)), TypeError,
     r"position_ids must hold integer positions, got dtype torch\.float32"),
    ("positions-list", dict(input_ids=IDS, position_ids=list(range(20))), TypeError, r"position_ids must be an integer torch\.Tensor"),
    ("positions-span", dict(input_ids=IDS, position_ids=torch.arange(20) * 2**40), ValueError,
     r"position_ids span \d+ positions \(with the local cache\); RoPE angles are exact in float32 only below 16777216"),
    ("labels-range", dict(input_ids=IDS, labels=IDS + 64), ValueError, r"labels must lie in \[0, vocab_size=64\) or be -100"),
    ("labels-float", dict(input_ids=IDS, labels=IDS.float()), TypeError, r"labels must hold integer token ids, got dtype torch\.float32"),
    ("labels-shape", dict(input_ids=IDS, labels=IDS[:, :5]), ValueError, r"labels must be \[B=2, n=20\] like the input, got shape \[2, 5\]"),
    ("logits_to_keep-negative", dict(input_ids=IDS, logits_to_keep=-1), ValueError, r"logits_to_keep must be an int >= 0, got -1"),
    ("logits_to_keep-float", dict(input_ids=IDS, logits_to_keep=1.5), TypeError, r"logits_to_keep must be an int >= 0, got float 1\.5"),
    ("last_context_length-0", dict(input_ids=IDS, last_context_length=0), ValueError, r"last_context_length must be a positive int, got 0"),
]  # fmt: skip


@pytest.mark.parametrize(("kwargs", "exc", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
@torch.no_grad()
def test_model_refuses_bad_input_and_keeps_the_cache(model, kwargs, exc, match):
    cache = model(IDS).cache  # a cache holding memory and a local window
    before = (cache.seen_tokens, cache.local_length, cache.memory_lengths())
    with pytest.raises(exc, match=match):
        model(**kwargs, past_key_values=cache if kwargs.get("input_ids") is not None else None)
    assert (cache.seen_tokens, cache.local_length, cache.memory_lengths()) == before
    with pytest.raises(exc, match=match):  # and the same without a cache
        model(**kwargs)


@torch.no_grad()
def test_far_positions_within_the_limit_work(model):
    positions = torch.arange(20) * 100_000  # beyond the RoPE table: computed directly, no huge table
    out = model(IDS[:, :8], position_ids=positions[:8])
    assert torch.isfinite(out.logits).all()


def test_generate_refuses_float_ids(model):
    with pytest.raises(TypeError, match=r"input_ids must hold integer token ids"):
        model.generate(IDS.float(), max_new_tokens=2)


def test_load_tokenizer_refuses_foreign_files(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01 not a sentencepiece model" * 10)
    with pytest.raises(ValueError, match=r"tokenizer\.model' is not a SentencePiece model"):
        load_tokenizer(tmp_path)
    (tmp_path / "empty.model").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.model' is not a SentencePiece model"):
        load_tokenizer(tmp_path / "empty.model")
    with pytest.raises(FileNotFoundError, match=r"no SentencePiece model at"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike, got int"):
        load_tokenizer(3)


SMALL = ["--keys", "64", "--queries", "4", "--heads", "1", "--dim", "4", "--k", "4"]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--k", "65"], "--k (65) must not exceed --keys (64)"),
        (["--json", "."], "--json '.' is a directory; give a file name"),
    ],
)
def test_agreement_cli_more_bad_arguments(argv, needle, capsys):
    assert agreement_main([*SMALL, *argv]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and needle in err[0]


def test_memory_on_a_gpu_that_is_not_there(model, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    config = model.config.to_dict()
    with pytest.raises(
        ValueError, match=r"mem_device='cuda:0': device 'cuda:0' asked for, but torch sees no CUDA device"
    ):
        LongLlamaForCausalLM(LongLlamaConfig(**{**config, "mem_device": "cuda:0"}))
    with torch.no_grad():
        model.save_memory(model(IDS).cache, tmp_path / "m")
    model.config.mem_device = "cuda:0"
    try:
        with pytest.raises(ValueError, match=r"device 'cuda:0' asked for, but torch sees no CUDA device"):
            model.load_memory(tmp_path / "m")
    finally:
        model.config.mem_device = None
