"""transformers' generation features on the embedded model: stop strings, stopping criteria, scores,
several return sequences, streamers, sequence bias, and the two spellings of the cache argument.

The embedded model answers a short passkey prompt greedily with the pass key, then a full stop and more
text (e.g. ``"16899. Rememb"``), which gives the stop-string and streamer tests something to cut.
"""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

from longllama import LongLlamaCache, LongLlamaForCausalLM, embedded_model_path, load_tokenizer
from longllama.passkey import make_prompt

NEW_TOKENS = 12
LAST_CONTEXT = 32


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(embedded_model_path())


@pytest.fixture(scope="module")
def model():
    return LongLlamaForCausalLM.from_pretrained(embedded_model_path()).eval()


@pytest.fixture(scope="module")
def prompt(tokenizer) -> torch.Tensor:
    """[1, ~200] a passkey prompt: several windows, so the memory is used."""
    return make_prompt(tokenizer, 200, seed=3).input_ids


def generate(model, prompt, **kwargs):
    kwargs.setdefault("max_new_tokens", NEW_TOKENS)
    kwargs.setdefault("do_sample", False)
    return model.generate(prompt, last_context_length=LAST_CONTEXT, **kwargs)


@pytest.fixture(scope="module")
def greedy(model, prompt) -> torch.Tensor:
    """[NEW_TOKENS] the greedy continuation without any of the features under test."""
    out = generate(model, prompt)
    assert out.shape == (1, prompt.shape[1] + NEW_TOKENS)  # the generation config has no EOS in reach
    return out[0, prompt.shape[1] :]


def test_stop_strings_stop_at_the_string(model, tokenizer, prompt, greedy):
    full = tokenizer.decode(greedy)
    assert "." in full[:-1], f"the greedy continuation {full!r} has no full stop to stop at"
    out = generate(model, prompt, stop_strings=["."], tokenizer=tokenizer)
    new = out[0, prompt.shape[1] :]
    text = tokenizer.decode(new)
    assert text.endswith(".") and text.count(".") == 1, text
    assert len(new) < NEW_TOKENS
    assert torch.equal(new, greedy[: len(new)])  # the same tokens, cut at the string


class StopAfter(StoppingCriteria):
    """Stops once ``n`` tokens were generated after a prompt of ``prompt_length`` tokens."""

    def __init__(self, prompt_length: int, n: int) -> None:
        self.limit = prompt_length + n

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.limit, dtype=torch.bool)


def test_stopping_criteria(model, prompt, greedy):
    criteria = StoppingCriteriaList([StopAfter(prompt.shape[1], 3)])
    out = generate(model, prompt, stopping_criteria=criteria)
    assert torch.equal(out[0, prompt.shape[1] :], greedy[:3])


@torch.no_grad()
def test_output_scores_and_dict(model, prompt, greedy):
    out = generate(model, prompt, output_scores=True, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences[0, prompt.shape[1] :], greedy)
    assert len(out.scores) == NEW_TOKENS and len(out.logits) == NEW_TOKENS
    picked = torch.stack([s[0].argmax() for s in out.scores])
    assert torch.equal(picked, greedy)
    # the first step's scores are the prompt's last logits from a plain forward call
    first = model(prompt, last_context_length=LAST_CONTEXT).logits[:, -1]
    torch.testing.assert_close(out.logits[0], first, rtol=0, atol=1e-5)
    assert (
        isinstance(out.cache, LongLlamaCache)
        and out.cache.get_seq_length() == prompt.shape[1] + NEW_TOKENS - 1
    )


def test_num_return_sequences_with_sampling(model, prompt):
    def sample():
        torch.manual_seed(0)
        return generate(model, prompt, do_sample=True, temperature=3.0, top_k=0, num_return_sequences=3)

    out = sample()
    assert out.shape == (3, prompt.shape[1] + NEW_TOKENS)
    assert torch.equal(out[:, : prompt.shape[1]], prompt.expand(3, -1))
    new = out[:, prompt.shape[1] :]
    assert len({tuple(row.tolist()) for row in new}) == 3  # each sequence sampled on its own
    assert torch.equal(sample(), out)  # and reproducibly


