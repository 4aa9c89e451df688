"""`LongLlamaCache`: the per-sequence state of a LongLLaMA model, returned as ``past_key_values``.

It holds, for every decoder layer, the *local cache* (un-rotated keys and values of the most recent tokens)
and, for every memory layer, one :class:`knn_memory.MemoryBackend` with the (key, value) pairs of all earlier
context windows. The absolute position ids of the local cache are shared by all layers (every layer caches
the same tokens). Memory lives here, not in the modules, so one model can serve many sequences and a cache
can be carried into the next call to continue a document.

It is a ``transformers.Cache``, so ``generate()`` carries it between steps and beam search reorders it
(memory included, through ``MemoryBackend.reorder``). It cannot be cropped: once a token has been flushed
into memory there is no way back, so assisted/speculative decoding is refused.

Many questions about one document: :meth:`LongLlamaCache.checkpoint` after the prefill and
:meth:`LongLlamaCache.rollback` after each question (or ``with cache.question():``) return the cache to
the prefilled state, so each question sees the document and none of the other questions. The memories
roll back by forgetting what was added (``MemoryBackend.checkpoint``), not by copying the document.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

import knn_memory
from longllama.configuration import LongLlamaConfig


class LongLlamaLayerCache(CacheLayerMixin):
    """Local cache of one decoder layer (keys/values ``[B, H, n, d]``, keys un-rotated), plus its memory."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, is_memory_layer: bool) -> None:
        super().__init__()
        self.is_memory_layer = is_memory_layer
        self.memory: knn_memory.MemoryBackend | None = None

    # ------------------------------------------------------------------ local cache
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new keys/values [B, H, n, d]; returns the whole local keys and values."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values

    def set_local(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the local cache by ``keys``/``values`` [B, H, n, d] (un-rotated)."""
        self.device = keys.device
        self.keys, self.values = keys, values
        self.is_initialized = True

    def clear_local(self) -> None:
        """Forget the local cache (the memory is kept)."""
        self.keys = self.values = None
        self.is_initialized = False

    def get_seq_length(self) -> int:
        """Length of the local cache."""
        return 0 if self.keys is None else self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    # ------------------------------------------------------------------ cache-wide operations
    def reset(self) -> None:
        self.clear_local()
        if self.memory is not None:
            self.memory.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep batch rows ``beam_idx`` [B'] (rows may repeat), local cache and memory alike."""
        if self.keys is not None:
            self.keys = self.keys.index_select(0, beam_idx.to(self.keys.device))
            self.values = self.values.index_select(0, beam_idx.to(self.values.device))
        if self.memory is not None:
            self.memory.reorder(beam_idx.to(torch.int64))

    def crop(self, tokens_to_remove: int) -> None:
        _refuse_crop(tokens_to_remove)


def _refuse_crop(tokens_to_remove: int) -> None:
    """Both cache levels refuse ``crop`` (transformers' assisted decoding asks for it) the same way."""
    raise ValueError(
        "a LongLLaMA cache cannot be cropped: tokens flushed into memory cannot be taken back "
        f"(asked to remove {tokens_to_remove} tokens)"
    )


class LongLlamaCache(Cache):
    """Local caches and memories of a LongLLaMA model for one batch of sequences.

    Created empty from the config; the memory backends are built on the first forward call, when the batch
    size and device are known, with ``knn_memory.create_backend(config.mem_backend, ...)``.

    Args:
        config: the model's :class:`~longllama.configuration.LongLlamaConfig`.
    """

    def __init__(self, config: LongLlamaConfig) -> None:
        layers = [LongLlamaLayerCache(i in config.mem_layers) for i in range(config.num_hidden_layers)]
        super().__init__(layers=layers)
        self.config = config
        self.positions: torch.Tensor | None = None  # [B, local] absolute position ids of the local cache
        self.seen_tokens = 0
        self._batch_size: int | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(batch_size={self._batch_size}, tokens={self.seen_tokens}, "
            f"local={self.local_length}, memory={self.memory_lengths()}, backend={self.config.mem_backend!r})"
        )

    # ------------------------------------------------------------------ queries
    @property
    def local_length(self) -> int:
        """Number of tokens in the local cache (the same in every layer)."""
        return 0 if self.positions is None else self.positions.shape[-1]

    @property
    def batch_size(self) -> int:
        """Batch size the cache was built for, or -1 before the first forward call."""
        return -1 if self._batch_size is None else self._batch_size

    @property
    def memory_layers(self) -> list[int]:
        """Ids of the layers that have a memory."""
        return [i for i, layer in enumerate(self.layers) if layer.is_memory_layer]

    def memory(self, layer_idx: int) -> knn_memory.MemoryBackend | None:
        """The memory backend of layer ``layer_idx`` (None for a non-memory layer or before the first call)."""
        return self.layers[layer_idx].memory

    def memory_lengths(self) -> list[int]:
        """Memory entries per layer, one number per decoder layer (0 for non-memory layers).

        Each number is ``len(backend)``: the most real (non-padding) entries held by any batch row.
        """
        return [0 if layer.memory is None else len(layer.memory) for layer in self.layers]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Total number of tokens processed so far (local cache and memory together).

        ``generate()`` uses it to find the new tokens of its input.
        """
        return self.seen_tokens

    # ------------------------------------------------------------------ used by the model
    def prepare(self, batch_size: int, device: torch.device) -> None:
        """Build the memory backends for ``batch_size`` rows (first call) or check the batch size (later)."""
        if self._batch_size is not None:
            if batch_size != self._batch_size:
                raise ValueError(
                    f"past_key_values holds a cache for batch size {self._batch_size}, but the input has batch "
                    f"size {batch_size}"
                )
            return
        config = self.config
        mem_device = torch.device(config.mem_device) if config.mem_device is not None else device
        for layer in self.layers:
            if layer.is_memory_layer:
                layer.memory = create_memory(config, batch_size=batch_size, device=mem_device)
        self._batch_size = batch_size

    def flush_local_into_memory(self, mask: torch.Tensor) -> None:
        """Move the whole local cache into memory (memory layers) or drop it (other layers).

        Args:
            mask: [B, local] bool, True where the cached token is a real token (False: padding).
        """
        for layer in self.layers:
            if layer.memory is not None and layer.keys is not None:
                add_to_memory(layer.memory, layer.keys, layer.values, mask)
            layer.clear_local()
        self.positions = None

    # ------------------------------------------------------------------ many questions, one prefill
    def checkpoint(self) -> CacheCheckpoint:
        """A token of the cache now (e.g. right after a document's prefill) for :meth:`rollback`.

        It holds a copy of the local caches (at most one window per layer) and their positions, the
        token count, and one ``MemoryBackend.checkpoint()`` per memory: lengths and references for the
        built-in backends, never a copy of the memory where a backend can avoid it (a Faiss index
        that cannot remove keys, e.g. HNSW, is the exception: it is cloned). One token serves any
        number of rollbacks; rolling back to it makes tokens taken after it invalid.
        """
        layers = tuple(
            (None, None) if layer.keys is None else (layer.keys.clone(), layer.values.clone())
            for layer in self.layers
        )
        memories = tuple(None if layer.memory is None else layer.memory.checkpoint() for layer in self.layers)
        positions = None if self.positions is None else self.positions.clone()
        return CacheCheckpoint(self, layers, memories, positions, self.seen_tokens, self._batch_size)

    def rollback(self, checkpoint: CacheCheckpoint) -> None:
        """Return exactly to the state of :meth:`checkpoint` ``checkpoint``: local caches, positions, token
        count, batch size and memories (what was added since is forgotten, reorders are undone)."""
        if not isinstance(checkpoint, CacheCheckpoint):
            raise TypeError(
                f"checkpoint must be a CacheCheckpoint from this cache's checkpoint(), got {type(checkpoint).__name__}"
            )
        if checkpoint.cache is not self:
            raise ValueError("checkpoint was taken of another LongLlamaCache")
        for layer, (keys, values), memory in zip(
            self.layers, checkpoint.layers, checkpoint.memories, strict=True
        ):
            if keys is None:
                layer.clear_local()
            else:  # a copy: the token stays intact for the next rollback
                layer.set_local(keys.clone(), values.clone())
            if memory is None:
                layer.memory = None  # built after the checkpoint: the checkpoint had none
            else:
                layer.memory = memory.memory
                layer.memory.rollback(memory)
        self.positions = None if checkpoint.positions is None else checkpoint.positions.clone()
        self.seen_tokens = checkpoint.seen_tokens
        self._batch_size = checkpoint.batch_size

    @contextlib.contextmanager
    def question(self) -> Iterator[LongLlamaCache]:
        """``with cache.question():`` roll the cache back to its state at entry on exit (errors too)."""
        token = self.checkpoint()
        try:
            yield self
        finally:
            self.rollback(token)

    # ------------------------------------------------------------------ transformers.Cache API
    def reset(self) -> None:
        super().reset()
        self.positions = None
        self.seen_tokens = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch for beam search: row i becomes old row ``beam_idx[i]`` (memory included)."""
        super().reorder_cache(beam_idx)
        if self.positions is not None:
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))
        if self._batch_size is not None:
            self._batch_size = int(beam_idx.shape[0])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._batch_size is not None:
            self.reorder_cache(torch.arange(self._batch_size).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._batch_size is not None:
            self.reorder_cache(torch.arange(self._batch_size)[indices.cpu()])

    def crop(self, tokens_to_remove: int) -> None:
        _refuse_crop(tokens_to_remove)

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False


@dataclass(frozen=True, eq=False)
class CacheCheckpoint:
    """What :meth:`LongLlamaCache.checkpoint` returns (see there)."""

    cache: LongLlamaCache
    layers: tuple[tuple[torch.Tensor | None, torch.Tensor | None], ...]  # local keys, values [B, H, n, d]
    memories: tuple[knn_memory.MemoryCheckpoint | None, ...]  # one per layer (None: no memory)
    positions: torch.Tensor | None  # [B, local]
    seen_tokens: int
    batch_size: int | None


def create_memory(config: LongLlamaConfig, batch_size: int, device: torch.device) -> knn_memory.MemoryBackend:
    """A memory backend for one memory layer, as the config describes it."""
    return knn_memory.create_backend(
        config.mem_backend,
        num_heads=config.num_attention_heads,
        head_dim=config.hidden_size // config.num_attention_heads,
        batch_size=batch_size,
        device=device,
        **config.memory_backend_kwargs(),
    )


def add_to_memory(
    memory: knn_memory.MemoryBackend, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
) -> None:
    """Append un-rotated ``keys``/``values`` [B, H, n, d] with their ``mask`` [B, n] (True = real token)."""
    device = memory.device
    memory.add(keys.to(device), values.to(device), mask=mask.to(device))
