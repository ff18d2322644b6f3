"""Data-parallel training: the processes of one run, as torchrun starts them.

`from_environment` reads torchrun's variables (WORLD_SIZE, RANK, LOCAL_RANK, and MASTER_ADDR /
MASTER_PORT for the rendezvous), starts the process group (gloo on the CPU, NCCL on CUDA with
device cuda:LOCAL_RANK) and returns the `Ranks` the trainer works with; without WORLD_SIZE > 1
it returns `SINGLE`, the one-process case, whose collectives do nothing.

Every collective has the timeout of the class-parallel loss (`udat_kernels.distributed`,
`DEFAULT_TIMEOUT_S`, 300 s; never gloo's 30-minute default), and a failed one raises
`DistributedTrainingError`, which says what was being exchanged at which step, on which rank,
and that another rank died, raised or did not come (docs/distributed.md, "Data-parallel
training").

Groups: the default group carries DistributedDataParallel's gradient all-reduce (NCCL on CUDA);
`host` (gloo) carries the small CPU-side exchanges (step losses, evaluation outputs, barriers);
`batch_norm` carries the BatchNorm statistics of `GlobalBatchNorm2d` on the CPU, apart from the
gradient all-reduce so that the two never interleave.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

from udat_kernels.distributed import DEFAULT_TIMEOUT_S

__all__ = ["Ranks", "SINGLE", "DistributedTrainingError", "from_environment", "world_size",
           "GlobalBatchNorm2d", "synchronize_batch_norm", "part"]


class DistributedTrainingError(RuntimeError):
    """A collective of data-parallel training failed: another rank died, raised, or did not
    reach it within the timeout."""


def world_size() -> int:
    """The number of processes torchrun started for this run (1 without torchrun)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def part(n: int, rank: int, size: int) -> tuple[int, int]:
    """[lo, hi) of rank's share of n items: contiguous, the first n % size ranks one more."""
    base, extra = divmod(n, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


class Ranks:
    """This process's place in the run: rank, world size, device, and the collectives the
    trainer uses. `SINGLE` (world size 1) is the one-process run: nothing is exchanged."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0, host=None,
                 batch_norm=None, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.rank, self.size, self.local_rank = rank, size, local_rank
        self.host, self.batch_norm, self.timeout_s = host, batch_norm, timeout_s

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0

    def device(self, configured: str) -> torch.device:
        """The device of this rank: `configured`, or cuda:LOCAL_RANK for CUDA runs."""
        device = torch.device(configured)
        if self.distributed and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    @contextlib.contextmanager
    def collective(self, what: str, step: int | None = None):
        """Turns the failure of a collective inside the block into DistributedTrainingError.
        Errors that are not the process group's pass unchanged."""
        try:
            yield
        except DistributedTrainingError:
            raise
        except Exception as error:  # noqa: BLE001 - gloo and NCCL raise RuntimeError subclasses
            if not (self.distributed and _is_comm_error(error)):
                raise
            when = f" at step {step}" if step is not None else ""
            raise DistributedTrainingError(
                f"data-parallel training: {what}{when} failed on rank {self.rank} of "
                f"{self.size}: another rank died, raised, or did not reach this exchange "
                f"within {self.timeout_s:g} s; that rank's own log has the cause "
                f"({type(error).__name__}: {str(error).strip()[:400]})") from error

    def barrier(self, what: str, step: int | None = None) -> None:
        if self.distributed:
            with self.collective(what, step):
                dist.barrier(group=self.host)

    def mean(self, values: list[float], what: str, step: int | None = None) -> list[float]:
        """The mean over the ranks of each value (float64)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        with self.collective(what, step):
            dist.all_reduce(t, group=self.host)
        return (t / self.size).tolist()

    def gather(self, obj, what: str) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.size
        with self.collective(what):
            dist.all_gather_object(out, obj, group=self.host)
        return out

    def broadcast(self, obj, what: str):
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        with self.collective(what):
            dist.broadcast_object_list(box, src=0, group=self.host)
        return box[0]


SINGLE = Ranks()


def _is_comm_error(error: BaseException) -> bool:
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    # gloo reports a closed connection or a timeout as a plain RuntimeError from its C++ side
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("gloo", "Gloo", "Connection closed", "Connection reset", "NCCL",
                            "Timed out", "timed out", "Broken pipe"))


def from_environment(device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Ranks:
    """The run's Ranks from torchrun's environment; starts the process group when WORLD_SIZE
    is above 1 (and it is not started yet), otherwise returns SINGLE."""
    size = world_size()
    if size == 1:
        return SINGLE
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.device(device).type == "cuda"
    timeout = datetime.timedelta(seconds=timeout_s)
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout,
                                **({"device_id": torch.device("cuda", local_rank)}
                                   if cuda else {}))
    host = dist.new_group(backend="gloo", timeout=timeout)
    batch_norm = None if cuda else dist.new_group(backend="gloo", timeout=timeout)
    return Ranks(rank, size, local_rank, host, batch_norm, timeout_s)


class _SumOverRanks(torch.autograd.Function):
    """Σ over the ranks of `group` of a tensor; its backward is the same sum of the gradients
    (the loss of every rank depends on every rank's contribution)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch (every rank's
    rows), as one process would compute them: torch's SyncBatchNorm for the CPU, where it
    does not run. The sums travel through a differentiable all-reduce, whose backward
    all-reduces their gradients: each rank's input gradient is that of the
    global batch's statistics (docs/distributed.md, "Data-parallel training"). Same parameters,
    buffers and state-dict keys as BatchNorm2d."""

    group = None  # set by synchronize_batch_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        def all_reduce(t, group):
            return _SumOverRanks.apply(t, group)

        dims, dtype = (0, 2, 3), x.dtype
        if dtype not in (torch.float32, torch.float64):
            x = x.float()  # half-precision inputs: statistics in float32, as BatchNorm keeps them
        count = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
        total = all_reduce(torch.cat([x.sum(dims), count]), group=self.group)
        n = total[-1].detach()
        mean = total[:-1] / n
        centred = x - mean[None, :, None, None]
        var = all_reduce(centred.square().sum(dims), group=self.group) / n  # two passes: exact
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                     else self.momentum)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                unbiased = var.detach() * (n / (n - 1)) if n > 1 else var.detach()
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        return y.to(dtype)


def synchronize_batch_norm(model: nn.Module, ranks: Ranks, device: torch.device) -> nn.Module:
    """The model with every BatchNorm2d computing global-batch statistics: torch's SyncBatchNorm
    on CUDA, GlobalBatchNorm2d on the CPU. Parameters and buffers are kept."""
    if not ranks.distributed:
        return model
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in list(model.named_children()):
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, GlobalBatchNorm2d):
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats, device=device)
            new.load_state_dict(child.state_dict())
            new.group = ranks.batch_norm
            new.train(child.training)
            setattr(model, name, new)
        else:
            synchronize_batch_norm(child, ranks, device)
    return model
