"""The correctness check of `python -m udat_kernels.info`, run on the CUDA kernels under the
emulator: the cases a GPU user's first run checks pass here before they reach a GPU."""

from __future__ import annotations

import torch

from udat_kernels import info


def test_info_checks_pass_on_the_emulated_cuda_backend(emu, capsys):
    passed, total = info.check_backend("cuda", torch.device("cpu"))
    out = capsys.readouterr().out
    assert passed == total == 2 * len(info.HEADS) * 2 * 2, out
