"""`ShardedAngularMarginLoss`: the angular-margin loss with its class centres split over the
ranks of a torch.distributed process group (docs/distributed.md; the math in docs/math.md,
"Class shards").

One step, on every rank:
  1. one small all-gather of each rank's batch size and checks — the one host sync of a step;
  2. all-gather of the embeddings and of the labels (with the sample weights), padded to the
     largest per-rank batch;
  3. (sample_rate < 1) sampling of the centres: a second host sync and one all-gather;
  4. the shard mode's forward over the global batch against this rank's centres, in blocks of
     rows, then one all-gather of the per-row (lse^(r), q^(r)) that every rank combines alike;
and in the backward, the shard mode's backward with the global lse, then one reduce-scatter of
the parts of grad x, so that each rank receives the gradient of its own rows.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import numbers

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .. import _validate, dispatch, reference
from . import shard_mode
from ._comm import Comm, make_group
from ._sampling import sample_centres, virtual_targets

__all__ = ["ShardedAngularMarginLoss", "shard_range"]

# Keyword arguments of the op that the loss keeps and passes on (docs/math.md, "The op").
_OP_KWARGS = ("class_weight", "label_smoothing", "ignore_index", "reduction", "margin_grad",
              "backend", "validate", "grl_lambda")
_DTYPE_CODES = {dt: i for i, dt in enumerate(_validate.FLOAT_DTYPES)}
# What the shard mode is given as ignore_index when no label is ignored (ignore_index=None): a
# value that the label check rejects, so that no valid row is ever compared equal to it.
_NO_IGNORE = -(2**31)


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """(first class, number of classes) of rank `rank`: n_r = C // N + (r < C % N), the ranks
    in order — Partial FC's rule, so that its checkpoints map onto these shards."""
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + (1 if rank < extra else 0)


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def _digest(tensor):
    if tensor is None:
        return None
    data = tensor.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


