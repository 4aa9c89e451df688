"""``benchmarks.gpu_check``: its arguments and refusals everywhere, a tiny run where CUDA is present."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["tests", "exact_backend", "prefill", "ceilings"]
STATUSES = {"ok", "failed", "error", "timeout", "skipped"}


def _run(args: list[str], env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--out", "--tokens", "--skip-tests", "--budget-s", "--device"):
        assert option in out


def test_no_cuda_exits_2_with_one_line_naming_the_device(tmp_path):
    out = tmp_path / "res"
    proc = _run(["--out", str(out), "--device", "cuda:0"], env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("no CUDA device: ") and "'cuda:0'" in lines[0]
    assert not out.exists()  # refused before any work


def test_bad_tokens_exit_2_naming_the_argument(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "res"), "--tokens", "lots"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tokens" in err[0] and "'lots'" in err[0]
    assert not (tmp_path / "res").exists()


@pytest.mark.parametrize(
    ("args", "word"), [(["--device", "cpu"], "--device"), (["--budget-s", "0"], "--budget-s")]
)
def test_other_bad_arguments_exit_2(tmp_path, capsys, args, word):
    assert gpu_check.main(["--out", str(tmp_path / "res"), *args]) == 2
    assert word in capsys.readouterr().err


def test_pytest_summary_counts():
    text = "..F.s\nFAILED tests/x.py::t\n3 passed, 1 failed, 1 skipped, 40 deselected, 2 warnings in 2.10s\n"
    assert gpu_check.pytest_counts(text) == {
        "passed": 3, "failed": 1, "skipped": 1, "deselected": 40, "warnings": 2,
    }  # fmt: skip
    assert gpu_check.pytest_counts("1 error in 0.5s") == {"errors": 1}
    assert gpu_check.pytest_counts("no tests ran") == {}


def test_topk_agreement_counts_slots_and_sets():
    a = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    b = torch.tensor([[1, 0, 2, 3], [4, 5, 6, 9]])
    got = gpu_check.topk_agreement(a, b)
    assert got["equal_ids_share"] == pytest.approx(5 / 8)
    assert got["id_set_overlap"] == pytest.approx((1 + 3 / 4) / 2)


def test_output_carries_no_machine_paths():
    text = f"{gpu_check.REPO_ROOT}/tests/test_x.py:3: in {sys.prefix}/lib/x.py"
    cleaned = gpu_check.portable(text)
    assert str(gpu_check.REPO_ROOT) not in cleaned and sys.prefix not in cleaned
    assert "<repo>/tests/test_x.py" in cleaned


def test_exact_backend_step_on_the_cpu_at_a_tiny_size():
    """The comparison's own logic, run CPU against CPU: everything agrees and the work is counted."""
    record: dict = {}
    shape = {"heads": 2, "head_dim": 8, "keys": 300, "adds": 3, "queries": 20, "k": 8}
    gpu_check.step_exact_backend(
        torch.device("cpu"), gpu_check.Deadline(60), record, shape, groups=((1, 7), (2, 20))
    )
    assert "status" not in record and all(record["checks"].values())
    assert record["attention"]["float32"]["rel_l2"] == 0.0
    assert record["topk"] == {"equal_ids_share": 1.0, "id_set_overlap": 1.0}
    flop = [t["flop"] for t in record["timings"] if "memory_attention" in t["name"]]
    assert flop == [4.0 * 8 * 20 * (20 + 300) * 2] * 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_tiny_run_writes_every_step(tmp_path):
    assert gpu_check.OWN_TEST == "test_a_tiny_run_writes_every_step"
    proc = _run(["--out", str(tmp_path), "--tokens", "4k", "--skip-tests", "--budget-s", "240"], timeout=420)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(result["steps"]) == STEPS
    assert all(step["status"] in STATUSES for step in result["steps"].values())
    assert result["steps"]["tests"]["status"] == "skipped"
    assert result["steps"]["ceilings"]["matmul_bfloat16_tflops"] > 0
    assert result["machine"]["gpu"] == torch.cuda.get_device_name(0)
    assert (tmp_path / "gpu_check.txt").read_text().startswith("knn-memory-gpu-check on ")
