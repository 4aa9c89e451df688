"""Saving memories to a directory and loading them back, atomically and checksummed.

This module is the one place that writes and reads saved memories. Two formats share its layout:
``FORMAT`` (one backend, :func:`save_backend` / :func:`load_backend`) and ``CACHE_FORMAT`` (a model's
whole cache: one backend per memory layer plus the model's local state, written by the model package
through :func:`write_version` / :func:`read_version`).

Layout of a saved memory directory::

    path/
      CURRENT              name of the live version folder (replaced atomically)
      v-<id>/meta.json     format, format version, description, sha256 and size of every file
      v-<id>/<name>.pt     tensors and plain values (torch.save, loaded with weights_only=True)
      .versions.json       the version names this library wrote here (the only ones a save removes)
      .lock                the writers' OS file lock (flock)

A save writes a new version folder (files written, flushed and fsynced under a temporary name, then
renamed), then atomically replaces ``CURRENT``, then removes older versions. A process killed at any
point leaves either the previous memory or the new one loadable, never a half-written one; a failed
write (``OSError``, a full disk included) raises and leaves the previous memory in place. Writers to
one directory, threads or processes, take turns on an OS file lock; readers may run while a writer
saves (a reader that loses the race to the writer's clean-up retries on the new version). A save never
removes what it cannot prove it wrote (the manifest), and refuses a non-empty directory that holds no
saved memory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from knn_memory.backend import MemoryBackend
from knn_memory.process_group import process_rank, process_world_size
from knn_memory.registry import backend_class

FORMAT = "knn-memory/backend"
CACHE_FORMAT = "knn-memory/cache"
FORMAT_VERSION = 1
CURRENT = "CURRENT"
#: the writers' lock file and the list of versions this library wrote (the only ones it deletes)
LOCK = ".lock"
MANIFEST = ".versions.json"
_VERSION_NAME = re.compile(r"v-[0-9a-f]{12}")
#: a memory saved in parts (one per process, e.g. ``"sharded"``): ``path/manifest`` is a saved memory that
#: names the backend and its parts, each part a saved memory of its own beside it
PARTS_MANIFEST = "manifest"
PARTS_FILE = "manifest.pt"


def part_dir(rank: int, world_size: int) -> str:
    """Name of process ``rank``'s part inside a memory saved in parts."""
    return f"rank-{rank}-of-{world_size}"


def saved_in_parts(root: str | os.PathLike) -> bool:
    """True when ``root`` holds a memory saved in parts (a ``manifest/`` and no ``CURRENT`` of its own)."""
    root = Path(root)
    return not (root / CURRENT).exists() and (root / PARTS_MANIFEST / CURRENT).exists()


def write_parts(
    root: str | os.PathLike,
    files: dict[str, object | Callable[[], object]],
    meta: dict,
    *,
    rank: int,
    world_size: int,
    barrier: Callable[[], None],
) -> Path:
    """Save one part of a memory spread over ``world_size`` processes; every process calls it with the same
    ``root`` (on a file system they share).

    Each writes its ``files`` as a saved memory of its own in ``root/rank-<r>-of-<w>`` (atomic, as
    :func:`write_version`); once every part is written (``barrier``), rank 0 writes ``root/manifest``,
    which names the world size and the parts. Returns this process's version folder.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"path {str(root)!r} exists and is not a directory")
    if (root / CURRENT).exists():
        raise ValueError(
            f"path {str(root)!r} holds a memory saved by one process; save one in parts elsewhere"
        )
    part = write_version(root / part_dir(rank, world_size), files, meta)
    barrier()
    if rank == 0:
        manifest = {"world_size": world_size, "parts": [part_dir(r, world_size) for r in range(world_size)]}
        write_version(root / PARTS_MANIFEST, {PARTS_FILE: manifest}, {**meta, "world_size": world_size})
    barrier()
    return part


def own_part(root: str | os.PathLike, expect_format: str) -> Path:
    """This process's part of a memory saved by :func:`write_parts`: ``ValueError`` when the manifest's
    world size is not this process group's (a part means nothing without the others)."""
    root = Path(root)
    _, files = read_version(root / PARTS_MANIFEST, expect_format)
    saved = (files.get(PARTS_FILE) or {}).get("world_size")
    rank, world = process_rank(), process_world_size()
    if saved != world:
        raise ValueError(
            f"memory at {str(root)!r} was saved by {saved} ranks, but this group has {world}: load it with "
            f"as many ranks (torchrun --nproc-per-node {saved})"
        )
    return root / part_dir(rank, world)


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


