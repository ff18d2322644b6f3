"""`python -m udat_kernels.info`, the self-check a GPU user runs first, on the CPU: it reports the
build, the device and every backend, checks the ones that can serve against the float64
reference, and says FAIL (exit status 1) when a check fails."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import udat_kernels as uk
from helpers import TOLERANCES
from udat_kernels import info

pytestmark = pytest.mark.skipif(not uk._C_loader.available(),
                                reason=f"extension not built: {uk._C_loader.error()}")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_module_runs_and_passes_on_the_cpu():
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-m", "udat_kernels.info", "--device", "cpu"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert out.startswith("udat-kernels self-check\nbuild: version ")
    assert "device: cpu" in out
    for name in info.BACKENDS:
        assert f"  {name:9s} can" in out
    n = 2 * len(info.HEADS) * 2 * 2
    assert f"verdict cpu: PASS ({n}/{n} cases)" in out
    assert "verdict cuda: not available on cpu" in out
    assert "verdict triton: not available on cpu" in out


def test_tolerances_are_the_documented_ones():
    assert info.TOLERANCES == TOLERANCES


def test_a_failed_check_fails_the_verdict(monkeypatch, capsys):
    monkeypatch.setattr(info, "TOLERANCES", {k: (0.0, 0.0) for k in info.TOLERANCES})
    assert info.main(["--device", "cpu", "--backends", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "verdict cpu: FAIL" in out
