"""Test session set-up: without a GPU the Triton kernels run under the interpreter.

TRITON_INTERPRET must be set before anything imports triton (kernels bind to the interpreter
when they are defined), so it is set here, before any test module is collected.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
