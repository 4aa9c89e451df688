"""generate(): greedy, sampling and beam search carry the memory cache between steps."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from longllama import LongLlamaCache, LongLlamaForCausalLM

# W=16, L=8 (conftest): a 30-token prompt leaves 22 tokens in memory and 8 in the local cache, which
# overflows into memory at the 9th generated token.
PROMPT_LENGTH = 30
NEW_TOKENS = 14
# beams share their first tokens; the second flush (at the 26th token) puts beam-specific tokens in memory
BEAM_TOKENS = 32


def build(config) -> LongLlamaForCausalLM:
    torch.manual_seed(0)
    model = LongLlamaForCausalLM(config).eval()
    # no EOS, so that exactly max_new_tokens tokens are generated
    model.generation_config = GenerationConfig(bos_token_id=1, pad_token_id=0)
    return model


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 64, (batch, length), generator=gen)


@torch.no_grad()
def greedy_by_hand(model, ids, steps: int, last_context_length: int = 8, cache=None):
    """Greedy decoding with explicit calls: the prompt, then one token per call with the returned cache."""
    out = model(ids, past_key_values=cache, last_context_length=last_context_length)
    tokens, scores = [], []
    for _ in range(steps):
        logits = out.logits[:, -1]
        scores.append(logits)
        token = logits.argmax(-1, keepdim=True)
        tokens.append(token)
        out = model(token, past_key_values=out.cache)
    return torch.cat(tokens, dim=1), torch.stack(scores)


@torch.no_grad()
def test_greedy_generate_equals_explicit_calls(longllama_config):
    model = build(longllama_config())
    ids = random_ids(2, PROMPT_LENGTH)
    out = model.generate(
        ids, max_new_tokens=NEW_TOKENS, do_sample=False, last_context_length=8,
        output_scores=True, return_dict_in_generate=True,
    )  # fmt: skip
    tokens, scores = greedy_by_hand(model, ids, NEW_TOKENS)
    assert torch.equal(out.sequences[:, PROMPT_LENGTH:], tokens)
    torch.testing.assert_close(torch.stack(out.scores), scores, rtol=0, atol=1e-5)
    # generate() passed the cache along: 22 prompt tokens, then the 8 + 8 local ones, flushed at step 9
    assert isinstance(out.cache, LongLlamaCache)
    assert out.cache.memory_lengths() == [0, 38, 0] and out.cache.local_length == 5


@torch.no_grad()
def test_generate_without_cache_recomputes_the_whole_sequence(longllama_config):
    model = build(longllama_config())
    sequence = random_ids(2, PROMPT_LENGTH)
    generated = model.generate(sequence, max_new_tokens=4, use_cache=False, last_context_length=8)
    for _ in range(4):  # each step: one fresh call over everything so far
        next_token = model(sequence, last_context_length=8).logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(generated, sequence)


@torch.no_grad()
def test_generate_passes_the_cache_and_last_context_length(longllama_config):
    model = build(longllama_config())
    seen = []

    def spy(_module, _args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        seen.append((kwargs["input_ids"].shape[1], type(cache).__name__, kwargs.get("last_context_length")))

    handle = model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        model.generate(random_ids(1, PROMPT_LENGTH), max_new_tokens=3, last_context_length=12)
    finally:
        handle.remove()
    assert [length for length, _, _ in seen] == [PROMPT_LENGTH, 1, 1]
    assert all(name == "LongLlamaCache" for _, name, _ in seen[1:])
    assert all(lcl == 12 for _, _, lcl in seen)


@torch.no_grad()
def test_readme_sampling_call(longllama_config):
    model = build(longllama_config())
    ids = random_ids(1, PROMPT_LENGTH)

    def sample(seed):
        torch.manual_seed(seed)
        return model.generate(
            ids,
            max_new_tokens=NEW_TOKENS,
            num_beams=1,
            last_context_length=12,
            do_sample=True,
            temperature=1.0,
        )

    first = sample(0)
    assert first.shape == (1, PROMPT_LENGTH + NEW_TOKENS)
    assert torch.equal(first[:, :PROMPT_LENGTH], ids)
    assert torch.equal(sample(0), first)
    # sampling from the single most likely token is greedy decoding
    torch.manual_seed(1)
    top1 = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=1, last_context_length=12)
    greedy = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, last_context_length=12)
    assert torch.equal(top1, greedy)


@torch.no_grad()
def test_left_padded_batch_generates_as_each_row_alone(longllama_config):
    model = build(longllama_config(max_position_embeddings=8, last_context_length=4))
    x, y = random_ids(1, 12, seed=2), random_ids(1, 20, seed=3)
    # x gets a whole window of padding, so its real tokens are split into the same windows as alone
    ids = torch.cat([torch.cat([torch.zeros(1, 8, dtype=torch.long), x], dim=1), y])
    mask = torch.ones_like(ids)
    mask[0, :8] = 0
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=10, last_context_length=4)
    alone_x = model.generate(x, max_new_tokens=10, last_context_length=4)
    alone_y = model.generate(y, max_new_tokens=10, last_context_length=4)
    assert torch.equal(batch[0, 8:], alone_x[0])
    assert torch.equal(batch[1], alone_y[0])


@torch.no_grad()
def sequence_logprob(model, prompt: torch.Tensor, continuation: torch.Tensor) -> float:
    """Sum of log-probabilities of ``continuation`` after ``prompt`` (1-D), decoding one token per call."""
    out = model(prompt[None], last_context_length=8)
    total = 0.0
    for token in continuation.tolist():
        total += torch.log_softmax(out.logits[0, -1].float(), dim=-1)[token].item()
        out = model(torch.tensor([[token]]), past_key_values=out.cache)
    return total


@torch.no_grad()
@pytest.mark.parametrize("backend", [{}, {"mem_backend": "faiss", "mem_index": "Flat", "mem_top_k": 64}])
def test_beam_search_reorders_memory(longllama_config, backend):
    model = build(longllama_config(**backend))
    ids = random_ids(2, PROMPT_LENGTH)
    out = model.generate(
        ids, max_new_tokens=BEAM_TOKENS, num_beams=3, num_return_sequences=2, do_sample=False,
        length_penalty=0.0, last_context_length=8, output_scores=True, return_dict_in_generate=True,
    )  # fmt: skip
    assert out.sequences.shape == (4, PROMPT_LENGTH + BEAM_TOKENS)
    assert out.cache.batch_size == 6 and out.cache.memory(1).batch_size == 6
    # every returned beam's score is the log-probability of its tokens, recomputed along that beam alone:
    # this holds only if the local caches and memories were reordered with the beams
    for i, sequence in enumerate(out.sequences):
        expected = sequence_logprob(model, sequence[:PROMPT_LENGTH], sequence[PROMPT_LENGTH:])
        assert out.sequences_scores[i].item() == pytest.approx(expected, abs=1e-4)


@torch.no_grad()
def test_beam_search_same_with_faiss_flat_and_exact(longllama_config):
    ids = random_ids(2, PROMPT_LENGTH)
    kwargs = dict(max_new_tokens=BEAM_TOKENS, num_beams=2, do_sample=False, last_context_length=8)
    exact = build(longllama_config()).generate(ids, **kwargs)
    faiss = build(longllama_config(mem_backend="faiss", mem_index="Flat", mem_top_k=64)).generate(
        ids, **kwargs
    )
    assert torch.equal(faiss, exact)


@torch.no_grad()
def test_generate_continues_from_a_cache(longllama_config):
    # the instruct-colab pattern: load a document into memory with a forward call, then generate
    model = build(longllama_config())
    document, question = random_ids(1, 40), random_ids(1, 6, seed=4)
    cache = model(document, last_context_length=8).cache
    out = model.generate(
        torch.cat([document, question], dim=1), cache=cache, max_new_tokens=NEW_TOKENS,
        last_context_length=8, return_dict_in_generate=True,
    )  # fmt: skip
    assert out.cache is cache
    by_hand, _ = greedy_by_hand(
        model, question, NEW_TOKENS, cache=model(document, last_context_length=8).cache
    )
    assert torch.equal(out.sequences[:, 46:], by_hand)


@torch.no_grad()
def test_assisted_generation_is_refused(longllama_config):
    model = build(longllama_config())
    with pytest.raises(ValueError, match="stateful"):
        model.generate(random_ids(1, 10), max_new_tokens=2, assistant_model=build(longllama_config()))


@torch.no_grad()
@pytest.mark.parametrize("padded", [False, True])
def test_position_ids_are_passed_only_with_padding(longllama_config, padded):
    # without padding generate() keeps no position tensor (the model continues from its local cache:
    # the same differences); with padding every call gets cumsum(mask) - 1 positions, as upstream
    model = build(longllama_config())
    ids = random_ids(2, PROMPT_LENGTH)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0
    seen = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("position_ids")), with_kwargs=True
    )
    try:
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=4, do_sample=False, last_context_length=8
        )
    finally:
        handle.remove()
    assert len(seen) == 4
    if not padded:
        assert all(p is None for p in seen)
        assert torch.equal(out[:, PROMPT_LENGTH:], greedy_by_hand(model, ids, 4)[0])
    else:
        positions = mask.cumsum(-1) - 1
        assert torch.equal(seen[0], positions)
        assert [p.tolist() for p in seen[1:]] == [
            [[r[-1] + s] for r in positions.tolist()] for s in (1, 2, 3)
        ]
