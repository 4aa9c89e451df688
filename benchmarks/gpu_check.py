"""``knn-memory-gpu-check``: one command that exercises the CUDA code paths and times them against the GPU.

    python -m benchmarks.gpu_check --out benchmarks/results/gpu [--tokens 256k] [--skip-tests]

It is meant to be run on a GPU machine lent for the purpose (the development machines have none); its
output, ``gpu_check.json`` and ``gpu_check.txt``, is committed under ``benchmarks/results/gpu/``. The
default budget keeps a run under 8 minutes on one H200. Steps, in order, each guarded (one failing step
is reported and the next still runs) and each given a share of the overall ``--budget-s``:

1. **tests**: ``pytest -m gpu -q tests/`` in a subprocess: pass/fail counts and the output's tail (the
   check's own gpu test, which runs this command, is left out).
2. **exact_backend**: the ``"exact"`` backend on CUDA against the same backend on the CPU, same inputs
   (32 heads x 65536 keys x d=100 in bf16 memory, added in 4 calls): ``memory_attention`` outputs
   (max abs difference, relative L2) for float32 and bfloat16 queries, and the ids of an exact top-128
   search (share of equal ids, and overlap of the id sets).
3. **prefill**: a ``--tokens`` passkey prompt read by the embedded model on CUDA in one call, first with
   the exact backend (dense, as upstream), then with ``faiss:auto`` (top-32). On CUDA the auto index
   stays an exact torch matmul + top-k over the keys in GPU memory; Faiss GPU would only serve IVF
   specs, and the run says whether the installed Faiss has GPU support at all. The answer is decoded
   greedily from each prefill's cache and scored as ``longllama.passkey.run_passkey`` scores it.
4. **ceilings**: the GPU's bf16 and fp32 matmul rates (8192^3, best of several, synchronized) and its
   read bandwidth, measured in the same run.

Every timing is reported with the FLOP of its work where that is well defined (matmul FLOP: 2 per
multiply-add, e.g. ``2*2*q*(n+M)*d`` per head for attention over n local keys and M memory entries), as
achieved TFLOP/s and as a ratio to the bf16 matmul rate; every timing also as "bf16-equivalent FLOP"
(seconds x the bf16 rate). Faiss may be absent, CPU-only or GPU-enabled: the run records which, and a
missing Faiss fails only the steps that import ``knn_memory`` (which imports Faiss).

Exit codes: 0 every step ran and passed its checks, 1 some step failed, errored or ran out of time,
2 bad arguments or no CUDA device (one line on stderr, before any work).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
TOOL = "knn-memory-gpu-check"
DEFAULT_TOKENS = "256k"
DEFAULT_BUDGET_S = 420.0
# shares of the overall budget; a step's unused time passes on to the later steps
SHARES = {"tests": 0.25, "exact_backend": 0.15, "prefill": 0.5, "ceilings": 0.1}
TAIL_CHARS = 3000
OWN_TEST = "test_a_tiny_run_writes_every_step"

# step 2 geometry: one memory layer of a 3B LongLLaMA (32 heads of 100) holding 64k tokens, one window
EXACT_SHAPE = {"heads": 32, "head_dim": 100, "keys": 65536, "adds": 4, "queries": 2048, "k": 128}
# thresholds of the CUDA-vs-CPU comparison (float32 matmuls may use TF32 where it is switched on)
MAX_REL_L2 = {"float32": 2e-3, "bfloat16": 3e-2}
MIN_TOPK_OVERLAP = 0.99


class StepTimeout(Exception):
    """A step's share of the budget ran out (raised between pieces of work, never inside a kernel)."""


class Deadline:
    """Wall-clock deadline of one step."""

    def __init__(self, seconds: float) -> None:
        self.at = time.perf_counter() + seconds

    def left(self) -> float:
        return self.at - time.perf_counter()

    def check(self, before: str) -> None:
        if time.perf_counter() > self.at:
            raise StepTimeout(f"step budget spent before {before}")

    def split(self, fraction: float) -> Deadline:
        """A deadline ``fraction`` of the way from now to this one."""
        return Deadline(max(0.0, self.left()) * fraction)