class ShardedAngularMarginLoss(nn.Module):
    """ArcFace / CosFace loss whose class centres are split over the ranks of a process group.

    Rank r of N holds the centres [start_r, start_r + n_r) of `num_classes` as its parameter
    `weight` (n_r, embedding_size), n_r = C // N + (r < C % N). forward(local_embeddings (B_r, D),
    local_labels (B_r,) int64 global class indices, sample_weight (B_r,) or None) gathers every
    rank's rows (B_r may differ between ranks and may be 0) and returns, on every rank, the loss
    of the global batch — the value the single-device op gives on the concatenated batch and
    the whole weight. Its backward gives `weight` ∂L/∂W_shard and the local embeddings
    N·∂L/∂x_local (Partial FC's convention: DistributedDataParallel's average over the ranks then
    gives the backbone the single-process gradient; docs/distributed.md).

    Keywords: scale, margin, cos_margin as in `angular_margin_cross_entropy`; `process_group`
    (None: a new group over every rank, with `timeout` seconds for each collective, default 300);
    `sample_rate` in (0, 1]: below 1, each step keeps the positive centres and a random share of
    the negative ones (Partial FC), and the loss is that of the sampled problem; `chunk_rows`
    rows of logits at a time (default: blocks of at most 128 MiB of logits); `device`, `dtype`
    of `weight`; and the op's keywords (class_weight (C,) whole on every rank, label_smoothing,
    ignore_index, reduction, margin_grad, backend, validate, grl_lambda), which keep their
    meaning; ignore_index=None ignores no label (every label must be a class). Every rank must
    construct the loss with the same settings (checked here, by name) and call it the same
    number of times.
    """

    def __init__(self, num_classes: int, embedding_size: int, *, scale: float = 64.0,
                 margin: float = 0.5, cos_margin: float = 0.0, process_group=None,
                 sample_rate: float = 1.0, timeout=None, chunk_rows: int | None = None,
                 device=None, dtype=None, **op_kwargs):
        super().__init__()
        C = _positive_int("num_classes", num_classes)
        D = _positive_int("embedding_size", embedding_size)
        for key in op_kwargs:
            if key not in _OP_KWARGS:
                raise TypeError(f"ShardedAngularMarginLoss got an unexpected keyword argument "
                                f"{key!r}")
        scale = _validate._number("scale", scale)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale: expected a finite positive number, got {scale}")
        margin = _validate._number("margin", margin)
        if not 0.0 <= margin < math.pi:
            raise ValueError(f"margin: expected 0 <= margin < pi (radians), got {margin}")
        cos_margin = _validate._number("cos_margin", cos_margin)
        if not (math.isfinite(cos_margin) and cos_margin >= 0):
            raise ValueError(f"cos_margin: expected a finite number >= 0, got {cos_margin}")
        sample_rate = _validate._number("sample_rate", sample_rate)
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate: expected 0 < sample_rate <= 1, got {sample_rate}")
        if chunk_rows is not None:
            chunk_rows = _positive_int("chunk_rows", chunk_rows)
        label_smoothing = _validate._number("label_smoothing",
                                            op_kwargs.get("label_smoothing", 0.0))
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing: expected 0 <= label_smoothing < 1, "
                             f"got {label_smoothing}")
        ignore_index = op_kwargs.get("ignore_index", -100)
        if ignore_index is not None and (isinstance(ignore_index, bool)
                                         or not isinstance(ignore_index, numbers.Integral)):
            raise TypeError(f"ignore_index: expected an int or None, got "
                            f"{type(ignore_index).__name__}")
        reduction = op_kwargs.get("reduction", "mean")
        _validate.reduction_code(reduction)
        margin_grad = op_kwargs.get("margin_grad", "exact")
        if margin_grad not in _validate.MARGIN_GRADS:
            raise ValueError(f"margin_grad: expected one of {_validate.MARGIN_GRADS}, "
                             f"got {margin_grad!r}")
        backend = op_kwargs.get("backend", "auto")
        if not isinstance(backend, str) or backend not in dispatch.BACKENDS:
            raise ValueError(f"backend: unknown backend {backend!r}; expected one of "
                             f"{dispatch.BACKENDS}")
        grl_lambda = op_kwargs.get("grl_lambda")
        if grl_lambda is not None:
            grl_lambda = _validate.check_lambda(grl_lambda)
        class_weight = op_kwargs.get("class_weight")
        if class_weight is not None:
            class_weight = torch.as_tensor(class_weight)
            if not class_weight.is_floating_point():
                class_weight = class_weight.to(torch.float32)
            if class_weight.shape != (C,):
                raise ValueError(f"class_weight: expected shape ({C},) (the whole vector, on "
                                 f"every rank), got {tuple(class_weight.shape)}")
            class_weight = class_weight.to(device) if device is not None else class_weight

        group, timeout_s = make_group(process_group, timeout)
        self._comm = Comm(group, timeout_s)
        self.world_size, self.rank = self._comm.world_size, self._comm.rank
        self.num_classes, self.embedding_size = C, D
        self.class_start, self.num_local = shard_range(C, self.world_size, self.rank)
        self.scale, self.margin, self.cos_margin = scale, margin, cos_margin
        self.sample_rate, self.chunk_rows = sample_rate, chunk_rows
        self.label_smoothing = label_smoothing
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        # The value the shard mode compares the targets with.
        self._ignore_value = _NO_IGNORE if ignore_index is None else self.ignore_index
        self.reduction, self.margin_grad, self.backend = reduction, margin_grad, backend
        self.validate = bool(op_kwargs.get("validate", True))
        self.grl_lambda = grl_lambda
        self.register_buffer("class_weight", class_weight)
        self.weight = nn.Parameter(torch.empty(self.num_local, D, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=0.01)
        self.steps = 0
        # The global class ids of this rank's sampled centres in the last step (sample_rate < 1).
        self.last_sampled_classes: torch.Tensor | None = None
        self._check_same_settings()

    def _check_same_settings(self):
        lam = self.grl_lambda
        mine = {
            "num_classes": self.num_classes, "embedding_size": self.embedding_size,
            "dtype": str(self.weight.dtype), "scale": self.scale, "margin": self.margin,
            "cos_margin": self.cos_margin, "sample_rate": self.sample_rate,
            "label_smoothing": self.label_smoothing, "ignore_index": self.ignore_index,
            "reduction": self.reduction, "margin_grad": self.margin_grad,
            "backend": self.backend, "validate": self.validate,
            "grl_lambda": "a tensor" if isinstance(lam, torch.Tensor) else lam,
            "class_weight": _digest(self.class_weight),
        }
        every = self._comm.all_gather_object(mine, "the check of the settings")
        differ = []
        for key in mine:
            values = [d[key] for d in every]
            if any(v != values[0] for v in values):
                shown = ", ".join(f"rank {r}: {v if key != 'class_weight' else _cw(v)}"
                                  for r, v in enumerate(values))
                differ.append(f"{key} ({shown})")
        if differ:
            raise ValueError("ShardedAngularMarginLoss: settings differ across ranks: "
                             + "; ".join(differ))

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor,
                sample_weight: torch.Tensor | None = None) -> torch.Tensor:
        x, t = local_embeddings, local_labels
        _validate._tensor("local_embeddings", x, dims=2)
        if x.shape[1] != self.embedding_size:
            raise ValueError(f"local_embeddings: expected (B, {self.embedding_size}), got "
                             f"{tuple(x.shape)}")
        if x.device != self.weight.device:
            raise ValueError(f"local_embeddings: on {x.device}, the loss's weight is on "
                             f"{self.weight.device}")
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
            raise TypeError(f"local_labels: expected an int64 tensor of class indices, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
        _validate._tensor("local_labels", t, dims=1, shape=(x.shape[0],), device=x.device,
                          float_dtype=False)
        if sample_weight is not None:
            _validate._tensor("sample_weight", sample_weight, dims=1, shape=(x.shape[0],),
                              device=x.device)
        step = self.steps
        self.steps += 1
        return _ShardedLoss.apply(x, self.weight, t, sample_weight, self, step)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
                f"rank={self.rank} of {self.world_size}, classes=[{self.class_start}, "
                f"{self.class_start + self.num_local}), scale={self.scale}, "
                f"margin={self.margin}, cos_margin={self.cos_margin}, "
                f"sample_rate={self.sample_rate}")


