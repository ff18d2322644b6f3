"""The command lines end to end on a tiny configuration, and the experiment's λ selection."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from udat_kernels.udat.experiment import _method_row
from udat_kernels.udat.experiment import main as experiment_main
from udat_kernels.udat.training.cli import main as train_main

TINY = ["--width", "0.0625", "--epochs", "2", "--lr", "0.01", "--momentum", "0.9",
        "--tsne-points", "20", "--quiet"]


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


def folder_args(folders):
    return ["--source", "folder", "--source-root", str(folders / "src"),
            "--target", "folder", "--target-root", str(folders / "tgt")]


def test_experiment_cli_end_to_end(folders, tmp_path, capsys):
    out = tmp_path / "exp"
    argv = [*folder_args(folders), "--seeds", "0", "1", "--out", str(out), *TINY]
    assert experiment_main(argv) == 0
    printed = capsys.readouterr().out
    assert "| 5 | UDAT-AS with margin" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"source", "target", "seeds", "config", "versions", "commit",
                            "methods"}
    assert list(results["methods"]) == ["target", "source_only", "udat", "udat_as",
                                        "udat_as_margin"]
    for row in results["methods"].values():
        assert set(row) >= {"target_acc", "mean", "std", "balanced_acc", "per_class", "lambda",
                            "selection", "oracle_acc"}
        assert len(row["target_acc"]) == 2 and all(0 <= a <= 1 for a in row["target_acc"])
        assert len(row["per_class"][0]) == 3
        assert row["selection"] == "source_val"
    assert results["methods"]["udat"]["lambda"] == 1.0
    assert results["methods"]["source_only"]["lambda"] is None
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 10
    assert (out / "results.md").read_text().startswith("S: folder → T: folder")
    for figure in ("tsne.png", "curves.png"):
        assert (out / figure).stat().st_size > 1000
    # Run again: every run is reused, the table is the same.
    assert experiment_main(argv) == 0
    assert json.loads((out / "results.json").read_text())["methods"] == results["methods"]


def test_train_cli_and_resume(folders, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*folder_args(folders), "--method", "udat", "--lambda", "0.3", "--out", str(out),
            "--width", "0.0625", "--epochs", "1", "--quiet"]
    assert train_main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "udat" and 0 <= summary["target_acc"] <= 1
    assert {p.name for p in out.iterdir()} >= {"last.pt", "best.pt", "log.jsonl", "result.json"}
    assert train_main([*argv, "--resume"]) == 0  # already finished: same result
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "udat_kernels.udat.experiment", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--lambda-sweep" in out.stdout


def _fake(val_acc, entropy, acc, oracle):
    record = {"val_acc": val_acc, "target_entropy": entropy, "target_test": {"acc": acc}}
    return {"history": [record], "selected_epoch": 1, "oracle_acc": oracle,
            "target_test": {"acc": acc, "balanced_acc": acc, "per_class": [acc]}}


@pytest.mark.parametrize("select,lam", [("source_val", 0.1), ("entropy", 0.2), ("oracle", 0.3)])
def test_lambda_selection(select, lam):
    runs = {0.1: [_fake(0.9, 1.0, 0.5, 0.5)] * 2, 0.2: [_fake(0.8, 0.2, 0.6, 0.6)] * 2,
            0.3: [_fake(0.7, 0.9, 0.7, 0.8)] * 2}
    row = _method_row(runs, select, adversarial=True)
    assert row["lambda"] == lam and row["selection"] == select
    assert row["oracle_acc"] == [0.8, 0.8] and row["oracle_lambda"] == 0.3
    assert _method_row({0.0: runs[0.1]}, select, adversarial=False)["lambda"] is None


def test_experiment_rejects_unknown_method(tmp_path):
    with pytest.raises(SystemExit):
        experiment_main(["--methods", "dann", "--out", str(tmp_path)])
