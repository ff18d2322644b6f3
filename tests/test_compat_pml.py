"""udat_kernels.compat.pml against the installed pytorch-metric-learning (docs/compat.md).

Same constructor, parameters, state_dict, keywords and numbers as pytorch-metric-learning's
ArcFaceLoss / CosFaceLoss. Numbers follow the closeness rule of docs/math.md ("Closeness and
tolerances"): ours in float32 against pytorch-metric-learning's own formula evaluated in float64
on the same inputs, allowing twice pytorch-metric-learning's own float32 error where that is
larger. Target cosines stay within |c| ≤ 0.95 and away from the margin's jump (docs/math.md,
"ψ′ and its guard"), on both sides of θ + m = π.
"""

import copy
import inspect
import io
import math
import subprocess
import sys

import pytest
import torch

from helpers import assert_close_spec, make_inputs

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
from pytorch_metric_learning import distances, miners, reducers, regularizers  # noqa: E402

from udat_kernels.compat import pml as ours  # noqa: E402

ARC_DEG = 28.6  # pytorch-metric-learning's default ArcFace margin, in degrees
F32 = (1e-5, 1e-6)


def make_pair(kind, C, D, seed=0, **kwargs):
    """(pytorch-metric-learning's loss, ours), built from the same seed: the same initial W."""
    cls = {"arc": (pml_losses.ArcFaceLoss, ours.ArcFaceLoss),
           "cos": (pml_losses.CosFaceLoss, ours.CosFaceLoss)}[kind]
    torch.manual_seed(seed)
    theirs = cls[0](num_classes=C, embedding_size=D, **copy.deepcopy(kwargs))
    torch.manual_seed(seed)
    mine = cls[1](num_classes=C, embedding_size=D, **copy.deepcopy(kwargs))
    return theirs, mine


def inputs(B, D, C, seed=0, margin_rad=0.5, target_cos=None):
    x, w, y = make_inputs(B, D, C, seed=seed, margin=margin_rad, target_cos=target_cos)
    return x, w, y


def run(loss_mod, x, w_dc, y, dtype=torch.float32, **fwd):
    """loss, grad embeddings, grad W of one forward/backward with W set to w_dc (D, C)."""
    loss_mod = copy.deepcopy(loss_mod).to(dtype)
    with torch.no_grad():
        loss_mod.W.copy_(w_dc.to(dtype))
    x = x.to(dtype).detach().requires_grad_()
    loss = loss_mod(x, y, **fwd)
    loss.backward()
    return loss, x.grad, loss_mod.W.grad


def check_same(kind, B, D, C, *, seed=0, ctor=None, target_cos=None, margin_rad=0.5, **fwd):
    ctor = ctor or {}
    theirs, mine = make_pair(kind, C, D, seed, **ctor)
    x, w, y = inputs(B, D, C, seed, margin_rad=margin_rad, target_cos=target_cos)
    got = run(mine, x, w.t(), y, **fwd)
    ref = run(theirs, x.double(), w.t().double(), y, torch.float64, **fwd)
    own = run(theirs, x, w.t(), y, **fwd)
    assert got[0].dtype == torch.float32 and got[2].shape == (D, C)
    for name, a, b, o in zip(("loss", "grad embeddings", "grad W"), got, ref, own):
        assert_close_spec(a, b, *F32, name, torch_own=o)
    return got, ref


# ---------------------------------------------------------------------------------------------
# Interface: signatures, parameters, state_dict
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ArcFaceLoss", "CosFaceLoss"])
def test_constructor_signature_is_pml(name):
    assert inspect.signature(getattr(ours, name)) == inspect.signature(getattr(pml_losses, name))
    for method in ("forward", "get_logits"):
        assert (inspect.signature(getattr(getattr(ours, name), method))
                == inspect.signature(getattr(getattr(pml_losses, name), method)))
    theirs, mine = make_pair("arc" if name == "ArcFaceLoss" else "cos", 10, 6)
    assert isinstance(mine, getattr(pml_losses, name))
    assert (mine.margin, mine.scale, mine.num_classes) == (theirs.margin, theirs.scale,
                                                           theirs.num_classes)
    assert type(mine.reducer) is type(theirs.reducer)
    assert list(dict(mine.named_parameters())) == list(dict(theirs.named_parameters())) == ["W"]