# ---------------------------------------------------------------------------------------------- helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    """``fn()`` and its synchronized wall time in seconds."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def _timing(name: str, seconds: float, flop: float | None = None, dtype: str | None = None) -> dict:
    return {"name": name, "seconds": seconds, "flop": flop, "dtype": dtype}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".strip()


def portable(text: str) -> str:
    """``text`` without this machine's paths (repository, interpreter, temp and home directories)."""
    places = [
        (str(REPO_ROOT), "<repo>"),
        (sys.prefix, "<python>"),
        (sys.base_prefix, "<python>"),
        (tempfile.gettempdir(), "<tmp>"),
        (str(Path.home()), "~"),
    ]
    for path, name in sorted(places, key=lambda p: -len(p[0])):
        if len(path) > 1:
            text = text.replace(path, name)
    return text


def faiss_status() -> dict:
    """The installed Faiss: version and GPU count, or why it cannot be imported."""
    try:
        import faiss
    except Exception as err:  # ImportError, or a broken wheel's OSError
        return {"version": None, "gpus": None, "gpu_build": False, "import_error": _error_text(err)}
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else None
    return {
        "version": getattr(faiss, "__version__", "unknown"),
        "gpus": gpus,
        "gpu_build": hasattr(faiss, "StandardGpuResources"),
        "import_error": None,
    }


def gpu_machine_info(device: torch.device) -> dict:
    """CPU and GPU of this machine, torch/CUDA versions (no host names, no paths)."""
    try:
        from benchmarks.ceilings import machine_info

        info = machine_info(str(device))
    except Exception as err:  # benchmarks.ceilings imports knn_memory, hence Faiss
        info = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "os": f"{platform.system()} {platform.machine()}",
            "cores": os.cpu_count(),
            "machine_info_error": _error_text(err),
        }
    info["torch"] = torch.__version__
    info["cuda"] = torch.version.cuda
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_capability"] = f"{props.major}.{props.minor}"
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["gpu_count"] = torch.cuda.device_count()
        info["cudnn"] = torch.backends.cudnn.version()
        info["matmul_allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return info


# ------------------------------------------------------------------------------------------ step 1: tests
_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed|warnings?)\b")


def pytest_counts(text: str) -> dict[str, int]:
    """Counts from pytest's summary line ("3 passed, 1 failed, 40 deselected in 2.1s")."""
    counts: dict[str, int] = {}
    lines = [line for line in text.splitlines() if _COUNT.search(line)]
    for number, word in _COUNT.findall(lines[-1] if lines else ""):
        word = {"error": "errors", "warning": "warnings"}.get(word, word)
        counts[word] = counts.get(word, 0) + int(number)
    return counts


def step_tests(device: torch.device, deadline: Deadline, record: dict) -> None:
    """``pytest -m gpu -q tests/`` in a subprocess, killed at the deadline."""
    tests = REPO_ROOT / "tests"
    if not tests.is_dir():
        record["status"] = "skipped"
        record["note"] = "no tests/ directory beside the benchmarks package (an installed copy)"
        return
    # the check's own gpu test runs this command: left out here, it would only run it again
    own = f"tests/test_gpu_check.py::{OWN_TEST}"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "tests/", "--deselect", own]
    record["command"] = f"pytest -m gpu -q tests/ --deselect {own}"
    timeout = max(1.0, deadline.left())
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
        output, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        output = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else err.stdout
        record["output_tail"] = portable((output or "")[-TAIL_CHARS:])
        record["timings"] = [_timing("pytest -m gpu", time.perf_counter() - t0)]
        raise StepTimeout(f"pytest still running after {timeout:.0f} s; killed") from None
    seconds = time.perf_counter() - t0
    counts = pytest_counts(output)
    record.update(
        returncode=rc,
        counts=counts,
        output_tail=portable(output[-TAIL_CHARS:]),
        timings=[_timing("pytest -m gpu", seconds)],
    )
    # 5: no test collected (none marked gpu); 0: all selected passed
    if rc not in (0, 5) or counts.get("failed") or counts.get("errors"):
        record["status"] = "failed"


