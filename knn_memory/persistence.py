"""Saving a memory backend to a directory and loading it back, atomically and checksummed.

Layout of a saved memory directory::

    path/
      CURRENT              name of the live version folder (replaced atomically)
      v-<id>/meta.json     format version, backend name, config, sha256 and size of state.pt
      v-<id>/state.pt      the backend's tensors (torch.save, loaded with weights_only=True)

A save writes a new version folder, fsyncs it, then atomically replaces ``CURRENT``, then removes
older versions. A process killed at any point leaves either the previous memory or the new one
loadable, never a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import torch

from knn_memory.backend import MemoryBackend
from knn_memory.registry import backend_class

FORMAT = "knn-memory/backend"
FORMAT_VERSION = 1
CURRENT = "CURRENT"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_version(root: str | os.PathLike, files: dict[str, object], meta: dict) -> Path:
    """Write ``files`` (name -> torch-saveable object) and ``meta.json`` as a new live version of ``root``.

    ``meta`` gets the checksums; ``CURRENT`` is switched only once everything is on disk.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"path {str(root)!r} exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)
    name = f"v-{uuid.uuid4().hex[:12]}"
    tmp = root / f".tmp-{name}"
    tmp.mkdir()
    try:
        checksums = {}
        for fname, obj in files.items():
            fpath = tmp / fname
            with open(fpath, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            checksums[fname] = {"sha256": _sha256(fpath), "bytes": fpath.stat().st_size}
        meta = {**meta, "files": checksums}
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        os.replace(tmp, root / name)
        _fsync_dir(root)
        pointer = root / f".{CURRENT}.{name}"
        with open(pointer, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer, root / CURRENT)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(root / name, ignore_errors=True)
        raise
    for old in root.iterdir():  # previous versions and leftovers of interrupted saves
        if old.name != name and (old.name.startswith(("v-", ".tmp-v-", f".{CURRENT}."))):
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    return root / name


def read_version(root: str | os.PathLike, expect_format: str) -> tuple[dict, dict[str, object]]:
    """Read the live version of ``root``: (meta, name -> loaded object), after verifying every checksum.

    Raises:
        ValueError: missing or foreign directory, unknown format or version, checksum mismatch,
            truncated or unreadable file.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"path {str(root)!r} is not a saved memory directory")
    pointer = root / CURRENT
    if not pointer.is_file():
        raise ValueError(f"path {str(root)!r} holds no saved memory (no {CURRENT} file)")
    name = pointer.read_text().strip()
    version = root / name
    if not name.startswith("v-") or "/" in name or not version.is_dir():
        raise ValueError(f"path {str(root)!r}: {CURRENT} names {name!r}, which is not a saved version")
    try:
        meta = json.loads((version / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"path {str(root)!r}: unreadable meta.json ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != expect_format:
        raise ValueError(
            f"path {str(root)!r} holds format {meta.get('format') if isinstance(meta, dict) else None!r}, "
            f"expected {expect_format!r}"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"path {str(root)!r} has format version {meta.get('format_version')!r}; "
            f"this library reads version {FORMAT_VERSION}"
        )
    loaded = {}
    for fname, info in meta.get("files", {}).items():
        fpath = version / fname
        if not fpath.is_file():
            raise ValueError(f"path {str(root)!r}: file {fname} is missing")
        if fpath.stat().st_size != info.get("bytes") or _sha256(fpath) != info.get("sha256"):
            raise ValueError(f"path {str(root)!r}: file {fname} is corrupt or truncated (checksum mismatch)")
        try:
            loaded[fname] = torch.load(fpath, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"path {str(root)!r}: file {fname} cannot be read ({type(err).__name__})"
            ) from None
    return meta, loaded


def save_backend(backend: MemoryBackend, path: str | os.PathLike) -> Path:
    """Save ``backend`` to directory ``path`` (atomic, checksummed). Returns the version folder."""
    if not isinstance(backend, MemoryBackend):
        raise TypeError(f"backend must be a MemoryBackend, got {type(backend).__name__}")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backend": backend.name,
        "config": backend.config(),
    }
    return write_version(path, {"state.pt": backend.state()}, meta)


def load_backend(path: str | os.PathLike, device: str | torch.device | None = None) -> MemoryBackend:
    """Load a backend saved by :meth:`MemoryBackend.save`, verifying format, version and checksums."""
    meta, files = read_version(path, FORMAT)
    cls = backend_class(meta.get("backend"))
    state = files.get("state.pt")
    if not isinstance(state, dict) or "config" not in state:
        raise ValueError(f"path {str(path)!r}: state.pt does not hold a backend state")
    try:
        return cls.from_state(state, device=device)
    except (KeyError, TypeError, IndexError, AttributeError) as err:
        raise ValueError(
            f"path {str(path)!r}: saved state does not match backend {cls.name!r} ({err})"
        ) from None