def _cw(digest):
    return "None" if digest is None else f"sha256 {digest}"


class _Header:
    """What each rank tells the others first (the one host sync of a step)."""

    FIELDS = ("step", "rows", "x_dtype", "has_sample_weight", "needs_grad_x", "bad_labels",
              "first_bad_label")

    def __init__(self, comm, x, t, sample_weight, needs_grad_x, loss, step):
        bad = (t < 0) | (t >= loss.num_classes)
        if loss.ignore_index is not None:
            bad &= t != loss.ignore_index
        if not loss.validate or t.numel() == 0:
            bad = torch.zeros_like(t, dtype=torch.bool)
        known = [step, x.shape[0], _DTYPE_CODES[x.dtype], sample_weight is not None, needs_grad_x]
        if x.device.type == "cpu":
            known = torch.tensor(known, dtype=torch.int64)
        else:  # a pinned, asynchronous copy: no host sync here
            known = torch.tensor(known, dtype=torch.int64, pin_memory=True).to(
                x.device, non_blocking=True)
        first = (t.gather(0, bad.to(torch.int8).argmax().view(1)) if t.numel()
                 else t.new_zeros(1))
        mine = torch.cat([known, bad.sum().view(1), first])
        every = comm.all_gather(mine, "the exchange of batch sizes", step).view(
            comm.world_size, len(self.FIELDS)).tolist()
        self.rows = [r[1] for r in every]
        self.has_sample_weight = any(r[3] for r in every)
        self.needs_grad_x = any(r[4] for r in every)
        problems = []
        if len({r[0] for r in every}) > 1:
            problems.append("the loss was called a different number of times on the ranks ("
                            + ", ".join(f"rank {i}: call {r[0]}" for i, r in enumerate(every))
                            + "); every rank must run every step")
        if len({r[2] for r in every}) > 1:
            names = {code: str(dt) for dt, code in _DTYPE_CODES.items()}
            problems.append("local_embeddings: dtype differs across ranks ("
                            + ", ".join(f"rank {i}: {names[r[2]]}" for i, r in enumerate(every))
                            + ")")
        for i, r in enumerate(every):
            if r[5]:
                but = ("" if loss.ignore_index is None
                       else f" that are not ignore_index ({loss.ignore_index})")
                problems.append(f"local_labels: rank {i} has {r[5]} label(s) outside "
                                f"[0, {loss.num_classes}){but}, e.g. {r[6]}")
        if problems:
            # Every rank sees the same header, so every rank raises the same error.
            raise ValueError("ShardedAngularMarginLoss: " + "; ".join(problems))