def test_num_return_sequences_with_beams(model, prompt):
    out = generate(
        model, prompt, num_beams=3, num_return_sequences=3, output_scores=True, return_dict_in_generate=True
    )
    new = out.sequences[:, prompt.shape[1] :]
    assert new.shape[0] == 3
    assert len({tuple(row.tolist()) for row in new}) == 3  # three different hypotheses
    scores = out.sequences_scores.tolist()
    assert scores == sorted(scores, reverse=True), scores


class Collect(BaseStreamer):
    """Records every ``put`` (the prompt first, then one token per step) and ``end`` calls."""

    def __init__(self) -> None:
        self.chunks: list[list[int]] = []
        self.ended = 0

    def put(self, value: torch.Tensor) -> None:
        self.chunks.append(value.reshape(-1).tolist())

    def end(self) -> None:
        self.ended += 1


def test_streamer_receives_exactly_the_generated_tokens(model, prompt, greedy):
    streamer = Collect()
    out = generate(model, prompt, streamer=streamer)
    assert streamer.chunks[0] == prompt[0].tolist()
    streamed = [token for chunk in streamer.chunks[1:] for token in chunk]
    assert streamed == out[0, prompt.shape[1] :].tolist() == greedy.tolist()
    assert streamer.ended == 1


def test_text_iterator_streamer(model, tokenizer, prompt, greedy):
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60)
    worker = threading.Thread(target=generate, args=(model, prompt), kwargs={"streamer": streamer})
    worker.start()
    text = "".join(streamer)
    worker.join()
    assert text == tokenizer.decode(greedy, skip_special_tokens=True)


def test_sequence_bias_that_forbids_the_greedy_token_changes_the_output(model, prompt, greedy):
    first = int(greedy[0])
    out = generate(model, prompt, sequence_bias={(first,): -1e4})
    new = out[0, prompt.shape[1] :]
    assert first not in new.tolist()
    assert not torch.equal(new, greedy)
    # a bias on a token that greedy decoding never picks, strong enough, makes it the first one
    other = next(t for t in range(3, model.config.vocab_size) if t not in greedy.tolist())
    out = generate(model, prompt, sequence_bias={(other,): 1e4}, max_new_tokens=2)
    assert out[0, prompt.shape[1]] == other


def continue_with_cache(model, prompt, tokenizer, spelling: str) -> tuple[torch.Tensor, list]:
    """Generate, then ask a second question continuing from the returned cache passed as ``spelling``."""
    first = generate(model, prompt, max_new_tokens=4, return_dict_in_generate=True)
    question = tokenizer(
        "\nWhat is the pass key? The pass key is", add_special_tokens=False, return_tensors="pt"
    )
    ids = torch.cat([first.sequences, question.input_ids], dim=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = generate(model, ids, max_new_tokens=6, **{spelling: first.cache})
    # the given cache was used and carried on: it has now seen everything but the last token
    assert first.cache.get_seq_length() == ids.shape[1] + 6 - 1
    return out[0, ids.shape[1] :], [w for w in caught if issubclass(w.category, FutureWarning)]


def test_cache_argument_both_spellings(model, tokenizer, prompt):
    new_spelling, new_warnings = continue_with_cache(model, prompt, tokenizer, "cache")
    old_spelling, old_warnings = continue_with_cache(model, prompt, tokenizer, "past_key_values")
    assert torch.equal(new_spelling, old_spelling)
    assert new_warnings == [], [str(w.message) for w in new_warnings]
    # the upstream spelling still works; transformers 5 marks it deprecated in generate()
    assert any("past_key_values" in str(w.message) for w in old_warnings)
