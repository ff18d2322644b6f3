"""Evaluation: predictions and features over an ImageSet, accuracies, prediction entropy."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from ..data import ImageSet, to_input

__all__ = ["predict", "accuracy_report", "mean_entropy", "autocast_context"]


def autocast_context(device: torch.device, amp: str):
    """The autocast region for `amp` ("off", "bf16", "fp16") on `device`."""
    if amp == "off":
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def predict(model, images: ImageSet, device: torch.device, amp: str = "off",
            batch_size: int = 500, features: bool = False):
    """-> logits (N, classes) float32 on the CPU, and the G_f features (N, F) when asked.

    The model is put in eval mode and left there (the trainer switches it back).
    """
    model.eval()
    logits, feats = [], []
    channels_last = device.type == "cuda"
    for start in range(0, len(images), batch_size):
        x = to_input(images.images[start:start + batch_size], device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, amp):
            f = model.extract(x)
            z = model.head(model.label_hidden(f))
        logits.append(z.float().cpu())
        if features:
            feats.append(f.float().cpu())
    out = torch.cat(logits) if logits else torch.zeros(0, model.num_classes)
    if not features:
        return out
    return out, torch.cat(feats) if feats else torch.zeros(0, model.fc2.out_features)


def accuracy_report(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """{"acc", "balanced_acc", "per_class", "confusion"}: fractions, a class without images
    gets None and is left out of the balanced accuracy; confusion[true][predicted] counts."""
    pred = logits.argmax(1)
    correct = (pred == labels).double()
    per_class = []
    for c in range(num_classes):
        mask = labels == c
        per_class.append(float(correct[mask].mean()) if mask.any() else None)
    present = [a for a in per_class if a is not None]
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long)
    confusion.index_add_(0, labels.long() * num_classes + pred.long(),
                         torch.ones_like(labels, dtype=torch.long))
    return {"acc": float(correct.mean()) if len(labels) else math.nan,
            "balanced_acc": sum(present) / len(present) if present else math.nan,
            "per_class": per_class,
            "confusion": confusion.view(num_classes, num_classes).tolist()}


def mean_entropy(logits: torch.Tensor) -> float:
    """Mean Shannon entropy (nats) of the softmax predictions."""
    logp = torch.log_softmax(logits.double(), dim=1)
    return float(-(logp.exp() * logp).sum(1).mean())
