"""LongLLaMA forward semantics: windows, memory, local cache, continuation, padding, training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longllama import LongLlamaCache, LongLlamaForCausalLM, LongLlamaModel

ATOL = 1e-5


def build(config) -> LongLlamaForCausalLM:
    torch.manual_seed(0)
    return LongLlamaForCausalLM(config).eval()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 64, (batch, length), generator=gen)


@torch.no_grad()
def test_logits_do_not_depend_on_use_cache(longllama_config):
    model = build(longllama_config())
    ids = random_ids(2, 45)  # W=16, L=8: windows 16 + 16 + 5 into memory, last 8 local
    cached = model(ids, use_cache=True)
    uncached = model(ids, use_cache=False)
    torch.testing.assert_close(cached.logits, uncached.logits, rtol=0, atol=0)
    assert cached.cache.memory_lengths() == [0, 37, 0] and cached.cache.local_length == 8
    # without a local cache the final window goes to memory as well
    assert uncached.cache.memory_lengths() == [0, 45, 0] and uncached.cache.local_length == 0
    assert cached.cache.get_seq_length() == uncached.cache.get_seq_length() == 45


@torch.no_grad()
def test_upstream_call_shape_and_past_key_values(longllama_config):
    model = build(longllama_config())
    ids = random_ids(1, 30)
    out = model(ids, None, None, None, last_context_length=8)  # input_ids, attention_mask, position_ids, past
    assert isinstance(out.past_key_values, LongLlamaCache)
    assert out.past_key_values is out.cache
    again = model(random_ids(1, 3, seed=2), past_key_values=out.past_key_values)
    assert again.past_key_values is out.cache  # the cache is updated in place and returned
    assert again.cache.get_seq_length() == 33


@torch.no_grad()
def test_tuple_outputs(longllama_config):
    model = build(longllama_config())
    ids = random_ids(1, 20)
    logits, cache = model(ids, return_dict=False)
    torch.testing.assert_close(logits, model(ids).logits, rtol=0, atol=0)
    assert isinstance(cache, LongLlamaCache)
    loss, logits, cache = model(ids, labels=ids, return_dict=False)
    assert loss.dim() == 0
    # without a local cache and without memory layers there is no state to return
    no_memory = build(longllama_config(mem_layers=[]))
    assert no_memory(ids, use_cache=False).cache is None
    assert isinstance(no_memory(ids).cache, LongLlamaCache)


@torch.no_grad()
def test_local_cache_continuation_equals_single_call(longllama_config):
    model = build(longllama_config())
    ids = random_ids(2, 8)  # one window (n <= L): no memory involved
    whole = model(ids).logits
    first = model(ids[:, :5])
    second = model(ids[:, 5:], past_key_values=first.cache, attention_mask=torch.ones(2, 8, dtype=torch.long))
    torch.testing.assert_close(second.logits, whole[:, 5:], rtol=0, atol=ATOL)
    torch.testing.assert_close(first.logits, whole[:, :5], rtol=0, atol=ATOL)
    # the next call continues the positions of the local cache
    assert second.cache.positions.tolist() == [list(range(8))] * 2


@torch.no_grad()
def test_memory_only_continuation_equals_single_call(longllama_config):
    # with L == W every window is a full window; a memory-only cache (use_cache=False) carried into the
    # next call reproduces the windows of one long call when the split point is a window boundary
    model = build(longllama_config(max_position_embeddings=8, last_context_length=8))
    ids = random_ids(1, 40)
    whole = model(ids).logits
    first = model(ids[:, :16], use_cache=False)
    assert first.cache.local_length == 0 and first.cache.memory_lengths()[1] == 16
    second = model(ids[:, 16:], past_key_values=first.cache)
    torch.testing.assert_close(second.logits, whole[:, 16:], rtol=0, atol=ATOL)
    # and it is not trivially so: without the memory the logits differ
    alone = model(ids[:, 16:]).logits
    assert (alone - whole[:, 16:]).abs().max() > 1e-3


@torch.no_grad()
def test_overflow_moves_the_whole_local_cache_into_memory(longllama_config):
    model = build(longllama_config(mem_layers=[0, 2]))
    cache = model(random_ids(1, 20)).cache  # 12 to memory, 8 local
    assert cache.memory_lengths() == [12, 0, 12] and cache.local_length == 8
    model(random_ids(1, 5, seed=2), past_key_values=cache)  # 13 <= 16: no flush
    assert cache.memory_lengths() == [12, 0, 12] and cache.local_length == 13
    model(random_ids(1, 5, seed=3), past_key_values=cache)  # 18 > 16: all 13 local tokens go to memory first
    assert cache.memory_lengths() == [25, 0, 25] and cache.local_length == 5
    assert cache.positions.tolist() == [[25, 26, 27, 28, 29]]
    assert cache.get_seq_length() == 30
    # a prefix window of a continuation call runs with the local cache too (8 + 5 local, then flush)
    # windows 13 + 8: 5 + 13 > 16 flushes the 5 local tokens, then 13 + 8 > 16 flushes those 13
    model(random_ids(1, 21, seed=4), past_key_values=cache)
    assert cache.memory_lengths() == [43, 0, 43] and cache.local_length == 8


@torch.no_grad()
def test_no_memory_layers_gives_independent_windows(longllama_config):
    ids = random_ids(1, 24)
    no_memory = build(longllama_config(max_position_embeddings=8, last_context_length=8, mem_layers=[]))
    logits = no_memory(ids).logits  # windows [0, 8), [8, 16), [16, 24)
    for begin in (8, 16):
        alone = no_memory(ids[:, begin : begin + 8]).logits
        torch.testing.assert_close(logits[:, begin : begin + 8], alone, rtol=0, atol=ATOL)
    assert no_memory(ids).cache.memory_lengths() == [0, 0, 0]
    with_memory = build(longllama_config(max_position_embeddings=8, last_context_length=8))
    assert (with_memory(ids).logits[:, 8:16] - with_memory(ids[:, 8:16]).logits).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("grouping", [(1, 3), (2, 1), (1, 100)])
def test_attention_grouping_is_a_no_op(longllama_config, grouping):
    ids = random_ids(2, 45)
    plain = build(longllama_config())(ids).logits
    grouped = build(longllama_config(mem_attention_grouping=grouping))(ids).logits
    torch.testing.assert_close(grouped, plain, rtol=0, atol=ATOL)


@torch.no_grad()
def test_torch_attention_matches_explicit_attention(longllama_config):
    ids = random_ids(2, 45)
    plain = build(longllama_config())(ids).logits
    sdpa = build(longllama_config(torch_attention=True))(ids).logits
    torch.testing.assert_close(sdpa, plain, rtol=0, atol=ATOL)


@torch.no_grad()
def test_padding_entries_in_memory_are_ignored(longllama_config):
    model = build(longllama_config(max_position_embeddings=8, last_context_length=4))
    x = random_ids(1, 12)
    alone = model(x).logits  # windows x[0:8] -> memory, x[8:12] local
    # row 0: a whole window of padding, then x: windows pads -> memory (masked), x[0:8] -> memory, x[8:12]
    # row 1: 20 real tokens, to check that rows do not interact
    other = random_ids(1, 20, seed=5)
    ids = torch.cat([torch.cat([torch.zeros(1, 8, dtype=torch.long), x], dim=1), other])
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, :8] = 0
    out = model(ids, attention_mask=mask)
    assert torch.isfinite(out.logits).all()  # fully masked rows (all-padding window) stay finite
    torch.testing.assert_close(out.logits[0, 8:], alone[0], rtol=0, atol=ATOL)
    torch.testing.assert_close(out.logits[1], model(other).logits[0], rtol=0, atol=ATOL)
    assert out.cache.memory(1).lengths.tolist() == [8, 16]  # real entries per row


@torch.enable_grad()
def test_loss_is_cross_entropy_over_all_windows(longllama_config):
    model = build(longllama_config())
    ids = random_ids(2, 40)
    labels = ids.clone()
    labels[0, :5] = -100
    out = model(ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


@torch.enable_grad()  # independent of what earlier code left in the global grad mode
def test_gradients_flow_into_earlier_windows_through_memory(longllama_config):
    def prefix_grad(mem_layers):
        model = build(
            longllama_config(max_position_embeddings=8, last_context_length=8, mem_layers=mem_layers)
        )
        embeds = model.get_input_embeddings()(random_ids(1, 16)).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, use_cache=False).logits  # windows [0, 8) and [8, 16)
        logits[:, 8:].sum().backward()  # a loss on the last window only
        return embeds.grad[:, :8].abs().max().item()

    assert prefix_grad([1]) > 0  # memory is not detached (upstream trains through it)
    assert prefix_grad([]) == 0  # without memory the windows are independent


@torch.enable_grad()
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(longllama_config):
    config = longllama_config(num_hidden_layers=4, mem_layers=[2], gradient_checkpoint_every_ith=2)
    ids = random_ids(2, 30)

    def loss_and_grads(checkpointing: bool):
        model = build(config).train()
        calls = []
        if checkpointing:
            model.activation_checkpointing_enable()
            checkpoint = model.model._gradient_checkpointing_func
            model.model._gradient_checkpointing_func = lambda *args: calls.append(1) or checkpoint(*args)
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()], len(calls)

    loss, grads, _ = loss_and_grads(False)
    ckpt_loss, ckpt_grads, checkpointed = loss_and_grads(True)
    # 3 windows (16 + 6 + 8 tokens) x layer 0 (layer 2 is a multiple of 2 but has memory)
    assert checkpointed == 3
    torch.testing.assert_close(ckpt_loss, loss, rtol=0, atol=1e-6)
    for a, b in zip(ckpt_grads, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_memory_override_replaces_the_memory_it_is_given_for(longllama_config):
    """A ``memory_override`` is attended to instead of the cache's memory, in every memory layer in order,
    and nothing enters any memory (FoT training's hook)."""
    model = build(longllama_config(mem_layers=[0, 2]))
    a, b = random_ids(2, 16, seed=1), random_ids(2, 16, seed=2)
    one_window = dict(use_cache=False, last_context_length=16)
    reference = model(b, cache=model(a, **one_window).cache, **one_window).logits  # b sees a through memory
    given = model(a, **one_window).cache
    memories = iter([given.memory(0), given.memory(2)])
    calls = []

    def override(keys, values, real, mem_dtype):
        calls.append((tuple(keys.shape), tuple(values.shape), tuple(real.shape), mem_dtype))
        return next(memories)

    out = model(b, memory_override=override, **one_window)
    torch.testing.assert_close(out.logits, reference, rtol=0, atol=0)
    assert calls == [((2, 2, 16, 16), (2, 2, 16, 16), (2, 16), "float32")] * 2
    assert given.memory_lengths() == [16, 0, 16]  # the given memories were only searched
    assert out.cache.memory_lengths() == [0, 0, 0]  # and b entered no memory
    with pytest.raises(TypeError, match="memory_override must be None or a callable"):
        model(b, memory_override="exact")


@torch.no_grad()
def test_bare_model_hidden_states(longllama_config):
    torch.manual_seed(0)
    model = LongLlamaModel(longllama_config()).eval()
    out = model(random_ids(2, 30), output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 30, 32)
    assert len(out.hidden_states) == 3 + 1
    assert all(h.shape == (2, 30, 32) for h in out.hidden_states)
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state, rtol=0, atol=0)


