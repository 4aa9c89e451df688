"""`LongLlamaConfig`: every upstream LongLLaMA field, with its upstream meaning and default, plus the
settings of the pluggable memory backend.

The upstream fields (``mem_layers``, ``mem_dtype``, ``last_context_length``, ...) keep their names, defaults
and meanings, so an upstream ``config.json`` loads unchanged. ``max_position_embeddings`` does three jobs, as
upstream: it is the RoPE table size, the window length used to split long inputs, and the capacity of the
local (generation) cache.

Added for the memory backend (all optional; the defaults reproduce upstream's dense memory):

* ``mem_backend``: a name registered in :mod:`knn_memory` (``"exact"`` = upstream's dense memory,
  ``"faiss"`` = top-k retrieval through a Faiss index);
* ``mem_top_k``: entries retrieved per query (``None``: the backend's default; dense for ``"exact"``);
* ``mem_index``: the Faiss ``index_factory`` string (``"Flat"``, ``"HNSW32"``, ``"IVF1024,Flat"``, ...);
* ``mem_index_params``: further backend options (``{"nprobe": 32}``, ``{"efSearch": 64}``, ...);
* ``mem_device``: where memory lives (``None``: next to the activations).

Added for batches: ``window_alignment`` (``"start"``, upstream's split, or ``"end"``: window boundaries
counted back from the input's end, so left padding never moves them; see :func:`longllama.split_windows`).

Every field is checked when it is set (construction, ``from_pretrained`` keyword overrides, assignment),
and :meth:`LongLlamaConfig.check` runs the checks that involve several fields; a bad value raises
``ValueError``/``TypeError`` naming the field.
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import field
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import PreTrainedConfig

import knn_memory
from knn_memory.validate import (
    MAX_K,
    check_grouping,
    check_int,
    check_mem_dtype,
    dtype_name,
    is_int,
)
from longllama.windows import WINDOW_ALIGNMENTS

# save_pretrained writes this module beside the weights and points config.json's auto_map at it, so that
# transformers' Auto classes load the checkpoint with trust_remote_code=True without importing the library
REMOTE_CODE_FILE = "longllama_remote.py"
REMOTE_AUTO_MAP = {
    "AutoConfig": "longllama_remote.LongLlamaConfig",
    "AutoModel": "longllama_remote.LongLlamaModel",
    "AutoModelForCausalLM": "longllama_remote.LongLlamaForCausalLM",
}


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def _normalize_mem_layers(value: object) -> list[int]:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"mem_layers must be a list of layer ids, got {type(value).__name__} {value!r}")
    for layer_id in value:
        if not is_int(layer_id):
            raise TypeError(f"mem_layers must hold int layer ids, got {type(layer_id).__name__} {layer_id!r}")
    return list(value)


def _normalize_mem_dtype(value: object) -> str:
    return dtype_name(check_mem_dtype(value, "mem_dtype"))


def _normalize_grouping(value: object) -> tuple[int, int] | None:
    return check_grouping(value, "mem_attention_grouping")


def _normalize_mem_backend(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"mem_backend must be a str, got {type(value).__name__} {value!r}")
    known = knn_memory.available_backends()
    if value not in known:
        raise ValueError(f"mem_backend={value!r} is not a known memory backend; available: {known}")
    return value


def _normalize_mem_top_k(value: object) -> int | None:
    return None if value is None else check_int(value, "mem_top_k", 1, MAX_K)


def _normalize_mem_index(value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(
            f"mem_index must be None or a Faiss index_factory string, got {type(value).__name__} {value!r}"
        )
    return value


def _normalize_mem_index_params(value: object) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise TypeError(f"mem_index_params must be None or a dict of str keys, got {value!r}")
    return dict(value)


def _normalize_mem_device(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, torch.device):
        return str(value)
    if not isinstance(value, str):
        raise TypeError(
            f"mem_device must be None, a str or a torch.device, got {type(value).__name__} {value!r}"
        )
    try:
        torch.device(value)
    except RuntimeError as err:
        raise ValueError(f"mem_device={value!r} is not a torch device: {err}") from None
    return value


def _normalize_window_alignment(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(
            f"window_alignment must be one of {list(WINDOW_ALIGNMENTS)}, got {type(value).__name__} {value!r}"
        )
    if value not in WINDOW_ALIGNMENTS:
        raise ValueError(f"window_alignment must be one of {list(WINDOW_ALIGNMENTS)}, got {value!r}")
    return value


def _normalize_rope_scaling(value: object) -> None:
    if value is not None:
        raise ValueError(f"rope_scaling must be None: LongLLaMA does not use RoPE scaling, got {value!r}")
    return None


def _normalize_number(name: str, value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return value


def _warn_long_last_context(last_context_length: int, window: int) -> None:
    # one fixed warning location, so the same message is shown once however often the config is checked
    warnings.warn(
        f"last_context_length ({last_context_length}) is larger than the window max_position_embeddings "
        f"({window}): inputs longer than the window get a final window longer than the window, and the local "
        "cache exceeds its capacity until the next call flushes it (accepted, as upstream does)",
        UserWarning,
        stacklevel=1,
    )


# Field name -> function that checks one value and returns its normal form (e.g. a JSON list -> a tuple).
_FIELD_CHECKS = {
    "vocab_size": lambda v: check_int(v, "vocab_size"),
    "hidden_size": lambda v: check_int(v, "hidden_size"),
    "intermediate_size": lambda v: check_int(v, "intermediate_size"),
    "num_hidden_layers": lambda v: check_int(v, "num_hidden_layers"),
    "num_attention_heads": lambda v: check_int(v, "num_attention_heads"),
    "max_position_embeddings": lambda v: check_int(v, "max_position_embeddings"),
    "rms_norm_eps": lambda v: _normalize_number("rms_norm_eps", v),
    "rope_theta": lambda v: _normalize_number("rope_theta", v),
    "rope_scaling": _normalize_rope_scaling,
    "last_context_length": lambda v: check_int(v, "last_context_length"),
    "mem_layers": _normalize_mem_layers,
    "mem_positionals": lambda v: _bool("mem_positionals", v),
    "mem_dtype": _normalize_mem_dtype,
    "mem_attention_grouping": _normalize_grouping,
    "torch_attention": lambda v: _bool("torch_attention", v),
    "gradient_checkpoint_every_ith": lambda v: check_int(v, "gradient_checkpoint_every_ith"),
    "mem_backend": _normalize_mem_backend,
    "mem_top_k": _normalize_mem_top_k,
    "mem_index": _normalize_mem_index,
    "mem_index_params": _normalize_mem_index_params,
    "mem_device": _normalize_mem_device,
    "window_alignment": _normalize_window_alignment,
}


class LongLlamaConfig(PreTrainedConfig):
    r"""Configuration of a LongLLaMA (Focused Transformer) model.

    LLaMA fields (``vocab_size`` ... ``tie_word_embeddings``) are as in LLaMA; LongLLaMA uses plain
    multi-head attention (``head_dim = hidden_size // num_attention_heads``) and no RoPE scaling.

    Args:
        max_position_embeddings: the window length W: RoPE table size, the length of the chunks a long
            input is split into, and the capacity of the local cache (a call that would overflow it first
            moves the whole local cache into memory).
        rope_theta: RoPE base (10000; LongLLaMA-Code-7B uses 1e6).
        last_context_length: how many of an input's last tokens stay out of memory (the final window).
            Can be overridden per call. Larger than W is accepted, with a warning, as upstream does.
        mem_layers: ids of the layers that attend to memory.
        mem_positionals: False removes RoPE entirely from memory layers (local queries/keys and memory).
        mem_dtype: storage dtype of memory keys and values (``"bfloat16"``, ``"float16"``, ``"float32"``).
        mem_attention_grouping: ``(h, q)``: memory layers compute attention in blocks of at most h heads x
            q queries (bounds peak memory; the result is the same).
        torch_attention: use ``F.scaled_dot_product_attention`` where there is no memory.
        gradient_checkpoint_every_ith: with gradient checkpointing on, checkpoint the non-memory layers
            whose index is a multiple of this.
        mem_backend: memory backend name (see :func:`knn_memory.available_backends`).
        mem_top_k: memory entries retrieved per query (None: backend default; dense for ``"exact"``).
        mem_index: Faiss ``index_factory`` string for the ``"faiss"`` backend (None: ``"Flat"``).
        mem_index_params: extra backend options, e.g. ``{"nprobe": 32}``.
        mem_device: device for the memory (None: the activations' device).
        window_alignment: where a long input's window boundaries lie: ``"start"`` (upstream) at multiples
            of W from the input's start, ``"end"`` at multiples of W counted back from its end (the final
            window is the last ``last_context_length`` tokens either way). With ``"end"`` a left-padded
            row is split exactly as it is alone, so a left-padded batch gives each row's unbatched result.
    """

    model_type: ClassVar[str] = "longllama"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["cache"]

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    last_context_length: int = 1024
    mem_layers: list[int] = field(default_factory=list)
    mem_positionals: bool = True
    mem_dtype: str = "bfloat16"
    mem_attention_grouping: tuple[int, int] | None = None
    torch_attention: bool = False
    gradient_checkpoint_every_ith: int = 1
    mem_backend: str = "exact"
    mem_top_k: int | None = None
    mem_index: str | None = None
    mem_index_params: dict[str, Any] | None = None
    mem_device: str | None = None
    window_alignment: str = "start"

    def __setattr__(self, key: str, value: Any) -> None:
        check = _FIELD_CHECKS.get(key)
        if check is not None:
            value = check(value)
        super().__setattr__(key, value)

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self.check()

    def check(self) -> None:
        """Checks that involve several fields (single fields are checked when set).

        Raises:
            ValueError: a memory layer id outside ``[0, num_hidden_layers)``, or ``hidden_size`` not a
                multiple of ``num_attention_heads``.
        """
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )
        for layer_id in self.mem_layers:
            if not 0 <= layer_id < self.num_hidden_layers:
                raise ValueError(
                    f"mem_layers holds layer id {layer_id}, but ids must lie in [0, {self.num_hidden_layers}) "
                    f"(num_hidden_layers={self.num_hidden_layers}); got mem_layers={self.mem_layers}"
                )
        if self.last_context_length > self.max_position_embeddings:
            _warn_long_last_context(self.last_context_length, self.max_position_embeddings)

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """Write ``config.json`` with an ``auto_map`` and the remote-code module it names, beside it.

        The module (``longllama_remote.py``) only imports this library's classes, so that
        ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` loads the checkpoint in an
        interpreter that never imported ``longllama`` (the library must be installed). The ``auto_map``
        entries of another implementation (e.g. an upstream checkpoint's) are replaced.
        """
        self.auto_map = {**(getattr(self, "auto_map", None) or {}), **REMOTE_AUTO_MAP}
        os.makedirs(save_directory, exist_ok=True)
        shutil.copyfile(Path(__file__).with_name(REMOTE_CODE_FILE), Path(save_directory) / REMOTE_CODE_FILE)
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoConfig") -> None:
        """Does nothing: ``save_pretrained`` always writes the ``auto_map`` and its remote-code module.

        transformers calls this on classes it loads as remote code; it would make later saves copy this
        library's source files beside the weights instead of the one-import module.
        """

    def memory_backend_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`knn_memory.create_backend` besides the geometry and the device."""
        return {
            "mem_dtype": self.mem_dtype,
            "top_k": self.mem_top_k,
            "index": self.mem_index,
            **(self.mem_index_params or {}),
        }
