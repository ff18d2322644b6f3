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


def pytest_collection_modifyitems(config, items):
    """UDAT_TEST_SHARD=i/n keeps the i-th of n contiguous slices of the collected tests (0-based).

    benchmarks/gpu_check.sh runs the GPU tests as n such processes at once: each compiles its
    own kernels, so the compilations spread over the CPUs. Slices are contiguous because
    neighbouring tests (one function's parameters) share specializations."""
    shard = os.environ.get("UDAT_TEST_SHARD")
    if not shard:
        return
    try:
        i, n = (int(v) for v in shard.split("/"))
        if not 0 <= i < n:
            raise ValueError
    except ValueError:
        raise pytest.UsageError(f"UDAT_TEST_SHARD: expected i/n with 0 <= i < n, got {shard!r}")
    lo, hi = len(items) * i // n, len(items) * (i + 1) // n
    config.hook.pytest_deselected(items=items[:lo] + items[hi:])
    items[:] = items[lo:hi]
