"""Scale-out: one build spread over the processes ``torchrun`` starts.

    torchrun --nproc_per_node N -m edgesnn build MODEL --private --binary

Every process runs the same build and joins one process group (``env://``:
torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT). The work is split
where it is heavy:

- synthesis: the images are made in work units that do not depend on the
  number of processes (``edgesnn.synth``: chunks of the class-balanced label
  list, each optimised in its own pool from its own seed); rank r makes units
  r, r + W, … and the units are summed into the whole set on every rank, the
  same images as one process makes;
- retraining (privatize, binarize): every rank draws the same global batch from
  the same seeded generator and trains on its contiguous share of the rows
  under ``DistributedDataParallel``, which averages the gradients: with equal
  shares that is the gradient of the global batch, as in one process.

Rank 0 alone reads and writes the bundle: it decides which stages resume and
sends every stage's artifact to the other ranks as bytes, which they parse with
the same readers as a resumed build (no pickle). The gloo backend carries CPU
tensors (and lets the tests run two CPU processes); with ``--device cuda`` each
rank trains on GPU LOCAL_RANK and the gradients go over NCCL.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from collections.abc import Iterator

import torch
import torch.distributed as dist

from .errors import PipelineError

TIMEOUT = datetime.timedelta(minutes=30)  # how long a rank waits for the others at one collective


def launched() -> bool:
    """True in a process that torchrun started as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """True once this process belongs to a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """True on rank 0 (and in a plain single-process run)."""
    return rank() == 0


def start(device: str) -> str:
    """Join the process group torchrun set up, if it did; returns the device this rank trains on.

    ``device`` "cuda" becomes "cuda:LOCAL_RANK" (one GPU per rank); CPU tensors always go over gloo.
    """
    if not launched() or active():
        return device
    if not dist.is_available():
        raise PipelineError("torchrun: this torch build has no torch.distributed")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise PipelineError(f"torchrun: rank with LOCAL_RANK {local} has no GPU ({torch.cuda.device_count()} visible); use --nproc_per_node ≤ the GPU count")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    _loopback_when_alone()
    try:
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=TIMEOUT)
    except (RuntimeError, ValueError) as error:
        raise PipelineError(f"torchrun: could not join the process group ({str(error).splitlines()[0]})") from None
    return device


def _loopback_when_alone() -> None:
    """Gloo over the loopback interface when every rank runs on this machine.

    Gloo otherwise binds to the address this machine's hostname resolves to, which
    in containers and sandboxes may be missing or on an interface the ranks cannot
    reach each other through. GLOO_SOCKET_IFNAME, when set, wins.
    """
    if "GLOO_SOCKET_IFNAME" in os.environ or os.environ.get("LOCAL_WORLD_SIZE") != os.environ.get("WORLD_SIZE"):
        return
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return
    loopback = next((name for name in ("lo", "lo0") if name in names), None)
    if loopback is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = loopback


def stop(wait: bool = True) -> None:
    """Leave the process group; with ``wait``, once every rank has reached this point.

    The barrier keeps a rank that finished early (a follower, while rank 0 still
    writes the bundle) connected until rank 0 is done, so no rank tears down its
    connections under another one's feet. A rank leaving on an error does not wait
    (the others may never get there; torchrun stops them).
    """
    if dist.is_available() and dist.is_initialized():
        if wait and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def joined(device: str) -> Iterator[str]:
    """``start(device)`` for the body, ``stop()`` after it (without waiting when it raised)."""
    device = start(device)
    try:
        yield device
    except BaseException:
        stop(wait=False)
        raise
    stop()


def share(count: int) -> slice:
    """This rank's contiguous share of ``count`` items: [r·count/W, (r+1)·count/W)."""
    size, index = world_size(), rank()
    return slice(index * count // size, (index + 1) * count // size)


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over all ranks, on every rank (rows each filled on one rank: all of them)."""
    if not active():
        return tensor
    total = tensor.cpu().clone()
    dist.all_reduce(total)
    return total


def sum_with_gradient(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over all ranks, differentiable: backward, each rank's input gets the
    sum of every rank's gradient of the result (as in SyncBatchNorm, which is CUDA-only)."""
    if not active():
        return tensor
    return _SumOverRanks.apply(tensor)


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


def broadcast_bytes(data: bytes | None) -> bytes:
    """Rank 0's ``data`` on every rank (the others pass None)."""
    length = torch.tensor([len(data) if is_main() and data is not None else 0], dtype=torch.int64)
    dist.broadcast(length, 0)
    if int(length) == 0:
        return b""
    if is_main():
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    else:
        buffer = torch.empty(int(length), dtype=torch.uint8)
    dist.broadcast(buffer, 0)
    return buffer.numpy().tobytes()


def broadcast_flag(flag: bool | None) -> bool:
    """Rank 0's ``flag`` on every rank (the others pass None)."""
    value = torch.tensor([int(bool(flag)) if is_main() else 0], dtype=torch.int64)
    dist.broadcast(value, 0)
    return bool(value)


def wrap(network: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``network`` under DistributedDataParallel when several ranks train it (it averages the gradients)."""
    if not active():
        return network
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(network, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False)


__all__ = ["active", "broadcast_bytes", "broadcast_flag", "is_main", "joined", "launched", "rank", "share", "start", "stop", "sum_over_ranks", "sum_with_gradient", "world_size", "wrap"]
