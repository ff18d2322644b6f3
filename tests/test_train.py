"""The trainer: adversarial step directions, AMP, checkpoints and exact kill-and-resume."""

import json

import pytest
import torch

from udat_kernels.udat.config import ModelConfig, RunConfig, TrainConfig
from udat_kernels.udat.data import Domain, load_digits
from udat_kernels.udat.training import ResumeError, RunExistsError, Trainer
from udat_kernels.udat.training.streams import BatchStream

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


@pytest.fixture(scope="module")
def domains():
    """Two small digit domains (the second one brighter), 128 training images each."""
    digits = load_digits(size=32)
    source = Domain("a", digits.train.subset(range(128)), digits.test.subset(range(40)), False)
    bright = digits.train.subset(range(128, 256))
    bright.images = (bright.images.int() * 2).clamp(max=255).to(torch.uint8)
    target = Domain("b", bright, digits.test.subset(range(40, 80)), False)
    return source, target


def tiny(method, **kwargs):
    base = dict(method=method, epochs=2, lr=0.01, momentum=0.9, seed=3)
    return RunConfig(model=ModelConfig(width=1 / 16), train=TrainConfig(**{**base, **kwargs}))


def theta(model, part):
    """θ_f (features), θ_y (label classifier) or θ_r (domain classifier) parameters."""
    names = {"f": ("features.", "fc1.", "fc2."), "y": ("fc3.", "head."),
             "r": ("domain_classifier.",)}[part]
    return [p for n, p in model.named_parameters() if n.startswith(names)]


@pytest.mark.parametrize("method", ["udat", "udat_as", "udat_as_margin"])
def test_adversarial_step_moves_the_right_parameters_the_right_way(domains, tmp_path, method):
    source, target = domains
    trainer = Trainer(tiny(method, lambda_max=0.5, schedule="constant"), source, target,
                      tmp_path, progress=False)
    model = trainer.model.eval()  # a fixed function: no dropout, BatchNorm running statistics
    x = torch.cat([source.train.images[:16], target.train.images[:16]]).float() / 127.5 - 1
    x = x.expand(-1, 3, -1, -1)
    y, d = source.train.labels[:16], torch.arange(32) // 16
    model.domain_classifier.set_progress(0, 1)

    def losses():
        with torch.no_grad():
            f = model.extract(x)
            return model.label_loss(f[:16], y).item(), model.domain_loss(f, d).item()

    l_y, l_r = losses()
    f = model.extract(x)
    (model.label_loss(f[:16], y) + model.domain_loss(f, d)).backward()
    assert model.domain_classifier.last_lambda == 0.5

    def step(part, sign):
        """A small step along the group's normalized gradient (a first-order move)."""
        params = theta(model, part)
        norm = torch.sqrt(sum(p.grad.square().sum() for p in params))
        with torch.no_grad():
            for p in params:
                p -= sign * 1e-4 * p.grad / norm

    step("f", 1)
    assert losses()[1] > l_r  # θ_f descends L_y − λ·L_r: the domain loss goes up
    step("f", -1)
    step("r", 1)
    assert losses()[1] < l_r  # θ_r descends L_r
    step("r", -1)
    step("y", 1)
    assert losses()[0] < l_y  # θ_y descends L_y


@pytest.mark.parametrize("method,labelled", [("source_only", "a"), ("target", "b")])
def test_non_adversarial_methods_have_no_domain_classifier(domains, tmp_path, method, labelled):
    source, target = domains
    trainer = Trainer(tiny(method), source, target, tmp_path, progress=False)
    assert trainer.model.domain_classifier is None
    assert trainer.labelled_domain.name == labelled
    out = trainer.train_step()
    assert out["loss_d"] == 0.0 and out["lambda"] == 0.0


