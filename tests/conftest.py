"""Shared test fixtures.

Every test that draws random data takes the ``seed`` fixture: a fresh seed per run (so repeated CI
runs explore new inputs), printed in the failure report and reproducible with
FASTBICOT_TEST_SEED=<n>.
"""

import os
import random

import torch

# Triton decides interpreter-vs-compiled when a kernel is *decorated* (module import), so the switch
# must be set before any test module imports kernels/. Without CUDA every Triton kernel is
# interpreted; tests reach them with FASTBICOT_FORCE_TRITON=1 (see kernels/__init__.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for name, value in item.user_properties:
            if name == "seed":
                report.sections.append(("seed", f"reproduce with FASTBICOT_TEST_SEED={value}"))