def _read_manifest(root: Path) -> list[str] | None:
    """Version names this library wrote into ``root`` (None: no manifest there)."""
    try:
        names = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return []  # unreadable: prove nothing, delete nothing
    if not isinstance(names, list):
        return []
    return [n for n in names if isinstance(n, str) and _VERSION_NAME.fullmatch(n)]


def _write_manifest(root: Path, names: list[str]) -> None:
    tmp = root / f"{MANIFEST}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(sorted(set(names)), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / MANIFEST)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _proven_live(root: Path) -> str | None:
    """The version ``CURRENT`` names, if it is a version folder with this library's ``meta.json``."""
    try:
        name = (root / CURRENT).read_text().strip()
        meta = json.loads((root / name / "meta.json").read_text()) if _VERSION_NAME.fullmatch(name) else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(meta, dict) and meta.get("format") in (FORMAT, CACHE_FORMAT):
        return name
    return None


def _check_target(root: Path) -> None:
    """Refuse a path that is a file, or a non-empty directory that is not a saved memory.

    A directory is a saved memory when its ``CURRENT`` names a version with this library's
    ``meta.json``, or when it holds only what an interrupted first save leaves (names in its manifest).
    """
    if root.exists() and not root.is_dir():
        raise ValueError(f"path {str(root)!r} exists and is not a directory")
    if not root.is_dir() or _proven_live(root) is not None:
        return
    own = set(_read_manifest(root) or [])
    foreign = [
        p.name
        for p in root.iterdir()
        if p.name not in (LOCK, MANIFEST, f"{MANIFEST}.tmp")
        and p.name.removeprefix(".tmp-").removeprefix(f".{CURRENT}.") not in own
    ]
    if foreign:
        raise ValueError(
            f"path {str(root)!r} is a non-empty directory that holds no saved memory "
            f"(it has {sorted(foreign)[:3]}); refusing to write into it"
        )