@pytest.mark.parametrize("C,D", [(1, 3), (7, 5), (257, 33)])
def test_w_is_pml_shaped_class_major_and_initialised_alike(C, D):
    theirs, mine = make_pair("arc", C, D, seed=3)
    assert mine.W.shape == theirs.W.shape == (D, C)
    assert mine.W.t().is_contiguous() and ours.is_class_major(mine.W)
    assert torch.equal(mine.W, theirs.W)  # same values from the same seed
    assert list(mine.state_dict()) == list(theirs.state_dict()) == ["W"]


def test_weight_init_func_is_pml():
    from pytorch_metric_learning.utils import common_functions as c_f

    init = c_f.TorchInitWrapper(torch.nn.init.uniform_, a=-0.3, b=0.3)
    theirs, mine = make_pair("cos", 9, 4, seed=1, weight_init_func=init)
    assert torch.equal(mine.W, theirs.W) and mine.W.abs().max() <= 0.3


def test_subcenter_arcface_is_not_served():
    with pytest.raises(NotImplementedError, match="SubCenterArcFaceLoss"):
        ours.SubCenterArcFaceLoss(num_classes=10, embedding_size=4)


def _save_load(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf)


@pytest.mark.parametrize("kind", ["arc", "cos"])
def test_state_dict_interchange_both_ways(kind):
    theirs, mine = make_pair(kind, 13, 6, seed=0)
    _, other = make_pair(kind, 13, 6, seed=1)  # different values to load into
    x, _, y = inputs(5, 6, 13)
    # theirs -> ours (through a file), strict
    other.load_state_dict(_save_load(theirs.state_dict()))
    assert torch.equal(other.W, theirs.W) and ours.is_class_major(other.W)
    assert_close_spec(other(x, y), theirs(x, y), *F32, "loss after loading theirs")
    # ours -> theirs
    fresh, _ = make_pair(kind, 13, 6, seed=2)
    fresh.load_state_dict(_save_load(mine.state_dict()))
    assert torch.equal(fresh.W, mine.W) and fresh.W.is_contiguous()
    assert_close_spec(mine(x, y), fresh(x, y), *F32, "loss after loading ours")
    # assign=True installs the loaded (D, C)-contiguous tensor: put back class-major at once
    other.load_state_dict(_save_load(theirs.state_dict()), assign=True)
    assert ours.is_class_major(other.W) and torch.equal(other.W, theirs.W)
    # a checkpoint of the whole module
    again = _save_load_module(mine)
    assert ours.is_class_major(again.W) and torch.equal(again.W, mine.W)


def _save_load_module(module):
    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_layout_survives_to_copy_and_data_swap():
    _, mine = make_pair("arc", 11, 4)
    assert ours.is_class_major(copy.deepcopy(mine).W)
    for dtype in (torch.float64, torch.float16, torch.float32):
        mine.to(dtype)
        assert mine.W.dtype == dtype and ours.is_class_major(mine.W)
    mine.to_empty(device="cpu")
    assert ours.is_class_major(mine.W)
    # W.data replaced by a (D, C)-contiguous tensor: the next forward restores the layout once,
    # keeping the Parameter object (an optimizer holding it keeps working)
    param = mine.W
    mine.W.data = torch.randn(4, 11)
    x, _, y = inputs(3, 4, 11)
    mine(x, y)
    assert mine.W is param and ours.is_class_major(mine.W)


