"""Batch-level input pipeline: uint8 images -> normalized 3-channel float tensors.

Augmentation is done per batch on tensors with an explicit torch.Generator, so that the same seed
and step always draw the same crops and flips (the trainer's exact resume relies on it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["MEAN", "STD", "to_input"]

MEAN = 0.5
STD = 0.5


def _random_crop(x: torch.Tensor, pad: int, generator: torch.Generator,
                 rows: slice, total: int) -> torch.Tensor:
    """Zero-pad by `pad` pixels and crop back to the input size at a random offset per image;
    the offsets are drawn for a batch of `total` images, of which x holds `rows`."""
    _, _, H, W = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (total, 2), generator=generator)[rows].tolist()
    return torch.stack([padded[i, :, dy:dy + H, dx:dx + W] for i, (dy, dx) in enumerate(offsets)])


def to_input(images: torch.Tensor, device: torch.device | str = "cpu", *,
             generator: torch.Generator | None = None, flip: bool = False,
             crop_fraction: float = 0.125,
             of_batch: tuple[int, int] | None = None) -> torch.Tensor:
    """(B, C, S, S) uint8, C ∈ {1, 3} -> (B, 3, S, S) float32 on `device`, (x/255 − 0.5)/0.5.

    With a generator (training), each image is shifted by up to crop_fraction·S pixels (random
    crop of the zero-padded image) and, when `flip`, mirrored with probability 1/2.
    of_batch=(start, total): `images` are the rows [start, start + len(images)) of a batch of
    `total` images, and the random draws are those of the whole batch (a data-parallel rank
    augments its rows as one process would).
    """
    x = images.to(device=device, dtype=torch.float32).div_(255.0)
    if generator is not None:
        start, total = of_batch if of_batch is not None else (0, x.shape[0])
        rows = slice(start, start + x.shape[0])
        pad = max(1, round(crop_fraction * x.shape[-1]))
        x = _random_crop(x, pad, generator, rows, total)
        if flip:
            mirror = torch.rand(total, generator=generator)[rows] < 0.5
            x = torch.where(mirror.to(device)[:, None, None, None], x.flip(-1), x)
    x = x.sub_(MEAN).div_(STD)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
