"""Shared test fixtures (shared non-fixture helpers are in helpers.py).

Every test that draws random data takes the ``seed`` fixture: a fresh seed per run (so repeated CI
runs explore new inputs), printed in the failure report and reproducible with
FASTBICOT_TEST_SEED=<n>.

``one_thread``: torch on one thread for the test (tiny matmuls: extra threads only add contention on
a shared CPU); modules that want it for every test say ``pytestmark = pytest.mark.usefixtures("one_thread")``.

``kernel_path``: the Triton-interpreter harness of the kernel tests (see its docstring).
"""

import os
import random

import torch

# Triton decides interpreter-vs-compiled when a kernel is *decorated* (module import), so the switch
# must be set before any test module imports fastbicot.kernels. Without CUDA every Triton kernel is
# interpreted; tests reach them with FASTBICOT_FORCE_TRITON=1 (see fastbicot/kernels/__init__.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def seed(request):
    value = int(os.environ.get("FASTBICOT_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(value)
    random.seed(value)
    request.node.user_properties.append(("seed", value))
    yield value


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=["torch", "triton"])
def kernel_path(request, monkeypatch):
    """Runs a kernel test on both paths of the kernel's dispatch, returning the param.

    'torch': FASTBICOT_FORCE_TRITON=0, CPU tensors take the kernel module's torch path.
    'triton': FASTBICOT_FORCE_TRITON=1, the Triton kernels (on CUDA tensors, or on CPU tensors under
    Triton's interpreter). Skipped when the test module's ``TRITON_READY`` is false: triton was imported
    without TRITON_INTERPRET=1 (it reads the switch when kernels are decorated), and the module's
    test_triton_cases_in_fresh_interpreter (helpers.run_triton_cases_in_fresh_interpreter) runs those
    cases in a fresh subprocess instead."""
    if request.param == "triton":
        if not request.module.TRITON_READY:
            pytest.skip("triton was imported without TRITON_INTERPRET=1: see the subprocess test")
        monkeypatch.setenv("FASTBICOT_FORCE_TRITON", "1")
    else:
        monkeypatch.setenv("FASTBICOT_FORCE_TRITON", "0")
    return request.param


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for name, value in item.user_properties:
            if name == "seed":
                report.sections.append(("seed", f"reproduce with FASTBICOT_TEST_SEED={value}"))
