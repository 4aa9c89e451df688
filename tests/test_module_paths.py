"""The modules moved into ``longllama.fot`` and ``longllama.tools`` keep their old import paths, and the
runnable ones their old ``python -m`` paths."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MOVED = {
    "longllama.training": "longllama.fot.training",
    "longllama.crossbatch": "longllama.fot.crossbatch",
    "longllama.training_data": "longllama.fot.training_data",
    "longllama.tokenizer_training": "longllama.fot.tokenizer_training",
    "longllama.model_card": "longllama.fot.model_card",
    "longllama.passkey": "longllama.tools.passkey",
    "longllama.passkey_cli": "longllama.tools.passkey_cli",
    "longllama.cli_args": "longllama.tools.cli_args",
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_path_is_the_moved_module_itself(old):
    import longllama

    new = importlib.import_module(MOVED[old])
    assert importlib.import_module(old) is new  # one module: patching either patches both
    assert getattr(longllama, old.rpartition(".")[2]) is new


@pytest.mark.parametrize(
    ("module", "argv", "code"),
    [
        ("longllama.training", ["--help"], 0),
        ("longllama.passkey_cli", ["--help"], 0),
        ("longllama.model_card", [], 2),
    ],
)
def test_python_dash_m_runs_an_old_path(module, argv, code):
    """``python -m longllama.passkey_cli ...`` (and the others) in a fresh interpreter, as scripts call them."""
    done = subprocess.run(
        [sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert done.returncode == code, done.stderr[-2000:]
    assert "usage:" in done.stdout + done.stderr


def test_the_passkey_prompt_text_has_one_home():
    from longllama.fot import training_data
    from longllama.tools import passkey

    for name in ("TASK", "EVAL_FILLER"):
        assert getattr(training_data, name) is getattr(passkey, name)


def test_benchmarks_measure_peak_rss_with_the_same_class():
    from benchmarks import measure
    from longllama.tools import passkey
    from longllama.tools.peak_rss import PeakRSS

    assert measure.PeakRSS is PeakRSS and passkey.PeakRSS is PeakRSS
