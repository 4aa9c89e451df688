"""Prefix windows stacked along the batch (``LongLlamaModel._forward_window_group``) give what running
them one window at a time gives: the same logits, hidden states and memory, bit for bit."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import longllama.modeling as modeling
from longllama import LongLlamaCache, split_windows
from tests.tiny import tiny_model

_GROUP_FORWARD = modeling.LongLlamaModel._forward_window_group

BACKENDS = {
    "exact": {},
    "faiss-flat": dict(mem_backend="faiss", mem_index="Flat", mem_top_k=5),
    "faiss-auto": dict(
        mem_backend="faiss", mem_index="auto", mem_top_k=5, mem_index_params={"exact_until": 40}
    ),
}


def _run(model, ids, mask, group_tokens, monkeypatch, **kwargs):
    """(output, cache) of one call with prefix groups of at most ``group_tokens`` tokens (0: none)."""
    monkeypatch.setattr(modeling, "GROUP_TOKENS", group_tokens)
    calls = []
    real = _GROUP_FORWARD

    def counted(self, inputs_embeds, *args, **kw):
        calls.append(inputs_embeds.shape[1])
        return real(self, inputs_embeds, *args, **kw)

    monkeypatch.setattr(modeling.LongLlamaModel, "_forward_window_group", counted)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, **kwargs)
    return out, calls


def _assert_same_memories(a: LongLlamaCache, b: LongLlamaCache) -> None:
    """Same entries per row, and the same hits (scores, ids, values) for a few random queries."""
    assert a.memory_layers == b.memory_layers
    for layer in a.memory_layers:
        ma, mb = a.memory(layer), b.memory(layer)
        assert torch.equal(ma.lengths, mb.lengths)
        if ma.is_empty:
            continue
        q = torch.randn(
            ma.batch_size, ma.num_heads, 3, ma.head_dim, generator=torch.Generator().manual_seed(layer)
        )
        ha, hb = ma.search(q), mb.search(q)
        assert torch.equal(ha.scores, hb.scores) and torch.equal(ha.ids, hb.ids)
        if ha.values is not None:
            assert torch.equal(ha.values, hb.values)
        else:
            assert all(torch.equal(x, y) for x, y in zip(ha.value_chunks, hb.value_chunks, strict=True))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 130),
    batch=st.integers(1, 2),
    pad=st.integers(0, 9),
    backend=st.sampled_from(sorted(BACKENDS)),
    alignment=st.sampled_from(["start", "end"]),
    use_cache=st.booleans(),
    group_tokens=st.sampled_from([32, 48, 2048]),
)
# two 8-token windows grouped: a one-row product of strided q/k rounds differently on some CPUs
@example(n=16, batch=1, pad=0, backend="exact", alignment="start", use_cache=False, group_tokens=32)
def test_grouped_prefix_equals_window_by_window(
    monkeypatch, n, batch, pad, backend, alignment, use_cache, group_tokens
):
    model = tiny_model(window_alignment=alignment, **BACKENDS[backend])
    ids = torch.randint(3, 64, (batch, n), generator=torch.Generator().manual_seed(n))
    mask = torch.ones(batch, n, dtype=torch.long)
    mask[-1, : min(pad, n - 1)] = 0  # left padding of the last row (never the whole row)
    kwargs = dict(use_cache=use_cache, output_hidden_states=True)
    one, none_grouped = _run(model, ids, mask, 0, monkeypatch, **kwargs)
    grouped, calls = _run(model, ids, mask, group_tokens, monkeypatch, **kwargs)
    assert none_grouped == []
    assert torch.equal(one.logits, grouped.logits)
    assert len(one.hidden_states) == len(grouped.hidden_states)
    for a, b in zip(one.hidden_states, grouped.hidden_states, strict=True):
        assert torch.equal(a, b)
    cache_a, cache_b = one.past_key_values, grouped.past_key_values
    _assert_same_memories(cache_a, cache_b)
    assert cache_a.seen_tokens == cache_b.seen_tokens == n
    assert cache_a.local_length == cache_b.local_length
    # every group is a run of at least two windows within the token budget
    spans = split_windows(n, 16, 8, alignment)
    prefix_full = sum(1 for b, e in spans[:-1] if e - b == 16)
    for tokens in calls:
        assert tokens % 16 == 0 or tokens == n  # whole windows
        assert tokens * batch <= max(group_tokens, 2 * 16 * batch)
    if prefix_full >= 2 and group_tokens // (batch * 16) >= 2:
        assert calls, "a long prefix ran without a single group"


def test_grouped_memory_and_generation_match(monkeypatch):
    """The memory a grouped prefill leaves behind holds the same entries, and decoding from it matches."""
    model = tiny_model(**BACKENDS["exact"])
    ids = torch.randint(3, 64, (1, 200), generator=torch.Generator().manual_seed(1))
    results = []
    for tokens in (0, 2048):
        monkeypatch.setattr(modeling, "GROUP_TOKENS", tokens)
        with torch.no_grad():
            out = model.generate(
                ids,
                max_new_tokens=6,
                do_sample=False,
                return_dict_in_generate=True,
                output_logits=True,
                pad_token_id=0,
            )
        results.append(out)
    assert torch.equal(results[0].sequences, results[1].sequences)
    for a, b in zip(results[0].logits, results[1].logits, strict=True):
        assert torch.equal(a, b)


def test_group_sizes(monkeypatch):
    """Runs of equal-length windows with no local cache, within GROUP_TOKENS; never with an override."""
    model = tiny_model()
    inner = model.model
    monkeypatch.setattr(modeling, "GROUP_TOKENS", 64)
    spans = split_windows(100, 16, 8)  # 16 x 5, 12, then the final 8
    assert spans[-2:] == [(80, 92), (92, 100)]
    state = LongLlamaCache(model.config)
    # 64 tokens of one row: 4 windows of 16
    assert inner._prefix_group(spans, 0, 100, 1, state, True, None) == 4
    # two rows: 2 windows
    assert inner._prefix_group(spans, 0, 100, 2, state, True, None) == 2
    # the 5th window is the last of length 16: alone
    assert inner._prefix_group(spans, 4, 100, 1, state, True, None) == 1
    # the final window stays local with use_cache, joins memory without
    assert inner._prefix_group(spans, 5, 100, 1, state, True, None) == 1
    assert inner._prefix_group([(0, 16), (16, 32)], 0, 32, 1, state, False, None) == 2
    assert inner._prefix_group([(0, 16), (16, 32)], 0, 32, 1, state, True, None) == 1
    # a memory override (FoT training) or a local cache: window by window
    assert inner._prefix_group(spans, 0, 100, 1, state, True, lambda *a: None) == 1
    with torch.no_grad():
        model(torch.randint(3, 64, (1, 8)), use_cache=True, past_key_values=state)
    assert state.local_length == 8
    assert inner._prefix_group(spans, 0, 100, 1, state, True, None) == 1
