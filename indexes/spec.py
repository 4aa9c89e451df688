"""Faiss index specs: validate a Faiss ``index_factory`` string, build the index, set search knobs.

Specs are Faiss's own factory strings (``"Flat"``, ``"IVF1024,Flat"``, ``"HNSW32"``,
``"IVF1024,PQ20"``, ``"SQ8"``...), always with the inner-product metric. Everything here turns Faiss
errors into ``ValueError`` naming the spec, so no public call reaches a Faiss assertion.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import faiss

from indexes.validate import MAX_DIM, check_int

# Search-time knobs we accept, with the Faiss ParameterSpace name each maps to.
SEARCH_PARAMS = ("nprobe", "efSearch")

# Faiss k-means warns below 39 training points per centroid; PQ / SQ codebooks have 256 centroids.
POINTS_PER_CENTROID = 39
_CODEBOOK_CENTROIDS = 256
# Bounds on what reaches ``faiss.index_factory`` (a very long string or a huge number in it crashes or
# exhausts memory inside Faiss): the string's length, any number in it, and a few numbers of their own.
MAX_SPEC_LENGTH = 256
MAX_SPEC_NUMBER = 2**20  # IVF lists, PQ sub-quantizers, transform dims...
MAX_HNSW_M = 512
MAX_CODE_BITS = 16
#: ``nprobe`` / ``efSearch`` at most (Faiss sizes per-query buffers by them)
MAX_SEARCH_PARAM = 2**20


@dataclass(frozen=True)
class IndexSpec:
    """What the streaming layer needs to know about a factory string.

    Attributes:
        spec: the factory string as given (whitespace stripped).
        dim: vector dimension.
        is_flat: ``"Flat"``: exact search over the raw keys, no Faiss index object needed.
        needs_training: the fresh index reports ``is_trained == False``.
        nlist: number of IVF lists (0 when the index has no IVF stage).
        min_train_points: keys needed before training is sensible (39 per centroid).
        search_params: the search knobs this index accepts (subset of ``SEARCH_PARAMS``).
    """

    spec: str
    dim: int
    is_flat: bool
    needs_training: bool
    nlist: int
    min_train_points: int
    search_params: tuple[str, ...]


def _probe(spec: str, dim: int) -> faiss.Index:
    try:
        return faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1]
        reason = reason.split("Error:")[-1].split(":")[-1].strip() or reason
        raise ValueError(
            f"index {spec!r} is not a usable Faiss index_factory string for inner-product search "
            f"at dim={dim} (Faiss says: {reason}). Examples: 'Flat', 'IVF1024,Flat', 'HNSW32', "
            f"'IVF1024,PQ20', 'SQ8'."
        ) from None


def _check_numbers(spec: str) -> None:
    """Refuse a spec whose numbers would overflow or exhaust memory in Faiss, before Faiss sees it."""
    for m in re.finditer(r"\d+", spec):
        if len(m.group(0)) > 7 or int(m.group(0)) > MAX_SPEC_NUMBER:
            raise ValueError(
                f"index {spec[:64]!r}: number {m.group(0)[:16]} is too large (at most {MAX_SPEC_NUMBER})"
            )
    for m in re.finditer(r"HNSW(\d+)", spec):
        if int(m.group(1)) > MAX_HNSW_M:
            raise ValueError(f"index {spec!r}: {m.group(0)} has M={m.group(1)}; HNSW takes M <= {MAX_HNSW_M}")
    for m in re.finditer(r"x(\d+)", spec):
        if int(m.group(1)) > MAX_CODE_BITS:
            raise ValueError(
                f"index {spec!r}: {m.group(0)} asks for codes of {m.group(1)} bits; at most {MAX_CODE_BITS}"
            )


def _check_sizes(spec: str, index: faiss.Index) -> list[int]:
    """Refuse sizes that ``index_factory`` accepts but that crash Faiss later (SIGSEGV / SIGABRT / SIGFPE).

    Returns the bits per code of every PQ / RQ / LSQ stage (``PQ8x10`` -> 10).
    """
    for m in re.finditer(r"HNSW(\d+)", spec):
        if int(m.group(1)) < 2:
            raise ValueError(f"index {spec!r}: {m.group(0)} has M={m.group(1)}; HNSW needs M >= 2")
    nbits = []
    for m in re.finditer(r"(?:PQ|RQ|LSQ)\d+(?:x\d+)+", spec):
        nbits.append(int(m.group(0).rsplit("x", 1)[1]))
        if nbits[-1] < 1:
            raise ValueError(f"index {spec!r}: {m.group(0)} has codes of 0 bits; use at least 1")
    pre = faiss.downcast_index(index)  # (``index`` stays referenced: it owns the transforms)
    if isinstance(pre, faiss.IndexPreTransform):
        for i in range(pre.chain.size()):
            vt = faiss.downcast_VectorTransform(pre.chain.at(i))
            if vt.d_out < 1 or (isinstance(vt, faiss.PCAMatrix) and vt.d_out > vt.d_in):
                raise ValueError(
                    f"index {spec!r}: {type(vt).__name__} maps dim {vt.d_in} to {vt.d_out}, "
                    f"which is not a usable output dimension"
                )
            if isinstance(vt, faiss.OPQMatrix) and (vt.M < 1 or vt.d_out % vt.M):
                raise ValueError(f"index {spec!r}: OPQ{vt.M} needs M >= 1 dividing its output dim {vt.d_out}")
        pre = faiss.downcast_index(pre.index)
    if getattr(pre, "code_size", None) == 0:
        raise ValueError(f"index {spec!r} stores codes of 0 bytes: every key would look the same")
    return nbits


def parse_spec(spec: str, dim: int) -> IndexSpec:
    """Validate ``spec`` for inner-product search at ``dim`` and describe it.

    Raises:
        TypeError: ``spec`` is not a string or ``dim`` not an int.
        ValueError: Faiss cannot build it, it cannot take keys incrementally (NSG) or without ids
            (IDMap), a size in it would crash Faiss (HNSW1, PQ4x0, RR0, IVF0), or ``dim`` <= 0.
    """
    if not isinstance(spec, str):
        raise TypeError(f"index must be a Faiss index_factory string, got {type(spec).__name__}")
    dim = check_int(dim, "dim", 1, MAX_DIM)
    if len(spec) > MAX_SPEC_LENGTH:
        raise ValueError(
            f"index must be a Faiss index_factory string of at most {MAX_SPEC_LENGTH} characters, "
            f"got one of {len(spec)} ({spec[:32]!r}...)"
        )
    spec = spec.strip()
    if not spec:
        raise ValueError("index must be a non-empty Faiss index_factory string, got ''")
    _check_numbers(spec)
    if re.search(r"(^|,)NSG", spec):
        raise ValueError(f"index {spec!r}: NSG graphs cannot be extended after they are built; use HNSW")
    if re.search(r"(^|,)IDMap", spec):
        raise ValueError(
            f"index {spec!r}: entry ids are assigned by the memory (insertion order); drop the IDMap prefix"
        )
    index = _probe(spec, dim)
    nbits = _check_sizes(spec, index)
    nlist = 0
    try:
        nlist = int(faiss.extract_index_ivf(index).nlist)
    except (RuntimeError, AttributeError):
        nlist = None
    if nlist is not None and nlist < 1:
        raise ValueError(f"index {spec!r}: an IVF index needs at least 1 list, got nlist={nlist}")
    nlist = nlist or 0
    needs_training = not index.is_trained
    min_points = 0
    if needs_training:
        min_points = POINTS_PER_CENTROID * max(nlist, 1)
        if re.search(r"PQ|SQ[468]|SQbf16|RQ|LSQ", spec):
            centroids = max([_CODEBOOK_CENTROIDS, *(2**b for b in nbits)])  # PQ8x10: 1024 per codebook
            min_points = max(min_points, POINTS_PER_CENTROID * centroids)
    params = []
    ps = faiss.ParameterSpace()
    for name, value in (("nprobe", 1), ("efSearch", 16)):
        try:
            ps.set_index_parameter(index, name, value)
            params.append(name)
        except RuntimeError:
            pass
    return IndexSpec(
        spec=spec,
        dim=dim,
        is_flat=spec == "Flat",
        needs_training=needs_training,
        nlist=nlist,
        min_train_points=min_points,
        search_params=tuple(params),
    )


def build_index(spec: IndexSpec) -> faiss.Index:
    """A fresh (untrained) CPU Faiss index for ``spec`` with the inner-product metric."""
    return _probe(spec.spec, spec.dim)


def check_search_params(spec: IndexSpec, params: dict[str, int | None]) -> dict[str, int]:
    """Validate search knobs against what the index accepts; drop the ``None`` ones.

    Raises:
        ValueError: unknown knob, a knob this index has no use for, or a value that is not a positive int.
    """
    out: dict[str, int] = {}
    for name, value in params.items():
        if value is None:
            continue
        if name not in SEARCH_PARAMS:
            raise ValueError(f"unknown search parameter {name!r}; expected one of {list(SEARCH_PARAMS)}")
        if name not in spec.search_params:
            raise ValueError(
                f"search parameter {name}={value!r} does not apply to index {spec.spec!r} "
                f"(it accepts {list(spec.search_params) or 'none'})"
            )
        out[name] = check_int(value, name, 1, MAX_SEARCH_PARAM)
    return out


def apply_search_params(index: faiss.Index, params: dict[str, int]) -> None:
    """Set validated search knobs (``nprobe``, ``efSearch``) on a built index."""
    ps = faiss.ParameterSpace() if not _is_gpu_index(index) else faiss.GpuParameterSpace()
    for name, value in params.items():
        ps.set_index_parameter(index, name, value)


def _is_gpu_index(index: faiss.Index) -> bool:
    return type(index).__name__.startswith("Gpu")
