"""The application's typed configurations and the command lines that build them."""

import ast
from dataclasses import replace
from pathlib import Path

import pytest

import udat_kernels.udat as app
from udat_kernels.udat.arguments import parse_experiment, parse_train
from udat_kernels.udat.config import (LAMBDA_SWEEP, ConfigError, DataConfig, ExperimentConfig,
                                      ModelConfig, RunConfig, TrainConfig)


@pytest.mark.parametrize("cls,kwargs,field", [
    (DataConfig, {"source": "svhn"}, "source"),
    (DataConfig, {"target": "fer2013"}, "target_root"),
    (DataConfig, {"target": "digits", "target_root": "x"}, "target_root"),
    (DataConfig, {"fer_test": "Training"}, "fer_test"),
    (DataConfig, {"val_fraction": 1.0}, "val_fraction"),
    (ModelConfig, {"preset": "resnet"}, "preset"),
    (ModelConfig, {"input_size": 100}, "input_size"),
    (ModelConfig, {"width": 0}, "width"),
    (ModelConfig, {"scale": -1.0}, "scale"),
    (TrainConfig, {"method": "dann"}, "method"),
    (TrainConfig, {"lr": 0}, "lr"),
    (TrainConfig, {"momentum": 1.0}, "momentum"),
    (TrainConfig, {"epochs": 2.5}, "epochs"),
    (TrainConfig, {"lambda_max": -0.1}, "lambda_max"),
    (TrainConfig, {"seed": True}, "seed"),
    (TrainConfig, {"select": "best"}, "select"),
    (TrainConfig, {"checkpoint_every": -1}, "checkpoint_every"),
    (ExperimentConfig, {"out": "o", "seeds": (1, 1)}, "seeds"),
    (ExperimentConfig, {"out": "o", "methods": ()}, "methods"),
    (ExperimentConfig, {"out": "o", "lambdas": (0.1, -1.0)}, "lambdas"),
])
def test_bad_field_is_named(cls, kwargs, field):
    with pytest.raises(ConfigError, match=f"^{field}: ") as info:
        cls(**kwargs)
    assert info.value.field == field


def test_round_trip_through_dicts():
    run = RunConfig(DataConfig(source="folder", source_root="/d/a", val_fraction=0.2),
                    ModelConfig(width=0.25, batch_norm=False),
                    TrainConfig(method="udat", seed=4, lambda_max=0.3, lr=0.02))
    assert RunConfig.from_dict(run.to_dict()) == run
    experiment = ExperimentConfig(out="o", model=ModelConfig(input_size=64), seeds=(3, 1),
                                  lambdas=LAMBDA_SWEEP, methods=("udat", "target"))
    again = ExperimentConfig.from_dict(experiment.to_dict())
    assert again.to_dict() == experiment.to_dict()
    assert "method" not in experiment.to_dict()["train"]  # set per run, not shared


def test_experiment_runs_replace_method_seed_and_lambda():
    experiment = ExperimentConfig(out="o", train=TrainConfig(lr=0.05), lambdas=(0.1, 0.5))
    run = experiment.run("udat", 0.5, 2)
    assert run.train == replace(experiment.train, method="udat", lambda_max=0.5, seed=2)
    assert run.data is experiment.data and run.model is experiment.model
    assert experiment.lambdas_of("udat") == (0.1, 0.5)
    assert experiment.lambdas_of("source_only") == (0.0,)


def test_model_config_resolves_the_preset():
    arch = ModelConfig(preset="vgg16", width=0.5, input_size=64).architecture()
    assert (arch.width, arch.input_size, arch.batch_norm, arch.fc) == (0.5, 64, False,
                                                                       (4096, 4096, 1024))
    assert ModelConfig().size == 32