@pytest.mark.parametrize("kind", ["arc", "cos"])
@pytest.mark.parametrize("opt", ["sgd_momentum", "adam", "adamw_foreach_off"])
def test_training_steps_match_pml_and_keep_layout(kind, opt):
    """A few optimizer steps from the same state give the same W (and keep ours class-major:
    gradients, momentum and Adam moments share W's strides)."""
    C, D, B = 23, 8, 16
    theirs, mine = make_pair(kind, C, D, seed=4)
    make_opt = {"sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
                "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
                "adamw_foreach_off": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=False)}[opt]
    opts = [make_opt(m.parameters()) for m in (theirs, mine)]
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        x = torch.randn(B, D, generator=g)
        y = torch.randint(0, C, (B,), generator=g)
        for m, o in zip((theirs, mine), opts):
            o.zero_grad(set_to_none=True)
            m(x, y).backward()
            o.step()
        assert mine.W.grad.stride() == (1, D)
        for state in opts[1].state[mine.W].values():
            if isinstance(state, torch.Tensor) and state.dim() == 2:
                assert state.stride() == (1, D)
    assert ours.is_class_major(mine.W)
    assert_close_spec(mine.W, theirs.W, 1e-5, 1e-6, "W after 4 steps")


# ---------------------------------------------------------------------------------------------
# Numbers: loss and gradients equal pytorch-metric-learning's
# ---------------------------------------------------------------------------------------------

SHAPES = [(1, 3, 1), (5, 4, 2), (9, 7, 7), (33, 16, 10), (64, 32, 257), (17, 130, 1000)]


@pytest.mark.parametrize("B,D,C", SHAPES)
def test_arcface_matches_pml(B, D, C):
    check_same("arc", B, D, C, seed=B + C)


@pytest.mark.parametrize("B,D,C", SHAPES)
def test_cosface_matches_pml(B, D, C):
    check_same("cos", B, D, C, seed=B + C)


@pytest.mark.parametrize("kind,ctor,margin_rad", [
    ("arc", {"margin": 10.0, "scale": 30}, math.radians(10.0)),
    ("arc", {"margin": 0.0, "scale": 16}, 0.0),
    ("arc", {"margin": 57.29577951308232, "scale": 64}, 1.0),
    ("cos", {"margin": 0.0, "scale": 10}, 0.0),
    ("cos", {"margin": 0.5, "scale": 45.5}, 0.0),
])
def test_margins_and_scales_match_pml(kind, ctor, margin_rad):
    check_same(kind, 24, 12, 31, seed=7, ctor=ctor, margin_rad=margin_rad)


def test_arcface_past_the_jump_matches_pml():
    """θ + m > π: pytorch-metric-learning falls back to cos θ − m·sin m, as the op's ψ does; rows
    on both sides of the jump at cos(π − m) in one batch."""
    m = math.radians(ARC_DEG)
    jump = math.cos(math.pi - m)
    cos = [-0.95, -0.93, jump - 0.03, jump + 0.03, -0.5, 0.0, 0.6, 0.95] * 3
    got, _ = check_same("arc", len(cos), 9, 6, target_cos=cos)
    # the fallback region really was exercised: its loss rows are cos θ − m sin m (monotonic)
    assert sum(c < jump for c in cos) >= 6


@pytest.mark.parametrize("kind", ["arc", "cos"])
def test_indices_tuple_weights_rows_as_pml(kind):
    B, D, C = 20, 6, 5
    x, w, y = inputs(B, D, C, seed=2)
    triplets = miners.TripletMarginMiner(margin=0.2, type_of_triplets="all")(x, y)
    assert len(triplets[0]) > 0
    pairs = (torch.tensor([0, 0, 3, 7]), torch.tensor([1, 2, 4, 7]), torch.tensor([0]),
             torch.tensor([5]))
    for tuples in (triplets, pairs):
        check_same(kind, B, D, C, seed=2, indices_tuple=tuples)
    # an empty miner result weighs every row alike, as pytorch-metric-learning does
    empty = tuple(torch.empty(0, dtype=torch.long) for _ in range(3))
    check_same(kind, B, D, C, seed=2, indices_tuple=empty)


@pytest.mark.parametrize("reducer", [reducers.SumReducer(), reducers.AvgNonZeroReducer(),
                                     reducers.ThresholdReducer(low=20.0),
                                     reducers.MeanReducer(collect_stats=True)],
                         ids=["sum", "avg_nonzero", "threshold", "mean_with_stats"])
