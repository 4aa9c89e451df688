"""Keys, values and queries for the benchmarks: synthetic, or captured from a LongLLaMA checkpoint.

Source names:

* ``"clustered"``, ``"gaussian"``, ``"attention"``: :func:`knn_memory.synthetic.make_memory`
  (``"attention"``: queries and keys from the same latents through different projections, the
  query/key shift of real attention);
* ``"captured:<file.pt>"``: keys, values and queries recorded from a real model's memory layers by
  :mod:`benchmarks.capture`. Every (memory layer, head) pair of the capture is one benchmark head; the
  keys are the first ``n_keys`` memory entries in token order, the queries the last ``n_queries``
  recorded (rotated) queries, i.e. those that searched the largest memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from knn_memory.synthetic import SOURCES as SYNTHETIC_SOURCES
from knn_memory.synthetic import make_memory

CAPTURED_PREFIX = "captured:"
CAPTURE_FORMAT = "knn-memory-capture/1"


class SourceUnavailable(ValueError):
    """The source cannot supply the requested geometry (e.g. a capture holds fewer keys)."""


@dataclass
class MemoryData:
    """Keys and values [1, H, n_keys + extra, d] and queries [1, H, n_queries, d], float32."""

    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor

    @property
    def num_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def head_dim(self) -> int:
        return self.keys.shape[3]


def is_captured(source: str) -> bool:
    return source.startswith(CAPTURED_PREFIX)


def captured_path(source: str) -> str:
    """The file of a ``captured:<file>`` source."""
    return source[len(CAPTURED_PREFIX) :]


def source_label(source: str) -> str:
    """A short, path-free name of a source for tables and plots."""
    if is_captured(source):
        return f"captured ({Path(source[len(CAPTURED_PREFIX) :]).stem})"
    return source


def check_source(source: str) -> str:
    """``source`` if it names a known source (a captured file must exist); ``ValueError`` otherwise."""
    if source in SYNTHETIC_SOURCES:
        return source
    if is_captured(source):
        path = Path(source[len(CAPTURED_PREFIX) :])
        if not path.is_file():
            raise ValueError(f"captured source file not found: {path.name}")
        return source
    raise ValueError(
        f"unknown source {source!r}; use one of {list(SYNTHETIC_SOURCES)} or 'captured:<file written by "
        "benchmarks.capture>'"
    )


def load_memory(
    source: str, *, num_heads: int, head_dim: int, n_keys: int, n_queries: int, seed: int = 0
) -> MemoryData:
    """Data for one benchmark group.

    Raises:
        SourceUnavailable: a captured source has another head_dim, fewer heads, keys or queries.
    """
    if source in SYNTHETIC_SOURCES:
        keys, values, queries = make_memory(
            source, num_heads=num_heads, head_dim=head_dim, n_keys=n_keys, n_queries=n_queries, seed=seed
        )
        return MemoryData(keys, values, queries)
    if is_captured(source):
        return _from_capture(source[len(CAPTURED_PREFIX) :], num_heads, head_dim, n_keys, n_queries)
    raise ValueError(check_source(source))


@lru_cache(maxsize=2)
def load_capture(path: str) -> dict:
    """A capture file as written by :func:`benchmarks.capture.capture` (cached: they are large)."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != CAPTURE_FORMAT:
        raise ValueError(f"{Path(path).name} is not a capture file ({CAPTURE_FORMAT})")
    return data


def capture_geometry(path: str) -> dict:
    """Heads (memory layers x heads), head_dim, keys and queries available in a capture."""
    data = load_capture(path)
    L, H, n, d = data["keys"].shape
    return {"heads": L * H, "head_dim": d, "keys": n, "queries": data["queries"].shape[2]}


def _from_capture(path: str, num_heads: int, head_dim: int, n_keys: int, n_queries: int) -> MemoryData:
    data = load_capture(path)
    keys, values, queries = data["keys"], data["values"], data["queries"]  # [L, H, n, d], [L, H, q, d]
    L, H, n, d = keys.shape
    name = Path(path).name
    if d != head_dim:
        raise SourceUnavailable(f"{name} holds head_dim {d}, not {head_dim}")
    if num_heads > L * H:
        raise SourceUnavailable(f"{name} holds {L}x{H} (layer, head) pairs, fewer than {num_heads} heads")
    if n_keys > n:
        raise SourceUnavailable(f"{name} holds {n} memory keys per head, fewer than {n_keys}")
    if n_queries > queries.shape[2]:
        raise SourceUnavailable(f"{name} holds {queries.shape[2]} queries per head, fewer than {n_queries}")
    flat = lambda t: t.reshape(L * H, t.shape[2], d)[:num_heads]  # noqa: E731
    return MemoryData(
        keys=flat(keys)[:, :n_keys].unsqueeze(0).float().contiguous(),
        values=flat(values)[:, :n_keys].unsqueeze(0).float().contiguous(),
        queries=flat(queries)[:, queries.shape[2] - n_queries :].unsqueeze(0).float().contiguous(),
    )
