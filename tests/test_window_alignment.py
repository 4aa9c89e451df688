"""``window_alignment``: window boundaries counted from the input's start (upstream) or back from its end.

With ``"end"`` a left-padded row is cut into the same windows as the row alone, so a left-padded batch
gives every row its unbatched logits and greedy continuation; with ``"start"`` (the default, upstream's
split, kept for parity) it does not.
"""

from __future__ import annotations

import itertools
import json
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import GenerationConfig

from longllama import (
    LongLlamaConfig,
    LongLlamaForCausalLM,
    embedded_model_path,
    load_tokenizer,
    split_windows,
)
from longllama.passkey import make_prompt

# float tolerance for logits of ~25 in magnitude computed in batches of different shapes (float32); the
# scores of 40 generated tokens drift a little further (measured up to 2.6e-5 with the Faiss backend)
RTOL = ATOL = 1e-5
# generated scores: float32 rounding of a batch and of a row alone (different matmul kernels) accumulates
# over 40 greedy steps and a growing memory; measured up to 6e-6 of the largest score (1.4e-4 where the
# largest is 23, on a CPU with AVX2 only). A misaligned row differs by more than 1 (the "start" test below)
SCORES_RTOL_OF_MAX = 2e-5
# the embedded model: W=64, L=32; 40 new tokens overflow the 32-token local cache into memory on the way
NEW_TOKENS = 40
MEMORY_SETTINGS = {
    "exact": {},
    "faiss": {"mem_backend": "faiss", "mem_index": "Flat", "mem_top_k": 32},
}


# ---------------------------------------------------------------------------------------------- the split
def test_end_alignment_counts_boundaries_back_from_the_end():
    # 100 tokens, W=32, L=12: the 88 prefix tokens go to memory as 24 + 32 + 32, the last 12 stay local
    assert split_windows(100, 32, 12, "end") == [(0, 24), (24, 56), (56, 88), (88, 100)]
    assert split_windows(100, 32, 12, "start") == [(0, 32), (32, 64), (64, 88), (88, 100)]
    # a prefix that is a multiple of W, or shorter than W, or an input no longer than L: both agree
    for args in ((40, 16, 8), (10, 16, 8), (8, 16, 8), (5, 16, 8)):
        assert split_windows(*args, "end") == split_windows(*args, "start") == split_windows(*args)


@pytest.mark.parametrize("alignment", ["middle", "END", None, 1])
def test_bad_alignment(alignment):
    with pytest.raises(ValueError, match=r"alignment must be one of \['start', 'end'\]"):
        split_windows(100, 32, 12, alignment)


@given(n=st.integers(1, 300), window=st.integers(1, 40), last=st.integers(1, 40))
def test_end_split_properties(n, window, last):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spans = split_windows(n, window, last, "end")
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(b == a_end for (_, a_end), (b, _) in itertools.pairwise(spans))
    assert all(end > begin for begin, end in spans)
    assert spans[-1] == (n - min(n, last), n)
    # prefix windows: all full except the first one, which holds the remainder
    prefix = spans[:-1]
    assert all(end - begin == window for begin, end in prefix[1:])
    assert all(0 < end - begin <= window for begin, end in prefix)
    assert len(prefix) == -(-max(n - last, 0) // window)


@given(n=st.integers(1, 200), pad=st.integers(0, 150), window=st.integers(1, 40), last=st.integers(1, 40))
def test_left_padding_never_moves_an_end_aligned_boundary(n, pad, window, last):
    """The padded input's spans, cut to the real tokens, are the spans of the real tokens alone."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone = split_windows(n, window, last, "end")
        padded = split_windows(n + pad, window, last, "end")
    cut = [(max(b, pad) - pad, e - pad) for b, e in padded if e > pad]
    assert cut == alone
    # and the final window keeps its meaning: the last L tokens of the (padded) input
    assert padded[-1] == (n + pad - min(n + pad, last), n + pad)


def test_left_padding_moves_start_aligned_boundaries():
    alone = split_windows(100, 32, 12, "start")
    padded = split_windows(105, 32, 12, "start")
    assert [(max(b, 5) - 5, e - 5) for b, e in padded if e > 5] != alone


# --------------------------------------------------------------------------------------------- the config
def test_config_default_is_upstreams_split():
    assert LongLlamaConfig().window_alignment == "start"


def test_config_rejects_bad_alignment():
    with pytest.raises(ValueError, match=r"window_alignment must be one of \['start', 'end'\], got 'left'"):
        LongLlamaConfig(window_alignment="left")
    with pytest.raises(TypeError, match=r"window_alignment must be one of \['start', 'end'\], got bool True"):
        LongLlamaConfig(window_alignment=True)
    config = LongLlamaConfig()
    with pytest.raises(ValueError, match="window_alignment"):
        config.window_alignment = "both"
    assert config.window_alignment == "start"


def test_config_alignment_saved_loaded_and_a_from_pretrained_keyword(longllama_config, tmp_path):
    LongLlamaForCausalLM(longllama_config()).save_pretrained(tmp_path / "start")
    model = LongLlamaForCausalLM.from_pretrained(tmp_path / "start", window_alignment="end")
    assert model.config.window_alignment == "end"
    model.save_pretrained(tmp_path / "end")
    assert json.loads((tmp_path / "end" / "config.json").read_text())["window_alignment"] == "end"
    assert LongLlamaForCausalLM.from_pretrained(tmp_path / "end").config.window_alignment == "end"
    with pytest.raises(ValueError, match="window_alignment"):
        LongLlamaForCausalLM.from_pretrained(tmp_path / "end", window_alignment="centre")


@torch.no_grad()
def test_forward_follows_the_configured_split(longllama_config):
    """W=16, L=8: a prefix that is a multiple of W is split alike; otherwise the logits change."""
    torch.manual_seed(0)
    start = LongLlamaForCausalLM(longllama_config()).eval()
    end = LongLlamaForCausalLM(longllama_config(window_alignment="end")).eval()
    end.load_state_dict(start.state_dict())
    ids = torch.randint(3, 64, (1, 45), generator=torch.Generator().manual_seed(1))
    same = ids[:, :40]  # prefix 32 = 2 windows either way
    torch.testing.assert_close(end(same).logits, start(same).logits, rtol=0, atol=0)
    # prefix 37: windows 16+16+5 ("start") or 5+16+16 ("end")
    assert float((end(ids).logits - start(ids).logits).abs().max()) > 1e-3


# ---------------------------------------------------------------------------- batches on the embedded model
@pytest.fixture(scope="module")
def rows() -> list[torch.Tensor]:
    """Passkey prompts of 150, 214 and 289 tokens (3-5 windows of 64) and a 20-token one (< L)."""
    tokenizer = load_tokenizer(embedded_model_path())
    long = [make_prompt(tokenizer, n, seed=seed).input_ids[0] for n, seed in ((150, 1), (213, 2), (287, 3))]
    return [*long, long[1][:20]]


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [n_i] -> input_ids and attention_mask [B, max n_i], padded on the left with id 0."""
    n = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, n - len(row) :] = row
        mask[i, n - len(row) :] = 1
    return ids, mask


