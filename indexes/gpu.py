"""GPU placement for Faiss: device parsing, one shared resources object per GPU, GPU limits.

Faiss GPU indexes cap k and nprobe at 2048 (``GPU_MAX_SELECTION_K``); those limits are checked here
before any call, because Faiss reports them with an assertion that aborts the process.
"""

from __future__ import annotations

import threading

import faiss
import torch

MAX_GPU_K = 2048
MAX_GPU_NPROBE = 2048

_resources: dict[int, object] = {}
_lock = threading.Lock()


def faiss_has_gpu() -> bool:
    """True when the installed Faiss was built with GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def parse_device(device: str | torch.device) -> torch.device:
    """Normalise ``device`` and check that it exists.

    Raises:
        TypeError: not a str or ``torch.device``.
        ValueError: unknown device type, or a CUDA device asked for where torch sees none.
    """
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a device string such as 'cpu' or 'cuda:0'") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    device = str(device)  # named as given, "cuda:0" rather than device(type='cuda', index=0)
    if dev.type != "cuda":
        raise ValueError(f"device {device!r}: only 'cpu' and 'cuda[:N]' are supported")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device on this machine")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return torch.device("cuda", index)


def gpu_resources(device_index: int):
    """The one ``StandardGpuResources`` shared by every index on GPU ``device_index``."""
    if not faiss_has_gpu():
        raise ValueError(
            "a Faiss GPU index was asked for, but the installed Faiss has no GPU support "
            "(install the 'gpu' extra: faiss-gpu in place of faiss-cpu)"
        )
    with _lock:
        res = _resources.get(device_index)
        if res is None:
            res = faiss.StandardGpuResources()
            _resources[device_index] = res
        return res


def index_to_gpu(index: faiss.Index, device_index: int) -> faiss.Index:
    """Copy a (trained or empty) CPU index to GPU ``device_index``."""
    return faiss.index_cpu_to_gpu(gpu_resources(device_index), device_index, index)


def check_gpu_limits(k: int, params: dict[str, int]) -> None:
    """Raise ``ValueError`` where a Faiss GPU index would abort on ``k`` or ``nprobe``."""
    if k > MAX_GPU_K:
        raise ValueError(f"k={k} exceeds the Faiss GPU limit of {MAX_GPU_K}; use k <= {MAX_GPU_K}")
    nprobe = params.get("nprobe")
    if nprobe is not None and nprobe > MAX_GPU_NPROBE:
        raise ValueError(f"nprobe={nprobe} exceeds the Faiss GPU limit of {MAX_GPU_NPROBE}")