@contextlib.contextmanager
def _locked(root: Path):
    """Hold an exclusive OS lock (``flock``) on ``root``'s lock file: one writer at a time, across processes."""
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _torch_save(obj: object, fpath: Path) -> None:
    """``torch.save`` to ``fpath``, fsynced; a failed write (full disk, quota) is an ``OSError``."""
    try:
        with open(fpath, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except RuntimeError as err:  # torch's stream writer reports a failed write as a RuntimeError
        reason = str(err).strip().splitlines()[0] if str(err).strip() else "write failed"
        raise OSError(errno.EIO, f"writing {fpath.name} failed ({reason})", str(fpath)) from None


def write_version(
    root: str | os.PathLike, files: dict[str, object | Callable[[], object]], meta: dict
) -> Path:
    """Write ``files`` and ``meta.json`` as a new live version of directory ``root``.

    Args:
        root: the memory directory (created if missing; an existing one must be a saved memory or empty).
        files: file name -> a torch-saveable object, or a function returning one; functions are called one
            at a time, just before their file is written, so only one large state is in memory at once.
        meta: JSON-serialisable description; it gets ``files`` (sha256 and size of each file).

    ``CURRENT`` is switched only once every file is on disk. Writers to one directory (threads or
    processes) take turns on an OS file lock. Only versions recorded in the directory's manifest (the
    ones this library wrote there) are ever removed. Returns the new version folder.

    Raises:
        ValueError: ``root`` is a file, or a directory with other content.
        OSError: a write failed (full disk included); the previous version (if any) is still the live
            one and nothing half-written is left behind.
    """
    root = Path(root)
    _check_target(root)
    if not root.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        _fsync_dir(root.parent)
    with _locked(root):
        _check_target(root)  # again, now that no other writer runs
        return _write_locked(root, files, meta)


def _write_locked(root: Path, files: dict[str, object | Callable[[], object]], meta: dict) -> Path:
    name = f"v-{uuid.uuid4().hex[:12]}"
    own = [
        n
        for n in _read_manifest(root) or []
        if any(p.exists() for p in (root / n, root / f".tmp-{n}", root / f".{CURRENT}.{n}"))
    ]
    live = _proven_live(root)
    # record the name before anything of it exists, so a killed save leaves only removable leftovers
    _write_manifest(root, [*own, *([live] if live else []), name])
    tmp = root / f".tmp-{name}"
    pointer = root / f".{CURRENT}.{name}"
    switched = False
    tmp.mkdir()
    try:
        checksums = {}
        for fname, obj in files.items():
            if callable(obj):
                obj = obj()
            fpath = tmp / fname
            _torch_save(obj, fpath)
            del obj
            checksums[fname] = {"sha256": _sha256(fpath), "bytes": fpath.stat().st_size}
        meta = {**meta, "files": checksums}
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        os.replace(tmp, root / name)
        _fsync_dir(root)
        with open(pointer, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer, root / CURRENT)
        switched = True
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        pointer.unlink(missing_ok=True)
        if not switched:  # once CURRENT names the new version, it is complete and live: keep it
            shutil.rmtree(root / name, ignore_errors=True)
            with contextlib.suppress(OSError):
                _write_manifest(root, [n for n in (_read_manifest(root) or []) if n != name])
        raise
    # previous versions and leftovers of interrupted saves: only those the manifest proves are ours
    for old in _read_manifest(root) or []:
        if old == name:
            continue
        for leftover in (root / old, root / f".tmp-{old}", root / f".{CURRENT}.{old}"):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
    # the manifest keeps the removed names until the next save prunes them (one write fewer here)
    return root / name


def _live_version(root: Path) -> str:
    pointer = root / CURRENT
    try:
        return pointer.read_text().strip()
    except FileNotFoundError:
        raise ValueError(f"path {str(root)!r} holds no saved memory (no {CURRENT} file)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"path {str(root)!r}: unreadable {CURRENT} file ({err})") from None


def read_version(root: str | os.PathLike, expect_format: str) -> tuple[dict, dict[str, object]]:
    """Read the live version of ``root``: (meta, name -> loaded object), after verifying every checksum.

    Tensors are memory-mapped from their files (``torch.load(mmap=True)``), so loading does not hold
    a second copy of a large memory: callers copy what they keep.

    Raises:
        ValueError: missing or foreign directory, unknown format or version, checksum mismatch,
            truncated or unreadable file.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"path {str(root)!r} is not a saved memory directory")
    for attempt in range(3):
        name = _live_version(root)
        try:
            return _read(root, name, expect_format)
        except ValueError:
            # a writer may have switched CURRENT and removed this version while it was being read
            if attempt == 2 or _live_version(root) == name:
                raise
    raise AssertionError("unreachable")


def _read(root: Path, name: str, expect_format: str) -> tuple[dict, dict[str, object]]:
    version = root / name
    if not name.startswith("v-") or "/" in name or not version.is_dir():
        raise ValueError(f"path {str(root)!r}: {CURRENT} names {name!r}, which is not a saved version")
    try:
        meta = json.loads((version / "meta.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
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
    files = meta.get("files")
    if not isinstance(files, dict) or not all(isinstance(info, dict) for info in files.values()):
        raise ValueError(f"path {str(root)!r}: meta.json lists no files")
    loaded = {}
    for fname, info in files.items():
        fpath = version / fname
        if not isinstance(fname, str) or "/" in fname or not fpath.is_file():
            raise ValueError(f"path {str(root)!r}: file {fname} is missing")
        if fpath.stat().st_size != info.get("bytes") or _sha256(fpath) != info.get("sha256"):
            raise ValueError(f"path {str(root)!r}: file {fname} is corrupt or truncated (checksum mismatch)")
        try:
            loaded[fname] = torch.load(fpath, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:
            raise ValueError(
                f"path {str(root)!r}: file {fname} cannot be read ({type(err).__name__})"
            ) from None
    return meta, loaded


def backend_meta(backend: MemoryBackend) -> dict:
    """The ``meta.json`` description of a saved backend."""
    if not isinstance(backend, MemoryBackend):
        raise TypeError(f"backend must be a MemoryBackend, got {type(backend).__name__}")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backend": backend.name,
        "config": backend.config(),
    }


def save_backend(backend: MemoryBackend, path: str | os.PathLike) -> Path:
    """Save ``backend`` to directory ``path`` (atomic, checksummed). Returns the version folder."""
    meta = backend_meta(backend)  # checks the type first
    return write_version(path, {"state.pt": backend.state}, meta)


def load_backend(path: str | os.PathLike, device: str | torch.device | None = None) -> MemoryBackend:
    """Load a backend saved by :meth:`MemoryBackend.save`, verifying format, version and checksums.

    A memory saved in parts (:func:`write_parts`, e.g. a ``"sharded"`` one) loads this process's part."""
    if saved_in_parts(path):
        path = own_part(path, FORMAT)
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