@pytest.mark.parametrize("method", ["source_only", "udat_as_margin"])
def test_bf16_autocast_steps(domains, tmp_path, method):
    source, target = domains
    trainer = Trainer(tiny(method, amp="bf16"), source, target, tmp_path, progress=False)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    out = trainer.train_step()
    assert torch.isfinite(torch.tensor([out["loss_y"], out["loss_d"]])).all()
    after = list(trainer.model.parameters())
    assert all(p.dtype == torch.float32 for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_fp16_needs_cuda(domains, tmp_path):
    with pytest.raises(ValueError, match="fp16"):
        Trainer(tiny("udat", amp="fp16"), *domains, tmp_path, progress=False)


class Killed(Exception):
    pass


def kill_at(step):
    def on_step(trainer):
        if trainer.step == step:
            raise Killed
    return on_step


def _strip_time(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


@pytest.fixture(scope="module")
def uninterrupted(domains, tmp_path_factory):
    """An uninterrupted run: (final weights, result)."""
    trainer = Trainer(tiny("udat_as_margin"), *domains, tmp_path_factory.mktemp("full"),
                      progress=False)
    result = trainer.fit()
    return trainer.model.state_dict(), result


@pytest.mark.parametrize("every,kill", [(1, 3), (0, 3)])
def test_kill_and_resume_reaches_the_same_result(domains, uninterrupted, tmp_path, every, kill):
    """Killed mid-epoch, with (every=1) or without (every=0) a checkpoint at that step."""
    source, target = domains
    config = tiny("udat_as_margin", checkpoint_every=every)
    weights, expected = uninterrupted
    killed = Trainer(config, source, target, tmp_path / "killed", progress=False,
                     on_step=kill_at(kill))
    with pytest.raises(Killed):
        killed.fit()
    resumed = Trainer(config, source, target, tmp_path / "killed", progress=False)
    result = resumed.fit(resume=True)
    for a, b in zip(weights.values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert _strip_time(result["history"]) == _strip_time(expected["history"])
    log = [json.loads(line) for line in (tmp_path / "killed" / "log.jsonl").read_text().split("\n")
           if line]
    assert [r["epoch"] for r in log if r["event"] == "epoch"] == [1, 2]
    assert not list((tmp_path / "killed").glob("*.tmp"))
    assert set(result) >= {"selected_epoch", "target_test", "oracle_acc", "history"}


def test_resume_refuses_other_settings(domains, tmp_path):
    source, target = domains
    Trainer(tiny("udat", epochs=1), source, target, tmp_path, progress=False).fit()
    other = Trainer(tiny("udat", epochs=1, lr=0.02), source, target, tmp_path, progress=False)
    with pytest.raises(ResumeError, match=f"cannot resume {tmp_path}.*train.lr: 0.01 -> 0.02"):
        other.fit(resume=True)


def test_resume_accepts_settings_that_do_not_change_the_result(domains, uninterrupted,
                                                               tmp_path):
    """Killed mid-epoch, then resumed with another checkpoint frequency, another spelling of
    the device and another validator for best.pt: same history as the uninterrupted run."""
    source, target = domains
    killed = Trainer(tiny("udat_as_margin", checkpoint_every=2), source, target, tmp_path,
                     progress=False, on_step=kill_at(4))
    with pytest.raises(Killed):
        killed.fit()
    harmless = tiny("udat_as_margin", checkpoint_every=0, device="cpu:0", select="entropy",
                    keep="last")
    result = Trainer(harmless, source, target, tmp_path, progress=False).fit(resume=True)
    assert _strip_time(result["history"]) == _strip_time(uninterrupted[1]["history"])
    assert (tmp_path / "last.pt").exists() and not (tmp_path / "best.pt").exists()  # keep=last


def test_a_run_folder_is_never_overwritten_unasked(domains, tmp_path):
    source, target = domains
    config = tiny("source_only", epochs=1)
    first = Trainer(config, source, target, tmp_path, progress=False).fit()
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    with pytest.raises(RunExistsError, match="--resume .* --overwrite"):
        Trainer(config, source, target, tmp_path, progress=False).fit()
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    again = Trainer(config, source, target, tmp_path, progress=False).fit(resume=True)
    assert again == first  # finished: reused, not retrained
    other = tiny("source_only", epochs=1, lr=0.05)
    result = Trainer(other, source, target, tmp_path, progress=False).fit(overwrite=True)
    assert result["config"]["train"]["lr"] == 0.05


def test_batch_stream_state_round_trip():
    a = BatchStream(10, 4, seed=1, stream_id=0)
    batches = [a.next() for _ in range(3)]
    assert sorted(torch.cat(batches[:2]).tolist() + batches[2][:2].tolist()) == list(range(10))
    b = BatchStream(10, 4, seed=1, stream_id=0)
    b.next()
    c = BatchStream(10, 4, seed=1, stream_id=0)
    c.load_state_dict(b.state_dict())
    assert torch.equal(c.next(), batches[1]) and torch.equal(c.next(), batches[2])