# --------------------------------------------------------------------------- step 2: exact backend CUDA/CPU
def _compare(reference: torch.Tensor, other: torch.Tensor) -> dict:
    a, b = reference.float().cpu(), other.float().cpu()
    diff = (a - b).abs()
    return {
        "max_abs_diff": float(diff.max()),
        "rel_l2": float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(a).clamp_min(1e-30)),
    }


def topk_agreement(ids_a: torch.Tensor, ids_b: torch.Tensor) -> dict:
    """Share of equal ids slot by slot, and mean overlap of each query's id set ([..., k] int64, unique)."""
    same = float((ids_a == ids_b).float().mean())
    both = torch.cat([ids_a.sort(dim=-1).values, ids_b.sort(dim=-1).values], dim=-1).sort(dim=-1).values
    common = (both[..., 1:] == both[..., :-1]) & (both[..., 1:] >= 0)
    overlap = float((common.sum(dim=-1).float() / ids_a.shape[-1]).mean())
    return {"equal_ids_share": same, "id_set_overlap": overlap}


def step_exact_backend(
    device: torch.device,
    deadline: Deadline,
    record: dict,
    shape: dict | None = None,
    groups: tuple[tuple[int, int], tuple[int, int]] = ((8, 128), (32, 512)),
) -> None:
    """The exact backend on ``device`` against the CPU: same keys, values and queries.

    ``groups``: the (heads, queries) blocks of ``memory_attention`` on the CPU and on ``device`` (the
    result does not depend on them; small CPU blocks avoid multi-GB score tensors); searches run in
    blocks of the same number of queries.
    """
    shape = dict(EXACT_SHAPE, **(shape or {}))
    H, d, M, Q, k = shape["heads"], shape["head_dim"], shape["keys"], shape["queries"], shape["k"]
    record["shape"] = shape
    try:
        import knn_memory
    except Exception as err:
        record["status"] = "error"
        record["error"] = (
            f"import knn_memory failed ({_error_text(err)}); knn_memory imports Faiss through indexes/, so "
            "the faiss-cpu wheel is needed even where the memory lives on a GPU"
        )
        return
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, H, M, d, generator=g)
    values = torch.randn(1, H, M, d, generator=g)
    query = torch.randn(1, H, Q, d, generator=g)
    local_k = torch.randn(1, H, Q, d, generator=g)
    local_v = torch.randn(1, H, Q, d, generator=g)
    mems = {
        name: knn_memory.create_backend("exact", num_heads=H, head_dim=d, device=dev, mem_dtype="bfloat16")
        for name, dev in (("cpu", torch.device("cpu")), ("gpu", device))
    }
    timings = record.setdefault("timings", [])
    step = -(-M // shape["adds"])
    add_s = 0.0
    for start in range(0, M, step):
        deadline.check("adding keys")
        kc, vc = keys[:, :, start : start + step], values[:, :, start : start + step]
        mems["cpu"].add(kc, vc)
        kg, vg = kc.to(device), vc.to(device)
        add_s += _timed(lambda kg=kg, vg=vg: mems["gpu"].add(kg, vg), device)[1]
    timings.append(_timing(f"exact add {M} keys x {H} heads ({shape['adds']} calls)", add_s))
    cpu_groups, dev_groups = groups
    attn_flop = 4.0 * d * Q * (Q + M) * H  # q.k and p.v over [local ; memory], every head
    results: dict[str, dict] = {}
    deadline.check("CPU memory attention")
    ref, cpu_s = _timed(
        lambda: knn_memory.memory_attention(
            query, local_k, local_v, None, memory=mems["cpu"], grouping=cpu_groups
        ),
        torch.device("cpu"),
    )
    record["cpu_attention_seconds"] = cpu_s
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        deadline.check(f"{device} memory attention ({name})")
        args = [t.to(device, dtype) for t in (query, local_k, local_v)]

        def attend(args=args):
            return knn_memory.memory_attention(*args, None, memory=mems["gpu"], grouping=dev_groups)

        attend()  # warm-up
        out, seconds = min((_timed(attend, device) for _ in range(3)), key=lambda r: r[1])
        results[name] = _compare(ref, out)
        timings.append(_timing(f"exact memory_attention q={Q} M={M} ({name})", seconds, attn_flop, name))
        del out, args
    record["attention"] = results
    # exact top-k search, in query blocks (the scores of a block are [1, H, block, M] float32)
    ids = {}
    search_s = 0.0
    for name in ("cpu", "gpu"):
        dev, block = (torch.device("cpu"), cpu_groups[1]) if name == "cpu" else (device, dev_groups[1])
        parts = []
        for begin in range(0, Q, block):
            deadline.check(f"{name} top-{k} search")
            qb = query[:, :, begin : begin + block].to(dev)
            hits, seconds = _timed(lambda qb=qb, name=name: mems[name].search(qb, k=k), dev)
            parts.append(hits.ids.cpu())
            if name == "gpu":
                search_s += seconds
        ids[name] = torch.cat(parts, dim=2)
    timings.append(
        _timing(f"exact top-{k} search q={Q} M={M} (float32)", search_s, 2.0 * d * Q * M * H, "float32")
    )
    record["topk"] = topk_agreement(ids["cpu"], ids["gpu"])
    checks = {
        "float32_rel_l2": results["float32"]["rel_l2"] <= MAX_REL_L2["float32"],
        "bfloat16_rel_l2": results["bfloat16"]["rel_l2"] <= MAX_REL_L2["bfloat16"],
        "topk_overlap": record["topk"]["id_set_overlap"] >= MIN_TOPK_OVERLAP,
    }
    record["checks"] = checks
    record["thresholds"] = {"max_rel_l2": MAX_REL_L2, "min_topk_overlap": MIN_TOPK_OVERLAP}
    if not all(checks.values()):
        record["status"] = "failed"


# ------------------------------------------------------------------------------------- step 3: prefill
class FlopCounter:
    """Counts the matmul FLOP of every ``knn_memory.memory_attention`` call the model makes.

    A top-k backend is counted as an exact search (every key scored), which is what runs on CUDA; an
    IVF on the CPU scores fewer keys.
    """

    def __init__(self) -> None:
        self.local = 0.0
        self.memory = 0.0

    def count(self, query, local_keys, memory, top_k) -> None:
        B, H, q, d = query.shape
        n = local_keys.shape[2]
        self.local += 4.0 * d * q * n * B * H
        if memory is None:
            return
        entries = getattr(memory, "entries", None)  # the dense backend scores padding entries too
        M = int(entries) if entries is not None else len(memory)
        if M == 0:
            return
        k = top_k if top_k is not None else memory.top_k
        if k is None:  # dense: every entry scored and weighted
            self.memory += 4.0 * d * q * M * B * H
        else:  # exact search over all keys (the CUDA path), then attention over k hits
            self.memory += 2.0 * d * q * M * B * H + 4.0 * d * q * min(k, M) * B * H

    @contextlib.contextmanager
    def installed(self):
        import knn_memory

        original = knn_memory.memory_attention

        def counted(query, local_keys, local_values, local_mask=None, memory=None, **kwargs):
            self.count(query, local_keys, memory, kwargs.get("top_k"))
            return original(query, local_keys, local_values, local_mask, memory, **kwargs)

        knn_memory.memory_attention = counted
        try:
            yield self
        finally:
            knn_memory.memory_attention = original


def dense_flop_per_token(config) -> float:
    """Matmul FLOP per token outside attention: q/k/v/o projections and the MLP of every layer."""
    D, inter = config.hidden_size, config.intermediate_size
    return config.num_hidden_layers * 2.0 * (4 * D * D + 3 * D * inter)


def _prefill_run(
    model, prompt, tokenizer, device: torch.device, deadline: Deadline, run: dict
) -> torch.Tensor:
    """Warm up, time one prefill, decode the answer greedily; fills ``run``; returns the last logits."""
    seen = {"tokens": 0}

    def guard(module, args, kwargs):  # before each window's first layer
        deadline.check(f"the window after {seen['tokens']} tokens")
        hidden = args[0] if args else kwargs["hidden_states"]
        seen["tokens"] += int(
            hidden.shape[0] // ids.shape[0] * hidden.shape[1]
        )  # [G * B, n, D] stacked windows

    ids = prompt.input_ids.to(device)
    warm = min(2048, ids.shape[1])
    with torch.no_grad():
        model(ids[:, :warm], use_cache=True, logits_to_keep=1)
    _sync(device)
    _free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    handle = model.model.layers[0].register_forward_pre_hook(guard, with_kwargs=True)
    counter = FlopCounter()
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), counter.installed():
            out = model(ids, use_cache=True, logits_to_keep=1)
            _sync(device)
    except StepTimeout:
        seconds = time.perf_counter() - t0
        run["tokens_read"] = seen["tokens"]
        run["tokens_per_second"] = seen["tokens"] / seconds if seconds > 0 else None
        raise
    finally:
        handle.remove()
    seconds = time.perf_counter() - t0
    config = model.config
    tokens = int(ids.shape[1])
    dense = dense_flop_per_token(config) * tokens + 2.0 * config.hidden_size * config.vocab_size
    run.update(
        seconds=seconds,
        tokens_per_second=tokens / seconds,
        flop={"dense": dense, "local_attention": counter.local, "memory_attention": counter.memory},
        memory_entries_per_head=len(out.cache.memory(config.mem_layers[0])),
    )
    if device.type == "cuda":
        run["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    logits = out.logits[0, -1].float().cpu()
    # the answer, greedy from the prefill's cache: scored as run_passkey scores it (every token equal)
    deadline.check("decoding the answer")
    generated = [int(logits.argmax())]
    with torch.no_grad():
        cache = out.cache
        for _ in range(len(prompt.answer_ids) - 1):
            token = torch.tensor([[generated[-1]]], device=device)
            step = model(token, cache=cache, use_cache=True, logits_to_keep=1)
            cache = step.cache
            generated.append(int(step.logits[0, -1].argmax()))
    run["passkey"] = {
        "key": prompt.key,
        "output": tokenizer.decode(generated, skip_special_tokens=True).strip(),
        "correct": generated == list(prompt.answer_ids),
        "first_token": generated[0],
    }
    return logits


def step_prefill(device: torch.device, deadline: Deadline, record: dict, tokens: int, seed: int = 0) -> None:
    """The embedded model reads one ``tokens``-token passkey prompt on ``device`` per backend."""
    try:
        from longllama import LongLlamaForCausalLM, embedded_model_path, load_tokenizer
        from longllama.passkey import make_prompt
    except Exception as err:
        record["status"] = "error"
        record["error"] = (
            f"import longllama failed ({_error_text(err)}); the model uses knn_memory, which imports Faiss"
        )
        return
    faiss = faiss_status()
    record["faiss_gpu"] = (
        f"Faiss {faiss['version']} reports {faiss['gpus']} GPU(s)"
        if faiss["gpus"]
        else "no Faiss GPU support here (get_num_gpus() is 0 or missing); faiss:auto runs its torch path"
    )
    record["auto_on_cuda"] = (
        "exact torch matmul + top-k over the keys in GPU memory (the auto policy stays exact)"
    )
    path = embedded_model_path()
    tokenizer = load_tokenizer(path)
    t0 = time.perf_counter()
    prompt = make_prompt(tokenizer, tokens, seed)
    record.update(
        tokens=prompt.n_tokens, tokens_asked=tokens, seed=seed, prompt_seconds=time.perf_counter() - t0
    )
    timings = record.setdefault("timings", [])
    runs = record.setdefault("runs", {})
    backends = [
        ("exact", {"mem_backend": "exact", "mem_index": None, "mem_top_k": None}),
        ("faiss:auto", {"mem_backend": "faiss", "mem_index": "auto", "mem_top_k": 32}),
    ]
    logits = {}
    for i, (label, settings) in enumerate(backends):
        run = runs[label] = {"settings": settings, "status": "ok"}
        sub = deadline.split(1.0 / (len(backends) - i))
        model = None
        try:
            sub.check(f"loading the model for {label}")
            model = LongLlamaForCausalLM.from_pretrained(
                path, torch_dtype=torch.float32, mem_device=None, **settings
            ).to(device)
            model.eval()
            logits[label] = _prefill_run(model, prompt, tokenizer, device, sub, run)
            flop = sum(run["flop"].values())
            timings.append(
                _timing(f"prefill {prompt.n_tokens} tokens, {label}", run["seconds"], flop, "float32")
            )
        except StepTimeout as err:
            run["status"] = "timeout"
            run["error"] = str(err)
        except Exception as err:
            run["status"] = "error"
            run["error"] = _error_text(err)
            run["traceback_tail"] = portable(traceback.format_exc()[-TAIL_CHARS:])
        finally:
            del model
            _free(device)
    if len(logits) == 2:
        a, b = logits.values()
        record["agreement"] = {
            "same_next_token": int(a.argmax()) == int(b.argmax()),
            "max_abs_logit_diff": float((a - b).abs().max()),
            "same_answer": runs["exact"]["passkey"]["output"] == runs["faiss:auto"]["passkey"]["output"],
        }
    statuses = [r["status"] for r in runs.values()]
    for bad in ("error", "timeout"):
        if bad in statuses:
            record["status"] = bad
            break


# ------------------------------------------------------------------------------------ step 4: ceilings
def _fallback_matmul_gflops(n: int, dtype: torch.dtype, device: torch.device, repeats: int = 10) -> float:
    """Best GFLOP/s of an n^3 matmul (used only where ``benchmarks.ceilings`` cannot be imported)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    best = min(_timed(lambda: torch.matmul(a, b, out=out), device)[1] for _ in range(repeats + 1))
    return 2.0 * n**3 / best / 1e9


def step_ceilings(
    device: torch.device, deadline: Deadline, record: dict, n: int = 8192, mib: int = 4096
) -> None:
    """bf16/fp32 matmul rates and read bandwidth of ``device``.

    Every other step's ratios need these figures, so this step runs even when the budget is spent: each
    of its three measurements then gets a short budget of its own (one warm-up and at least one run).
    """
    record.update(matmul_n=n, read_mib=mib)
    try:
        from benchmarks.ceilings import matmul_gflops, read_bandwidth_gbs

        record["source"] = "benchmarks.ceilings"
    except Exception as err:
        record["source"] = f"torch only ({_error_text(err)})"
        matmul_gflops = read_bandwidth_gbs = None
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        budget = max(1.0, deadline.left() / 3)
        if matmul_gflops is not None:
            rate = matmul_gflops(n, dtype, device, repeats=20, budget_s=budget)
        else:
            rate = _fallback_matmul_gflops(n, dtype, device)
        record[f"matmul_{name}_tflops"] = rate / 1e3
    if read_bandwidth_gbs is not None:
        record["read_gbs"] = read_bandwidth_gbs(mib, device, repeats=10, budget_s=max(1.0, deadline.left()))


# ------------------------------------------------------------------------------------------- the report
def rate_table(result: dict) -> list[dict]:
    """Every step's timings with achieved TFLOP/s and ratios to the run's bf16 matmul rate."""
    ceil = result["steps"].get("ceilings", {})
    bf16 = ceil.get("matmul_bfloat16_tflops")
    fp32 = ceil.get("matmul_float32_tflops")
    rows = []
    for step, rec in result["steps"].items():
        for t in rec.get("timings", []):
            s, flop = t["seconds"], t["flop"]
            tflops = flop / s / 1e12 if flop and s > 0 else None
            same = {"float32": fp32, "bfloat16": bf16}.get(t.get("dtype") or "")
            rows.append(
                {
                    "step": step,
                    **t,
                    "tflops": tflops,
                    "ratio_bf16_matmul": tflops / bf16 if tflops and bf16 else None,
                    "ratio_own_dtype_matmul": tflops / same if tflops and same else None,
                    "bf16_equivalent_tflop": s * bf16 if bf16 else None,
                }
            )
    return rows


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _step_note(name: str, rec: dict) -> str:
    if rec.get("error"):
        return rec["error"]
    if name == "tests":
        return ", ".join(f"{v} {k}" for k, v in rec.get("counts", {}).items()) or rec.get("note", "")
    if name == "exact_backend" and "attention" in rec:
        a, t = rec["attention"], rec.get("topk", {})
        return (
            f"rel L2 fp32 {a['float32']['rel_l2']:.1e} bf16 {a['bfloat16']['rel_l2']:.1e}; "
            f"top-k id overlap {_fmt(t.get('id_set_overlap'), '.4f')}, equal slots {_fmt(t.get('equal_ids_share'), '.4f')}"
        )
    if name == "prefill":
        parts = []
        for label, run in rec.get("runs", {}).items():
            if run["status"] == "ok":
                pk = run["passkey"]
                parts.append(
                    f"{label}: {run['tokens_per_second']:.0f} tok/s, passkey "
                    f"{'correct' if pk['correct'] else 'wrong'} ({pk['output']!r} vs {pk['key']})"
                )
            else:
                parts.append(f"{label}: {run['status']} ({run.get('error', '')})")
        return "; ".join(parts)
    if name == "ceilings" and "matmul_bfloat16_tflops" in rec:
        return (
            f"bf16 {rec['matmul_bfloat16_tflops']:.0f} TFLOP/s, fp32 "
            f"{_fmt(rec.get('matmul_float32_tflops'), '.1f')} TFLOP/s, read {_fmt(rec.get('read_gbs'), '.0f')} GB/s"
        )
    return rec.get("note", "")


def format_report(result: dict) -> str:
    m, f = result["machine"], result["faiss"]
    faiss_line = (
        f"Faiss absent ({f['import_error']})"
        if f["import_error"]
        else f"Faiss {f['version']}, {f['gpus']} Faiss GPU(s)"
        + ("" if f["gpu_build"] else " (CPU-only build)")
    )
    lines = [
        f"{TOOL} on {m.get('gpu', '?')} (torch {m['torch']}, CUDA {m['cuda']}; {faiss_line})",
        f"budget {result['budget_s']:.0f} s, total {_fmt(result.get('total_seconds'), '.0f')} s",
        "",
        f"{'step':<14} {'status':<8} {'seconds':>8}  note",
    ]
    for name, rec in result["steps"].items():
        lines.append(
            f"{name:<14} {rec['status']:<8} {_fmt(rec.get('seconds'), '8.1f')}  {_step_note(name, rec)}"
        )
    lines += [
        "",
        f"{'timing':<52} {'seconds':>9} {'TFLOP':>9} {'TFLOP/s':>8} {'x bf16':>7} {'x dtype':>7} {'bf16-eq TFLOP':>13}",
    ]
    for r in rate_table(result):
        lines.append(
            f"{r['name'][:52]:<52} {r['seconds']:>9.3f} {_fmt(r['flop'] and r['flop'] / 1e12, '9.3f'):>9} "
            f"{_fmt(r['tflops'], '8.2f'):>8} {_fmt(r['ratio_bf16_matmul'], '7.4f'):>7} "
            f"{_fmt(r['ratio_own_dtype_matmul'], '7.4f'):>7} {_fmt(r['bf16_equivalent_tflop'], '13.1f'):>13}"
        )
    lines.append(
        "x bf16: achieved rate / bf16 matmul rate of this run; x dtype: / the matmul rate of the work's dtype"
    )
    return "\n".join(lines)


def write_results(result: dict, out: Path) -> None:
    result["rates"] = rate_table(result)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "gpu_check.txt").write_text(format_report(result) + "\n")


# ------------------------------------------------------------------------------------------------ main
def _parse_tokens(text: str) -> int:
    try:
        from longllama.cli_args import parse_token_count
    except Exception:  # longllama imports knn_memory and Faiss; the count itself needs neither
        return _plain_token_count(text)
    return parse_token_count(text, "--tokens", minimum=64)


def _plain_token_count(text: str) -> int:
    t = text.strip().lower()
    scale = {"k": 1024, "m": 1024 * 1024}.get(t[-1:], 1)
    try:
        number = float(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise ValueError(f"--tokens {text!r} is not a token count such as 5000, 64k or 1m") from None
    if not number <= 2**40:  # NaN, inf and sizes no GPU holds
        raise ValueError(f"--tokens {text!r} is not a finite token count of at most {2**40}")
    if int(number) < 64:
        raise ValueError(f"--tokens {text!r} is below 64 tokens")
    return int(number)


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose errors raise ``ValueError`` (one stderr line, exit code 2) instead of usage + exit."""

    def error(self, message: str):
        raise ValueError(message)


def _writable_dir(text: str) -> Path:
    """``--out`` created and proved writable (a probe file made and removed) before the steps run."""
    out = Path(text)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"--out {text!r} cannot be written ({err.strerror or type(err).__name__})") from None
    return out


