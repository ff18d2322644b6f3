"""udat_kernels.compat.insightface.PartialFC_V2 against arcface_torch's PartialFC_V2
(docs/compat.md, "PartialFC_V2").

arcface_torch is not part of any installable package: the comparison is with an eager
re-implementation written from its published formulas (tests/partial_fc_workers.py,
`EagerPartialFC`), on two gloo processes, in float64 (and float32 as PyTorch's own result):
loss, every shard's grad W and every rank's grad of its embeddings, for ArcFace and CosFace,
uneven shards, labels of shape (B, 1) and int32, sampled centres, fp16; where the two differ by
design (rows past θ + m2 = π, rows whose loss exceeds arcface_torch's cap of 69.08) the test
checks ours against the single-device op and the size of the difference. Per-rank checkpoints
(state_dict and optimizer state) go both ways; bad arguments raise naming them.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.distributed as dist

from udat_kernels.compat.insightface import CombinedMarginLoss, PartialFC_V2

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                 reason="torch.distributed with gloo is not available")

WORLD = 2


# ---------------------------------------------------------------------------------------------
# One process: the constructor
# ---------------------------------------------------------------------------------------------


def test_signature_is_arcface_torch():
    params = inspect.signature(PartialFC_V2).parameters
    assert list(params)[:5] == ["margin_loss", "embedding_size", "num_classes", "sample_rate",
                                "fp16"]
    assert params["sample_rate"].default == 1.0 and params["fp16"].default is False
    # the one addition is keyword-only
    assert [p.kind for p in params.values()][5:] == [inspect.Parameter.KEYWORD_ONLY]


class _ArcfaceTorchCombinedMarginLoss(torch.nn.Module):
    """Stands for arcface_torch's own CombinedMarginLoss: its five arguments as attributes."""

    def __init__(self, s, m1, m2, m3, interclass_filtering_threshold=0):
        super().__init__()
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
        self.interclass_filtering_threshold = interclass_filtering_threshold

    def forward(self, logits, labels):
        raise AssertionError("PartialFC_V2 must not call the margin loss")


class _ArcFace(torch.nn.Module):
    """arcface_torch's older ArcFace(s, margin) module: not a CombinedMarginLoss."""

    def __init__(self, s=64.0, margin=0.5):
        super().__init__()
        self.s, self.margin = s, margin

    def forward(self, logits, labels):
        return logits


@pytest.mark.parametrize("margin_loss,error,name", [
    (_ArcFace(), TypeError, "margin_loss"),
    (lambda logits, labels: logits, TypeError, "margin_loss"),
    (None, TypeError, "margin_loss"),
    (_ArcfaceTorchCombinedMarginLoss(64, 0.9, 0.4, 0.0), ValueError, "m1"),
    (_ArcfaceTorchCombinedMarginLoss(64, 1.0, 0.3, 0.2), ValueError, "m2, m3"),
    (_ArcfaceTorchCombinedMarginLoss(64, 1.0, 0.5, 0.0, 0.2), ValueError,
     "interclass_filtering_threshold"),
])
def test_margin_losses_that_cannot_be_served_raise_naming_them(margin_loss, error, name):
    with pytest.raises(error, match=f"^{name}:"):
        PartialFC_V2(margin_loss, 8, 10)


@pytest.mark.parametrize("fp16", [None, 1.0, "yes"])
def test_fp16_must_be_a_bool(fp16):
    with pytest.raises(TypeError, match="^fp16:"):
        PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 8, 10, 1.0, fp16)


def test_needs_an_initialized_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        PartialFC_V2(_ArcfaceTorchCombinedMarginLoss(64, 1.0, 0.5, 0.0), 8, 10)


# ---------------------------------------------------------------------------------------------
# Two gloo processes
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    from partial_fc_workers import launch

    codes, logs, results = launch("interface", WORLD, tmp_path_factory.mktemp("pfc"),
                                  timeout_s=120)
    assert codes == [0] * WORLD and all(r is not None for r in results), "\n".join(logs)
    return results


def _case(results, rank, case):
    got = results[rank][case]
    assert "exception" not in got, f"rank {rank}:\n{got.get('exception')}"
    return got


def _assert_within(got, names, case, rank):
    for name in names:
        err, bound = got[name]
        assert err <= bound, f"{case}, rank {rank}: {name} error {err:.3e} > bound {bound:.3e}"


