"""Test-session setup.

Triton reads TRITON_INTERPRET when a kernel is *defined*, so it must be set before anything imports
``supergen.kernels``: without a GPU, every Triton kernel runs in the interpreter on the CPU.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tiny-model tests on one torch thread: at these sizes thread fan-out costs more
    than it saves (15x slower forwards measured with 2 threads on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
