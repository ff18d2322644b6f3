"""The collectives of the class-parallel loss: torch.distributed, a timeout, and clear errors.

Every collective goes through `Comm`, which turns a failure (a peer that died, raised and left,
or did not reach the collective before the timeout) into a `DistributedLossError` that says
which collective of which step failed on which rank, so that no rank hangs and every rank's log
says what happened (docs/distributed.md, "Failures").
"""

from __future__ import annotations

import datetime
import numbers

import torch
import torch.distributed as dist

# Seconds a collective of the loss may wait for the other ranks before it fails, when the loss
# makes its own process group. It must exceed the longest time one rank can spend elsewhere
# while the others wait in the loss (a checkpoint written by rank 0, an evaluation).
DEFAULT_TIMEOUT_S = 300.0

# all_gather_single / reduce_scatter_single are the names of torch 2.14; older releases have
# the same collectives as all_gather_into_tensor / reduce_scatter_tensor.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class DistributedLossError(RuntimeError):
    """A collective of the sharded loss failed: another rank died, raised, or did not reach the
    collective within the timeout."""


def _seconds(timeout) -> float:
    if isinstance(timeout, datetime.timedelta):
        timeout = timeout.total_seconds()
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not timeout > 0:
        raise ValueError(f"timeout: expected a positive number of seconds or a timedelta, "
                         f"got {timeout!r}")
    return float(timeout)


def make_group(process_group, timeout):
    """(group, timeout in seconds or None): the caller's group as it is, or a new group over
    every rank of the default group with the loss's own timeout."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("ShardedAngularMarginLoss: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group first (torchrun sets the "
                           "rendezvous environment)")
    if process_group is not None:
        if timeout is not None:
            raise TypeError("timeout: applies only when process_group is None (the loss then "
                            "makes its own group); give your own group its timeout when you "
                            "create it (torch.distributed.new_group(..., timeout=...))")
        return process_group, None
    seconds = DEFAULT_TIMEOUT_S if timeout is None else _seconds(timeout)
    group = dist.new_group(timeout=datetime.timedelta(seconds=seconds))
    return group, seconds


class Comm:
    """The loss's view of its process group: rank, size, and the collectives it uses."""

    def __init__(self, group, timeout_s):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.timeout_s = timeout_s

    def error(self, what: str, step, cause: BaseException) -> DistributedLossError:
        waited = (f"{self.timeout_s:g} s" if self.timeout_s is not None
                  else "the process group's timeout")
        when = f" at step {step}" if step is not None else ""
        return DistributedLossError(
            f"ShardedAngularMarginLoss: {what}{when} failed on rank {self.rank} of "
            f"{self.world_size}: another rank died, raised, or did not reach this collective "
            f"within {waited}; that rank's own log has the cause "
            f"({type(cause).__name__}: {str(cause).strip()[:400]})")

    def _run(self, what, step, start):
        try:
            work = start()
        except Exception as e:  # noqa: BLE001 - every backend raises its own type
            raise self.error(what, step, e) from e
        return _Pending(self, what, step, work)

    def all_gather(self, tensor, what, step=None, async_op=False):
        """Every rank's `tensor` (same shape everywhere), concatenated along dim 0 in rank
        order. With async_op, a handle whose wait() returns the result."""
        tensor = tensor.contiguous()
        out = tensor.new_empty((self.world_size * tensor.shape[0], *tensor.shape[1:]))
        pending = self._run(what, step, lambda: _ALL_GATHER(out, tensor, group=self.group,
                                                            async_op=True))
        pending.result = out
        return pending if async_op else pending.wait()

    def reduce_scatter(self, tensor, what, step=None):
        """Σ over ranks of `tensor` (world_size·n, ...), this rank's block n of it."""
        tensor = tensor.contiguous()
        out = tensor.new_empty((tensor.shape[0] // self.world_size, *tensor.shape[1:]))
        pending = self._run(what, step, lambda: _REDUCE_SCATTER(out, tensor, group=self.group,
                                                                async_op=True))
        pending.result = out
        return pending.wait()

    def all_gather_object(self, obj, what):
        out = [None] * self.world_size
        try:
            dist.all_gather_object(out, obj, group=self.group)
        except Exception as e:  # noqa: BLE001
            raise self.error(what, None, e) from e
        return out


class _Pending:
    def __init__(self, comm, what, step, work):
        self.comm, self.what, self.step, self.work = comm, what, step, work
        self.result = None

    def wait(self):
        try:
            if self.work is not None:
                self.work.wait()
        except Exception as e:  # noqa: BLE001
            raise self.comm.error(self.what, self.step, e) from e
        return self.result