@pytest.mark.parametrize("case", ["arcface", "cosface", "arcface_s30_m0.3", "sampled"])
def test_matches_arcface_torch(ranks, case):
    """Same loss on every rank and same gradients as arcface_torch's head (θ + m2 ≤ π, every
    row's loss below its cap). "arcface": rank 1 passes int32 labels of shape (B, 1)."""
    from partial_fc_workers import LOSS_CAP

    C = {"arcface": 11, "cosface": 11, "arcface_s30_m0.3": 7, "sampled": 40}[case]
    for rank in range(WORLD):
        got = _case(ranks, rank, case)
        _assert_within(got, ("loss", "grad_weight", "grad_embeddings"), case, rank)
        # arcface_torch's shard rule: n_r = C // N + (r < C % N), in rank order
        assert got["shard"] == (C // WORLD * rank + min(rank, C % WORLD),
                                C // WORLD + (rank < C % WORLD))
        assert got["max_row_loss"] < LOSS_CAP - 10, got["max_row_loss"]
        assert got["loss_value"] == _case(ranks, 0, case)["loss_value"]
        if case == "sampled":
            kept, num_sample, num_local = got["sampled"]
            assert num_sample == int(0.5 * num_local) and num_sample <= kept < num_local


def test_rows_past_theta_plus_m2_eq_pi_follow_psi(ranks):
    """There ours is the single-device op (ψ decreasing in θ) and arcface_torch's cos(θ + m2)
    is not: the losses differ by far more than rounding."""
    for rank in range(WORLD):
        got = _case(ranks, rank, "beyond_pi")
        _assert_within(got, ("loss", "grad_weight", "grad_embeddings"), "beyond_pi", rank)
        assert got["differs_from_arcface_torch"] > 1.0


def test_rows_over_arcface_torchs_loss_cap(ranks):
    """arcface_torch clamps the target probability at 1e-30 (a row's loss at 69.08) in the
    value only: its loss is ours less the rows' excess over the cap, averaged; same gradients."""
    for rank in range(WORLD):
        got = _case(ranks, rank, "capped_rows")
        assert got["rows_over_cap"] == 2
        _assert_within(got, ("loss_minus_excess", "grad_weight", "grad_embeddings"),
                       "capped_rows", rank)


def test_fp16_feeds_float16_embeddings(ranks):
    """fp16=True: the loss is the op's on the float16-rounded embeddings (float32 rule; the
    embeddings' gradient in float16's) — not the op's on the float32 ones — and within float16
    rounding of arcface_torch's float16-autocast cosines."""
    for rank in range(WORLD):
        got = _case(ranks, rank, "fp16")
        _assert_within(got, ("loss_vs_reference_on_float16", "grad_weight_vs_reference_on_float16",
                             "grad_embeddings_vs_reference_on_float16",
                             "loss_vs_arcface_torch_fp16"), "fp16", rank)
        on_half = got["loss_vs_reference_on_float16"][0]
        on_float = got["loss_vs_reference_on_float32"][0]
        assert on_float > 10 * max(on_half, 1e-9), (on_half, on_float)


def test_same_initial_centres_as_arcface_torch_for_the_same_seed(ranks):
    for rank in range(WORLD):
        got = _case(ranks, rank, "same_initial_weight")
        assert got["equal"] and abs(got["std"] - 0.01) < 0.003


def test_per_rank_checkpoints_load_both_ways(ranks):
    """arcface_torch's checkpoint dict (the head's state_dict and SGD's state, momentum
    included) loads into ours and training continues as arcface_torch's does; ours loads into
    arcface_torch's."""
    for rank in range(WORLD):
        got = _case(ranks, rank, "checkpoints")
        assert got["keys"] == (["weight"], ["weight"])
        assert got["shapes"][0] == got["shapes"][1] == (got["shard"][0][1], 8)
        assert got["shard"][0] == got["shard"][1]
        assert got["version"] == (2, 2)
        assert got["momentum_loaded"]
        assert got["moved"] > 1e-3  # the steps after loading changed the weights
        _assert_within(got, ("theirs_into_ours", "ours_into_theirs"), "checkpoints", rank)


def test_a_label_outside_the_classes_raises_on_every_rank(ranks):
    """arcface_torch has no ignored label: −1 (or any label outside [0, C)) on one rank raises
    on every rank, naming the rank and the label."""
    for rank in range(WORLD):
        err = ranks[rank]["bad_label"]
        assert err["type"] == "ValueError", err
        assert "local_labels: rank 1 has 1 label(s) outside [0, 11), e.g. -1" in err["message"]
        assert "ignore_index" not in err["message"]


def test_fp16_that_differs_across_ranks_is_named(ranks):
    for rank in range(WORLD):
        err = ranks[rank]["fp16_mismatch"]
        assert err["type"] == "ValueError", err
        assert "fp16 (rank 0: True, rank 1: False)" in err["message"]


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and dist.is_nccl_available()),
                    reason="needs a CUDA device and NCCL")
def test_on_a_cuda_device(tmp_path):
    from partial_fc_workers import launch

    codes, logs, results = launch("cuda", 1, tmp_path, timeout_s=180)
    assert codes == [0] and results[0] is not None, "\n".join(logs)
    for case, got in results[0].items():
        assert got["device"].startswith("cuda"), got
        _assert_within(got, ("loss", "grad_weight", "grad_embeddings"), case, 0)
