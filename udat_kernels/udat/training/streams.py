"""Endless, resumable batch index streams.

A stream walks through successive random permutations of range(n), `batch` indices at a time,
wrapping into the next permutation as needed. Permutation c is drawn from a generator seeded by
(seed, stream id, c), so a stream's whole future is fixed by its (cycle, position) state.
"""

from __future__ import annotations

import torch

__all__ = ["BatchStream", "derive_seed"]


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixing the given integers (deterministic across runs and machines)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class BatchStream:
    """Indices (batch,) int64 into a data set of n items, forever."""

    def __init__(self, n: int, batch: int, seed: int, stream_id: int):
        if n <= 0:
            raise ValueError("cannot draw batches from an empty data set")
        self.n, self.batch, self.seed, self.stream_id = n, batch, seed, stream_id
        self.cycle, self.position = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, cycle: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.stream_id, cycle))
        return torch.randperm(self.n, generator=g)

    def next(self) -> torch.Tensor:
        parts, need = [], self.batch
        while need:
            take = min(need, self.n - self.position)
            parts.append(self._perm[self.position:self.position + take])
            self.position += take
            need -= take
            if self.position == self.n:
                self.cycle, self.position = self.cycle + 1, 0
                self._perm = self._permutation(self.cycle)
        return torch.cat(parts)

    def state_dict(self) -> dict:
        return {"cycle": self.cycle, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.cycle, self.position = state["cycle"], state["position"]
        self._perm = self._permutation(self.cycle)
