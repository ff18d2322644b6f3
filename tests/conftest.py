"""Test session set-up: without a GPU the Triton kernels run under the interpreter.

TRITON_INTERPRET must be set before anything imports triton (kernels bind to the interpreter
when they are defined), so it is set here, before any test module is collected.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests, restored afterwards. The application's tests
    train tiny models, where a second thread only adds OpenMP hand-offs: on a busy two-core
    machine the tiny experiment took 4 times the CPU time with two threads. Restoring matters
    because `--threads` of a command under test sets the count for the whole process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
