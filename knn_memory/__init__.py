"""kNN memory for long-context transformers.

A memory backend holds, per memory layer, the (key, value) pairs of every earlier context window,
one store per batch row and head, and answers each query with memory entries: all of them (the
``"exact"`` backend, upstream LongLLaMA's dense memory) or its top-k (the ``"faiss"`` backend).
:func:`memory_attention` merges them with the local keys in one softmax.

    mem = knn_memory.create_backend("faiss", num_heads=32, head_dim=100, index="IVF1024,Flat", nprobe=32)
    mem.add(keys, values, mask)        # [B, H, n, d], mask [B, n]
    hits = mem.search(queries)         # [B, H, q, d] -> MemoryHits
"""

# Faiss is imported before torch on purpose (its OpenMP runtime first; see indexes/threads.py).
import indexes  # noqa: F401  isort: skip

from knn_memory.agreement import AgreementReport, compare_backends, measure_agreement
from knn_memory.attention import memory_attention, memory_attention_windows
from knn_memory.backend import MemoryBackend, MemoryCheckpoint, resolve_dtype
from knn_memory.backends.exact import ExactBackend
from knn_memory.backends.faiss_index import FaissBackend, search_knobs
from knn_memory.hits import MemoryHits
from knn_memory.persistence import load_backend, save_backend
from knn_memory.registry import available_backends, backend_class, create_backend, register_backend
from knn_memory.threads import set_threads

__all__ = [
    "AgreementReport",
    "ExactBackend",
    "FaissBackend",
    "MemoryBackend",
    "MemoryCheckpoint",
    "MemoryHits",
    "available_backends",
    "backend_class",
    "compare_backends",
    "create_backend",
    "load_backend",
    "measure_agreement",
    "memory_attention",
    "memory_attention_windows",
    "register_backend",
    "resolve_dtype",
    "save_backend",
    "search_knobs",
    "set_threads",
]
