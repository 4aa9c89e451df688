"""Faiss, and only Faiss: index specs, CPU/GPU placement, streaming training, head fan-out.

Knows nothing of attention, heads or models. Every public call validates its input first, since a
Faiss assertion aborts the process instead of raising.
"""

from indexes.batched import add_many, all_compiled, search_many
from indexes.chunked import ChunkedTensor
from indexes.gpu import MAX_GPU_K, MAX_GPU_NPROBE, faiss_has_gpu, parse_device
from indexes.growth import AUTO, GrowthPolicy
from indexes.protocol import KeyIndex, check_key_index, index_class, index_kind, register_index
from indexes.spec import IndexSpec, parse_spec
from indexes.streaming import StreamingIndex, check_k, pad_to_k
from indexes.threads import default_threads, faiss_threads, fan_out, fork_safe_context, set_faiss_threads

__all__ = [
    "AUTO",
    "MAX_GPU_K",
    "MAX_GPU_NPROBE",
    "ChunkedTensor",
    "GrowthPolicy",
    "IndexSpec",
    "KeyIndex",
    "StreamingIndex",
    "add_many",
    "all_compiled",
    "check_k",
    "check_key_index",
    "default_threads",
    "faiss_has_gpu",
    "faiss_threads",
    "fan_out",
    "fork_safe_context",
    "index_class",
    "index_kind",
    "pad_to_k",
    "parse_device",
    "parse_spec",
    "register_index",
    "search_many",
    "set_faiss_threads",
]
