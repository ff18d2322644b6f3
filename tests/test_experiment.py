"""The command lines end to end on tiny configurations: the experiment's files and reuse, the
paper recipe's smoke run, udat-train's folder rules and early errors, udat-evaluate."""

import contextlib
import csv
import io
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from udat_kernels import __version__
from udat_kernels.udat import experiment as experiment_module
from udat_kernels.udat.arguments import parse_experiment
from udat_kernels.udat.config import LAMBDA_SWEEP, PAPER_OURS, PAPER_STATES
from udat_kernels.udat.evaluate import main as evaluate_main
from udat_kernels.udat.experiment import main as experiment_main
from udat_kernels.udat.experiment import plan_runs
from udat_kernels.udat.runkey import fingerprints
from udat_kernels.udat.training import cli as train_cli
from udat_kernels.udat.training.cli import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)

TINY = ["--width", "0.0625", "--epochs", "2", "--lr", "0.01", "--tsne-points", "20"]
METHOD_NAMES = ["target", "source_only", "udat", "udat_as", "udat_as_margin"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two image-folder domains of three classes (a bar at three heights); the target's
    colours are inverted."""
    root = tmp_path_factory.mktemp("domains")
    rng = np.random.default_rng(0)
    for domain, invert in (("src", False), ("tgt", True)):
        for k, name in enumerate(("low", "mid", "high")):
            (root / domain / name).mkdir(parents=True)
            for i in range(10):
                image = rng.integers(0, 60, (32, 32, 3)).astype(np.uint8)
                image[8 * k + 4:8 * k + 10] = 220
                Image.fromarray(255 - image if invert else image).save(
                    root / domain / name / f"{i}.png")
    return root


def folder_args(folders, src="src", tgt="tgt"):
    return ["--source", "folder", "--source-root", str(folders / src),
            "--target", "folder", "--target-root", str(folders / tgt)]


@pytest.fixture(scope="module")
def experiment(folders, tmp_path_factory):
    """One tiny experiment: (argv, output folder, results, stdout, stderr)."""
    out = tmp_path_factory.mktemp("exp") / "exp"
    argv = [*folder_args(folders), "--seeds", "0", "1", "--out", str(out), *TINY]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        assert experiment_main(argv) == 0
    return argv, out, json.loads((out / "results.json").read_text()), stdout.getvalue(), \
        stderr.getvalue()


def test_experiment_writes_every_result_file(experiment):
    argv, out, results, printed, log = experiment
    assert "| 5 | UDAT-AS with margin" in printed
    assert set(results) >= {"source", "target", "seeds", "config", "version", "versions",
                            "commit", "methods", "selection", "differences", "runs", "validator"}
    assert results["version"] == __version__
    config = results["config"]
    assert config["recipe"] == "compact" and config["lambdas"] == [0.1]
    assert config["data"]["source"] == "folder" and config["train"]["lr"] == 0.01
    assert config["overrides"] == ["model.width", "train.epochs", "train.lr"]
    assert list(results["methods"]) == METHOD_NAMES
    for row in results["methods"].values():
        assert len(row["target_acc"]) == 2 and all(0 <= a <= 1 for a in row["target_acc"])
        assert len(row["per_class"][0]) == 3 and len(row["confusion"][0]) == 3
        assert row["selection"] == results["validator"]
    assert results["methods"]["udat"]["lambda"] == [0.1, 0.1]
    assert results["methods"]["source_only"]["lambda"] is None
    assert len(results["differences"]) == 6
    assert set(results["selection"]["udat"]["validators"]) == {"source_val", "entropy", "dev",
                                                               "im", "snd"}
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 10 and {"acc_low", "acc_mid", "acc_high"} <= set(rows[0])
    assert len(list(csv.DictReader((out / "confusion.csv").open()))) == 5 * 2 * 9
    assert len(list(csv.DictReader((out / "selection.csv").open()))) == 5 * 2 * 6
    md = (out / "results.md").read_text()
    assert md.startswith("S: folder → T: folder")
    for text in ("Paired differences", "regret", "random pick", "Per-class", "Confusion"):
        assert text in md
    for figure in ("tsne.png", "curves.png", *(f"confusion_{m}.png" for m in METHOD_NAMES)):
        assert (out / figure).stat().st_size > 1000
    # progress: the plan with its disk estimate, then one line per run trained
    assert "10 runs (0 finished, 10 to train)" in log and "disk: about" in log
    assert "[run 1/10] target seed 0" in log and "[run 10/10] udat_as_margin λ 0.1 seed 1" in log
    assert "left)" in log


def test_runs_are_keyed_and_reused_only_with_the_same_result_fields(experiment, folders,
                                                                    capsys):
    argv, out, results, _, _ = experiment
    folders_before = sorted(p.name for p in (out / "runs").iterdir())
    assert len(folders_before) == 10
    assert all(r["folder"].endswith(r["key"]) for r in results["runs"])
    # the same command again: every run reused, same table
    assert experiment_main([*argv, "--quiet"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert all(r["reused"] for r in again["runs"])
    assert (results["trained"], again["trained"]) == (10, 0)
    assert again["methods"] == results["methods"]
    # threads and checkpoint frequency do not change a result: still reused
    assert experiment_main([*argv, "--quiet", "--threads", "1", "--checkpoint-every", "5"]) == 0
    assert all(r["reused"] for r in json.loads((out / "results.json").read_text())["runs"])
    # a copy of the target data at another root is other data: new runs, old ones untouched
    shutil.copytree(folders / "tgt", folders / "tgt_copy")
    other = [*folder_args(folders, tgt="tgt_copy"), *argv[8:], "--quiet", "--methods", "udat",
             "--seeds", "0"]
    assert experiment_main(other) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert not runs[0]["reused"] and runs[0]["key"] not in {r["key"] for r in results["runs"]}
    assert set(folders_before) < {p.name for p in (out / "runs").iterdir()}
    capsys.readouterr()


def test_run_key_fields(folders, tmp_path):
    """The fields that change a result change the key; the others do not."""
    def keys(*args):
        experiment = parse_experiment(["--out", str(tmp_path), "--methods", "udat",
                                       "source_only", "--seeds", "0", *args]).experiment
        plan = plan_runs(experiment, fingerprints(experiment.data, experiment.model))
        return [p["key"] for p in plan]

    base = keys()
    assert keys("--threads", "1", "--checkpoint-every", "3", "--keep", "both",
                "--select", "entropy", "--device", "cpu:0", "--deterministic") == base
    assert keys("--fer-test", "PublicTest") == base  # no FER2013 in mnist5k -> digits
    for changed in (["--lr", "0.02"], ["--augment", "none"], ["--val-fraction", "0.2"],
                    ["--epochs", "3"], ["--width", "0.25"]):
        assert keys(*changed)[0] != base[0], changed
    lam = keys("--lambda", "0.3")
    assert lam[0] != base[0] and lam[1] == base[1]  # source only has no λ
    fer = tmp_path / "fer2013.csv"
    fer.write_text("emotion,pixels,Usage\n")
    fer_args = ["--source", "fer2013", "--source-root", str(fer)]
    assert keys(*fer_args) != keys(*fer_args, "--fer-test", "PublicTest")
    before = keys(*fer_args)
    fer.write_text("emotion,pixels,Usage\n0," + " ".join(["0"] * 2304) + ",Training\n")
    assert keys(*fer_args) != before  # the file changed


def test_paper_recipe_smoke_run_at_reduced_size(folders, tmp_path):
    """`--recipe paper` end to end, shrunk for CI: the conv width (1/16), the input size (32),
    the epochs (1), the λ grid (0 and 1), one seed, one method and tiny folders; every other
    setting is the recipe's, and results.json says which fields were shrunk."""
    out = tmp_path / "paper"
    argv = [*folder_args(folders), "--recipe", "paper", "--methods", "udat_as_margin",
            "--seeds", "0", "--width", "0.0625", "--input-size", "32", "--epochs", "1",
            "--lambdas", "0", "1", "--tsne-points", "10", "--quiet", "--out", str(out)]
    assert experiment_main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    config = results["config"]
    assert config["recipe"] == "paper"
    assert config["overrides"] == ["experiment.lambdas", "model.input_size", "model.width",
                                   "train.epochs"]
    for name, value in {**PAPER_STATES, **PAPER_OURS}.items():
        section, field = name.split(".")
        got = config["lambdas"] if section == "experiment" else config[section][field]
        if name not in config["overrides"]:
            assert got == (list(value) if isinstance(value, tuple) else value), name
    assert config["model"]["preset"] == "vgg16" and config["train"]["lr"] == 0.001
    assert results["methods"]["udat_as_margin"]["lambda"][0] in (0.0, 1.0)
    assert parse_experiment(["--out", "o", "--recipe", "paper"]).experiment.lambdas == LAMBDA_SWEEP


def test_train_cli_refuses_an_existing_run_then_resumes_or_overwrites(folders, tmp_path,
                                                                       capsys):
    out = tmp_path / "run"
    argv = [*folder_args(folders), "--method", "udat", "--lambda", "0.3", "--out", str(out),
            "--width", "0.0625", "--epochs", "1", "--quiet"]
    assert train_main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "udat" and 0 <= summary["target_acc"] <= 1
    assert {p.name for p in out.iterdir()} == {"best.pt", "log.jsonl", "result.json"}
    with pytest.raises(SystemExit) as info:
        train_main(argv)
    assert info.value.code == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "result.json").exists()
    assert train_main([*argv, "--resume"]) == 0  # already finished: same result
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    assert train_main([*argv, "--overwrite", "--keep", "both"]) == 0
    assert {p.name for p in out.iterdir()} >= {"best.pt", "last.pt"}
    with pytest.raises(SystemExit):
        train_main([*argv, "--resume", "--overwrite"])


