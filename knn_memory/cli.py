"""What every command-line tool shares: one-line argument errors, token counts, output paths checked early.

A bad argument ends a tool with exit code 2 and exactly one line ``prog: error: ...`` on stderr that names
the argument. :class:`OneLineParser` turns argparse's errors (usage + ``SystemExit``) into
:class:`BadArguments`, which ``main()`` reports through :func:`error_exit`. Output paths are checked
(created and written to) before any long work starts, so a run never ends at its last step because its
results cannot be written.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

#: the largest token count or size a command line may ask for (2**40: no run reaches it; larger values
#: are typing errors that would only fail later, after the model or memory is built)
MAX_COUNT = 2**40


class BadArguments(ValueError):
    """A command-line argument was refused (the tool prints one line and exits with code 2)."""


class OneLineParser(argparse.ArgumentParser):
    """``ArgumentParser`` whose errors raise :class:`BadArguments` instead of printing usage and exiting."""

    def error(self, message: str):
        raise BadArguments(message)


def error_exit(prog: str, err: BaseException) -> int:
    """Print ``prog: error: <err>`` as one line on stderr; return 2 (the exit code for bad arguments)."""
    text = " ".join(str(err).split()) or type(err).__name__
    print(f"{prog}: error: {text}", file=sys.stderr)
    return 2


def parse_count(text: str, name: str, minimum: int = 1, maximum: int = MAX_COUNT, what: str = "count") -> int:
    """``"4k"`` -> 4096, ``"1m"`` -> 1048576, ``"1500"`` -> 1500.

    Raises:
        ValueError: naming ``name``: not a number, NaN or infinite, or outside ``[minimum, maximum]``.
    """
    t = str(text).strip().lower()
    scale = {"k": 1024, "m": 1024 * 1024}.get(t[-1:], 1)
    try:
        number = float(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise ValueError(f"{name} {text!r} is not a {what} such as 5000, 64k or 1m") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} {text!r} is not a finite {what} (expected e.g. 5000, 64k or 1m)")
    if number > maximum:
        raise ValueError(f"{name} {text!r} is too large (expected at most {maximum})")
    value = int(number)
    if value < minimum:
        raise ValueError(f"{name} {text!r} is below {minimum} (expected {minimum} <= {name} <= {maximum})")
    return value


def check_writable_dir(path: str | Path, name: str = "--out") -> Path:
    """Create directory ``path`` (with its parents) and prove it writable with a probe file it removes.

    Raises:
        ValueError: naming ``name`` and the path: it exists and is not a directory, or it cannot be
            created or written to (the reason the system gave).
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{name} {str(p)!r} exists and is not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ValueError(
            f"{name} {str(p)!r} cannot be written ({reason}); give a writable directory"
        ) from None
    return p


def check_writable_file(path: str | Path, name: str = "--out") -> Path:
    """Check that file ``path`` can be written: not a directory, its folder created and writable, and
    the file itself (if it exists) writable.

    Raises:
        ValueError: naming ``name`` and the path, saying why not.
    """
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{name} {str(p)!r} is a directory; give a file name")
    parent = p.parent
    if parent.exists() and not parent.is_dir():
        raise ValueError(f"{name} {str(p)!r} cannot be written ({str(parent)!r} is not a directory)")
    try:
        check_writable_dir(parent, name)
    except ValueError:
        raise ValueError(
            f"{name} {str(p)!r} cannot be written (its directory cannot be created or written)"
        ) from None
    if p.exists() and not os.access(p, os.W_OK):
        raise ValueError(f"{name} {str(p)!r} exists and is not writable")
    return p


def parse_option(text: str, name: str = "--index-option") -> tuple[str, int | float | str]:
    """``"max_nprobe=8"`` -> ``("max_nprobe", 8)``: NAME=VALUE with an int, a float or (else) a word as
    the value; ``ValueError`` naming ``name`` otherwise."""
    key, sep, value = text.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not key.isidentifier() or not value:
        raise ValueError(f"{name} {text!r} must be NAME=VALUE, e.g. max_nprobe=8")
    for kind in (int, float):
        try:
            number = kind(value)
        except ValueError:
            continue
        if isinstance(number, float) and not math.isfinite(number):
            raise ValueError(f"{name} {text!r}: the value must be finite")
        return key, number
    if not value.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"{name} {text!r}: the value must be a number or a word")
    return key, value
