"""Every console script: a bad argument exits with code 2 and exactly one stderr line naming it.

Each tool's ``main(argv)`` runs in-process. An output path that cannot be written is refused before any
work (a path below a regular file: no directory can be made there, whoever runs the tests). ``--help``
exits 0 everywhere.
"""

from __future__ import annotations

import configparser
import importlib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _console_scripts() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [x.strip() for x in cfg["options.entry_points"]["console_scripts"].splitlines() if x.strip()]
    return {name.strip(): target.strip() for name, _, target in (x.partition("=") for x in lines)}


SCRIPTS = _console_scripts()
#: tools run with ``python -m`` rather than installed as a script
MODULES = {"memory_growth": "benchmarks.memory_growth:main"}
TOOLS = {**SCRIPTS, **MODULES}

#: ``{bad}``: a path below a regular file (cannot be created); ``{tmp}``: a writable folder;
#: ``{ckpt}``: a folder holding a config.json file
CASES = [
    ("longllama-passkey", ["--lengths", "inf"], "--lengths"),
    ("longllama-passkey", ["--lengths", "nan"], "--lengths"),
    ("longllama-passkey", ["--lengths", "1e300"], "--lengths"),
    ("longllama-passkey", ["--depths", "deep"], "--depths"),
    ("longllama-passkey", ["--seeds", "many"], "--seeds"),
    ("longllama-passkey", ["--lengths", "1k", "--seeds", "1", "--out", "{bad}"], "--out"),
    ("longllama-train", ["--out", "{tmp}", "--threads", "0"], "--threads"),
    ("longllama-train", ["--out", "{tmp}", "--save-every", "0"], "--save-every"),
    ("longllama-train", ["--out", "{tmp}", "--grad-clip", "-1"], "--grad-clip"),
    ("longllama-train", ["--out", "{tmp}", "--warmup", "-5"], "--warmup"),
    ("longllama-train", ["--out", "{tmp}", "--lr", "nan"], "--lr"),
    ("longllama-train", ["--out", "{tmp}", "--steps", "many"], "--steps"),
    ("longllama-train", ["--threads", "1"], "--out"),
    ("longllama-train", ["--out", "{bad}"], "--out"),
    ("knn-memory-scaling", ["--sizes", "inf", "--out", "{tmp}"], "--sizes"),
    ("knn-memory-scaling", ["--sizes", "nan", "--out", "{tmp}"], "--sizes"),
    ("knn-memory-scaling", ["--sizes", "0", "--out", "{tmp}"], "--sizes"),
    ("knn-memory-scaling", ["--max-backend-search-keys", "inf"], "--max-backend-search-keys"),
    ("knn-memory-scaling", ["--preset", "huge"], "--preset"),
    ("knn-memory-scaling", ["--quick", "--out", "{bad}"], "--out"),
    ("knn-memory-scaling", ["--quick", "--out", "{tmp}", "--readme", "{bad}/README.md"], "--readme"),
    ("knn-memory-capture", ["{ckpt}", "--tokens", "1"], "--tokens"),
    ("knn-memory-capture", ["{ckpt}", "--tokens", "inf"], "--tokens"),
    ("knn-memory-capture", ["{ckpt}", "--out", "{bad}/c.pt"], "--out"),
    ("knn-memory-backend-check", ["--keys", "inf"], "--keys"),
    ("knn-memory-backend-check", ["--keys", "0"], "--keys"),
    ("knn-memory-backend-check", ["--heads", "0"], "--heads"),
    ("knn-memory-backend-check", ["--json", "{bad}/b.json"], "--json"),
    ("knn-memory-end-to-end", ["--contexts", "inf", "--out", "{tmp}"], "--contexts"),
    ("knn-memory-end-to-end", ["--backends", "dense", "--out", "{tmp}"], "--backends"),
    ("knn-memory-end-to-end", ["--top-k", "0", "--out", "{tmp}"], "--top-k"),
    ("knn-memory-end-to-end", ["--out", "{bad}"], "--out"),
    ("knn-memory-ceilings", ["--device", "gpu0"], "--device"),
    ("knn-memory-ceilings", ["--quick", "--json", "{bad}/c.json"], "--json"),
    ("knn-memory-ceilings", ["--quick", "--bogus"], "--bogus"),
    ("knn-memory-bench-report", ["{tmp}/absent"], "results"),
    ("knn-memory-bench-report", ["{tmp}", "--readme", "{bad}/README.md"], "--readme"),
    ("knn-memory-gpu-check", ["--tokens", "inf"], "--tokens"),
    ("knn-memory-gpu-check", ["--budget-s", "nan"], "--budget-s"),
    ("knn-memory-gpu-check", ["--device", "cpu"], "--device"),
    ("knn-memory-policy-check", ["{tmp}/c.pt", "--top-k", "0"], "--top-k"),
    ("knn-memory-policy-check", ["{tmp}/c.pt", "--lists-per-sqrt", "nan"], "--lists-per-sqrt"),
    ("knn-memory-policy-check", ["{tmp}/c.pt", "--out", "{bad}/rows.json"], "--out"),
    ("knn-memory-phases", ["--length", "inf"], "--length"),
    ("knn-memory-phases", ["--threads", "0"], "--threads"),
    ("knn-memory-phases", ["--length", "64k", "--out", "{bad}/p.json"], "--out"),
    ("knn-memory-agreement", ["--keys", "0"], "--keys"),
    ("knn-memory-agreement", ["--json", "{bad}/a.json"], "--json"),
    ("knn-memory-sharded", ["--length", "nan"], "--length"),
    ("knn-memory-sharded", ["--backend", "faiss:auto"], "--backend"),
    ("knn-memory-sharded", ["--ranks", "0"], "--ranks"),
    ("knn-memory-sharded", ["--out", "{bad}"], "--out"),
    ("memory_growth", ["--tokens", "inf"], "--tokens"),
    ("memory_growth", ["--model", "random", "--out", "{bad}"], "--out"),
]
if not torch.cuda.is_available():
    CASES.append(("knn-memory-ceilings", ["--device", "cuda"], "--device"))


def _main(tool: str):
    module, _, func = TOOLS[tool].partition(":")
    return getattr(importlib.import_module(module), func)


def _run(tool: str, argv: list[str]) -> int:
    try:
        return _main(tool)(argv)
    except SystemExit as stop:
        return stop.code


def _fill(argv: list[str], tmp_path: Path) -> list[str]:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}\n")
    out = tmp_path / "out"
    out.mkdir()
    return [a.format(bad=blocker / "sub", tmp=out, ckpt=ckpt) for a in argv]


def test_every_console_script_has_cases():
    covered = {tool for tool, _, _ in CASES}
    assert set(TOOLS) <= covered, f"no bad-argument case for {sorted(set(TOOLS) - covered)}"


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_help_exits_0(tool, capsys):
    assert _run(tool, ["--help"]) == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize(("tool", "argv", "word"), CASES, ids=[f"{t}:{' '.join(a)}" for t, a, _ in CASES])
def test_bad_argument_exits_2_with_one_line_naming_it(tool, argv, word, tmp_path, capsys):
    capsys.readouterr()
    code = _run(tool, _fill(argv, tmp_path))
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == 2, f"exit code {code}, stderr {err!r}"
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    assert lines[0].startswith(f"{tool}: error: "), lines[0]
    assert word in lines[0], lines[0]