class _Rows:
    """Where each rank's rows sit in the padded gathers (N·max_B rows) and in the global batch
    (Σ B_r rows, in rank order)."""

    def __init__(self, rows, device):
        self.rows = rows
        self.max = max(rows)
        self.total = sum(rows)
        self.padded = any(r != self.max for r in rows)
        self.index = (torch.cat([torch.arange(r, device=device) + i * self.max
                                 for i, r in enumerate(rows)]) if self.padded else None)

    def pad(self, local, fill=0):
        if not self.padded or local.shape[0] == self.max:
            return local
        extra = local.new_full((self.max - local.shape[0], *local.shape[1:]), fill)
        return torch.cat([local, extra])

    def compact(self, gathered):
        return gathered.index_select(0, self.index) if self.padded else gathered

    def spread(self, rows_global):
        """The global rows put back into the padded layout (zeros in the padding)."""
        if not self.padded:
            return rows_global
        out = rows_global.new_zeros((len(self.rows) * self.max, *rows_global.shape[1:]))
        return out.index_copy_(0, self.index, rows_global)


class _ShardedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, target, sample_weight, loss, step):
        comm = loss._comm
        chosen = dispatch.select(loss.backend, x, weight).name
        needs_grad_x = bool(ctx.needs_input_grad[0])
        head = _Header(comm, x, target, sample_weight, needs_grad_x, loss, step)
        rows = _Rows(head.rows, x.device)
        acc = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32

        # Embeddings, labels and sample weights of every rank (the weights travel as the bits of
        # float64 values beside the labels, in one int64 gather).
        if rows.max:
            gx = comm.all_gather(rows.pad(x), "all-gather of the embeddings", step, async_op=True)
            meta = [target]
            if head.has_sample_weight:
                sw = (sample_weight.to(torch.float64) if sample_weight is not None
                      else torch.ones(x.shape[0], dtype=torch.float64, device=x.device))
                meta.append(sw.view(torch.int64))
            meta = rows.pad(torch.stack(meta, dim=1), fill=0)
            gm = comm.all_gather(meta, "all-gather of the labels", step)
            x_all = rows.compact(gx.wait())
            gm = rows.compact(gm)
            t_all = gm[:, 0].contiguous()
            sw_all = gm[:, 1].contiguous().view(torch.float64) if head.has_sample_weight else None
        else:
            x_all = x.new_empty((0, x.shape[1]))
            t_all, sw_all = target.new_empty((0,)), None

        ignored = t_all == loss._ignore_value
        valid = ~ignored & (t_all >= 0) & (t_all < loss.num_classes)
        problem = dict(num_classes=loss.num_classes, class_weight=loss.class_weight,
                       ignore_index=loss._ignore_value)
        offset, centres, sampled = loss.class_start, weight, None
        if loss.sample_rate < 1.0:
            starts_sizes = [shard_range(loss.num_classes, comm.world_size, r)
                            for r in range(comm.world_size)]
            sampled = sample_centres(t_all, valid, shard_starts=[s for s, _ in starts_sizes],
                                     shard_sizes=[n for _, n in starts_sizes], rank=comm.rank,
                                     sample_rate=loss.sample_rate, comm=comm, step=step)
            loss.last_sampled_classes = sampled.local_index + loss.class_start
            t_all = virtual_targets(t_all, valid, ignored, sampled)
            centres = weight.index_select(0, sampled.local_index)
            offset = sampled.offset
            cw = loss.class_weight
            problem = dict(num_classes=sampled.num_classes,
                           class_weight=cw[sampled.class_ids] if cw is not None else None,
                           ignore_index=-1)
        chunk = loss.chunk_rows or shard_mode.default_chunk_rows(
            centres.shape[0], torch.empty((), dtype=acc).element_size())
        kw = dict(class_offset=offset, normalize=True, scale=loss.scale, margin=loss.margin,
                  cos_margin=loss.cos_margin, bias_shard=None, sample_weight=sw_all,
                  label_smoothing=loss.label_smoothing,
                  straight_through=loss.margin_grad == "straight_through", chunk_rows=chunk,
                  **problem)

        lse_local, partial = shard_mode.shard_forward(chosen, x_all, centres, t_all, **kw)
        if rows.total:
            parts = comm.all_gather(torch.stack([lse_local, partial]),
                                    "all-gather of the per-row partials", step).view(
                                        comm.world_size, 2, rows.total)
            lse_parts, partial_parts = parts[:, 0], parts[:, 1]
        else:
            lse_parts = partial_parts = lse_local.new_empty((comm.world_size, 0))
        combine = dict(num_classes=kw["num_classes"], class_weight=kw["class_weight"],
                       sample_weight=sw_all, label_smoothing=loss.label_smoothing,
                       ignore_index=kw["ignore_index"])
        loss_rows, lse = reference.shard_combine(lse_parts, partial_parts, t_all, **combine)
        denominator = None
        if loss.reduction == "mean":
            denominator = reference.shard_mean_denominator(
                t_all, num_classes=kw["num_classes"], class_weight=kw["class_weight"],
                sample_weight=sw_all, ignore_index=kw["ignore_index"], dtype=acc)
        out = reference.shard_reduce(loss_rows, loss.reduction, denominator)

        ctx.save_for_backward(x_all, centres, t_all, lse)
        ctx.comm, ctx.rows, ctx.kw, ctx.chosen, ctx.step = comm, rows, kw, chosen, step
        ctx.reduction, ctx.denominator = loss.reduction, denominator
        ctx.grl_lambda, ctx.needs_grad_x = loss.grl_lambda, head.needs_grad_x
        ctx.local_index = sampled.local_index if sampled is not None else None
        ctx.x_meta = (x.shape, x.dtype)
        ctx.weight_meta = weight.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        x_all, centres, t_all, lse = ctx.saved_tensors
        comm, rows, kw = ctx.comm, ctx.rows, ctx.kw
        grad_rows = reference.shard_grad_rows(grad_loss.to(lse.dtype), rows.total,
                                              ctx.reduction, ctx.denominator)
        grad_x_part, grad_centres, _ = shard_mode.shard_backward(
            ctx.chosen, grad_rows, x_all, centres, t_all, lse, grl_lambda=ctx.grl_lambda, **kw)
        grad_x = None
        if ctx.needs_grad_x and rows.max:
            # Σ over the ranks of every shard's part, each rank receiving its own rows; ×N is
            # Partial FC's convention (DDP averages the backbone's gradients over N ranks).
            mine = comm.reduce_scatter(rows.spread(grad_x_part),
                                       "reduce-scatter of the embeddings' gradient", ctx.step)
            shape, dtype = ctx.x_meta
            grad_x = (mine[:shape[0]] * comm.world_size).to(dtype)
        elif ctx.needs_input_grad[0]:
            shape, dtype = ctx.x_meta
            grad_x = torch.zeros(shape, dtype=dtype, device=x_all.device)
        if not ctx.needs_input_grad[0]:
            grad_x = None
        grad_weight = grad_centres
        if ctx.local_index is not None:
            grad_weight = grad_centres.new_zeros(ctx.weight_meta).index_copy_(
                0, ctx.local_index, grad_centres)
        return grad_x, grad_weight, None, None, None, None
