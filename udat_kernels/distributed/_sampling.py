"""Negative-centre sampling (sample_rate < 1), as Partial FC does it, and the virtual numbering
that lets the shard mode serve the sampled problem unchanged (docs/distributed.md, "Sampling").

Each step, rank r keeps every centre of its shard that is the target of some row of the global
batch (the positives) and draws the rest at random up to int(sample_rate·n_r) centres in all
(more when the positives alone exceed that). The sampled problem numbers its classes by
concatenating every rank's kept centres in rank order: rank r's centres are the virtual classes
[o'_r, o'_r + m_r), and a target y becomes its rank among all kept class ids. Every rank knows
every rank's m_s from the global targets (one host sync), and one all-gather of the kept ids
gives every rank the whole numbering.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sampled:
    local_index: torch.Tensor  # (m_r,) sorted indices into this rank's shard
    class_ids: torch.Tensor    # (C',) the kept global class ids, sorted (rank order)
    offset: int                # o'_r: this rank's first virtual class
    num_classes: int           # C' = Σ_s m_s


def sample_centres(target, valid, *, shard_starts, shard_sizes, rank, sample_rate, comm,
                   step) -> Sampled:
    """Sample this rank's centres for the global targets `target` (rows where `valid`)."""
    device = target.device
    C = shard_starts[-1] + shard_sizes[-1]
    # Which classes are targets of valid rows (an accumulate, not a boolean index: no sync).
    hits = torch.zeros(C, dtype=torch.int32, device=device)
    hits.index_put_((torch.where(valid, target, torch.zeros_like(target)),),
                    valid.to(torch.int32), accumulate=True)
    present = hits > 0
    ends = torch.tensor([s + n for s, n in zip(shard_starts, shard_sizes)], device=device)
    starts = torch.tensor(shard_starts, device=device)
    cum = torch.cat([present.new_zeros(1, dtype=torch.int64), present.cumsum(0)])
    positives = (cum[ends] - cum[starts]).tolist()  # the host sync of sampling
    kept = [max(int(sample_rate * n), p) for n, p in zip(shard_sizes, positives)]
    start, n, m = shard_starts[rank], shard_sizes[rank], kept[rank]
    if m < n:
        # Positives get 2, negatives a uniform draw in [0, 1): the top m are every positive and
        # a uniform sample of the negatives.
        score = torch.rand(n, device=device)
        score.masked_fill_(present[start:start + n], 2.0)
        local_index = torch.topk(score, m).indices.sort().values
    else:
        local_index = torch.arange(n, device=device)
    width = max(kept)
    padded = torch.full((width,), -1, dtype=torch.int64, device=device)
    padded[:m] = local_index
    every = comm.all_gather(padded, "all-gather of the sampled centres", step).view(
        comm.world_size, width)
    class_ids = torch.cat([every[s, :kept[s]] + shard_starts[s]
                           for s in range(comm.world_size)])
    return Sampled(local_index=local_index, class_ids=class_ids, offset=sum(kept[:rank]),
                   num_classes=sum(kept))


def virtual_targets(target, valid, ignored, sampled: Sampled):
    """Targets in the virtual numbering: the rank of y among the kept class ids; −1 for ignored
    rows (the sampled problem's ignore_index) and C' for rows whose target is out of range."""
    ids = sampled.class_ids
    position = (torch.searchsorted(ids, torch.where(valid, target, torch.zeros_like(target)))
                if ids.numel() else torch.zeros_like(target))
    out_of_range = torch.full_like(target, sampled.num_classes)
    return torch.where(ignored, torch.full_like(target, -1),
                       torch.where(valid, position, out_of_range))