@pytest.mark.parametrize("args,message", [
    (["--device", "gpu"], "argument --device: 'gpu' is not a device name"),
    (["--device", "mps"], "argument --device: 'mps': only cpu and cuda"),
    (["--device", "cuda"], "argument --device: 'cuda': no CUDA device is available here"),
    (["--amp", "fp16"], "argument --amp: fp16 needs a CUDA device"),
    (["--init", "missing.pth"], "argument --init: .*missing.pth: no such file"),
    (["--init", "GARBAGE"], "argument --init: .*garbage.pth: cannot read it as a PyTorch "
                            "state dict"),
    (["--val-fraction", "0.05"], "argument --val-fraction: 0.05 of the 24 labelled training "
                                 r"images of the source \(folder\) is 2 validation images"),
    (["--lr", "0"], "argument --lr: must be a number > 0"),
])
def test_bad_arguments_fail_before_any_data_is_read(folders, tmp_path, monkeypatch, capsys,
                                                    args, message):
    if args == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a state dict at all")
    args = [str(garbage) if a == "GARBAGE" else a for a in args]

    def no_data(*_, **__):
        raise AssertionError("the data was read before the arguments were checked")

    monkeypatch.setattr(train_cli, "load_domains", no_data)
    monkeypatch.setattr(experiment_module, "load_domains", no_data)
    source = ["--source", "folder", "--source-root", str(folders / "src")]
    for main in (train_main, experiment_main):
        with pytest.raises(SystemExit) as info:
            main([*source, "--out", str(tmp_path / "o"), *args])
        assert info.value.code == 2
        assert re.search(message, capsys.readouterr().err), main


