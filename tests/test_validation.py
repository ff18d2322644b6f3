"""Bad input raises a Python exception that names the argument (docs/math.md) — never a crash and
never a silently wrong number — both through the public functions and at the ops themselves."""

from __future__ import annotations

import math

import pytest
import torch

import udat_kernels as uk
from helpers import make_inputs

pytestmark = pytest.mark.skipif(not uk._C_loader.available(),
                                reason=f"extension not built: {uk._C_loader.error()}")

AMCE = uk.angular_margin_cross_entropy
LCE = uk.linear_cross_entropy


@pytest.fixture
def xwt():
    return make_inputs(6, 5, 4, seed=31)


def _cases():
    """(name, function, mutate(x, w, t) -> (args, kwargs), exception, argument named)."""
    nan = float("nan")
    return [
        ("x_rank", AMCE, lambda x, w, t: ((x[0], w, t), {}), ValueError, "x"),
        ("weight_rank", AMCE, lambda x, w, t: ((x, w[0], t), {}), ValueError, "weight"),
        ("feature_mismatch", AMCE, lambda x, w, t: ((x, w[:, :3], t), {}), ValueError, "weight"),
        ("target_shape", AMCE, lambda x, w, t: ((x, w, t[:3]), {}), ValueError, "target"),
        ("target_rank", AMCE, lambda x, w, t: ((x, w, t[:, None]), {}), ValueError, "target"),
        ("target_high", AMCE, lambda x, w, t: ((x, w, t + 10), {}), ValueError, "target"),
        ("target_negative", AMCE, lambda x, w, t: ((x, w, t - 10), {}), ValueError, "target"),
        ("target_float", AMCE, lambda x, w, t: ((x, w, t.float()), {}), TypeError, "target"),
        ("target_list", AMCE, lambda x, w, t: ((x, w, t.tolist()), {}), TypeError, "target"),
        ("x_integer", AMCE, lambda x, w, t: ((x.long(), w, t), {}), TypeError, "x"),
        ("weight_integer", LCE, lambda x, w, t: ((x, w.int(), t), {}), TypeError, "weight"),
        ("scale_nan", AMCE, lambda x, w, t: ((x, w, t), {"scale": nan}), ValueError, "scale"),
        ("scale_inf", AMCE, lambda x, w, t: ((x, w, t), {"scale": math.inf}), ValueError, "scale"),
        ("scale_zero", AMCE, lambda x, w, t: ((x, w, t), {"scale": 0.0}), ValueError, "scale"),
        ("scale_negative", AMCE, lambda x, w, t: ((x, w, t), {"scale": -2.0}), ValueError,
         "scale"),
        ("scale_string", AMCE, lambda x, w, t: ((x, w, t), {"scale": "64"}), TypeError, "scale"),
        ("margin_negative", AMCE, lambda x, w, t: ((x, w, t), {"margin": -0.1}), ValueError,
         "margin"),
        ("margin_pi", AMCE, lambda x, w, t: ((x, w, t), {"margin": math.pi}), ValueError,
         "margin"),
        ("cos_margin_negative", AMCE, lambda x, w, t: ((x, w, t), {"cos_margin": -0.2}),
         ValueError, "cos_margin"),
        ("smoothing_one", AMCE, lambda x, w, t: ((x, w, t), {"label_smoothing": 1.0}),
         ValueError, "label_smoothing"),
        ("smoothing_negative", LCE, lambda x, w, t: ((x, w, t), {"label_smoothing": -0.1}),
         ValueError, "label_smoothing"),
        ("reduction", AMCE, lambda x, w, t: ((x, w, t), {"reduction": "avg"}), ValueError,
         "reduction"),
        ("backend", AMCE, lambda x, w, t: ((x, w, t), {"backend": "tpu"}), ValueError, "backend"),
        ("backend_wrong_device", AMCE, lambda x, w, t: ((x, w, t), {"backend": "cuda"}),
         RuntimeError, "backend"),
        ("margin_grad", AMCE, lambda x, w, t: ((x, w, t), {"margin_grad": "approx"}), ValueError,
         "margin_grad"),
        ("lambda_nan", AMCE, lambda x, w, t: ((x, w, t), {"grl_lambda": nan}), ValueError,
         "grl_lambda"),
        ("lambda_tensor_nan", AMCE,
         lambda x, w, t: ((x, w, t), {"grl_lambda": torch.tensor(nan)}), ValueError,
         "grl_lambda"),
        ("lambda_vector", AMCE, lambda x, w, t: ((x, w, t), {"grl_lambda": torch.ones(2)}),
         ValueError, "grl_lambda"),
        ("margin_to_linear", LCE, lambda x, w, t: ((x, w, t), {"margin": 0.5}), TypeError,
         "margin"),
        ("scale_to_linear", LCE, lambda x, w, t: ((x, w, t), {"scale": 30.0}), TypeError,
         "scale"),
        ("bias_to_angular", AMCE, lambda x, w, t: ((x, w, t), {"bias": torch.zeros(4)}),
         TypeError, "bias"),
        ("class_weight_shape", AMCE, lambda x, w, t: ((x, w, t), {"class_weight": torch.ones(3)}),
         ValueError, "class_weight"),
        ("sample_weight_shape", AMCE,
         lambda x, w, t: ((x, w, t), {"sample_weight": torch.ones(5)}), ValueError,
         "sample_weight"),
        ("bias_shape", LCE, lambda x, w, t: ((x, w, t), {"bias": torch.ones(2, 2)}), ValueError,
         "bias"),
        ("mismatched_devices", AMCE, lambda x, w, t: ((x, w.to("meta"), t), {}), ValueError,
         "weight"),
    ]


CASES = _cases()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_names_the_argument(xwt, case):
    _, fn, mutate, exc, name = case
    args, kwargs = mutate(*xwt)
    with pytest.raises(exc, match=name):
        fn(*args, **kwargs)


def test_unvalidated_cpu_still_checks_targets(xwt):
    """validate=False skips the Python checks; the CPU kernel still refuses a bad target."""
    x, w, t = xwt
    with pytest.raises(ValueError, match="target"):
        AMCE(x, w, t + 10, validate=False)


def test_op_checks_shapes_without_python(xwt):
    """The C++ ops check their arguments themselves (a direct op call cannot crash)."""
    x, w, t = xwt
    op = torch.ops.udat_kernels.margin_ce_fwd.default
    common = (None, None, None, None, True, 64.0, 0.5, 0.0, 0.0, -100, 1, False, False)
    with pytest.raises(ValueError, match="weight"):
        op(x, w[:, :2], t, *common)
    with pytest.raises(ValueError, match="target"):
        op(x, w, t[:2], *common)
    with pytest.raises(ValueError, match="margin"):
        op(x, w, t, None, None, None, None, True, 64.0, 4.0, 0.0, 0.0, -100, 1, False, False)
    with pytest.raises(ValueError, match="reduction"):
        op(x, w, t, None, None, None, None, True, 64.0, 0.5, 0.0, 0.0, -100, 7, False, False)
