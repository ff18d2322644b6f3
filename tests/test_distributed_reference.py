"""The reference shard mode against the ordinary reference op, on one process (docs/math.md,
"Class shards").

The classes are cut into 1 to 4 contiguous shards of uneven sizes (empty shards, shards that own
no target, C = 1, 2, 7 included); every shard's forward is combined, reduced and differentiated
through its backward with the global log-sum-exp, and the loss, grad x (the sum of the shards'
parts), grad W (the shards' blocks put together) and grad b must match the ordinary reference's
autograd for every keyword of the op.
"""

from __future__ import annotations

import math

import pytest
import torch

from udat_kernels import reference
from helpers import (KEYWORDS, assert_close_spec, make_inputs, materialize_keywords, run_loss,
                     tolerance)
from shard_helpers import SPLITS, cuts_of, sharded_loss


def ordinary(x, weight, target, *, angular=True, bias=None, **kwargs):
    fn = (reference.angular_margin_cross_entropy if angular
          else reference.linear_cross_entropy)
    return run_loss(fn, x, weight, target, bias=bias, **kwargs)


def compare(got, want, tol, what):
    for name, a, b in zip(("loss", "grad_x", "grad_weight", "grad_bias"), got, want):
        if b is None:
            assert a is None, f"{what}: {name}"
            continue
        assert_close_spec(a, b, *tol, f"{what}: {name}")


@pytest.mark.parametrize("C,shards", SPLITS)
@pytest.mark.parametrize("case", sorted(KEYWORDS))
def test_shards_match_the_op_float64(case, shards, C):
    B, D = 11, 9
    x, w, t = make_inputs(B, D, C, x_dtype=torch.float64, w_dtype=torch.float64,
                          seed=C * 31 + shards)
    kwargs = materialize_keywords(KEYWORDS[case], B, C, True, t)
    kwargs = {k: (v.double() if isinstance(v, torch.Tensor) and k != "grl_lambda" else v)
              for k, v in kwargs.items()}
    sizes = cuts_of(C, shards, seed=C + 7 * shards)
    got = sharded_loss(x, w, t, sizes, chunk_rows=4, **dict(kwargs))
    want = ordinary(x, w, t, **kwargs)
    compare(got, want, tolerance(torch.float64), f"{case} C={C} shards={sizes}")


@pytest.mark.parametrize("sizes", [[7], [0, 7], [3, 0, 4], [1, 2, 2, 2], [7, 0, 0, 0]])
@pytest.mark.parametrize("case", ["default", "smoothing_weights", "ignore_index", "none",
                                  "grl_float", "sum"])
def test_linear_head_with_bias(case, sizes):
    B, D, C = 10, 6, 7
    x, w, t = make_inputs(B, D, C, x_dtype=torch.float64, w_dtype=torch.float64, seed=3)
    bias = torch.randn(C, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    kwargs = materialize_keywords(KEYWORDS[case], B, C, False, t)
    kwargs = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    got = sharded_loss(x, w, t, sizes, angular=False, bias=bias, **dict(kwargs))
    want = ordinary(x, w, t, angular=False, bias=bias, **kwargs)
    compare(got, want, tolerance(torch.float64), f"linear {case} {sizes}")


def test_shards_that_own_no_target():
    """Every target in the first shard: the others add only their log-sum-exp and smoothing."""
    B, D, C = 9, 5, 12
    x, w, _ = make_inputs(B, D, C, x_dtype=torch.float64, w_dtype=torch.float64, seed=8)
    t = torch.randint(0, 3, (B,), generator=torch.Generator().manual_seed(2))
    for kwargs in ({}, {"label_smoothing": 0.3, "margin": 0.2, "cos_margin": 0.1}):
        got = sharded_loss(x, w, t, [3, 5, 4], **dict(kwargs))
        want = ordinary(x, w, t, **kwargs)
        compare(got, want, tolerance(torch.float64), f"no owner {kwargs}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch_and_all_ignored(reduction):
    D, C = 4, 5
    x, w, t = make_inputs(0, D, C, x_dtype=torch.float64, w_dtype=torch.float64)
    got = sharded_loss(x, w, t, [2, 3], reduction=reduction)
    want = ordinary(x, w, t, reduction=reduction)
    compare(got, want, tolerance(torch.float64), "empty batch")
    x, w, t = make_inputs(4, D, C, x_dtype=torch.float64, w_dtype=torch.float64)
    t[:] = -100
    got = sharded_loss(x, w, t, [2, 3], reduction=reduction)
    want = ordinary(x, w, t, reduction=reduction)
    compare(got, want, tolerance(torch.float64), "all rows ignored")
    for g in got[1:3]:
        assert torch.count_nonzero(g) == 0


@pytest.mark.parametrize("case", ["default", "smoothing_weights", "cosface", "none"])
def test_float32_inputs_within_the_closeness_rule(case):
    """float32 shards against the float64 op: the closeness rule of docs/math.md (with the
    allowance of twice PyTorch's own float32 error where the problem is ill-conditioned)."""
    B, D, C = 24, 16, 40
    x, w, t = make_inputs(B, D, C, seed=5)
    kwargs = materialize_keywords(KEYWORDS[case], B, C, True, t)
    got = sharded_loss(x, w, t, [13, 0, 20, 7], chunk_rows=5, **dict(kwargs))
    ref_kwargs = {k: (v.double() if isinstance(v, torch.Tensor) else v)
                  for k, v in kwargs.items()}
    want = ordinary(x.double(), w.double(), t, **ref_kwargs)
    own = ordinary(x, w, t, **kwargs)
    rtol, atol = tolerance(torch.float32)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    for name, a, b, o in zip(("loss", "grad_x", "grad_weight"), got, want, own):
        assert_close_spec(a, b, rtol, atol, f"{case}: {name}", torch_own=o)


def test_non_finite_rows_follow_the_op():
    """A NaN feature row gives a NaN loss and a +inf logit an infinite log-sum-exp, whichever
    shard holds it; a target outside [0, C) gives NaN on every shard's partial."""
    B, D, C = 4, 3, 6
    x, w, t = make_inputs(B, D, C, x_dtype=torch.float64, w_dtype=torch.float64, seed=9)
    x[1, 0] = float("nan")
    got = sharded_loss(x, w, t, [2, 4], reduction="none")
    want = ordinary(x, w, t, reduction="none")
    assert torch.equal(torch.isnan(got[0]), torch.isnan(want[0]))
    assert torch.isnan(got[0][1]) and not torch.isnan(got[0][0])
    # Linear head: a +inf bias on a class that is not the target makes the row's loss +inf.
    x, w, t = make_inputs(B, D, C, x_dtype=torch.float64, w_dtype=torch.float64, seed=9)
    t[:] = 0
    bias = torch.zeros(C, dtype=torch.float64)
    bias[4] = math.inf
    loss = sharded_loss(x, w, t, [2, 4], angular=False, bias=bias, reduction="none")[0]
    assert torch.all(loss == math.inf)
    t[2] = C + 3
    lse, partial = reference.shard_forward(x, w[:2], t, class_offset=0, num_classes=C)
    assert torch.isnan(partial[2]) and not torch.isnan(partial[[0, 1, 3]]).any()
