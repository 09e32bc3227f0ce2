"""torch.distributed for `torchrun -m unitscope ...`: one process group, and the few collectives the stages use.

Launched by torchrun (WORLD_SIZE > 1 in the environment), `init()` joins the group (gloo on CPU, NCCL when the
stage runs on CUDA); launched plainly, every helper here is the identity and costs nothing, so one process runs
exactly as before. Data-parallel training needs batch-level statistics over the *global* batch (the FVU
denominator, the residual's mean in AuxK): `batch_sum` and `batch_mean` give them while `data_parallel()` is
active, so each rank's loss is its share of the global loss and summing the gradients gives the global gradient;
`kth_largest` gives BatchTopK its global cut. A rank that crashes or stops answering never leaves the others
waiting: every collective and the rendezvous give up after `timeout()` (UNITSCOPE_DIST_TIMEOUT) and a lost peer
becomes one sentence (UnitscopeError), not a hang or a gloo traceback.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .errors import UnitscopeError

_DP = False  # inside a data-parallel training step


def launched() -> bool:
    """True when this process is one of several started by torchrun (or any launcher setting WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


DEFAULT_TIMEOUT = 600.0  # seconds; torch's own NCCL default (its gloo default, 30 min, is a long hang)


def timeout() -> float:
    """How long a rank waits for the others (joining, and at every collective) before it gives up:
    UNITSCOPE_DIST_TIMEOUT seconds, default 600. It must exceed the longest gap between two collectives, e.g. rank
    0 writing a checkpoint or uploading the dictionary while the others wait at the barrier."""
    raw = os.environ.get("UNITSCOPE_DIST_TIMEOUT", "")
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise UnitscopeError(f"UNITSCOPE_DIST_TIMEOUT={raw!r} is not a number of seconds; use a positive number")
    return value


def init(device: str = "cpu") -> None:
    """Join the process group once when launched by torchrun; a no-op for a single process."""
    if not launched() or dist.is_initialized():
        return
    backend = "nccl" if str(device).startswith("cuda") and torch.cuda.is_available() else "gloo"
    _c.init_process_group(backend, timeout=timedelta(seconds=timeout()))


class _Collectives:
    """torch.distributed's calls, with a failure turned into one sentence (UnitscopeError): a rank that crashed
    closes its connections and the others fail at once; one that hangs makes them fail after `timeout()`."""

    def __getattr__(self, name: str):
        call = getattr(dist, name)

        def guarded(*args: Any, **kw: Any) -> Any:
            try:
                return call(*args, **kw)
            except RuntimeError as e:  # gloo's and NCCL's errors, DistStoreError (rendezvous) among them
                who = f"rank {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')}"
                detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UnitscopeError(
                    f"{who} lost the other ranks in {name}: one of them failed (see its own error) or did not "
                    f"answer within {timeout():g} s (UNITSCOPE_DIST_TIMEOUT sets the wait) [{detail[:200]}]") from e
        return guarded


_c = _Collectives()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        _c.barrier()


def local_device(device: str) -> str:
    """`cuda` under torchrun means this rank's own GPU (LOCAL_RANK); any other device is kept."""
    if launched() and device == "cuda":
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (just `[obj]` for one process)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world()
    _c.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not active():
        return obj
    box = [obj]
    _c.broadcast_object_list(box, src=0)
    return box[0]


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def broadcast_(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's values of `t` on every rank, in place (the same shape everywhere); `t` itself for one process."""
    if active():
        _c.broadcast(t, src=0)
    return t


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place over ranks (sum, max or min); the tensor itself for one process."""
    if active():
        _c.all_reduce(t, op=_OPS[op])
    return t


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `t` concatenated in rank order (ranks may hold different row counts): the global batch
    from the ranks' slices. `t` itself for one process."""
    if not active():
        return t
    counts = t.new_zeros(world(), dtype=torch.long)
    counts[rank()] = t.shape[0]
    _c.all_reduce(counts)
    most = int(counts.max())
    padded = torch.cat([t, t.new_zeros(most - t.shape[0], *t.shape[1:])]) if t.shape[0] < most else t.contiguous()
    parts = [torch.empty_like(padded) for _ in range(world())]
    _c.all_gather(parts, padded)
    return torch.cat([p[:int(c)] for p, c in zip(parts, counts)])


def all_reduce_grads(params: list[torch.Tensor]) -> None:
    """Sum the gradients over ranks in one flat buffer (one collective per step, not one per tensor)."""
    if not active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    _c.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


@contextmanager
def data_parallel(on: bool = True) -> Iterator[None]:
    """While active (and several ranks run), `batch_sum`/`batch_mean` reduce over the global batch."""
    global _DP
    before, _DP = _DP, on and active()
    try:
        yield
    finally:
        _DP = before


def batch_sum(t: torch.Tensor) -> torch.Tensor:
    """A (detached) sum over this rank's rows, made global in a data-parallel step; `t` itself otherwise."""
    if not _DP:
        return t
    t = t.detach().clone()
    _c.all_reduce(t)
    return t


def batch_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of `x` over rows of the global batch in a data-parallel step (detached); `x.mean(0)` otherwise."""
    if not _DP:
        return x.mean(0)
    total = torch.cat([x.detach().sum(0).reshape(-1), x.new_tensor([x.shape[0]])])
    _c.all_reduce(total)
    return (total[:-1] / total[-1]).view(x.shape[1:])


# commands that split their work over torchrun's ranks; every other command runs on rank 0 alone
RANK_AWARE = ("record", "train")


def for_command(command: str) -> bool:
    """Whether this process runs `command`: always for one process and for the rank-aware commands; under torchrun
    other commands run once, on rank 0 as a single process (no group is formed), and the other ranks exit 0."""
    if not launched() or command in RANK_AWARE:
        return True
    if int(os.environ.get("RANK", "0")) != 0:
        return False
    os.environ["WORLD_SIZE"] = "1"
    return True


def in_data_parallel() -> bool:
    """Inside a data-parallel step with several ranks: batch-level selections must be made over the global batch."""
    return _DP


def global_rows(like: torch.Tensor) -> int:
    """The global batch's row count in a data-parallel step (`like`'s rows summed over ranks); its own otherwise."""
    if not _DP:
        return like.shape[0]
    t = torch.tensor([like.shape[0]], dtype=torch.long, device=like.device)  # NCCL reduces CUDA tensors only
    _c.all_reduce(t)
    return int(t)


def any_rank(flag: bool, like: torch.Tensor) -> bool:
    """Whether `flag` holds on some rank (in a data-parallel step; `flag` itself otherwise): keeps loops that hold
    collectives in lockstep. `like`: a tensor on this rank's device."""
    if not _DP:
        return flag
    t = torch.tensor([int(flag)], device=like.device)
    _c.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t)


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest of `values` (1-D) over every rank's values in a data-parallel step, over `values` otherwise.
    Only each rank's own top k travel (padded with -inf), so the cost is k floats per rank, not the whole batch."""
    top = values.topk(min(k, values.numel()), sorted=False).values
    if _DP:
        if top.numel() < k:
            top = torch.cat([top, top.new_full((k - top.numel(),), float("-inf"))])
        parts = [torch.empty_like(top) for _ in range(world())]
        _c.all_gather(parts, top)
        top = torch.cat(parts)
    return top.topk(min(k, top.numel()), sorted=False).values.min()


def row_mean(t: torch.Tensor) -> torch.Tensor:
    """`t.mean()` over a batch's rows; in a data-parallel step this rank's share of the global batch's mean (its
    sum over the global row count), so the shares sum to the single-process mean (the L1 and L0 penalties)."""
    if not _DP:
        return t.mean()
    n = t.new_tensor([float(t.shape[0])], dtype=torch.float64)  # on t's device: NCCL reduces CUDA tensors only
    _c.all_reduce(n)
    return t.sum() / n.item()
