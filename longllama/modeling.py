"""LongLLaMA (Focused Transformer): a LLaMA decoder whose memory layers also attend to a memory of all
earlier context windows.

Read top to bottom: RMSNorm and MLP (plain LLaMA), the attention layer, the decoder layer, then
`LongLlamaModel`, which splits a long input into windows and runs them one after the other, and
`LongLlamaForCausalLM`, which adds the LM head, the loss and ``generate()``.

How one call runs (upstream LongLLaMA's semantics, see ``split_windows``):

* The input is split into windows; the prefix windows go into memory, the final window (the last
  ``last_context_length`` tokens) stays in the local cache. ``config.window_alignment`` places the prefix
  windows' boundaries from the input's start (upstream) or counted back from its end (left padding then
  never moves them).
* A prefix window with no local cache yet attends causally to itself plus the whole memory, and *after* its
  attention its un-rotated keys and values enter the memory of every memory layer.
* With a local cache (continuation, generation, or a later prefix window of such a call), new tokens join the
  local cache. If that would exceed the window length, the *whole* previous local cache is first moved into
  memory (memory layers) or dropped (other layers).
* Local keys are stored un-rotated with their absolute positions and rotated on every call by their position
  relative to the oldest local key. Memory keys are never rotated (position 0), queries always are.
* Consecutive prefix windows of one length with no local cache depend on each other only through the
  memory: up to ``GROUP_TOKENS`` tokens of them run as one batch (embeddings, projections, RoPE, MLPs,
  norms, local attention), and each memory layer searches and adds to its memory window by window, in
  order (:func:`knn_memory.memory_attention_windows`, which runs the rest of the group's attention at
  once). The result is bit for bit that of running them one by one; short windows (the embedded model's
  64 tokens) no longer pay the per-call cost of every small operation once per window.
* Every layer calls ``knn_memory.memory_attention`` (memory layers pass their memory backend): one softmax
  over [local keys ; memory entries], upstream's numerics.
* A call may pass a ``memory_override`` (:class:`MemoryOverride`): its memory layers then attend to the
  memory it builds from each window's own keys and values instead of the cache's, and no window enters
  memory. FoT training uses it to let every window of a batch attend to other windows of the batch.

The memory and the local cache live in a :class:`~longllama.cache.LongLlamaCache`, returned as
``past_key_values`` (``cache`` in transformers 5).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import torch
from torch import nn
from torch.nn import CrossEntropyLoss
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

import knn_memory
from longllama import memory_io
from longllama.cache import LongLlamaCache, add_to_memory, create_memory
from longllama.configuration import LongLlamaConfig
from longllama.rope import RotaryTable, apply_rotary, relative_positions
from longllama.windows import split_windows

logger = logging.get_logger(__name__)

# Largest span of given position_ids in one call: float32 holds every integer position exactly below 2**24.
MAX_POSITION_SPAN = 2**24
# Most tokens (all rows together) of the prefix windows that run as one batch (LongLlamaModel._prefix_group):
# a window's non-memory work then costs one large call instead of many small ones.
GROUP_TOKENS = 2048


class LongLlamaRMSNorm(nn.Module):
    """RMS normalisation in float32, scaled by a learned weight (LLaMA's ``LlamaRMSNorm``)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., D], same dtype."""
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(input_dtype)


class LongLlamaMLP(nn.Module):
    """SwiGLU feed-forward: ``down(act(gate(x)) * up(x))``, no biases."""

    def __init__(self, config: LongLlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, n, D] -> [B, n, D]."""
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MemoryOverride(Protocol):
    """The memory a memory layer attends to in one forward call instead of the cache's.

    Called once per memory layer and window, after the layer has projected the window. FoT training passes
    one that builds, for every row of the batch, a dense memory of the other rows it may see.
    """

    def __call__(
        self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, mem_dtype: str
    ) -> knn_memory.MemoryBackend:
        """The memory for one memory layer.

        Args:
            keys: [B, H, n, d] the window's un-rotated keys in this layer; values: [B, H, n, d].
            mask: [B, n] bool, True for the window's real (non-padding) tokens.
            mem_dtype: the config's ``mem_dtype``, the storage dtype memories use.

        Returns:
            a backend with batch size B; the layer searches it and adds nothing to it.
        """
        ...


@dataclass
class WindowContext:
    """What every layer needs to process one window of ``n`` new tokens after ``past`` cached ones.

    Attributes:
        attention_mask: additive float mask [B, 1, n, past + n] (causal + padding, ``finfo.min`` = masked).
        cos, sin: RoPE of the local window's relative positions, [B, 1, past + n, d] (queries use the last n).
        cache: the sequence state (local caches and memories).
        use_cache: keep the window's keys/values in the local cache.
        memory_after_attention: a no-local-cache window: its keys/values enter memory after attention.
        mask: [B, n] bool, True for real (non-padding) new tokens; the memory mask of entries added after
            attention.
        memory_override: None, or what builds the memory each memory layer attends to instead of the cache's
            (see :class:`MemoryOverride`).
        group: the number G of consecutive prefix windows stacked along the batch (rows ``g * B`` to
            ``(g + 1) * B - 1`` hold window g); memory layers take them one after the other (see
            :meth:`LongLlamaModel._forward_window_group`). 1: one window.
    """

    attention_mask: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    cache: LongLlamaCache
    use_cache: bool
    memory_after_attention: bool
    mask: torch.Tensor
    memory_override: MemoryOverride | None = None
    group: int = 1


class LongLlamaAttention(nn.Module):
    """Multi-head attention over the local window and, in memory layers, the memory (one softmax).

    Args:
        config: model config.
        layer_idx: index of this layer; memory layers are those listed in ``config.mem_layers``.
    """

    def __init__(self, config: LongLlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.is_memory_layer = layer_idx in config.mem_layers
        # mem_positionals=False removes RoPE from memory layers altogether (queries and local keys too)
        self.use_positionals = not self.is_memory_layer or config.mem_positionals
        self.grouping = config.mem_attention_grouping if self.is_memory_layer else None
        self.use_sdpa = config.torch_attention
        self.mem_dtype = config.mem_dtype
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, window: WindowContext) -> torch.Tensor:
        """[B, n, D] -> [B, n, D]; updates this layer's local cache and memory in ``window.cache``."""
        B, n, D = hidden_states.shape
        H, d = self.num_heads, self.head_dim
        q = self.q_proj(hidden_states).view(B, n, H, d).transpose(1, 2)  # [B, H, n, d]
        k = self.k_proj(hidden_states).view(B, n, H, d).transpose(1, 2)  # [B, H, n, d], un-rotated
        v = self.v_proj(hidden_states).view(B, n, H, d).transpose(1, 2)  # [B, H, n, d]

        layer_cache = window.cache.layers[self.layer_idx]
        if layer_cache.get_seq_length() > 0:
            keys = torch.cat([layer_cache.keys, k], dim=-2)  # [B, H, past + n, d]
            values = torch.cat([layer_cache.values, v], dim=-2)
        else:
            keys, values = k, v
        if window.use_cache:
            layer_cache.set_local(keys, values)

        if self.use_positionals:
            q = apply_rotary(q, window.cos[:, :, -n:], window.sin[:, :, -n:])
            keys = apply_rotary(keys, window.cos, window.sin)

        memory = layer_cache.memory if self.is_memory_layer else None
        if self.is_memory_layer and window.memory_override is not None:
            memory = window.memory_override(k, v, window.mask, self.mem_dtype)
        if memory is None or window.group == 1:
            out = self._attend(q, keys, values, window.attention_mask, memory, k, v, window)  # [B, H, n, d]
        else:
            # G stacked prefix windows: each attends to the memory of every window before it, so they
            # search the memory one after the other, each adding its keys before the next searches
            rows = B // window.group

            def add_window(g: int) -> None:
                if window.memory_after_attention:
                    r = slice(g * rows, (g + 1) * rows)
                    add_to_memory(memory, k[r], v[r], window.mask[r])

            out = knn_memory.memory_attention_windows(
                q,
                keys,
                values,
                window.attention_mask,
                memory,
                windows=window.group,
                after_search=add_window,
                grouping=self.grouping,
                use_sdpa=self.use_sdpa,
            )
        return self.o_proj(out.transpose(1, 2).reshape(B, n, D))

    def _attend(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attention_mask: torch.Tensor,
        memory: knn_memory.MemoryBackend | None,
        k: torch.Tensor,
        v: torch.Tensor,
        window: WindowContext,
    ) -> torch.Tensor:
        """Attention of one window's queries ``q`` [B, H, n, d] over its local ``keys``/``values`` and the
        memory, which then receives the window's un-rotated ``k``/``v`` [B, H, n, d] (its real tokens:
        ``window.mask``) if the window goes to memory. -> [B, H, n, d]."""
        out = knn_memory.memory_attention(
            q, keys, values, attention_mask, memory, grouping=self.grouping, use_sdpa=self.use_sdpa
        )
        if memory is not None and window.memory_after_attention:
            add_to_memory(memory, k, v, window.mask)
        return out


class LongLlamaDecoderLayer(nn.Module):
    """Pre-norm decoder block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: LongLlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LongLlamaAttention(config, layer_idx)
        self.mlp = LongLlamaMLP(config)
        self.input_layernorm = LongLlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LongLlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @property
    def is_memory_layer(self) -> bool:
        return self.self_attn.is_memory_layer

    def forward(self, hidden_states: torch.Tensor, window: WindowContext) -> torch.Tensor:
        """[B, n, D] -> [B, n, D]."""
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), window)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class LongLlamaPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading conventions shared by the LongLLaMA models (LLaMA weight names)."""

    config_class = LongLlamaConfig
    config: LongLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["LongLlamaDecoderLayer"]
    # upstream v1.1 checkpoints carry the RoPE inverse frequencies; they are recomputed here
    _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = [r"rotary_emb\.inv_freq", r"decoder\.version"]
    # memory cannot be rolled back, so assisted generation is refused
    _is_stateful = True

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoModel") -> None:
        """Does nothing: the config's ``save_pretrained`` writes the ``auto_map`` and its remote-code module.

        transformers calls this on classes it loads as remote code (see
        :meth:`LongLlamaConfig.save_pretrained`); it would make later saves copy this library's source
        files beside the weights.
        """


def build_attention_mask(mask: torch.Tensor, query_length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask of ``query_length`` new tokens over ``mask.shape[1]`` local keys (the new ones last).

    Args:
        mask: [B, k] bool, True for real tokens, over the local window (cached + new).
        query_length: n, the number of new tokens (the last n of the window).
        dtype: the activation dtype.

    Returns:
        [B, 1, n, k]: ``finfo.min`` on padding keys plus ``finfo.min`` on future keys (causal, only when
        n > 1), 0 elsewhere; a key that is both sums to ``-inf``, which attention clamps as upstream does.
    """
    B, k = mask.shape
    past = k - query_length
    min_value = torch.finfo(dtype).min
    padding = torch.zeros(B, 1, 1, k, dtype=dtype, device=mask.device).masked_fill(
        ~mask[:, None, None, :], min_value
    )
    additive = padding.expand(B, 1, query_length, k)
    if query_length > 1:
        future = torch.ones(query_length, query_length, dtype=torch.bool, device=mask.device).triu(1)
        causal = torch.zeros(query_length, k, dtype=dtype, device=mask.device)
        causal[:, past:] = causal[:, past:].masked_fill(future, min_value)
        additive = additive + causal  # [B, 1, n, k]
    return additive


class LongLlamaModel(LongLlamaPreTrainedModel):
    """The LongLLaMA decoder: embeddings, decoder layers, final norm; handles inputs of any length.

    Args:
        config: model config. Its memory backend settings are checked here by building one backend.
    """

    def __init__(self, config: LongLlamaConfig) -> None:
        super().__init__(config)
        config.check()  # keyword overrides of from_pretrained are set after the config was built
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [LongLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = LongLlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rope = RotaryTable(
            config.hidden_size // config.num_attention_heads,
            config.rope_theta,
            config.max_position_embeddings,
        )
        self.gradient_checkpointing = False
        if config.mem_layers:
            check_memory_settings(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: LongLlamaCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        last_context_length: int | None = None,
        cache: LongLlamaCache | None = None,
        hidden_to_keep: int = 0,
        memory_override: MemoryOverride | None = None,
        **kwargs: object,
    ) -> BaseModelOutputWithPast | tuple:
        """Run an input of any length, window by window.

        Args:
            input_ids: [B, n] token ids (or ``inputs_embeds`` [B, n, D]).
            attention_mask: [B, local + n] (1 = real token, 0 = padding) covering the local cache and the
                input; a longer mask (e.g. the whole history) is cut to its last ``local + n`` columns.
                None: no padding.
            position_ids: [B, n]; None continues from the local cache (0 without one). Only differences
                between positions matter.
            past_key_values / cache: a :class:`LongLlamaCache` returned by an earlier call (either name).
            use_cache: keep the final window in the local cache (default ``config.use_cache``); with False
                it goes into memory like the other windows.
            output_hidden_states: also return the hidden states of every layer (windows concatenated).
            last_context_length: tokens of this input kept out of memory (default from the config).
            hidden_to_keep: if > 0, return only the last this many positions of ``last_hidden_state``
                (``generate()`` needs one); a long prefill then holds one window's hidden states, not
                [B, n, D].
            memory_override: memory layers attend to the memory this builds from each window's keys and
                values instead of the cache's, and no window enters memory (:class:`MemoryOverride`; FoT
                training's hook). None: the cache's memory, as always.
            **kwargs: ignored; what ``generate()`` passes to every model (e.g. ``tokenizer`` with
                ``stop_strings``), accepted as transformers' LLaMA does.

        Returns:
            ``BaseModelOutputWithPast`` with ``last_hidden_state`` [B, n, D] and the cache (``None`` only when
            ``use_cache`` is off and there are no memory layers).
        """
        config = self.config
        if output_attentions:
            raise ValueError(
                "output_attentions=True is not supported by LongLLaMA (attention is computed in blocks)"
            )
        output_hidden_states = bool(
            output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else config.return_dict
        use_cache = use_cache if use_cache is not None else config.use_cache
        last_context_length = (
            last_context_length if last_context_length is not None else config.last_context_length
        )
        if self.gradient_checkpointing and self.training and use_cache:
            logger.warning_once(
                "use_cache=True is incompatible with gradient checkpointing; using use_cache=False"
            )
            use_cache = False

        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids [B, n] and inputs_embeds [B, n, D]")
        weight = self.embed_tokens.weight
        if inputs_embeds is None:
            check_input_ids(input_ids, config.vocab_size, weight.device)
            B, n = input_ids.shape  # embedded a window at a time: a long input never holds [B, n, D]
        else:
            check_inputs_embeds(inputs_embeds, config.hidden_size, weight)
            B, n, _ = inputs_embeds.shape
        if not isinstance(hidden_to_keep, int) or isinstance(hidden_to_keep, bool) or hidden_to_keep < 0:
            raise ValueError(f"hidden_to_keep must be an int >= 0, got {hidden_to_keep!r}")
        if memory_override is not None and not callable(memory_override):
            raise TypeError(
                "memory_override must be None or a callable (keys, values, mask, mem_dtype) -> MemoryBackend, "
                f"got {type(memory_override).__name__}"
            )
        device = weight.device if inputs_embeds is None else inputs_embeds.device
        if n == 0:
            raise ValueError("the input is empty (0 tokens)")
        if B == 0:
            raise ValueError("the input is empty (batch size 0)")

        state = resolve_cache(past_key_values, cache, config)
        if state is None:
            state = LongLlamaCache(config)
        if not use_cache and state.local_length > 0:
            raise ValueError("past_key_values with a local cache needs use_cache=True (got use_cache=False)")
        state.prepare(B, device)
        past = state.local_length

        position_ids = self._position_ids(position_ids, state, B, n, device)
        mask = real_token_mask(attention_mask, B, past + n, device)  # [B, past + n]

        hidden_parts: list[torch.Tensor] = []
        layer_parts: list[list[torch.Tensor]] = []
        window_length, alignment = config.max_position_embeddings, config.window_alignment
        spans = split_windows(n, window_length, last_context_length, alignment)
        at = 0
        while at < len(spans):
            group = self._prefix_group(spans, at, n, B, state, use_cache, memory_override)
            if group > 1:
                begin, end = spans[at][0], spans[at + group - 1][1]
                hidden, layers = self._forward_window_group(
                    self.embed_tokens(input_ids[:, begin:end])
                    if inputs_embeds is None
                    else inputs_embeds[:, begin:end],
                    mask[:, past + begin : past + end],
                    position_ids[:, begin:end],
                    group,
                    state,
                    output_hidden_states,
                )
                hidden_parts.extend(hidden)
                layer_parts.extend(layers)
                while hidden_to_keep and sum(h.shape[1] for h in hidden_parts[1:]) >= hidden_to_keep:
                    hidden_parts.pop(0)
                at += group
                continue
            begin, end = spans[at]
            at += 1
            local = state.local_length
            final = end == n
            # a prefix window keeps a local cache only if one already exists (upstream)
            window_use_cache = use_cache if (final or local > 0) else False
            window_mask = mask[:, past + begin - local : past + end]
            window_embeds = (
                self.embed_tokens(input_ids[:, begin:end])
                if inputs_embeds is None
                else inputs_embeds[:, begin:end]
            )
            hidden, layers = self._forward_window(
                window_embeds,
                window_mask,
                position_ids[:, begin:end],
                state,
                window_use_cache,
                output_hidden_states,
                memory_override,
            )
            hidden_parts.append(hidden)
            layer_parts.append(layers)
            # only the last hidden_to_keep positions are wanted: drop windows wholly before them
            while hidden_to_keep and sum(h.shape[1] for h in hidden_parts[1:]) >= hidden_to_keep:
                hidden_parts.pop(0)

        last_hidden_state = torch.cat(hidden_parts, dim=1) if len(hidden_parts) > 1 else hidden_parts[0]
        if hidden_to_keep:
            last_hidden_state = last_hidden_state[:, -hidden_to_keep:]
        all_hidden_states = None
        if output_hidden_states:
            all_hidden_states = tuple(torch.cat(parts, dim=1) for parts in zip(*layer_parts, strict=True))
        returned_cache = state if (use_cache or config.mem_layers) else None
        if not return_dict:
            return tuple(v for v in (last_hidden_state, returned_cache, all_hidden_states) if v is not None)
        return BaseModelOutputWithPast(
            last_hidden_state=last_hidden_state, cache=returned_cache, hidden_states=all_hidden_states
        )

    def _position_ids(
        self, position_ids: torch.Tensor | None, state: LongLlamaCache, B: int, n: int, device: torch.device
    ) -> torch.Tensor:
        """[B, n] int64 positions: the given ones, or the next after the local cache's (0 without one)."""
        if position_ids is None:
            start = (
                state.positions.max(dim=-1, keepdim=True).values + 1
                if state.local_length > 0
                else torch.zeros(B, 1, dtype=torch.long, device=device)
            )
            return torch.arange(n, device=device).view(1, n) + start.to(device)
        if not isinstance(position_ids, torch.Tensor):
            raise TypeError(
                f"position_ids must be an integer torch.Tensor [B, n], got {type(position_ids).__name__}"
            )
        if position_ids.is_floating_point() or position_ids.is_complex() or position_ids.dtype == torch.bool:
            raise TypeError(f"position_ids must hold integer positions, got dtype {position_ids.dtype}")
        position_ids = position_ids.to(device=device, dtype=torch.long)
        if position_ids.dim() == 1:
            position_ids = position_ids.view(1, -1)
        if position_ids.shape[0] == 1 and B > 1:
            position_ids = position_ids.expand(B, -1)
        if tuple(position_ids.shape) != (B, n):
            raise ValueError(f"position_ids must be [B={B}, n={n}], got shape {list(position_ids.shape)}")
        # checked over the whole call before any window runs, so a refused call leaves the cache untouched
        every = position_ids if state.local_length == 0 else torch.cat([state.positions, position_ids], dim=1)
        span = int(relative_positions(every).max())
        if span >= MAX_POSITION_SPAN:
            raise ValueError(
                f"position_ids span {span} positions (with the local cache); RoPE angles are exact in float32 "
                f"only below {MAX_POSITION_SPAN} (2**24)"
            )
        return position_ids

    def _prefix_group(
        self,
        spans: list[tuple[int, int]],
        at: int,
        n: int,
        B: int,
        state: LongLlamaCache,
        use_cache: bool,
        memory_override: MemoryOverride | None,
    ) -> int:
        """How many windows from ``spans[at]`` on can run as one group (:meth:`_forward_window_group`).

        Those are consecutive windows of one length that start with no local cache and go to memory
        (every prefix window of a fresh call, and the final one too with ``use_cache=False``), at most
        :data:`GROUP_TOKENS` tokens of the batch in all; never with a ``memory_override`` (FoT training)
        or gradient checkpointing. 1: the window runs alone."""
        if (
            state.local_length > 0
            or memory_override is not None
            or (self.gradient_checkpointing and self.training)
        ):
            return 1
        length = spans[at][1] - spans[at][0]
        most = max(1, GROUP_TOKENS // max(B * length, 1))
        count = 0
        for begin, end in spans[at : at + most]:
            if end - begin != length or (end == n and use_cache):
                break
            count += 1
        return max(count, 1)

    def _forward_window_group(
        self,
        inputs_embeds: torch.Tensor,
        mask: torch.Tensor,
        position_ids: torch.Tensor,
        group: int,
        state: LongLlamaCache,
        output_hidden_states: bool,
    ) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        """``group`` consecutive windows of n tokens each that start with no local cache and go to memory,
        as one batch of ``group * B`` rows.

        A window's layers depend on earlier windows only through the memory: everything else (embeddings,
        projections, RoPE, MLPs, norms, the local attention) runs for the G windows at once, and each
        memory layer attends and adds to its memory window by window, in order (``WindowContext.group``).
        The result is that of G calls to :meth:`_forward_window`.

        Args:
            inputs_embeds: [B, G * n, D]; mask: [B, G * n] bool (real tokens); position_ids: [B, G * n].
            group: G.
            state: the cache, updated in place (memories; no local cache is kept).
            output_hidden_states: also return each window's per-layer hidden states.

        Returns:
            each window's normed hidden states [B, n, D] (G of them), and each window's per-layer hidden
            states if asked (else G empty lists).
        """
        B, total = inputs_embeds.shape[:2]
        n = total // group

        def stack(t: torch.Tensor) -> torch.Tensor:  # [B, G * n, ...] -> [G * B, n, ...], window-major
            return t.reshape(B, group, n, *t.shape[2:]).transpose(0, 1).reshape(group * B, n, *t.shape[2:])

        rows_mask = stack(mask)
        cos, sin = self.rope.lookup(relative_positions(stack(position_ids)), inputs_embeds.dtype)
        window = WindowContext(
            attention_mask=build_attention_mask(rows_mask, n, inputs_embeds.dtype),
            cos=cos,
            sin=sin,
            cache=state,
            use_cache=False,
            memory_after_attention=True,
            mask=rows_mask,
            group=group,
        )
        hidden_states = stack(inputs_embeds)
        per_layer = []
        for layer in self.layers:
            if output_hidden_states:
                per_layer.append(hidden_states)
            hidden_states = layer(hidden_states, window)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            per_layer.append(hidden_states)
        state.positions = None
        state.seen_tokens += group * n
        windows = list(hidden_states.split(B))
        layers = [[h[g * B : (g + 1) * B] for h in per_layer] for g in range(group)]
        return windows, layers

    def _forward_window(
        self,
        inputs_embeds: torch.Tensor,
        mask: torch.Tensor,
        position_ids: torch.Tensor,
        state: LongLlamaCache,
        use_cache: bool,
        output_hidden_states: bool,
        memory_override: MemoryOverride | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One window of n tokens.

        Args:
            inputs_embeds: [B, n, D].
            mask: [B, local + n] bool over the current local cache and the window.
            position_ids: [B, n] absolute positions of the window.
            state: the cache, updated in place.
            use_cache: keep the window in the local cache (else, memory layers add it to memory).
            output_hidden_states: collect the input of every layer and the normed output.
            memory_override: see :class:`MemoryOverride`; with one, the window does not enter memory.

        Returns:
            normed hidden states [B, n, D], and the per-layer hidden states if asked (else []).
        """
        n = inputs_embeds.shape[1]
        local = state.local_length
        if local > 0 and local + n > self.config.max_position_embeddings:
            # overflow: the whole previous local cache goes to memory before this window's attention
            state.flush_local_into_memory(mask[:, :local])
            mask = mask[:, local:]
            local = 0
        # positions of the whole local window [B, local + n]; RoPE uses them relative to the oldest key
        positions = torch.cat([state.positions, position_ids], dim=1) if local > 0 else position_ids
        cos, sin = self.rope.lookup(relative_positions(positions), inputs_embeds.dtype)  # [B, 1, local+n, d]
        window = WindowContext(
            attention_mask=build_attention_mask(mask, n, inputs_embeds.dtype),
            cos=cos,
            sin=sin,
            cache=state,
            use_cache=use_cache,
            # an overriding memory belongs to this call: the window enters neither it nor the cache's memory
            memory_after_attention=not use_cache and memory_override is None,
            mask=mask[:, local:],
            memory_override=memory_override,
        )

        hidden_states = inputs_embeds
        all_hidden_states = []
        every_ith = self.config.gradient_checkpoint_every_ith
        for idx, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            if (
                self.gradient_checkpointing
                and self.training
                and not layer.is_memory_layer
                and idx % every_ith == 0
            ):
                hidden_states = self._gradient_checkpointing_func(layer.__call__, hidden_states, window)
            else:
                hidden_states = layer(hidden_states, window)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states.append(hidden_states)

        state.positions = positions if use_cache else None
        state.seen_tokens += n
        return hidden_states, all_hidden_states


class LongLlamaForCausalLM(LongLlamaPreTrainedModel, GenerationMixin):
    """LongLLaMA with a language-modelling head; ``generate()`` keeps memory across steps.

    Args:
        config: model config.
    """

    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LongLlamaConfig) -> None:
        super().__init__(config)
        self.model = LongLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def get_decoder(self) -> LongLlamaModel:
        return self.model

    def set_decoder(self, decoder: LongLlamaModel) -> None:
        self.model = decoder

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: LongLlamaCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        last_context_length: int | None = None,
        cache: LongLlamaCache | None = None,
        logits_to_keep: int = 0,
        memory_override: MemoryOverride | None = None,
        **kwargs: object,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits of every position of an input of any length (see :meth:`LongLlamaModel.forward`).

        Args:
            labels: [B, n] next-token targets (-100 = ignored); the loss is the mean cross-entropy of
                ``logits[:, :-1]`` against ``labels[:, 1:]`` over all windows.
            logits_to_keep: if > 0, compute logits only for the last this many positions (``generate()``
                uses 1).
            (other arguments, and ``**kwargs``, which are ignored: as :meth:`LongLlamaModel.forward`.)

        Returns:
            ``CausalLMOutputWithPast``: ``logits`` [B, n, V], ``loss``, and the cache as ``cache`` (readable
            as ``past_key_values`` too), to pass to the next call.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if labels is not None:  # checked before the model runs, so a refused call leaves the cache untouched
            given = input_ids if input_ids is not None else inputs_embeds
            if isinstance(given, torch.Tensor) and given.dim() in (2, 3):
                check_labels(labels, given.shape[0], given.shape[1], self.config.vocab_size)
        if not isinstance(logits_to_keep, int) or isinstance(logits_to_keep, bool):
            raise TypeError(
                f"logits_to_keep must be an int >= 0, got {type(logits_to_keep).__name__} {logits_to_keep!r}"
            )
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0, got {logits_to_keep}")
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            last_context_length=last_context_length,
            cache=cache,
            # logits of the last positions only: a long prefill then never holds [B, n, D] hidden states
            hidden_to_keep=logits_to_keep if labels is None and not output_hidden_states else 0,
            memory_override=memory_override,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)  # [B, n, V]

        loss = None
        if labels is not None:
            if logits_to_keep:
                raise ValueError(
                    "labels cannot be combined with logits_to_keep (the loss needs every position)"
                )
            shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
            shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
            loss = CrossEntropyLoss()(shift_logits, shift_labels)

        if not return_dict:
            out = tuple(v for v in (logits, outputs.cache, outputs.hidden_states) if v is not None)
            return (loss, *out) if loss is not None else out
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )

    def save_memory(self, cache: LongLlamaCache, path: str | os.PathLike) -> Path:
        """Save ``cache`` (every memory layer and the local cache) to directory ``path``, atomically.

        See :mod:`longllama.memory_io`. Returns the version folder written.
        """
        return memory_io.save_memory(
            cache, path, self.config, fingerprint=memory_io.weights_fingerprint(self.model), dtype=self.dtype
        )

    def load_memory(self, path: str | os.PathLike) -> LongLlamaCache:
        """A cache saved by :meth:`save_memory` with this model, on this model's device.

        Raises ``ValueError`` for anything that is not a good save of this model's memory (see
        :mod:`longllama.memory_io`): corrupt or foreign files, another architecture, weights, dtype or
        memory settings.
        """
        return memory_io.load_memory(
            path,
            self.config,
            device=self.device,
            fingerprint=memory_io.weights_fingerprint(self.model),
            dtype=self.dtype,
        )

    def prepare_inputs_for_generation(self, *args, **kwargs) -> dict:
        """transformers' inputs for one ``generate()`` step, without the cache when ``use_cache=False``.

        Without a local cache every step feeds the whole sequence again; the memory-only cache an earlier
        step returned must not be fed with it, or that memory would hold the sequence twice.
        """
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        if inputs.get("use_cache") is False:
            inputs.pop("cache", None)
            inputs.pop("past_key_values", None)
        return inputs

    def _prepare_position_ids_for_generation(
        self, inputs_tensor: torch.Tensor, model_kwargs: dict
    ) -> torch.Tensor:
        """Positions for ``generate()``: ``cumsum(attention_mask) - 1``, padding keeps -1 (as upstream).

        Without padding, None: the model then continues each call's positions from its local cache,
        which gives the same differences between positions (the only thing RoPE sees), and
        ``generate()`` does not grow a [B, prompt + step] position tensor with every new token (at 10M
        tokens one such copy takes ~45 ms per token).
        """
        attention_mask = model_kwargs.get("attention_mask")
        if attention_mask is None or (attention_mask.dim() == 2 and bool((attention_mask == 1).all())):
            return None
        if attention_mask.dim() == 2:
            return attention_mask.long().cumsum(-1) - 1
        return super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)


def resolve_cache(past_key_values: object, cache: object, config: LongLlamaConfig) -> LongLlamaCache | None:
    """The cache passed under either name, or None for none (or the empty cache ``generate()`` makes).

    Raises:
        ValueError: both names given with different objects, or a cache built for another layout.
        TypeError: something that is not a :class:`LongLlamaCache` (e.g. upstream's tuple format).
    """
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("pass the cache once, as past_key_values or as cache, not two different objects")
    given = cache if cache is not None else past_key_values
    if given is None:
        return None
    if isinstance(given, LongLlamaCache):
        if len(given.layers) != config.num_hidden_layers or given.memory_layers != sorted(
            set(config.mem_layers)
        ):
            raise ValueError(
                f"past_key_values was built for {len(given.layers)} layers with memory layers "
                f"{given.memory_layers}, but this model has {config.num_hidden_layers} layers with memory layers "
                f"{sorted(set(config.mem_layers))}"
            )
        _check_cache_backend(given, config)
        return given
    if isinstance(given, Cache) and given.get_seq_length() == 0:
        return None  # the empty DynamicCache that generate() creates before the first step
    raise TypeError(
        f"past_key_values must be a LongLlamaCache returned by a previous call of this model, got "
        f"{type(given).__name__}"
    )


def _memory_settings_differ(
    backend: str, index: str | None, dtype: str, config: LongLlamaConfig
) -> list[str]:
    """What of (``backend``, ``index``, ``dtype``) differs from the memory ``config`` describes."""
    differs = []
    if backend != config.mem_backend:
        differs.append(f"backend {backend!r} (this model's: {config.mem_backend!r})")
    elif config.mem_index is not None and index is not None and index != config.mem_index:
        differs.append(f"index {index!r} (this model's: {config.mem_index!r})")
    if dtype != config.mem_dtype:
        differs.append(f"mem_dtype {dtype!r} (this model's: {config.mem_dtype!r})")
    return differs


def _check_cache_backend(cache: LongLlamaCache, config: LongLlamaConfig) -> None:
    """Refuse a cache whose memories (or, before they are built, whose config) are not of the memory this
    model is configured with: its keys were stored, searched and rounded by another backend."""
    for i, layer in enumerate(cache.layers):
        mem = layer.memory
        if mem is None:
            continue
        dtype = str(mem.mem_dtype).removeprefix("torch.")
        differs = _memory_settings_differ(mem.name, getattr(mem, "index", None), dtype, config)
        if differs:
            raise ValueError(
                f"past_key_values holds a memory built with another backend in layer {i}: "
                f"{'; '.join(differs)}; start a new cache, or load the model with the cache's memory settings"
            )
    built = any(layer.memory is not None for layer in cache.layers)
    if not built and cache.config is not config:
        c = cache.config
        differs = _memory_settings_differ(c.mem_backend, c.mem_index, c.mem_dtype, config)
        if differs:
            raise ValueError(
                f"past_key_values was created for another memory: {'; '.join(differs)}; "
                "create it with this model's config"
            )


def check_input_ids(input_ids: object, vocab_size: int, device: torch.device) -> None:
    """``input_ids`` must be an integer tensor [B, n] of ids in ``[0, vocab_size)`` on ``device``."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be an integer torch.Tensor [B, n], got {type(input_ids).__name__}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, n], got shape {list(input_ids.shape)}")
    if input_ids.device != device:
        raise ValueError(f"input_ids are on {input_ids.device}, but the model is on {device}")
    if input_ids.numel():
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"input_ids must lie in [0, vocab_size={vocab_size}), got values in [{low}, {high}]"
            )


def check_inputs_embeds(inputs_embeds: object, hidden_size: int, weight: torch.Tensor) -> None:
    """``inputs_embeds`` must be a finite [B, n, hidden_size] tensor in the model's dtype and on its device."""
    if not isinstance(inputs_embeds, torch.Tensor):
        raise TypeError(f"inputs_embeds must be a torch.Tensor [B, n, D], got {type(inputs_embeds).__name__}")
    if inputs_embeds.dtype != weight.dtype:
        raise TypeError(
            f"inputs_embeds must have the model's dtype {weight.dtype}, got {inputs_embeds.dtype}"
        )
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden_size:
        raise ValueError(
            f"inputs_embeds must be [B, n, D={hidden_size}], got shape {list(inputs_embeds.shape)}"
        )
    if inputs_embeds.device != weight.device:
        raise ValueError(f"inputs_embeds are on {inputs_embeds.device}, but the model is on {weight.device}")
    if inputs_embeds.numel() and not bool(torch.isfinite(inputs_embeds).all()):
        raise ValueError("inputs_embeds contain NaN or inf")


def check_labels(labels: object, B: int, n: int, vocab_size: int) -> None:
    """``labels`` must be an integer tensor [B, n] of ids in ``[0, vocab_size)`` or -100 (ignored)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be an integer torch.Tensor [B, n], got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must hold integer token ids, got dtype {labels.dtype}")
    if tuple(labels.shape) != (B, n):
        raise ValueError(f"labels must be [B={B}, n={n}] like the input, got shape {list(labels.shape)}")
    bad = (labels != -100) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        raise ValueError(
            f"labels must lie in [0, vocab_size={vocab_size}) or be -100 (ignored), got {labels[bad][0].item()}"
        )


def real_token_mask(
    attention_mask: torch.Tensor | None, B: int, length: int, device: torch.device
) -> torch.Tensor:
    """[B, length] bool real-token flags from a 2-D attention mask (1 = real), cut to its last ``length`` columns.

    A value other than 1 counts as padding, as upstream's ``1 - mask`` expansion does.
    """
    if attention_mask is None:
        return torch.ones(B, length, dtype=torch.bool, device=device)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"attention_mask must be a torch.Tensor [B, local + n], got {type(attention_mask).__name__}"
        )
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be 2-D [B, local + n], got shape {list(attention_mask.shape)}")
    given = attention_mask[:, -length:]
    if tuple(given.shape) != (B, length):
        raise ValueError(
            f"attention_mask must cover the local cache and the input: expected at least [B={B}, {length}] "
            f"columns, got shape {list(attention_mask.shape)}"
        )
    return (given == 1).to(device)


def check_memory_settings(config: LongLlamaConfig) -> None:
    """Build one small backend from the config so bad backend settings fail at load, naming the fields."""
    try:
        create_memory(config, batch_size=1, device=torch.device(config.mem_device or "cpu"))
    except (ValueError, TypeError) as err:
        raise type(err)(
            f"invalid memory backend settings mem_backend={config.mem_backend!r}, mem_index={config.mem_index!r}, "
            f"mem_top_k={config.mem_top_k!r}, mem_index_params={config.mem_index_params!r}, "
            f"mem_dtype={config.mem_dtype!r}, mem_device={config.mem_device!r}: {err}"
        ) from err
