"""Saving a LongLLaMA cache to a directory and loading it back: encode a long context once, ask many times.

    out = model(context_ids)                        # minutes for a million tokens
    model.save_memory(out.cache, "book.memory")
    cache = model.load_memory("book.memory")        # later, in another process
    answer = model(question_ids, past_key_values=cache)

What is saved (through :mod:`knn_memory.persistence`, so writes are atomic and every file checksummed):

* ``memory-<layer>.pt``: the state of every memory layer's backend (keys or Faiss index with its
  training, values, padding flags), exactly as :meth:`knn_memory.MemoryBackend.state` gives it;
* ``cache.pt``: the local cache of every layer (un-rotated keys and values ``[B, H, n, d]``), the
  positions of the local tokens ``[B, n]``, the number of tokens seen, the batch size, the activation
  dtype, a fingerprint of the model's weights, and the config fields listed below.

Loading refuses, with a ``ValueError`` naming what differs:

* a model whose architecture differs (``MODEL_FIELDS``: vocabulary, sizes, layers, memory layers,
  ``mem_dtype``, ``mem_positionals``, window length, RoPE base...), or whose weights differ (the
  fingerprint), or that runs in another dtype: the keys and values were computed by that model and
  mean nothing to another one;
* a model whose memory settings differ (``mem_backend``, ``mem_index``, ``mem_top_k`` and
  ``mem_index_params``, compared after the backend's own defaults are applied, so ``mem_index=None``
  equals ``"Flat"``). The memory is not rebuilt with other settings: a loaded memory answers exactly as
  the saved one did, and an IVF index keeps its training. To use other settings, load the model with the
  saved ones (``from_pretrained(path, mem_top_k=...)``) or encode the context again. Each backend
  declares which of its settings must match (:meth:`knn_memory.MemoryBackend.matching_config`): e.g.
  ``workers`` (a thread count) may differ, and ``mem_device`` (where the memory is placed on load).

Settings that only shape the computation (``mem_attention_grouping``, ``torch_attention``,
``last_context_length``) may differ.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

import knn_memory
from knn_memory.persistence import (
    CACHE_FORMAT,
    FORMAT_VERSION,
    own_part,
    read_version,
    saved_in_parts,
    write_parts,
    write_version,
)
from knn_memory.storage import compact
from knn_memory.validate import check_tensor_fits
from longllama.cache import LongLlamaCache, create_memory
from longllama.configuration import LongLlamaConfig

FORMAT = CACHE_FORMAT
CACHE_FILE = "cache.pt"

# Config fields that shape the keys and values in a cache: they must be equal to load it.
MODEL_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "hidden_act",
    "rms_norm_eps",
    "max_position_embeddings",
    "rope_theta",
    "mem_layers",
    "mem_dtype",
    "mem_positionals",
)
# Memory settings, recorded as given; compared through the backend config they resolve to.
MEMORY_FIELDS = ("mem_backend", "mem_index", "mem_top_k", "mem_index_params")
_BACKEND_KEY_FIELDS = {"top_k": "mem_top_k", "index": "mem_index", "mem_dtype": "mem_dtype"}


def memory_file(layer_idx: int) -> str:
    """Name of the file holding the memory of layer ``layer_idx``."""
    return f"memory-{layer_idx}.pt"


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tensor_digest(p: torch.Tensor) -> bytes:
    data = p.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(data.view(torch.uint8).numpy() if data.numel() else b"").digest()


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 over every parameter's name, shape, dtype and every byte of its values.

    Each tensor is hashed on its own (threads: hashlib releases the GIL), then the digests together;
    about 1.8 GB/s per core here, so a 3B-parameter bf16 model (6 GB) takes ~3 s on one core. The
    result is remembered per module until a parameter is replaced or changed in place (torch's
    version counter), so saving and loading memories does not hash the model again.
    """
    params = sorted(module.named_parameters(), key=lambda item: item[0])
    key = tuple((name, p.data_ptr(), p._version, tuple(p.shape), p.dtype) for name, p in params)
    cached = _FINGERPRINTS.get(module)
    if cached is not None and cached[0] == key:
        return cached[1]
    with ThreadPoolExecutor(max_workers=max(1, min(len(params), os.cpu_count() or 1))) as pool:
        digests = list(pool.map(lambda item: _tensor_digest(item[1]), params))
    h = hashlib.sha256()
    for (name, p), digest in zip(params, digests, strict=True):
        h.update(f"{name}:{list(p.shape)}:{p.dtype};".encode())
        h.update(digest)
    fingerprint = h.hexdigest()
    _FINGERPRINTS[module] = (key, fingerprint)
    return fingerprint