@torch.no_grad()
def test_bfloat16_model_runs(longllama_config):
    model = build(longllama_config(mem_dtype="bfloat16")).to(torch.bfloat16)
    ids = random_ids(2, 45)
    logits = model(ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    reference = build(longllama_config(mem_dtype="bfloat16"))(ids).logits
    assert (logits.float() - reference).abs().max() < 0.1


@torch.no_grad()
def test_cache_helpers(longllama_config):
    model = build(longllama_config(mem_layers=[0, 2]))
    cache = model(random_ids(3, 30)).cache
    assert cache.memory_layers == [0, 2] and cache.batch_size == 3
    assert cache.memory(1) is None and cache.memory(0) is not cache.memory(2)
    assert cache.memory_lengths() == [22, 0, 22]
    cache.reorder_cache(torch.tensor([2, 2, 0, 1]))
    assert cache.batch_size == 4 and cache.memory(0).batch_size == 4
    assert cache.layers[1].keys.shape[0] == 4 and cache.positions.shape == (4, 8)
    with pytest.raises(ValueError, match="cropped"):
        cache.crop(-1)
    cache.reset()
    assert cache.local_length == 0 and cache.memory_lengths() == [0, 0, 0] and cache.get_seq_length() == 0


@torch.no_grad()
def test_memory_settings_come_from_the_config(longllama_config):
    model = build(longllama_config(mem_dtype="bfloat16", mem_top_k=3, mem_device="cpu"))
    memory = model(random_ids(1, 30)).cache.memory(1)
    assert memory.name == "exact" and memory.mem_dtype == torch.bfloat16 and memory.top_k == 3
    # changing the config changes the caches built afterwards
    model.config.mem_backend = "faiss"
    assert model(random_ids(1, 30)).cache.memory(1).name == "faiss"


@torch.no_grad()
def test_input_errors(longllama_config):
    model = build(longllama_config())
    cache = model(random_ids(1, 20)).cache
    with pytest.raises(ValueError, match="use_cache"):
        model(random_ids(1, 3), past_key_values=cache, use_cache=False)
    with pytest.raises(ValueError, match="attention_mask"):
        model(random_ids(1, 3), past_key_values=cache, attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="batch size"):
        model(random_ids(2, 3), past_key_values=cache)
    with pytest.raises(TypeError, match="LongLlamaCache"):
        model(random_ids(1, 3), past_key_values=((torch.zeros(1, 2, 3, 16),) * 6,) * 3)
    with pytest.raises(ValueError, match="last_context_length"):
        model(random_ids(1, 3), last_context_length=0)
    with pytest.raises(ValueError, match="position_ids"):
        model(random_ids(1, 3), position_ids=torch.arange(4))
    with pytest.raises(ValueError, match="input_ids"):
        model(random_ids(1, 3), inputs_embeds=torch.zeros(1, 3, 32))
    other = build(longllama_config(mem_layers=[0]))
    with pytest.raises(ValueError, match="memory layers"):
        other(random_ids(1, 3), past_key_values=cache)