def test_other_reducers_match_pml(reducer):
    check_same("arc", 16, 8, 9, seed=5, ctor={"reducer": reducer})


def test_regularizers_match_pml():
    ctor = {"weight_regularizer": regularizers.RegularFaceRegularizer(),
            "weight_reg_weight": 0.3,
            "embedding_regularizer": regularizers.LpRegularizer(), "embedding_reg_weight": 0.1}
    check_same("arc", 12, 6, 8, seed=6, ctor=ctor)
    check_same("cos", 12, 6, 8, seed=6, ctor=ctor)


def test_do_nothing_reducer_returns_pml_loss_dict():
    theirs, mine = make_pair("arc", 8, 5, reducer=reducers.DoNothingReducer())
    x, w, y = inputs(10, 5, 8, seed=1)
    for m in (theirs, mine):
        with torch.no_grad():
            m.W.copy_(w.t())
    a, b = mine(x, y), theirs(x, y)
    assert a.keys() == b.keys() == {"loss"}
    assert a["loss"]["reduction_type"] == b["loss"]["reduction_type"] == "element"
    assert_close_spec(a["loss"]["losses"], b["loss"]["losses"], *F32, "per-row losses")


@pytest.mark.parametrize("kind", ["arc", "cos"])
def test_collect_stats_match_pml(kind):
    theirs, mine = make_pair(kind, 9, 5, collect_stats=True)
    theirs.distance.collect_stats = mine.distance.collect_stats = True
    x, w, y = inputs(12, 5, 9, seed=8)
    for m in (theirs, mine):
        with torch.no_grad():
            m.W.copy_(w.t())
        m(x, y)
    assert mine.avg_angle == pytest.approx(theirs.avg_angle, rel=1e-5)
    for stat in ("initial_avg_query_norm", "initial_avg_ref_norm", "final_avg_ref_norm"):
        assert getattr(mine.distance, stat) == pytest.approx(getattr(theirs.distance, stat),
                                                             rel=1e-5)


@pytest.mark.parametrize("kind", ["arc", "cos"])
def test_get_logits_matches_pml(kind):
    theirs, mine = make_pair(kind, 300, 17, seed=9)
    x = torch.randn(7, 17)
    assert_close_spec(mine.get_logits(x), theirs.get_logits(x), *F32, "get_logits")
    assert mine.get_logits(x).dtype == torch.float32


def test_half_embeddings_accumulate_in_float32_and_keep_w_dtype():
    """The documented difference: pytorch-metric-learning casts W to float16 and computes in
    float16; ours reads float16 embeddings, keeps W float32, and accumulates in float32."""
    theirs, mine = make_pair("arc", 50, 16, seed=2)
    x, w, y = inputs(32, 16, 50, seed=2)
    for m in (theirs, mine):
        with torch.no_grad():
            m.W.copy_(w.t())
    xh = x.half()
    loss = mine(xh, y)
    assert loss.dtype == torch.float32 and mine.W.dtype == torch.float32
    exact = copy.deepcopy(theirs).double()(xh.double(), y)  # their formula, float64, same inputs
    assert_close_spec(loss, exact, 2e-3, 1e-5, "float16 loss")
    theirs(xh, y)
    assert theirs.W.dtype == torch.float16  # pytorch-metric-learning's cast, which we skip


# ---------------------------------------------------------------------------------------------
# Bad input names the argument
# ---------------------------------------------------------------------------------------------


def test_forward_keywords_raise_naming_them():
    _, mine = make_pair("arc", 5, 4)
    x, _, y = inputs(6, 4, 5)
    with pytest.raises(ValueError, match="^ref_emb:"):
        mine(x, y, ref_emb=x)
    with pytest.raises(ValueError, match="^ref_labels:"):
        mine(x, y, ref_labels=y)
    with pytest.raises(ValueError, match="^labels:"):
        mine(x)
    with pytest.raises(TypeError, match="^labels:"):
        mine(x, y.float())
    for bad in (5, -1, -100):
        with pytest.raises(ValueError, match=f"^labels: value {bad} "):
            mine(x, torch.tensor([0, 1, bad, 2, 3, 4]))
    with pytest.raises(ValueError, match="^embeddings:"):
        mine(x[:, None], y)
    # int32 labels are class indices like int64 ones
    assert torch.equal(mine(x, y.int()), mine(x, y))


