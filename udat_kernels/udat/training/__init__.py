"""Training: run configuration, the UDAT / UDAT-AS trainer, evaluation and checkpoints."""

from .config import AMP_MODES, METHODS, SCHEDULES, SELECTIONS, Method, TrainConfig
from .evaluate import accuracy_report, mean_entropy, predict
from .trainer import Trainer, select_score

__all__ = ["TrainConfig", "Method", "METHODS", "SELECTIONS", "AMP_MODES", "SCHEDULES",
           "Trainer", "select_score", "predict", "accuracy_report", "mean_entropy"]
