"""Process-group plumbing for `torchrun`: the one place that knows whether this run is distributed.

A process started without `WORLD_SIZE` (or with `WORLD_SIZE=1`) never creates a process group, and
every helper here is then a no-op that returns its input: single-process results stay bit for bit
what they were. Under `torchrun` (`WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`),
`init_from_env()` joins the group: NCCL when CUDA is available (each rank on `cuda:LOCAL_RANK`),
gloo otherwise; `ALTERMOMA_DIST_BACKEND` overrides the choice.

Collectives take CPU tensors (the toolkit scores on the CPU) and move them to the rank's GPU and back
when the backend is NCCL. Checks that ranks agree (`check_same`) gather every rank's value, so every
rank raises together instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

BACKEND_ENV = "ALTERMOMA_DIST_BACKEND"  # "gloo" or "nccl": override the automatic choice
TIMEOUT_ENV = "ALTERMOMA_DIST_TIMEOUT"  # seconds a collective may wait for the other ranks (default 1800)
T = TypeVar("T")


class RankMismatchError(RuntimeError):
    """Ranks that must agree (the model, the scoring set, the selected channels) do not."""


def env_world() -> int:
    """The world size torchrun announced (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def default_threads(single: int = 2) -> int:
    """Torch threads per process: `single` without torchrun, else this node's cores over its processes
    (an oversubscribed CPU run was measured 60x slower)."""
    if env_world() <= 1:
        return single
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def init_from_env() -> bool:
    """Join the process group torchrun describes; True if this run is distributed.

    Idempotent. The backend is NCCL when CUDA is available, else gloo.
    """
    if is_distributed():
        return True
    if env_world() <= 1:
        return False
    backend = os.environ.get(BACKEND_ENV) or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"{BACKEND_ENV} must be gloo or nccl, got {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
    dist.init_process_group(backend, timeout=timeout)
    return True


def shutdown() -> None:
    """Leave the process group (after a final barrier, so no rank leaves while another still needs it)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def rank_prefix() -> str:
    """The prefix "rank 1/2: " for messages in a distributed run, "" otherwise."""
    return f"rank {rank()}/{world()}: " if is_distributed() else ""


def device() -> torch.device:
    """Where this rank trains: its GPU under NCCL, the CPU otherwise (and in every single-process run)."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def on_main(write: Callable[[], T]) -> T | None:
    """Run `write` on rank 0 alone, then hold every rank at a barrier until it is done.

    Outputs are written once; a failure on rank 0 raises there, and torchrun stops the waiting ranks.
    """
    result = write() if is_main() else None
    barrier()
    return result


def shard_range(count: int) -> range:
    """This rank's contiguous block of `count` items (all of them in a single process).

    Contiguous blocks keep the rank-order concatenation equal to the original order.
    """
    n, r = world(), rank()
    return range(r * count // n, (r + 1) * count // n)


def all_reduce_sum_(tensors: torch.Tensor | Sequence[torch.Tensor]) -> None:
    """Sum every tensor over the ranks, in place (one collective per dtype; a no-op in one process)."""
    if not is_distributed():
        return
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    target = device()
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group]).to(target)
        dist.all_reduce(flat)
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def broadcast_(tensors: torch.Tensor | Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite every tensor with rank `src`'s values, in place (a no-op in one process)."""
    if not is_distributed():
        return
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    target = device()
    for t in tensors:
        buffer = t.detach().to(target).contiguous()
        dist.broadcast(buffer, src)
        with torch.no_grad():
            t.copy_(buffer.view_as(t))


def broadcast_object(value: T, src: int = 0) -> T:
    """Rank `src`'s value (any picklable object) on every rank."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src)
    return box[0]


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's value, in rank order (`[value]` in one process)."""
    if not is_distributed():
        return [value]
    values: list[Any] = [None] * world()
    dist.all_gather_object(values, value)
    return values


def gather_object(value: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's value on rank `dst` (in rank order), None elsewhere."""
    if not is_distributed():
        return [value]
    values: list[Any] | None = [None] * world() if rank() == dst else None
    dist.gather_object(value, values, dst)
    return values


def check_same(value: Any, what: str) -> None:
    """Raise `RankMismatchError` on every rank unless all ranks hold a value equal to rank 0's.

    `value` must be picklable and comparable with ==; pass a digest for large things.
    """
    if not is_distributed():
        return
    values = all_gather_object(value)
    differing = [r for r, v in enumerate(values) if v != values[0]]
    if differing:
        ranks = ", ".join(str(r) for r in differing)
        raise RankMismatchError(f"{what} differs between ranks: rank(s) {ranks} disagree with rank 0")


def digest(value: Any) -> str:
    """A short content hash of tensors, arrays, primitives and containers of them, for rank agreement.

    Encoded field by field, never pickled: the bytes depend only on the values, so equal values give
    equal digests on every rank.
    """
    import dataclasses
    import enum
    import hashlib

    h = hashlib.sha256()

    def feed(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(v, dict):
            h.update(f"dict{len(v)}".encode())
            for k in v:
                h.update(repr(k).encode())
                feed(v[k])
        elif isinstance(v, list | tuple):
            h.update(f"{type(v).__name__}{len(v)}".encode())
            for x in v:
                feed(x)
        elif hasattr(v, "tobytes") and hasattr(v, "dtype"):  # numpy arrays and scalars
            h.update(f"{v.dtype}{getattr(v, 'shape', ())}".encode())
            h.update(v.tobytes())
        elif v is None or isinstance(v, bool | int | float | complex | str | bytes | enum.Enum):
            h.update(f"{type(v).__qualname__}:{v!r};".encode())  # float repr round-trips exactly
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            h.update(type(v).__qualname__.encode())
            feed({f.name: getattr(v, f.name) for f in dataclasses.fields(v)})
        elif hasattr(v, "__dict__"):
            h.update(type(v).__qualname__.encode())
            feed(dict(vars(v)))
        else:  # no value to read (slots-only or builtin objects): compared by type alone
            h.update(type(v).__qualname__.encode())

    feed(value)
    return h.hexdigest()[:16]