def test_evaluate_scores_a_saved_checkpoint(experiment, folders, tmp_path, capsys):
    _, out, results, _, _ = experiment
    run = next(r for r in results["runs"] if r["method"] == "udat" and r["seed"] == 0)
    result = json.loads((experiment_module.Path(run["folder"]) / "result.json").read_text())
    report_path = tmp_path / "report.json"
    assert evaluate_main([f"{run['folder']}/best.pt", "--data", "folder", "--root",
                          str(folders / "tgt"), "--json", str(report_path)]) == 0
    printed = capsys.readouterr().out
    assert "Confusion matrix" in printed and "| low |" in printed
    report = json.loads(report_path.read_text())
    assert report["acc"] == result["target_test"]["acc"]
    assert report["confusion"] == result["target_test"]["confusion"]
    assert report["epoch"] == result["selected_epoch"]
    with pytest.raises(SystemExit) as info:
        evaluate_main([f"{run['folder']}/best.pt", "--data", "digits"])
    assert info.value.code == 2 and "classes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate_main([str(tmp_path / "none.pt"), "--data", "digits"])


def test_module_entry_points_help():
    for module, option in (("udat_kernels.udat.experiment", "--lambda-sweep"),
                           ("udat_kernels.udat.evaluate", "--split")):
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0 and option in out.stdout


def test_experiment_rejects_unknown_method(tmp_path):
    with pytest.raises(SystemExit):
        experiment_main(["--methods", "dann", "--out", str(tmp_path)])