def cuda_device(text: str) -> torch.device:
    """``--device`` as a CUDA device that exists; ``ValueError`` saying why not."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {text!r} is not a device string such as 'cuda' or 'cuda:0'") from None
    if dev.type != "cuda":
        raise ValueError(f"--device {text!r} is not a CUDA device; this check needs one")
    if not torch.cuda.is_available():
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA"
        raise LookupError(
            f"no CUDA device: --device {text!r} asked for, but torch {torch.__version__} ({built}) sees none"
        )
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise LookupError(
            f"no CUDA device: --device {text!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) are present"
        )
    return torch.device("cuda", index)


def run_steps(device: torch.device, args: argparse.Namespace, tokens: int, out: Path) -> dict:
    start = time.perf_counter()
    end = start + args.budget_s
    result = {
        "tool": TOOL,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "args": {
            "tokens": tokens,
            "skip_tests": args.skip_tests,
            "budget_s": args.budget_s,
            "device": str(device),
        },
        "budget_s": args.budget_s,
        "machine": gpu_machine_info(device),
        "faiss": faiss_status(),
        "steps": {},
    }
    steps: list[tuple[str, Callable[[Deadline, dict], None]]] = [
        ("tests", lambda dl, rec: step_tests(device, dl, rec)),
        ("exact_backend", lambda dl, rec: step_exact_backend(device, dl, rec)),
        ("prefill", lambda dl, rec: step_prefill(device, dl, rec, tokens)),
        ("ceilings", lambda dl, rec: step_ceilings(device, dl, rec)),
    ]
    for i, (name, fn) in enumerate(steps):
        rec = result["steps"][name] = {"status": "ok"}
        if name == "tests" and args.skip_tests:
            rec.update(status="skipped", note="--skip-tests")
            continue
        later = sum(SHARES[n] for n, _ in steps[i:] if not (n == "tests" and args.skip_tests))
        deadline = Deadline(max(0.0, end - time.perf_counter()) * SHARES[name] / later)
        rec["budget_s"] = round(deadline.left(), 1)
        print(f"{TOOL}: {name} (budget {rec['budget_s']:.0f} s)", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            fn(deadline, rec)
        except StepTimeout as err:
            rec["status"] = "timeout"
            rec["error"] = str(err)
        except Exception as err:
            rec["status"] = "error"
            rec["error"] = _error_text(err)
            rec["traceback_tail"] = portable(traceback.format_exc()[-TAIL_CHARS:])
        rec["seconds"] = time.perf_counter() - t0
        _free(device)
        result["total_seconds"] = time.perf_counter() - start
        write_results(result, out)  # after every step: a run cut short still leaves its results
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = _OneLineParser(prog=TOOL, description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out", default="benchmarks/results/gpu", help="folder for gpu_check.json and gpu_check.txt"
    )
    p.add_argument(
        "--tokens", default=DEFAULT_TOKENS, help=f"prefill length, e.g. 4k, 256k (default {DEFAULT_TOKENS})"
    )
    p.add_argument("--skip-tests", action="store_true", help="do not run the gpu-marked tests")
    p.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help=f"overall time budget (default {DEFAULT_BUDGET_S:.0f})",
    )
    p.add_argument("--device", default="cuda", help="CUDA device (default cuda)")
    try:
        args = p.parse_args(argv)
        tokens = _parse_tokens(args.tokens)
        if not 0 < args.budget_s < math.inf:
            raise ValueError(f"--budget-s must be a finite number of seconds > 0, got {args.budget_s}")
        device = cuda_device(args.device)
    except LookupError as err:
        print(err, file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"{TOOL}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    try:
        out = _writable_dir(args.out)
    except ValueError as err:
        print(f"{TOOL}: error: {err}", file=sys.stderr)
        return 2
    result = run_steps(device, args, tokens, out)
    print(format_report(result))
    bad = [name for name, rec in result["steps"].items() if rec["status"] not in ("ok", "skipped")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