def _config_fields(config: LongLlamaConfig) -> dict:
    return {f: getattr(config, f) for f in (*MODEL_FIELDS, *MEMORY_FIELDS)}


def _same(a: object, b: object) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def _check_cache(cache: object, config: LongLlamaConfig) -> LongLlamaCache:
    if not isinstance(cache, LongLlamaCache):
        raise TypeError(f"cache must be a LongLlamaCache returned by the model, got {type(cache).__name__}")
    if not isinstance(config, LongLlamaConfig):
        raise TypeError(f"config must be a LongLlamaConfig, got {type(config).__name__}")
    if len(cache.layers) != config.num_hidden_layers or cache.memory_layers != sorted(set(config.mem_layers)):
        raise ValueError(
            f"cache was built for {len(cache.layers)} layers with memory layers {cache.memory_layers}, but the "
            f"config has {config.num_hidden_layers} layers with memory layers {sorted(set(config.mem_layers))}"
        )
    if cache.batch_size < 1:
        raise ValueError("cache is empty (the model has not run with it yet): there is no memory to save")
    return cache


def save_memory(
    cache: LongLlamaCache,
    path: str | os.PathLike,
    config: LongLlamaConfig,
    *,
    fingerprint: str | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``cache`` (every memory layer and the local cache) to directory ``path``, atomically.

    Saving again to the same path replaces the previous memory; a save that fails or is killed leaves the
    previous one loadable. Memory layers are serialised one at a time, so a save holds at most one layer's
    copy in memory besides the cache itself.

    Args:
        cache: the cache a model call returned (``out.cache``).
        path: a directory (created if missing; an existing one must hold a saved memory or be empty).
        config: the model's config.
        fingerprint: :func:`weights_fingerprint` of the model, checked on load (None: not recorded).
        dtype: the model's activation dtype, checked on load (None: not recorded).

    Returns:
        The version folder written.

    Raises:
        TypeError: ``cache`` is not a :class:`~longllama.cache.LongLlamaCache`.
        ValueError: the cache does not match ``config`` or is empty; ``path`` is a file or a foreign directory.
        OSError: the write failed (nothing half-written is left).
    """
    cache = _check_cache(cache, config)
    local = []
    for layer in cache.layers:
        if layer.keys is None:
            local.append(None)
        else:
            local.append((compact(layer.keys.cpu()), compact(layer.values.cpu())))
    memory_layers = cache.memory_layers
    state = {
        "config": _config_fields(config),
        "fingerprint": fingerprint,
        "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
        "batch_size": cache.batch_size,
        "seen_tokens": int(cache.seen_tokens),
        "positions": None if cache.positions is None else compact(cache.positions.cpu()),
        "local": local,
        "backends": {str(i): cache.memory(i).name for i in memory_layers},
    }
    files: dict[str, object] = {CACHE_FILE: state}
    for i in memory_layers:
        files[memory_file(i)] = cache.memory(i).state  # called when its file is written
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_type": config.model_type,
        "tokens": int(cache.seen_tokens),
        "batch_size": cache.batch_size,
        "memory_layers": memory_layers,
        "mem_backend": config.mem_backend,
        "memory_lengths": cache.memory_lengths(),
    }
    sharded = [m for m in (cache.memory(i) for i in memory_layers) if getattr(m, "SHARDED", False)]
    if not sharded:
        return write_version(path, files, meta)
    # a memory spread over processes: every rank writes its own cache as one part
    mem = sharded[0]
    return write_parts(path, files, meta, rank=mem.rank, world_size=mem.world_size, barrier=mem.group.barrier)


def _check_config(saved: dict, config: LongLlamaConfig, path: object) -> None:
    wrong = []
    for name in MODEL_FIELDS:
        ours = getattr(config, name)
        theirs = saved.get(name)
        if name == "mem_layers":
            ours = sorted(set(ours))
            theirs = sorted(set(theirs)) if isinstance(theirs, (list, tuple)) else theirs
        if not _same(ours, theirs):
            wrong.append(f"{name}={theirs!r} (this model: {ours!r})")
    if wrong:
        raise ValueError(f"memory at {str(path)!r} was encoded by a different model: " + "; ".join(wrong))


def _check_backend_settings(
    backend: knn_memory.MemoryBackend,
    saved_fields: dict,
    config: LongLlamaConfig,
    layer_idx: int,
    path: object,
) -> None:
    """The loaded backend must be what ``config`` would build (its defaults applied), bar free entries."""
    want = create_memory(config, batch_size=1, device=torch.device("cpu"))
    if backend.name != want.name:
        raise ValueError(
            f"memory at {str(path)!r} uses mem_backend={backend.name!r} but this model has "
            f"mem_backend={want.name!r}; load the model with the saved memory settings "
            f"({_describe(saved_fields)}) or encode the context again"
        )
    # each backend says which of its settings a saved memory must share (MemoryBackend.matching_config)
    ours, theirs = want.matching_config(), backend.matching_config()
    wrong = []
    for key in sorted(set(ours) | set(theirs)):
        if ours.get(key) == theirs.get(key):
            continue
        field = _BACKEND_KEY_FIELDS.get(key, f"mem_index_params[{key!r}]")
        wrong.append(f"{field}: saved {theirs.get(key)!r}, this model {ours.get(key)!r}")
    if wrong:
        raise ValueError(
            f"memory at {str(path)!r} (layer {layer_idx}) was built with other memory settings: "
            + "; ".join(wrong)
            + f". Load the model with the saved settings ({_describe(saved_fields)}) or encode the context again"
        )


def _describe(fields: dict) -> str:
    return ", ".join(f"{name}={fields.get(name)!r}" for name in MEMORY_FIELDS)


def load_memory(
    path: str | os.PathLike,
    config: LongLlamaConfig,
    device: str | torch.device | None = None,
    *,
    fingerprint: str | None = None,
    dtype: torch.dtype | None = None,
) -> LongLlamaCache:
    """Load a cache written by :func:`save_memory`, verifying checksums, format, shapes and the model.

    Args:
        path: the directory given to :func:`save_memory`.
        config: the config of the model that will use the cache.
        device: where the local cache goes (default CPU); the memory goes to ``config.mem_device`` if set,
            else here too.
        fingerprint: :func:`weights_fingerprint` of the model; refused if it differs from the saved one.
        dtype: the model's activation dtype; refused if it differs from the saved one.

    Returns:
        A :class:`~longllama.cache.LongLlamaCache` equal to the saved one, to pass as ``past_key_values``.

    Raises:
        ValueError: not a saved cache (missing, foreign, truncated or corrupt files, another format or
            version), or saved by a model that differs from this one (field named), or with other memory
            settings, or for another dtype or weights.
        TypeError: ``config`` is not a :class:`~longllama.configuration.LongLlamaConfig`.
    """
    if not isinstance(config, LongLlamaConfig):
        raise TypeError(f"config must be a LongLlamaConfig, got {type(config).__name__}")
    device = torch.device("cpu") if device is None else torch.device(device)
    if saved_in_parts(path):  # saved by every rank of a sharded memory: this process reads its own part
        path = own_part(path, FORMAT)
    _, files = read_version(path, FORMAT)
    state = files.get(CACHE_FILE)
    keys = ("config", "fingerprint", "dtype", "batch_size", "seen_tokens", "positions", "local", "backends")
    if not isinstance(state, dict) or any(k not in state for k in keys):
        raise ValueError(f"path {str(path)!r}: {CACHE_FILE} does not hold a saved cache")
    saved_config = state["config"]
    if not isinstance(saved_config, dict):
        raise ValueError(f"path {str(path)!r}: {CACHE_FILE} holds no model config")
    _check_config(saved_config, config, path)
    if (
        dtype is not None
        and state["dtype"] is not None
        and state["dtype"] != str(dtype).removeprefix("torch.")
    ):
        raise ValueError(
            f"memory at {str(path)!r} was encoded in torch_dtype={state['dtype']}, but this model runs in "
            f"{dtype}; load the model with torch_dtype=torch.{state['dtype']}"
        )
    if fingerprint is not None and state["fingerprint"] is not None and state["fingerprint"] != fingerprint:
        raise ValueError(
            f"memory at {str(path)!r} was encoded by a model with other weights (weights fingerprint differs); "
            "load it into the checkpoint that encoded it"
        )
    B = state["batch_size"]
    if not isinstance(B, int) or B < 1:
        raise ValueError(f"path {str(path)!r}: saved batch size {B!r} is not a positive int")
    H = config.num_attention_heads
    d = config.hidden_size // H
    cache = LongLlamaCache(config)
    mem_device = torch.device(config.mem_device) if config.mem_device is not None else device
    backends = state["backends"]
    if not isinstance(backends, dict) or sorted(backends) != sorted(str(i) for i in cache.memory_layers):
        raise ValueError(f"path {str(path)!r}: saved memory layers {backends!r} do not match the config")
    for i in cache.memory_layers:
        mstate = files.get(memory_file(i))
        if not isinstance(mstate, dict) or "config" not in mstate:
            raise ValueError(f"path {str(path)!r}: {memory_file(i)} does not hold a backend state")
        cls = knn_memory.backend_class(backends[str(i)])
        try:
            backend = cls.from_state(mstate, device=mem_device)
        except (KeyError, TypeError, IndexError, AttributeError) as err:
            raise ValueError(
                f"path {str(path)!r}: {memory_file(i)} does not match backend {cls.name!r} ({err})"
            ) from None
        if (backend.batch_size, backend.num_heads, backend.head_dim) != (B, H, d):
            raise ValueError(
                f"path {str(path)!r}: memory of layer {i} is [B={backend.batch_size}, H={backend.num_heads}, "
                f"d={backend.head_dim}], expected [B={B}, H={H}, d={d}]"
            )
        _check_backend_settings(backend, saved_config, config, i, path)
        cache.layers[i].memory = backend

    positions, local = state["positions"], state["local"]
    if not isinstance(local, list) or len(local) != config.num_hidden_layers:
        raise ValueError(
            f"path {str(path)!r}: saved local cache does not have {config.num_hidden_layers} layers"
        )
    n = None
    if positions is not None:
        if not isinstance(positions, torch.Tensor) or positions.dim() != 2 or positions.shape[0] != B:
            raise ValueError(f"path {str(path)!r}: saved positions are not [B={B}, n]")
        n = positions.shape[1]
        cache.positions = positions.to(device=device, dtype=torch.long, copy=True)
    for i, entry in enumerate(local):
        if entry is None:
            continue
        k, v = entry if isinstance(entry, (list, tuple)) and len(entry) == 2 else (None, None)
        for name, t in (("keys", k), ("values", v)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, H, n if n is not None else -1, d):
                raise ValueError(
                    f"path {str(path)!r}: saved local {name} of layer {i} have shape "
                    f"{list(getattr(t, 'shape', []))}, expected [B={B}, H={H}, n={n}, d={d}]"
                )
            if not t.is_floating_point():
                raise ValueError(f"path {str(path)!r}: saved local {name} of layer {i} have dtype {t.dtype}")
            try:  # NaN, inf, or values the model's dtype cannot hold would poison every later answer
                check_tensor_fits(t, f"saved local {name} of layer {i}", dtype or t.dtype)
            except ValueError as err:
                raise ValueError(f"path {str(path)!r}: {err}") from None
        cache.layers[i].set_local(k.to(device, copy=True), v.to(device, copy=True))
    seen = state["seen_tokens"]
    if not isinstance(seen, int) or seen < 0:
        raise ValueError(f"path {str(path)!r}: saved token count {seen!r} is not an int >= 0")
    cache.seen_tokens = seen
    cache._batch_size = B
    return cache
