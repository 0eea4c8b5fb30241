"""Several processes, GPUs and nodes: PyTorch's own engine, ``torchrun`` + DistributedDataParallel.

``torchrun`` starts one process per device and tells each its place through the
environment (RANK, WORLD_SIZE, LOCAL_RANK). ``init_from_env`` reads it and joins
the process group (nccl on CUDA, gloo on CPU) with a timeout, so a rank that
stops answering ends the job instead of hanging it. Without torchrun it returns
None and training runs exactly as in a single process.

Errors: every rank runs the same set-up; ``agreed`` turns an error on any rank
into an error on every rank (rank 0 reports it, the others exit quietly), and
``errors_from_rank0`` is the command decorator that applies that rule.
"""

from __future__ import annotations

import functools
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional, Tuple, TypeVar

import torch
import torch.distributed as tdist
from torch import nn

from erde.runtime.common.errors import ErdeError

DEVICE_CHOICES = ("auto", "cpu", "cuda")
T = TypeVar("T")


class DistributedError(ErdeError):
    """The torchrun environment is wrong, or another process failed or stopped answering."""


class ReportedByRank0(ErdeError):
    """Raised on ranks other than 0 for an error that every rank has and rank 0 reports."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in a torchrun job."""

    rank: int  # 0 .. world_size-1, over all nodes
    local_rank: int  # 0 .. processes on this node - 1; also the GPU index on CUDA
    world_size: int  # number of processes in the job
    device: torch.device
    backend: str  # "nccl" or "gloo"

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (picklable objects; tensors come back on the CPU)."""
        box = [obj]
        tdist.broadcast_object_list(box, src=0, device=self._comm_device())
        return box[0]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Elementwise sum of ``tensor`` over all ranks, on ``tensor``'s device."""
        t = tensor.detach().to(self._comm_device(), copy=True)
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t.to(tensor.device)

    def barrier(self) -> None:
        if self.backend == "nccl":
            tdist.barrier(device_ids=[self.device.index])
        else:
            tdist.barrier()

    def sync_buffers(self, model: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

        DDP does this at the start of each forward; after the last step of an epoch each
        rank holds its own statistics, so validation and checkpoints would otherwise differ.
        """
        for buf in model.buffers():
            tdist.broadcast(buf, src=0)

    def wrap(self, model: nn.Module) -> nn.Module:
        """DistributedDataParallel around ``model`` (already on ``self.device``): gradients are averaged."""
        from torch.nn.parallel import DistributedDataParallel

        if self.device.type == "cuda":
            return DistributedDataParallel(model, device_ids=[self.device.index], output_device=self.device.index)
        return DistributedDataParallel(model)

    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not a whole number; "
                               "launch with torchrun, which sets it") from None


def torchrun_env() -> Optional[Tuple[int, int, int]]:
    """(rank, local_rank, world_size) set by torchrun, or None when not launched by it."""
    found = {k: _env_int(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    if all(v is None for v in found.values()):
        return None
    missing = [k for k, v in found.items() if v is None]
    if missing:
        raise DistributedError(f"{', '.join(missing)} not set while {', '.join(k for k in found if k not in missing)} "
                               "is; launch with torchrun (it sets RANK, LOCAL_RANK and WORLD_SIZE), or unset them")
    rank, local_rank, world = found["RANK"], found["LOCAL_RANK"], found["WORLD_SIZE"]
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        raise DistributedError(f"RANK={rank}, LOCAL_RANK={local_rank}, WORLD_SIZE={world} do not fit together; "
                               "launch with torchrun")
    return rank, local_rank, world


def env_rank() -> int:
    """This process's rank from the environment (0 without torchrun or when it is unreadable)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """``auto``: GPU ``local_rank`` when CUDA is available, else the CPU; ``cuda`` insists on the GPU."""
    if choice not in DEVICE_CHOICES:
        raise ErdeError(f"--device {choice}: choose one of {', '.join(DEVICE_CHOICES)}")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ErdeError(f"--device cuda: no CUDA GPU is usable here (torch {torch.__version__}, "
                        f"CUDA build: {torch.version.cuda or 'none'}); use --device cpu or --device auto")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ErdeError(f"process with LOCAL_RANK {local_rank} has no GPU of its own: {count} visible on this node; "
                        f"start at most {count} processes per node (torchrun --nproc_per_node {count})")
    return torch.device("cuda", local_rank)


def threads_per_process() -> int:
    """CPU threads for one of the processes torchrun started on this node: the cores shared out."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    per_node = _env_int("LOCAL_WORLD_SIZE") or 1
    return max(1, cores // per_node)


def init_from_env(device: torch.device, timeout_minutes: float = 10.0) -> Optional[DistContext]:
    """Join the torchrun job this process belongs to; None when there is none (or it has one process)."""
    env = torchrun_env()
    if env is None or env[2] == 1:
        return None
    rank, local_rank, world = env
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        tdist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes),
                                 device_id=device if device.type == "cuda" else None)
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"rank {rank} of {world} cannot join the job's process group "
                               f"({_first_line(e)}); check MASTER_ADDR/MASTER_PORT or the --rdzv-endpoint, "
                               "and that every node runs the same command") from None
    return DistContext(rank, local_rank, world, device, backend)


@contextmanager
def joined(device: torch.device, timeout_minutes: float, ctx: Optional[DistContext] = None
           ) -> Iterator[Optional[DistContext]]:
    """The torchrun job's context for a block (None without torchrun); leaves the group afterwards.

    A ``ctx`` already given (a caller that set up the group itself) is used and left alone.
    """
    own = ctx is None
    if own:
        ctx = init_from_env(device, timeout_minutes)
    try:
        yield ctx
    except BaseException:
        if own:
            cleanup(ctx)
        raise
    if own:
        cleanup(ctx, together=True)


def cleanup(ctx: Optional[DistContext], together: bool = False) -> None:
    """Leave the process group (a no-op without one).

    ``together``: after a block that ended well on every rank, wait for all ranks first. Tearing gloo down
    while a peer is still leaving sometimes aborted a rank at exit ("terminate called without an active
    exception", about one run in seven here).
    """
    if ctx is not None and tdist.is_initialized():
        try:
            if together:
                tdist.barrier()
            tdist.destroy_process_group()
        except (RuntimeError, ValueError):
            pass  # leaving after another rank failed: nothing left to tidy


# ---- errors: the same on every rank, reported once ----------------------------------------------

def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and not isinstance(e, ErdeError):
        return f"{getattr(e, 'filename', '') or ''}: {e.strerror or e}"
    return str(e)


@contextmanager
def agreed(ctx: Optional[DistContext]) -> Iterator[None]:
    """Run a block on every rank; if it fails on any rank, fail on every rank.

    Rank 0 raises its own error (or the lowest failing rank's, prefixed "rank N:"); the other
    ranks raise ``ReportedByRank0``. Exchanging the outcome is also a barrier.
    """
    if ctx is None:
        yield
        return
    error: Optional[BaseException] = None
    try:
        yield
    except (ErdeError, OSError) as e:
        error = e
    outcomes: list = [None] * ctx.world_size
    tdist.all_gather_object(outcomes, None if error is None else _message(error))
    failed = [(r, m) for r, m in enumerate(outcomes) if m is not None]
    if not failed:
        return
    if ctx.rank != 0:
        raise ReportedByRank0(failed[0][1])
    if error is not None:
        raise error
    raise ErdeError(f"rank {failed[0][0]}: {failed[0][1]}")


def on_rank0(ctx: Optional[DistContext], fn: Callable[[], T]) -> T:
    """``fn()`` run on rank 0 only; its result (or its error) reaches every rank."""
    if ctx is None:
        return fn()
    result = None
    with agreed(ctx):
        if ctx.rank == 0:
            result = fn()
    return ctx.broadcast_object(result)


def local_rank0_first(ctx: Optional[DistContext], fn: Callable[[], T]) -> T:
    """``fn()`` on every rank, local rank 0 of each node first (it fills the on-disk caches)."""
    if ctx is None:
        return fn()
    result = None
    with agreed(ctx):
        if ctx.local_rank == 0:
            result = fn()
    with agreed(ctx):
        if ctx.local_rank != 0:
            result = fn()
    return result


@contextmanager
def same_on_every_rank() -> Iterator[None]:
    """A block whose errors depend only on the options and the machine (checked before the group
    exists): every rank fails alike, so only rank 0 reports."""
    try:
        yield
    except (ErdeError, OSError) as e:
        if env_rank() != 0:
            raise ReportedByRank0(_message(e)) from None
        raise


# What gloo and NCCL say when a peer died or stopped answering (gloo raises a plain RuntimeError).
_PEER_FAILURE_MARKS = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "[gloo",
                       "gloo/transport", "NCCL")


def is_peer_failure(e: BaseException) -> bool:
    """Whether a collective failed because another process died or hung (not a bug in this one)."""
    return isinstance(e, tdist.DistError) or (
        isinstance(e, RuntimeError) and os.environ.get("WORLD_SIZE", "1") != "1" and any(m in str(e) for m in _PEER_FAILURE_MARKS))


def errors_from_rank0(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Command decorator (inside ``friendly_errors``): one error report per job, not one per rank.

    Errors every rank shares exit quietly on ranks other than 0; an error only one rank has is
    reported by that rank, prefixed "rank N:"; a lost peer becomes one clear line.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        rank = env_rank()
        try:
            return fn(*args, **kwargs)
        except ReportedByRank0:
            sys.exit(2)
        except KeyboardInterrupt:
            if rank == 0:
                raise
            sys.exit(130)
        except RuntimeError as e:
            if not is_peer_failure(e):
                raise
            where = f"rank {rank}: " if rank else ""
            raise DistributedError(
                f"{where}lost contact with the other training processes ({_first_line(e)}); one of them failed "
                "(see its error) or did not answer within --dist-timeout minutes") from e
        except (ErdeError, OSError) as e:
            if rank == 0:
                raise
            raise ErdeError(f"rank {rank}: {_message(e)}") from None

    return wrapper
