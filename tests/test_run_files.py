"""Run files: atomic writes with normal permissions, clear errors for damaged files and a full
disk, resume past a torn log line, what a finished run keeps, and the console."""

import errno
import json
import os

import pytest
import torch

from udat_kernels.udat.config import ModelConfig, RunConfig, TrainConfig
from udat_kernels.udat.data import Domain, load_digits
from udat_kernels.udat.training import Trainer
from udat_kernels.udat.training import checkpoint as ckpt
from udat_kernels.udat.training.checkpoint import (CheckpointError, DiskFullError, atomic_save,
                                                   file_mode, load_checkpoint)
from udat_kernels.udat.training.trainer import LogError


@pytest.fixture(scope="module")
def domains():
    digits = load_digits(size=32)
    source = Domain("a", digits.train.subset(range(96)), digits.test.subset(range(30)), False)
    target = Domain("b", digits.train.subset(range(96, 192)), digits.test.subset(range(30, 60)),
                    False)
    return source, target


def tiny(**kwargs):
    base = dict(method="udat", epochs=2, lr=0.01, momentum=0.9, seed=1)
    return RunConfig(model=ModelConfig(width=1 / 16), train=TrainConfig(**{**base, **kwargs}))


class Killed(Exception):
    pass


def kill_at(step):
    def on_step(trainer):
        if trainer.step == step:
            raise Killed
    return on_step


def test_atomic_save_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_save({"a": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"a": Unpicklable()}, path)
    assert torch.load(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"step": 1}, path)

    def no_space(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", no_space)
    with pytest.raises(DiskFullError, match=f"cannot write {path}: no space left on device .*"
                                            f"previous last.pt is intact.*--resume"):
        atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_written_files_get_normal_permissions(tmp_path):
    atomic_save({"a": 1}, tmp_path / "x.pt")
    ckpt.atomic_write_json({"a": 1}, tmp_path / "x.json")
    for name in ("x.pt", "x.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == file_mode()
    assert file_mode() & 0o044  # readable by others under the usual umask 022
    old = os.umask(0o027)
    try:
        atomic_save({"a": 1}, tmp_path / "y.pt")
        assert (tmp_path / "y.pt").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


@pytest.mark.parametrize("content,match", [
    (b"", "the file is empty"),
    (None, "truncated or not a checkpoint"),          # the first half of a real checkpoint
    (b"\x80\x04garbage", "truncated or not a checkpoint"),
])
def test_damaged_checkpoint_names_file_cause_and_remedy(tmp_path, content, match):
    path = tmp_path / "last.pt"
    if content is None:
        atomic_save({"w": torch.zeros(1000)}, path)
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {path}: .*{match}.*delete"):
        load_checkpoint(path)


def test_checkpoints_load_with_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must not run",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(tmp_path / "evil.pt")


def test_resume_from_a_truncated_checkpoint_is_a_clear_error(domains, tmp_path):
    with pytest.raises(Killed):
        Trainer(tiny(epochs=1, checkpoint_every=1), *domains, tmp_path, progress=False,
                on_step=kill_at(1)).fit()
    path = tmp_path / "last.pt"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="last.pt.*--overwrite"):
        Trainer(tiny(epochs=1), *domains, tmp_path, progress=False).fit(resume=True)


def test_resume_tolerates_a_torn_last_log_line(domains, tmp_path):
    full = Trainer(tiny(), *domains, tmp_path / "full", progress=False).fit()
    killed = tmp_path / "killed"
    with pytest.raises(Killed):
        Trainer(tiny(), *domains, killed, progress=False, on_step=kill_at(3)).fit()
    with open(killed / "log.jsonl", "a") as f:
        f.write('{"event": "step", "st')  # the crash tore this line
    result = Trainer(tiny(), *domains, killed, progress=False).fit(resume=True)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in result["history"]]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in full["history"]]
    records = [json.loads(line) for line in (killed / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["event"] == "epoch"] == [1, 2]


def test_a_log_damaged_before_its_last_line_is_named(domains, tmp_path):
    with pytest.raises(Killed):
        Trainer(tiny(), *domains, tmp_path, progress=False, on_step=kill_at(3)).fit()
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    lines.insert(1, "{not json")
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(LogError, match=r"log.jsonl, line 2: not a JSON record"):
        Trainer(tiny(), *domains, tmp_path, progress=False).fit(resume=True)


def test_best_checkpoint_is_self_describing_and_keep_removes_the_other(domains, tmp_path):
    result = Trainer(tiny(keep="best"), *domains, tmp_path, progress=False).fit()
    assert not (tmp_path / "last.pt").exists()
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["kind"] == "best" and best["epoch"] == result["selected_epoch"]
    assert best["validator"] == result["selection"]
    assert RunConfig.from_dict(best["config"]) == tiny(keep="best")
    assert best["classes"] == list(domains[0].classes) and best["key"] == result["key"]
    record = result["history"][0]
    assert set(record["scores"]) == {"source_val", "entropy", "dev", "im", "snd"}
    assert sum(map(sum, record["target_test"]["confusion"])) == len(domains[1].test)


def test_deterministic_mode_trains_on_the_cpu(domains, tmp_path):
    was = torch.are_deterministic_algorithms_enabled()
    try:
        trainer = Trainer(tiny(deterministic=True), *domains, tmp_path, progress=False)
        assert torch.are_deterministic_algorithms_enabled()
        out = trainer.train_step()
        assert torch.isfinite(torch.tensor(out["loss_y"]))
    finally:
        torch.use_deterministic_algorithms(was)


def test_no_augmentation_feeds_the_images_as_they_are(domains, tmp_path):
    from udat_kernels.udat.config import DataConfig
    from udat_kernels.udat.data import to_input

    run = RunConfig(DataConfig(augment="none"), ModelConfig(width=1 / 16), tiny().train)
    trainer = Trainer(run, *domains, tmp_path, progress=False)
    index = torch.arange(4)
    x = trainer._batch(trainer.labelled, index, True, torch.Generator().manual_seed(0))
    assert torch.equal(x, to_input(trainer.labelled.images[index]))
    shifted = Trainer(tiny(), *domains, tmp_path / "b", progress=False)
    assert not torch.equal(
        shifted._batch(shifted.labelled, index, True, torch.Generator().manual_seed(0)), x)


def test_one_console_line_per_epoch(domains, tmp_path, capsys):
    Trainer(tiny(), *domains, tmp_path, progress=True).fit()
    err = capsys.readouterr()
    lines = [line for line in (err.out + err.err).splitlines() if "epoch " in line and "|" in line
             and "source val" in line]
    assert len(lines) == 2 and lines[0].startswith("udat λ 0.1 seed 1 epoch 1/2: loss_y")
    assert "target acc" in lines[1] and " λ " in lines[1]
