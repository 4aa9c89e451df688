"""`KeyIndex`: what a memory backend needs from the index of one (row, head), and index kinds by name.

:class:`~indexes.streaming.StreamingIndex` (Faiss, growing with the memory) is one; any object with
these members can hold a ``"faiss"`` backend's keys instead (pass it as ``index=``: it is the
template that every (row, head) clones). The backend validates its input once for all heads, so the
index is handed float32 ``[n, d]`` keys and ``[m, d]`` queries that are already finite, contiguous and on
its device.

Optional members, used where present: ``can_truncate`` / ``truncate(n)`` / ``mark()`` /
``rollback(mark)`` (rollback without copies; otherwise a checkpoint clones the index), and
``set_search_params(**knobs)``.

Saving a memory records each index's kind, the name it was registered under with
:func:`register_index`, so that loading finds the class whose ``from_state`` rebuilds it.
"""

from __future__ import annotations

from typing import Protocol, TypeVar, runtime_checkable

import torch


@runtime_checkable
class KeyIndex(Protocol):
    """Keys of one (row, head), searchable by inner product."""

    dim: int

    @property
    def ntotal(self) -> int:
        """Keys held."""

    @property
    def nbytes(self) -> int:
        """Bytes held by the keys and the index structures."""

    def add_checked(self, x: torch.Tensor) -> None:
        """Append keys ``x`` [n, d] float32 (validated by the caller); ids continue from :attr:`ntotal`."""

    def search_checked(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` by inner product for ``q`` [m, d] float32: scores [m, k] float32 (``-inf`` in empty
        slots) and ids [m, k] int64 (insertion order, ``-1`` in empty slots), best first."""

    def state(self) -> dict:
        """Everything the class's ``from_state(state, device=...)`` needs (tensors and plain values)."""

    def clone(self) -> KeyIndex:
        """An independent copy."""


_KINDS: dict[str, type] = {}
I = TypeVar("I", bound=type)


def register_index(kind: str):
    """Class decorator: make an index class (with a ``from_state`` classmethod) loadable as ``kind``."""
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"an index kind must be a non-empty str, got {kind!r}")

    def wrap(cls: I) -> I:
        if not callable(getattr(cls, "from_state", None)):
            raise TypeError(f"register_index({kind!r}): {cls.__name__} has no from_state classmethod")
        if kind in _KINDS and _KINDS[kind] is not cls:
            raise ValueError(f"an index kind {kind!r} is already registered ({_KINDS[kind].__name__})")
        cls.index_kind = kind
        _KINDS[kind] = cls
        return cls

    return wrap


def index_kind(index: object) -> str:
    """The registered kind of ``index``; ``ValueError`` when its class was never registered."""
    kind = getattr(type(index), "index_kind", None)
    if kind is None or _KINDS.get(kind) is not type(index):
        raise ValueError(
            f"index class {type(index).__name__} is not registered; decorate it with "
            f"@indexes.register_index('<kind>') so that a saved memory can rebuild it"
        )
    return kind


def index_class(kind: str) -> type:
    """The class registered as ``kind``; ``ValueError`` listing the known kinds otherwise."""
    try:
        return _KINDS[kind]
    except (KeyError, TypeError):
        raise ValueError(f"unknown index kind {kind!r}; registered: {sorted(_KINDS)}") from None


def check_key_index(index: object, name: str = "index") -> KeyIndex:
    """``index`` if it satisfies :class:`KeyIndex` and holds no keys yet; ``TypeError``/``ValueError`` otherwise."""
    missing = [
        m
        for m in ("dim", "ntotal", "nbytes", "add_checked", "search_checked", "state", "clone")
        if not hasattr(index, m)
    ]
    if missing:
        raise TypeError(
            f"{name} must be a Faiss index_factory string, 'auto' or an object with the KeyIndex members "
            f"(indexes.KeyIndex), got {type(index).__name__} (it lacks {missing})"
        )
    if index.ntotal != 0:
        raise ValueError(
            f"{name} is a template that every (row, head) clones: it must be empty, holds {index.ntotal} keys"
        )
    return index