def load(alignment: str, memory: str) -> LongLlamaForCausalLM:
    model = LongLlamaForCausalLM.from_pretrained(
        embedded_model_path(),
        torch_dtype=torch.float32,
        window_alignment=alignment,
        **MEMORY_SETTINGS[memory],
    ).eval()
    model.generation_config = GenerationConfig(bos_token_id=1, pad_token_id=0)  # no EOS: all NEW_TOKENS
    return model


@torch.no_grad()
def batched_and_alone_logits(model, rows) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row: (the batch's logits at the row's real positions, the row's logits alone), [n_i, V] each."""
    ids, mask = left_padded(rows)
    batch = model(ids, attention_mask=mask).logits
    return [(batch[i, ids.shape[1] - len(row) :], model(row[None]).logits[0]) for i, row in enumerate(rows)]


@pytest.mark.parametrize("memory", sorted(MEMORY_SETTINGS))
def test_end_aligned_left_padded_batch_equals_each_row_alone(rows, memory):
    model = load("end", memory)
    for i, (batched, alone) in enumerate(batched_and_alone_logits(model, rows)):
        assert torch.isfinite(batched).all(), f"row {i}"
        torch.testing.assert_close(batched, alone, rtol=RTOL, atol=ATOL, msg=lambda m, i=i: f"row {i}: {m}")


@pytest.mark.parametrize("memory", sorted(MEMORY_SETTINGS))
def test_start_aligned_left_padded_batch_differs_from_rows_alone(rows, memory):
    """Upstream's split: left padding moves the boundaries, and the padded rows' logits change."""
    model = load("start", memory)
    diffs = [float((batched - alone).abs().max()) for batched, alone in batched_and_alone_logits(model, rows)]
    # the longest row is not padded; rows 0 and 1 cross boundaries that the padding moved
    assert diffs[2] <= 1e-4, diffs
    assert max(diffs[:2]) > 1.0, diffs


@pytest.mark.parametrize("memory", sorted(MEMORY_SETTINGS))
@torch.no_grad()
def test_end_aligned_batched_generate_equals_each_row_alone(rows, memory):
    """Greedy generate through a local-cache overflow: the same tokens and scores, batched or alone.

    Rows of at least ``last_context_length`` tokens only: a shorter row's padding sits in its local cache,
    which then overflows into memory at another step than alone (see the README).
    """
    model = load("end", memory)
    long_rows = rows[:3]
    ids, mask = left_padded(long_rows)
    kwargs = {
        "max_new_tokens": NEW_TOKENS,
        "do_sample": False,
        "output_scores": True,
        "return_dict_in_generate": True,
    }
    batch = model.generate(ids, attention_mask=mask, **kwargs)
    batch_scores = torch.stack(batch.scores, dim=1)  # [B, NEW_TOKENS, V]
    for i, row in enumerate(long_rows):
        alone = model.generate(row[None], **kwargs)
        assert torch.equal(batch.sequences[i, ids.shape[1] :], alone.sequences[0, len(row) :]), f"row {i}"
        alone_scores = torch.stack(alone.scores, dim=1)[0]
        scale = float(alone_scores.abs().max())
        torch.testing.assert_close(batch_scores[i], alone_scores, rtol=RTOL, atol=SCORES_RTOL_OF_MAX * scale)
