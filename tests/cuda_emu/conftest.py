"""The CUDA backend run on the CPU under the checking emulator (emulator.h), for the tests here.

The library comes from the CMake build (`udat_cuda_emu`, or a mutant or AddressSanitizer build of
it): ctest passes its path in UDAT_CUDA_EMU_LIB. Without that variable the default CMake build
folders are tried, and the tests skip, saying why, when no library is found there.

`emu` is the fixture the tests use: it routes `backend="cuda"` of the public functions to the
emulated op pair (impl "emu", CPU tensors), resets the emulator's settings and log, and offers
`emu.config(...)`, `emu.log()` and `emu.kernels()`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib

import pytest
import torch

import udat_kernels as uk
from udat_kernels import dispatch

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_LIBS = [ROOT / d / "tests" / "cuda_emu" / "libudat_cuda_emu.so"
                for d in ("build-cmake", "build-emu", "build")]
DEFAULTS = {"seed": 0, "sm_count": 4, "resident_blocks": 4, "smem_optin": 227 * 1024,
            "free_bytes": 1 << 30, "total_bytes": 2 << 30, "check": 1, "max_blocks_per_sm": 32}


def _load() -> str | None:
    """Loads the emulation library; returns why it could not be, or None."""
    path = os.environ.get("UDAT_CUDA_EMU_LIB")
    if not path:
        found = [p for p in DEFAULT_LIBS if p.exists()]
        if not found:
            return ("the emulation library is not built (cmake target udat_cuda_emu; ctest runs "
                    "these tests with it)")
        path = str(found[0])
    if not uk._C_loader.available():
        return f"udat_kernels._C is not built: {uk._C_loader.error()}"
    if not hasattr(torch.ops.udat_kernels, "margin_ce_fwd_emu"):
        torch.ops.load_library(path)  # a library named by ctest must load: errors propagate
    return None


LOAD_ERROR = _load()


def pytest_collection_modifyitems(config, items):
    if LOAD_ERROR is None:
        return
    here = pathlib.Path(__file__).parent
    for item in items:
        if here in pathlib.Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.skip(reason=LOAD_ERROR))


class EmulatedCuda:
    """The CUDA backend's dispatch rules, served by the emulated op pair on CPU tensors."""

    name = "cuda"
    impl = "emu"

    def reasons(self, x, weight):
        return [] if x.device.type == "cpu" else ["the emulated backend serves CPU tensors"]

    def grad_in_forward(self, B, D, C):
        return dispatch.get_backend("cuda").grad_in_forward(B, D, C)


class Emu:
    """Settings and log of the emulator."""

    def config(self, **settings):
        for key, value in settings.items():
            torch.ops.udat_cuda_emu.set_config(key, int(value))

    @contextlib.contextmanager
    def settings(self, **settings):
        old = {k: torch.ops.udat_cuda_emu.get_config(k) for k in settings}
        self.config(**settings)
        try:
            yield
        finally:
            self.config(**old)

    def get(self, key) -> int:
        return torch.ops.udat_cuda_emu.get_config(key)

    def log(self) -> list[dict]:
        return [json.loads(line) for line in torch.ops.udat_cuda_emu.log().splitlines()]

    def kernels(self) -> list[dict]:
        return [e for e in self.log() if e["kind"] == "kernel"]

    def gemms(self) -> list[dict]:
        return [e for e in self.log() if e["kind"] == "gemm"]

    def clear(self):
        torch.ops.udat_cuda_emu.clear_log()


@pytest.fixture
def emu(monkeypatch):
    if LOAD_ERROR is not None:
        pytest.skip(LOAD_ERROR)
    backend = EmulatedCuda()
    real_select = dispatch.select

    def select(name, x, weight):
        if name == "cuda":
            return backend
        return real_select(name, x, weight)

    monkeypatch.setattr(dispatch, "select", select)
    e = Emu()
    e.config(**DEFAULTS)
    e.clear()
    yield e
    e.config(**DEFAULTS)
