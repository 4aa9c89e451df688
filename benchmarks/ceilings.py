"""The machine's own ceilings, measured in the same run as the benchmark that is compared with them.

* ``matmul_fp32_gflops`` / ``matmul_bf16_gflops``: the best rate of a square ``torch.matmul``
  (n x n x n, 2 n^3 FLOP) over a few repeats, with torch's default threads;
* ``mem_read_gbs``: the best rate of a ``torch.sum`` over a float32 buffer much larger than the caches
  (bytes read / time);
* also, for context, the fp32 rate of the exact-search GEMM shape (2048 queries x 65536 keys x d).

Best-of-repeats is used on purpose: a ceiling is what the machine can reach, and a noisy, shared machine
only ever makes a run slower. Every benchmark time is then also reported as achieved GFLOP/s or GB/s
and as a fraction of these figures.

    python -m benchmarks.ceilings [--quick] [--json out.json]
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

import knn_memory  # noqa: F401  (imports Faiss before torch runs anything, as the library does)
from knn_memory.cli import BadArguments, OneLineParser, check_writable_file, error_exit


@dataclass
class Ceilings:
    """Measured ceilings of this machine (CPU, or one CUDA device)."""

    device: str
    matmul_fp32_gflops: float
    matmul_bf16_gflops: float
    mem_read_gbs: float
    search_shape_fp32_gflops: float
    matmul_n: int
    read_mib: int
    threads: int
    seconds: float
    machine: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def ratio_flops(self, gflops: float | None, dtype: str = "float32") -> float | None:
        """``gflops`` as a fraction of the matmul ceiling of ``dtype``."""
        if gflops is None:
            return None
        peak = self.matmul_bf16_gflops if dtype == "bfloat16" else self.matmul_fp32_gflops
        return gflops / peak if peak > 0 else None

    def ratio_bandwidth(self, gbs: float | None) -> float | None:
        """``gbs`` as a fraction of the memory read bandwidth."""
        if gbs is None:
            return None
        return gbs / self.mem_read_gbs if self.mem_read_gbs > 0 else None


def machine_info(device: str = "cpu") -> dict:
    """A short description of the machine a run happened on (no host names, no paths)."""
    info = {
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "faiss": _faiss_version(),
        "os": f"{platform.system()} {platform.machine()}",
    }
    try:
        import psutil

        info["ram_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover - psutil is in the bench extra
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _faiss_version() -> str:
    try:
        import faiss

        return faiss.__version__
    except ImportError:  # pragma: no cover
        return "absent"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, device: torch.device, repeats: int, budget_s: float) -> float:
    """Best wall time of ``fn`` over up to ``repeats`` runs (after one warm-up), within ``budget_s``."""
    fn()
    _sync(device)
    best = float("inf")
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return best


@torch.no_grad()
def matmul_gflops(
    n: int, dtype: torch.dtype, device: str | torch.device = "cpu", repeats: int = 5, budget_s: float = 3.0
) -> float:
    """Best GFLOP/s of an n x n x n ``torch.matmul`` in ``dtype``."""
    dev = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dev, dtype)
    b = torch.randn(n, n, generator=g).to(dev, dtype)
    out = torch.empty(n, n, dtype=dtype, device=dev)
    t = _best_time(lambda: torch.matmul(a, b, out=out), dev, repeats, budget_s)
    return 2.0 * n**3 / t / 1e9


@torch.no_grad()
def search_shape_gflops(
    queries: int,
    keys: int,
    dim: int,
    device: str | torch.device = "cpu",
    repeats: int = 3,
    budget_s: float = 3.0,
) -> float:
    """Best fp32 GFLOP/s of the exact-search GEMM ``[queries, dim] x [dim, keys]``."""
    dev = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(1)
    q = torch.randn(queries, dim, generator=g).to(dev)
    k = torch.randn(keys, dim, generator=g).to(dev)
    out = torch.empty(queries, keys, device=dev)
    t = _best_time(lambda: torch.matmul(q, k.T, out=out), dev, repeats, budget_s)
    return 2.0 * queries * keys * dim / t / 1e9


@torch.no_grad()
def read_bandwidth_gbs(
    mib: int = 1024, device: str | torch.device = "cpu", repeats: int = 5, budget_s: float = 3.0
) -> float:
    """Best GB/s (1e9 bytes/s) of ``torch.sum`` over a ``mib`` MiB float32 buffer."""
    dev = torch.device(device)
    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=dev)
    t = _best_time(lambda: x.sum(), dev, repeats, budget_s)
    return x.numel() * 4 / t / 1e9


def measure_ceilings(device: str = "cpu", quick: bool = False) -> Ceilings:
    """Measure the ceilings of ``device`` (about 10 s on a 2-core CPU; ``quick``: about 3 s)."""
    t0 = time.perf_counter()
    dev = torch.device(device)
    n = 1024 if quick else 2048
    if dev.type == "cuda":
        n = 8192
    mib = 256 if quick else 1024
    if dev.type == "cuda":
        mib = 4096
    budget = 1.0 if quick else 3.0
    fp32 = matmul_gflops(n, torch.float32, dev, budget_s=budget)
    bf16 = matmul_gflops(n, torch.bfloat16, dev, budget_s=budget)
    shape = search_shape_gflops(2048, 16384 if quick else 65536, 100, dev, budget_s=budget)
    bw = read_bandwidth_gbs(mib, dev, budget_s=budget)
    return Ceilings(
        device=str(dev),
        matmul_fp32_gflops=fp32,
        matmul_bf16_gflops=bf16,
        mem_read_gbs=bw,
        search_shape_fp32_gflops=shape,
        matmul_n=n,
        read_mib=mib,
        threads=torch.get_num_threads(),
        seconds=time.perf_counter() - t0,
        machine=machine_info(str(dev)),
    )


def format_ceilings(c: Ceilings) -> str:
    return (
        f"ceilings on {c.device} ({c.machine.get('cpu', '?')}, {c.threads} threads): "
        f"fp32 matmul {c.matmul_fp32_gflops:.0f} GFLOP/s, bf16 matmul {c.matmul_bf16_gflops:.0f} GFLOP/s, "
        f"memory read {c.mem_read_gbs:.1f} GB/s; exact-search GEMM shape fp32 {c.search_shape_fp32_gflops:.0f} "
        f"GFLOP/s ({c.seconds:.1f} s)"
    )


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="knn-memory-ceilings", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="smaller problems, about 3 s")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    try:
        args = p.parse_args(argv)
        try:
            dev = torch.device(args.device)
        except RuntimeError:
            raise ValueError(
                f"--device {args.device!r} is not a device such as cpu, cuda or cuda:0"
            ) from None
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"--device {args.device!r}: expected cpu, cuda or cuda:N")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device!r}: torch sees no CUDA device here")
        if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
            raise ValueError(
                f"--device {args.device!r}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
        if args.json:
            check_writable_file(args.json, "--json")
    except (BadArguments, ValueError) as err:
        return error_exit("knn-memory-ceilings", err)
    c = measure_ceilings(args.device, quick=args.quick)
    print(format_ceilings(c))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(c.to_dict(), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
