"""`MemoryBackend`: the interface every memory implementation follows, and its input checks.

A backend is the memory of one memory layer: per batch row and head, a growing set of
(key, value) entries. Keys arrive un-rotated (LongLLaMA treats memory keys as position 0) and are
rounded to ``mem_dtype`` before they are stored or indexed, so that every backend sees exactly the
same keys. Searches take the rotated queries and return :class:`~knn_memory.hits.MemoryHits`.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from indexes import check_k, parse_device
from indexes.validate import MAX_COUNT, MAX_DIM, check_finite, check_int, check_tensor_fits
from knn_memory.hits import MemoryHits
from knn_memory.locking import reading, writing
from knn_memory.validate import check_mem_dtype


def resolve_dtype(mem_dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"``/``"float16"``/``"float32"`` (or the torch dtype) -> torch dtype."""
    return check_mem_dtype(mem_dtype, "mem_dtype")


class MemoryBackend(abc.ABC):
    """Memory of one memory layer: one store per (batch row, head).

    Args:
        num_heads: H.
        head_dim: d.
        batch_size: B, the number of independent sequences.
        mem_dtype: storage dtype of keys and values (keys are rounded to it before indexing).
        device: where the memory lives.
        top_k: entries returned per query (``None``: backend default).

    Threads: every public method holds the memory's readers-writer lock (:mod:`knn_memory.locking`),
    taken here once for every subclass. Searches (and ``state``, ``checkpoint``) from several threads
    run at once; ``add``, ``reset``, ``reorder``, ``truncate``, ``rollback``, ``set_search_params`` and
    ``save`` run alone: a call that would overlap waits for the other to finish.
    """

    #: registry name, set by :func:`knn_memory.registry.register_backend`
    name: str = ""
    #: public methods that only read the memory (run concurrently) and those that change it (alone)
    READERS = ("search", "search_for_attention", "state", "checkpoint")
    WRITERS = ("add", "reset", "reorder", "truncate", "rollback", "set_search_params", "save")

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for names, wrap in ((cls.READERS, reading), (cls.WRITERS, writing)):
            for name in names:
                if name in cls.__dict__:
                    setattr(cls, name, wrap(cls.__dict__[name]))

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        batch_size: int = 1,
        mem_dtype: str | torch.dtype = "bfloat16",
        device: str | torch.device = "cpu",
        top_k: int | None = None,
    ) -> None:
        self.num_heads = check_int(num_heads, "num_heads", 1, MAX_COUNT)
        self.head_dim = check_int(head_dim, "head_dim", 1, MAX_DIM)
        self.batch_size = check_int(batch_size, "batch_size", 1, MAX_COUNT)
        self.mem_dtype = resolve_dtype(mem_dtype)
        self.device = parse_device(device)
        self.top_k = None if top_k is None else check_k(top_k, "top_k")

    # ------------------------------------------------------------------ interface
    @abc.abstractmethod
    def add(self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Append entries.

        Args:
            keys: [B, H, n, d] un-rotated keys, any float dtype.
            values: [B, H, n, d], same dtype as ``keys``.
            mask: [B, n] bool, True for real tokens (padding entries are never retrieved), or None.
        """

    @abc.abstractmethod
    def search(self, queries: torch.Tensor, k: int | None = None, heads: slice | None = None) -> MemoryHits:
        """Entries for each query.

        Args:
            queries: [B, h, q, d] (rotated) queries for the heads selected by ``heads``.
            k: entries per query (default ``top_k``); ignored by a dense backend.
            heads: the slice of heads the queries belong to (default: all H).
        """

    def search_for_attention(
        self, queries: torch.Tensor, k: int | None = None, heads: slice | None = None
    ) -> MemoryHits:
        """:meth:`search` for :func:`~knn_memory.memory_attention`, which weighs the hits' values at once.

        A backend may leave top-k values where they are stored (``MemoryHits.retrieved``), so that
        :meth:`MemoryHits.weighted_values` reads them in place instead of copying [B, h, q, k, d]
        first. This default is :meth:`search`.
        """
        return self.search(queries, k, heads)

    @abc.abstractmethod
    def reset(self, rows: Sequence[int] | torch.Tensor | None = None) -> None:
        """Forget every entry of the given batch rows (all rows when None)."""

    @abc.abstractmethod
    def reorder(self, rows: torch.Tensor) -> None:
        """Keep batch rows ``rows`` [B'] (int64 positions) in that order (rows may repeat; beam search).
        B becomes B'."""

    @abc.abstractmethod
    def truncate(self, lengths: int | torch.Tensor) -> None:
        """Forget every entry after the first ``lengths[b]`` real entries of each row b, in place.

        Args:
            lengths: an int (the same for every row) or a [B] integer tensor, each at most the row's
                current :attr:`lengths`. Searches afterwards return what a memory that only ever
                received those entries returns.

        ``ValueError`` (before anything changes) for a length out of range, or where the backend
        cannot remove entries (see the backend).
        """

    @reading
    def checkpoint(self) -> MemoryCheckpoint:
        """A small token of the memory now, that :meth:`rollback` returns to (e.g. after a question).

        This default records :attr:`lengths` only and rolls back with :meth:`truncate`, which is right
        as long as the rows are not reset or reordered in between; the built-in backends override it to
        also survive those (beam search reorders) and never copy the entries where they can avoid it.
        A token stays valid for any number of rollbacks; rolling back to it makes tokens taken after it
        invalid.
        """
        return MemoryCheckpoint(self, self.lengths.clone())

    @writing
    def rollback(self, checkpoint: MemoryCheckpoint) -> None:
        """Return to the state of :meth:`checkpoint` ``checkpoint``: what was added since is forgotten."""
        self._check_checkpoint(checkpoint)
        self.truncate(checkpoint.state)

    @property
    @abc.abstractmethod
    def lengths(self) -> torch.Tensor:
        """[B] int64: real (non-padding) entries stored per row."""

    @property
    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes held by keys, values and index structures."""

    @abc.abstractmethod
    def state(self) -> dict:
        """Everything :meth:`from_state` needs (tensors and plain values only)."""

    @classmethod
    @abc.abstractmethod
    def from_state(cls, state: dict, device: str | torch.device | None = None) -> MemoryBackend:
        """Rebuild a backend saved by :meth:`state`."""

    # ------------------------------------------------------------------ what the class declares
    #: True for a memory split over several processes (``"sharded"``): :func:`~knn_memory.memory_attention`
    #: then attends to this process's part as a partial softmax state (running max, sum of exponentials,
    #: weighted values) and merges the parts with :meth:`merge_max` and :meth:`merge_sum`
    SHARDED: bool = False

    def merge_max(self, t: torch.Tensor) -> torch.Tensor:
        """Elementwise max of ``t`` over the processes holding parts of this memory (here: one, ``t``)."""
        return t

    def merge_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Elementwise sum of ``t`` over the processes holding parts of this memory (here: one, ``t``)."""
        return t

    #: :meth:`config` entries that may differ between a saved memory and the model that loads it
    FREE_OPTIONS: tuple[str, ...] = ("batch_size",)

    @classmethod
    def spec_grammar(cls) -> str:
        """How this backend is written on a command line, e.g. ``"faiss[:<index_factory string>]"``."""
        return cls.name

    @classmethod
    def parse_spec(cls, spec: str | None, name: str = "--backend") -> dict:
        """Constructor options from the text after ``name:`` on a command line (None: nothing after the
        name). This default takes none; ``ValueError`` naming ``name`` otherwise."""
        if spec is not None:
            raise ValueError(f"{name} {cls.name}:{spec!r}: the {cls.name!r} backend takes no ':<spec>'")
        return {}

    @classmethod
    def format_spec(cls, options: dict) -> str | None:
        """The command-line spec of ``options`` (the inverse of :meth:`parse_spec`); None: the bare name."""
        return None

    @classmethod
    def default_top_k(cls, options: dict) -> int | None:
        """Entries per query when ``top_k`` is not given (None: dense, every entry)."""
        return None

    @classmethod
    def search_knobs(cls, options: dict, head_dim: int) -> tuple[str, ...]:
        """Search-time knobs (``nprobe``, ``efSearch``, ...) that a backend built with ``options`` takes."""
        return ()

    def matching_config(self) -> dict:
        """The part of :meth:`config` that a saved memory and the model loading it must agree on."""
        return {k: v for k, v in self.config().items() if k not in self.FREE_OPTIONS}

    # ------------------------------------------------------------------ shared behaviour
    def __getstate__(self) -> dict:
        """For copy / deepcopy: everything but the lock (a copy gets its own)."""
        state = self.__dict__.copy()
        state.pop("_rwlock", None)
        return state

    def __len__(self) -> int:
        """Most real entries stored in any row."""
        lengths = self.lengths
        return int(lengths.max()) if lengths.numel() else 0

    @property
    def is_empty(self) -> bool:
        """True when no row holds an entry."""
        return len(self) == 0

    @writing
    def save(self, path: str) -> None:
        """Write this memory to directory ``path`` (atomically; see :mod:`knn_memory.persistence`)."""
        from knn_memory.persistence import save_backend

        save_backend(self, path)

    def config(self) -> dict:
        """Constructor arguments shared by every backend."""
        return {
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "batch_size": self.batch_size,
            "mem_dtype": str(self.mem_dtype).removeprefix("torch."),
            "top_k": self.top_k,
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, B={self.batch_size}, H={self.num_heads}, "
            f"d={self.head_dim}, entries={len(self)}, mem_dtype={self.mem_dtype}, device={self.device})"
        )

    # ------------------------------------------------------------------ input checks
    def _check_add(
        self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        for name, t in (("keys", keys), ("values", values)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor [B, H, n, d], got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{name} must be floating point, got dtype {t.dtype}")
            if t.dim() != 4:
                raise ValueError(f"{name} must be 4-D [B, H, n, d], got shape {list(t.shape)}")
            want = (self.batch_size, self.num_heads, t.shape[2], self.head_dim)
            if tuple(t.shape) != want:
                raise ValueError(
                    f"{name} must have shape [B={self.batch_size}, H={self.num_heads}, n, d={self.head_dim}], "
                    f"got {list(t.shape)}"
                )
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device}, but this memory lives on {self.device}")
            # finite, and still finite once rounded to mem_dtype (float16 overflows past 65504)
            check_tensor_fits(t, name, self.mem_dtype)
        if keys.shape != values.shape:
            raise ValueError(
                f"keys {list(keys.shape)} and values {list(values.shape)} must have the same shape"
            )
        if keys.dtype != values.dtype:
            raise TypeError(f"keys ({keys.dtype}) and values ({values.dtype}) must have the same dtype")
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a bool torch.Tensor [B, n], got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must have dtype torch.bool (True = real token), got {mask.dtype}")
        if tuple(mask.shape) != (self.batch_size, keys.shape[2]):
            raise ValueError(
                f"mask must have shape [B={self.batch_size}, n={keys.shape[2]}], got {list(mask.shape)}"
            )
        return mask.to(self.device)

    def _check_search(self, queries: torch.Tensor, k: int | None, heads: slice | None) -> tuple[int, slice]:
        if not isinstance(queries, torch.Tensor):
            raise TypeError(f"queries must be a torch.Tensor [B, h, q, d], got {type(queries).__name__}")
        if not queries.is_floating_point():
            raise TypeError(f"queries must be floating point, got dtype {queries.dtype}")
        if queries.dim() != 4:
            raise ValueError(f"queries must be 4-D [B, h, q, d], got shape {list(queries.shape)}")
        if heads is None:
            heads = slice(0, self.num_heads)
        if not isinstance(heads, slice) or heads.step not in (None, 1):
            raise TypeError(f"heads must be a contiguous slice of head indices, got {heads!r}")
        start = 0 if heads.start is None else heads.start
        stop = self.num_heads if heads.stop is None else heads.stop
        if (
            not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= self.num_heads)
            or isinstance(start, bool)
            or isinstance(stop, bool)
        ):
            raise ValueError(
                f"heads must be a non-empty slice start:stop with 0 <= start < stop <= num_heads="
                f"{self.num_heads}, got {heads!r}"
            )
        n_heads = stop - start
        want = (self.batch_size, n_heads, queries.shape[2], self.head_dim)
        if tuple(queries.shape) != want:
            raise ValueError(
                f"queries must have shape [B={self.batch_size}, h={n_heads}, q, d={self.head_dim}] "
                f"for heads {start}:{stop}, got {list(queries.shape)}"
            )
        if queries.device != self.device:
            raise ValueError(f"queries are on {queries.device}, but this memory lives on {self.device}")
        check_finite(queries, "queries", "contain")
        k = self.top_k if k is None else k
        if k is not None:
            k = check_k(k)
        return k, slice(start, stop)

    def _check_rows(self, rows: Sequence[int] | torch.Tensor | None) -> list[int]:
        if rows is None:
            return list(range(self.batch_size))
        if isinstance(rows, int) and not isinstance(rows, bool):
            rows = [rows]  # one row
        if isinstance(rows, torch.Tensor):
            if rows.dtype == torch.bool or rows.is_floating_point():
                raise TypeError(f"rows must hold integer row indices, got dtype {rows.dtype}")
            rows = rows.flatten().tolist()
        if isinstance(rows, (str, bytes)) or not hasattr(rows, "__iter__"):
            raise TypeError(
                f"rows must be None, an int, a sequence of ints or an integer tensor, got {type(rows).__name__}"
            )
        out = []
        for r in rows:
            if not isinstance(r, int) or isinstance(r, bool):
                raise TypeError(f"rows must be ints, got {type(r).__name__} {r!r}")
            if not -self.batch_size <= r < self.batch_size:
                raise ValueError(f"row {r} out of range for batch_size={self.batch_size}")
            out.append(r % self.batch_size)
        return out

    def _check_lengths(self, lengths: int | torch.Tensor) -> torch.Tensor:
        """``lengths`` of :meth:`truncate` as a [B] int64 CPU tensor, checked against :attr:`lengths`."""
        if isinstance(lengths, int) and not isinstance(lengths, bool):
            out = torch.full((self.batch_size,), lengths, dtype=torch.int64)
        elif isinstance(lengths, torch.Tensor):
            if lengths.dtype == torch.bool or lengths.is_floating_point() or lengths.is_complex():
                raise TypeError(f"lengths must hold integer entry counts, got dtype {lengths.dtype}")
            if tuple(lengths.shape) != (self.batch_size,):
                raise ValueError(
                    f"lengths must be an int or a [B={self.batch_size}] tensor, got shape {list(lengths.shape)}"
                )
            out = lengths.detach().to("cpu", torch.int64)
        else:
            raise TypeError(f"lengths must be an int or a [B] int64 tensor, got {type(lengths).__name__}")
        current = self.lengths
        if bool((out < 0).any()) or bool((out > current).any()):
            raise ValueError(
                f"lengths must lie in [0, current length] per row: got {out.tolist()}, the rows hold "
                f"{current.tolist()} entries"
            )
        return out

    def _check_checkpoint(self, checkpoint: object) -> None:
        if not isinstance(checkpoint, MemoryCheckpoint):
            raise TypeError(
                f"checkpoint must be a MemoryCheckpoint from this memory's checkpoint(), got "
                f"{type(checkpoint).__name__}"
            )
        if checkpoint.memory is not self:
            raise ValueError(
                f"checkpoint was taken of another memory ({checkpoint.memory!r}), not of {self!r}"
            )

    def _check_reorder(self, rows: torch.Tensor) -> torch.Tensor:
        if not isinstance(rows, torch.Tensor) or rows.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"rows must be an int64 torch.Tensor of row indices, got {rows!r}")
        if rows.dim() != 1 or rows.numel() == 0:
            raise ValueError(f"rows must be 1-D and non-empty, got shape {list(rows.shape)}")
        if bool((rows < 0).any()) or bool((rows >= self.batch_size).any()):
            raise ValueError(f"rows must lie in [0, batch_size={self.batch_size}), got {rows.tolist()}")
        return rows.to(torch.int64).cpu()


@dataclass(frozen=True, eq=False)
class MemoryCheckpoint:
    """What :meth:`MemoryBackend.checkpoint` returns: the memory it belongs to, and what the backend needs."""

    memory: MemoryBackend
    state: object
