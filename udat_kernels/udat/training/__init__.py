"""Training: the UDAT / UDAT-AS trainer, label-free validators, evaluation and checkpoints (the
run's configuration is `udat_kernels.udat.config.RunConfig`)."""

from .evaluate import accuracy_report, mean_entropy, predict
from .trainer import ResumeError, RunExistsError, Trainer
from .validators import selection_key

__all__ = ["Trainer", "RunExistsError", "ResumeError", "selection_key", "predict",
           "accuracy_report", "mean_entropy"]
