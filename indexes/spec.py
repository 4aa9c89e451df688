"""Faiss index specs: validate a Faiss ``index_factory`` string, build the index, set search knobs.

Specs are Faiss's own factory strings (``"Flat"``, ``"IVF1024,Flat"``, ``"HNSW32"``,
``"IVF1024,PQ20"``, ``"SQ8"``...), always with the inner-product metric. Everything here turns Faiss
errors into ``ValueError`` naming the spec, so no public call reaches a Faiss assertion.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import faiss

# Search-time knobs we accept, with the Faiss ParameterSpace name each maps to.
SEARCH_PARAMS = ("nprobe", "efSearch")

# Faiss k-means warns below 39 training points per centroid; PQ / SQ codebooks have 256 centroids.
POINTS_PER_CENTROID = 39
_CODEBOOK_CENTROIDS = 256


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


def parse_spec(spec: str, dim: int) -> IndexSpec:
    """Validate ``spec`` for inner-product search at ``dim`` and describe it.

    Raises:
        TypeError: ``spec`` is not a string or ``dim`` not an int.
        ValueError: Faiss cannot build it, it cannot take keys incrementally (NSG), or ``dim`` <= 0.
    """
    if not isinstance(spec, str):
        raise TypeError(f"index must be a Faiss index_factory string, got {type(spec).__name__}")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    spec = spec.strip()
    if not spec:
        raise ValueError("index must be a non-empty Faiss index_factory string, got ''")
    if re.search(r"(^|,)NSG", spec):
        raise ValueError(f"index {spec!r}: NSG graphs cannot be extended after they are built; use HNSW")
    index = _probe(spec, dim)
    nlist = 0
    try:
        nlist = int(faiss.extract_index_ivf(index).nlist)
    except (RuntimeError, AttributeError):
        nlist = 0
    needs_training = not index.is_trained
    min_points = 0
    if needs_training:
        min_points = POINTS_PER_CENTROID * max(nlist, 1)
        if re.search(r"PQ|SQ[468]|SQbf16|RQ|LSQ", spec):
            min_points = max(min_points, POINTS_PER_CENTROID * _CODEBOOK_CENTROIDS)
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
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
        out[name] = value
    return out


def apply_search_params(index: faiss.Index, params: dict[str, int]) -> None:
    """Set validated search knobs (``nprobe``, ``efSearch``) on a built index."""
    ps = faiss.ParameterSpace() if not _is_gpu_index(index) else faiss.GpuParameterSpace()
    for name, value in params.items():
        ps.set_index_parameter(index, name, value)


def _is_gpu_index(index: faiss.Index) -> bool:
    return type(index).__name__.startswith("Gpu")