def test_parse_train_builds_the_run():
    command = parse_train(["--method", "udat", "--lambda", "0.3", "--seed", "2", "--out", "r",
                           "--model", "vgg16", "--input-size", "64", "--lr", "0.01",
                           "--source", "folder", "--source-root", "d", "--threads", "2",
                           "--quiet"])
    run = command.run
    assert (run.train.method, run.train.lambda_max, run.train.seed, run.train.lr) == (
        "udat", 0.3, 2, 0.01)
    assert (run.model.preset, run.model.input_size) == ("vgg16", 64)
    assert (run.data.source, run.data.source_root) == ("folder", "d")
    assert (command.out, command.threads, command.progress, command.resume) == ("r", 2, False,
                                                                                False)


def test_parse_experiment_builds_the_grid():
    command = parse_experiment(["--out", "o", "--lambda-sweep", "--seeds", "4", "5",
                                "--methods", "udat", "source_only"])
    experiment = command.experiment
    assert experiment.lambdas == LAMBDA_SWEEP and experiment.seeds == (4, 5)
    assert experiment.methods == ("udat", "source_only")
    assert parse_experiment(["--out", "o", "--lambda", "0.2"]).experiment.lambdas == (0.2,)


@pytest.mark.parametrize("argv,option", [
    (["--lr", "-1"], "--lr"),
    (["--lambda", "-0.5"], "--lambda"),
    (["--input-size", "100"], "--input-size"),
    (["--val-fraction", "0"], "--val-fraction"),
    (["--source", "rafdb"], "--source-root"),
    (["--threads", "0"], "--threads"),
])
def test_bad_value_is_a_usage_error_naming_the_option(argv, option, capsys):
    with pytest.raises(SystemExit) as info:
        parse_train(["--out", "r", *argv])
    assert info.value.code == 2
    assert f"argument {option}:" in capsys.readouterr().err


def test_only_the_argument_module_sees_argparse():
    """The namespace is parsed once at the edge: no other module of the application imports
    argparse or reads parse_args."""
    root = Path(app.__file__).parent
    users = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) else [])
            if "argparse" in names or (isinstance(node, ast.Attribute)
                                       and node.attr == "parse_args"):
                users.append(path.relative_to(root).as_posix())
    assert set(users) == {"arguments.py"}


def test_every_config_field_is_classified_for_the_run_key():
    """A new field must be declared result-changing (in the run key and the resume check) or
    not: the one documented list in udat_kernels.udat.runkey."""
    from dataclasses import fields

    from udat_kernels.udat.runkey import OTHER_FIELDS, RESULT_FIELDS

    for section, cls in (("data", DataConfig), ("model", ModelConfig), ("train", TrainConfig)):
        names = {f.name for f in fields(cls)}
        assert names == set(RESULT_FIELDS[section]) | set(OTHER_FIELDS[section]), section
        assert not set(RESULT_FIELDS[section]) & set(OTHER_FIELDS[section])


def test_no_recipe_gives_settings_that_train_the_compact_model():
    run = parse_train(["--out", "r"]).run
    assert run.model.preset == "vgg16-compact" and run.model.size == 32
    t = run.train
    assert (t.lr, t.momentum, t.epochs, t.batch_size, t.lambda_max, t.schedule) == (
        0.03, 0.9, 10, 64, 0.1, "ganin")
    assert run.data.augment == "shift-flip"


def test_paper_recipe_and_command_line_overrides():
    from udat_kernels.udat.config import PAPER_OURS, PAPER_STATES

    command = parse_train(["--out", "r", "--recipe", "paper", "--epochs", "2", "--lr", "0.001"])
    run = command.run
    assert (run.model.preset, run.model.size, run.model.scale) == ("vgg16", 224, 64.0)
    assert (run.train.lr, run.train.batch_size, run.train.momentum, run.train.epochs) == (
        0.001, 64, 0.9, 2)
    assert run.train.weight_decay == PAPER_OURS["train.weight_decay"]
    assert command.overrides == ("train.epochs",)  # lr 0.001 is the recipe's own value
    assert set(PAPER_STATES) & set(PAPER_OURS) == set()
    experiment = parse_experiment(["--out", "o", "--recipe", "paper", "--lambda", "0.2"])
    assert experiment.experiment.lambdas == (0.2,)
    assert experiment.experiment.overrides == ("experiment.lambdas",)