def test_constructor_arguments_the_op_cannot_serve_raise():
    with pytest.raises(ValueError, match="^distance:"):
        ours.ArcFaceLoss(5, 4, distance=distances.CosineSimilarity(power=2))
    with pytest.raises(AssertionError):  # pytorch-metric-learning's own check
        ours.CosFaceLoss(5, 4, distance=distances.LpDistance())
    with pytest.raises(ValueError, match="^margin:"):
        ours.ArcFaceLoss(5, 4, margin=180)
    with pytest.raises(ValueError, match="^margin:"):
        ours.CosFaceLoss(5, 4, margin=-0.1)
    with pytest.raises(ValueError, match="^scale:"):
        ours.ArcFaceLoss(5, 4, scale=0)
    with pytest.raises(TypeError):
        ours.ArcFaceLoss(5, 4, backend="cpu")  # not a keyword of pytorch-metric-learning's


# ---------------------------------------------------------------------------------------------
# No (B, C)- and no (C, D)-sized allocation per call
# ---------------------------------------------------------------------------------------------


def _allocations(fn):
    """Sizes in bytes of every CPU allocation made while fn runs (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]


@pytest.mark.parametrize("kind", ["arc", "cos"])
def test_no_batch_by_class_and_no_copy_of_w_per_call(kind, monkeypatch):
    """At large C a call allocates nothing of B×C and nothing of C×D except the gradient of W
    itself (which becomes W.grad without a copy); without gradients, nothing of C×D at all. The
    CPU kernels' row block is capped (docs/design.md, "Memory"): a small cap here stands for a
    C large enough that B rows of logits exceed the default one."""
    B, D, C = 64, 16, 20_000
    bc, cd = B * C * 4, C * D * 4
    monkeypatch.setenv("UDAT_CPU_BLOCK_BYTES", str(8 * C * 4))
    theirs, mine = make_pair(kind, C, D)
    x = torch.randn(B, D, requires_grad=True)
    y = torch.randint(0, C, (B,))
    mine(x, y).backward()  # warm-up (first-call set-up)

    def train_step():
        mine.W.grad = None
        mine(x, y).backward()

    sizes = _allocations(train_step)
    assert max(sizes) < bc, f"a (B, C)-sized allocation: {max(sizes)} >= {bc}"
    assert sum(s >= cd for s in sizes) == 1, sorted(sizes)[-4:]
    assert mine.W.grad.stride() == (1, D)
    with torch.no_grad():
        sizes = _allocations(lambda: mine(x, y))
    assert max(sizes) < min(bc, cd), sorted(sizes)[-4:]
    # the same measurement catches what it is meant to catch: pytorch-metric-learning's loss
    # (B×C logits, W copied per call) and ours with W left (D, C)-contiguous
    with torch.no_grad():
        assert max(_allocations(lambda: theirs(x, y))) >= bc
    mine.W.data = mine.W.data.contiguous()
    sizes = _allocations(lambda: angular_loss_of_plain_layout(mine, x, y))
    assert sum(s >= cd for s in sizes) >= 2


def angular_loss_of_plain_layout(mine, x, y):
    """The op on W.t() of a (D, C)-contiguous W, bypassing the forward's layout repair."""
    from udat_kernels import angular_margin_cross_entropy

    mine.W.grad = None
    angular_margin_cross_entropy(x, mine.W.t(), y, scale=mine.scale,
                                 margin=mine._margins()[0],
                                 cos_margin=mine._margins()[1]).backward()


def test_import_udat_kernels_does_not_import_pml():
    code = ("import sys, udat_kernels, udat_kernels.compat, udat_kernels.compat.insightface\n"
            "print(any(m.split('.')[0] == 'pytorch_metric_learning' for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "False"
