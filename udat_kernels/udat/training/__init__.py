"""Training: the UDAT / UDAT-AS trainer, evaluation and checkpoints (the run's configuration
is `udat_kernels.udat.config.RunConfig`)."""

from .evaluate import accuracy_report, mean_entropy, predict
from .trainer import Trainer, select_score

__all__ = ["Trainer", "select_score", "predict", "accuracy_report", "mean_entropy"]
