"""The Triton launchers' device guard (docs/design.md, "The Triton kernels"): Triton launches on
the current CUDA device, so tensors on another GPU make that GPU current for the launch.

The decision is a pure function (guard_index) tested here on the CPU; the context the launchers
enter is checked with torch.cuda.device stubbed, so that no GPU is needed.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from udat_kernels.triton_backend import _runtime, launch  # noqa: E402


@pytest.mark.parametrize("device,current,expected", [
    ("cuda:1", 0, 1),      # another GPU: switch to it
    ("cuda:0", 0, None),   # already current
    ("cuda:3", 3, None),
    ("cuda:0", 2, 0),
    ("cuda", 1, None),     # no index: the current device is meant
    ("cpu", 0, None),      # the interpreter: nothing to switch
    ("meta", 5, None),
])
def test_guard_index(device, current, expected):
    assert _runtime.guard_index(torch.device(device), current) == expected


def test_device_guard_enters_the_tensors_device(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_device(index):
        entered.append(index)
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", fake_device)
    with _runtime.device_guard(torch.device("cuda:1")):
        pass
    with _runtime.device_guard(torch.device("cuda:0")):
        pass
    with _runtime.device_guard(torch.device("cpu")):
        pass
    assert entered == [1]


def test_launchers_run_under_the_guard(monkeypatch):
    # Both op bodies enter the guard of x's device before any kernel is launched.
    seen = []
    real = _runtime.device_guard

    def spy(device):
        seen.append(device)
        return real(device)

    monkeypatch.setattr(launch, "device_guard", spy)
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    t = torch.tensor([0, 1, 2, 0])
    args = (None, None, None, None, True, 64.0, 0.5, 0.0, 0.0, -100, 1, False)
    loss, lse, *_ = launch.margin_ce_fwd(x, w, t, *args, False)
    launch.margin_ce_bwd(torch.ones_like(loss), x, w, t, None, None, None, lse, None, *args[4:])
    assert seen == [x.device, x.device]
