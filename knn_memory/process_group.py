"""The ranks a sharded memory spans: joining ``torch.distributed``, and the few collectives it needs.

Every rank runs the same model on the same input (replicated compute); each holds a slice of the memory.
The group comes from ``torch.distributed``, the engine users already launch with ``torchrun``:

* already initialised (the caller ran ``init_process_group``): that group is used as it is;
* ``torchrun``'s environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``): the group is
  initialised from it (``init_method="env://"``), with gloo on CPU and NCCL for CUDA memories;
* neither: one process, world size 1, and every collective is the identity (no group at all).

``timeout`` bounds every collective: a rank that died or hangs ends the others with a
:class:`ShardGroupError` within that time instead of a silent hang (gloo raises as soon as a peer's
connection closes, and after ``timeout`` for a peer that stops answering).

Each collective counts the bytes this rank hands to it (:attr:`ShardGroup.sent_bytes`, by operation), the
payload of the sharded memory's communication (what a ring all-reduce puts on the wire is
``2 (w - 1) / w`` times that), and the seconds spent in it (:attr:`ShardGroup.seconds`, waiting for the
slowest rank included).
"""

from __future__ import annotations

import atexit
import os
import socket
import time
from collections import Counter
from datetime import timedelta

import torch
import torch.distributed as dist

from knn_memory.validate import check_float

#: the variables torchrun sets for every rank
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT = 300.0


def _destroy_group() -> None:
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # at exit, or with the group broken: nothing left to report to
        pass


class ShardGroupError(RuntimeError):
    """A collective of the sharded memory failed: a rank died, hung past the timeout, or left the group."""


def launched_by_torchrun() -> bool:
    """True when the environment holds torchrun's rendezvous variables."""
    return all(name in os.environ for name in TORCHRUN_ENV)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, for a group started on this machine (``MASTER_PORT``)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def local_rank_env(rank: int, world_size: int, port: int, threads: int = 1) -> dict[str, str]:
    """The environment torchrun gives rank ``rank`` of ``world_size`` processes on this machine, for
    starting the ranks by hand (tests, benchmarks), with ``threads`` OpenMP threads each."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": str(threads),
    }


def process_rank() -> int:
    """This process's rank: the group's when one is initialised, else ``RANK`` from the environment, else 0.
    For tools that print or write once (rank 0) whether or not a memory has joined a group yet."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def process_world_size() -> int:
    """Processes in the group: the group's when one is initialised, else ``WORLD_SIZE`` from the environment
    (torchrun's), else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1"))) if launched_by_torchrun() else 1
    except ValueError:
        return 1


class ShardGroup:
    """This process's place in the group: :attr:`rank`, :attr:`world_size`, and the collectives.

    Args:
        device: where the memory lives; picks the communication backend when the group is initialised
            here (``"gloo"`` for CPU, ``"nccl"`` for CUDA).
        timeout: seconds any collective may wait for the other ranks.
    """

    def __init__(self, device: torch.device, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.timeout = check_float(timeout, "timeout", 0.0, 7 * 24 * 3600.0, low_open=True)
        self.device = device
        self.sent_bytes: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()  # wall time inside each kind of collective (waits included)
        if dist.is_available() and dist.is_initialized():
            pass  # the caller's group, as it is
        elif launched_by_torchrun():
            if not dist.is_available():
                raise RuntimeError("torchrun launched this process, but this torch has no torch.distributed")
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(
                backend=backend, init_method="env://", timeout=timedelta(seconds=self.timeout)
            )
            # release the group before the interpreter tears down its threads (a group still alive then,
            # with a peer already gone, aborts the process at exit)
            atexit.register(_destroy_group)
        else:
            self.rank, self.world_size, self.backend = 0, 1, None
            return
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.backend = dist.get_backend()
        if device.type == "cpu" and self.backend == "nccl" and self.world_size > 1:
            raise ValueError(
                "the process group runs NCCL, which cannot reduce CPU tensors; put the memory on CUDA "
                "(mem_device='cuda') or initialise the group with backend='gloo'"
            )

    @property
    def distributed(self) -> bool:
        """True when there is more than one rank."""
        return self.world_size > 1

    # ------------------------------------------------------------------ collectives
    def _run(self, op: str, fn, payload_bytes: int):
        self.sent_bytes[op] += payload_bytes
        start = time.perf_counter()
        try:
            return fn()
        except (RuntimeError, ValueError) as err:  # gloo: connection closed / timed out; NCCL: watchdog
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            self._abandon()
            raise ShardGroupError(
                f"sharded memory: {op} across {self.world_size} ranks failed on rank {self.rank} "
                f"(a rank died, hung past timeout={self.timeout:g}s, or left the group): {reason}"
            ) from err
        finally:
            self.seconds[op] += time.perf_counter() - start

    def _abandon(self) -> None:
        """After a failed collective the group is broken: release it, so that this process can report the
        error and exit (a group left with a pending operation aborts the interpreter at exit)."""
        _destroy_group()

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        """Elementwise max of ``t`` over the ranks, in place (returns ``t``)."""
        if self.distributed:
            self._run(
                "all_reduce_max",
                lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX),
                t.numel() * t.element_size(),
            )
        return t

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Elementwise sum of ``t`` over the ranks, in place (returns ``t``)."""
        if self.distributed:
            self._run(
                "all_reduce_sum",
                lambda: dist.all_reduce(t, op=dist.ReduceOp.SUM),
                t.numel() * t.element_size(),
            )
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` stacked: ``[world_size, *t.shape]`` (rank order)."""
        if not self.distributed:
            return t.unsqueeze(0)
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        self._run("all_gather", lambda: dist.all_gather(parts, t), t.numel() * t.element_size())
        return torch.stack(parts)

    def all_gather_object(self, obj: object) -> list:
        """Every rank's picklable ``obj``, in rank order (setup only: it pickles)."""
        if not self.distributed:
            return [obj]
        out: list = [None] * self.world_size
        self._run("all_gather_object", lambda: dist.all_gather_object(out, obj), 0)
        return out

    def barrier(self) -> None:
        """Wait until every rank gets here (bounded by the timeout)."""
        if self.distributed:
            self._run("barrier", lambda: dist.barrier(), 0)

    def __repr__(self) -> str:
        return f"ShardGroup(rank={self.rank}, world_size={self.world_size}, backend={self.backend})"
