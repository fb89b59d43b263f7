"""Shared test configuration: one thread, deterministic seeds, an optional device to run on.

``EQUILIBRIA_TEST_DEVICE=cuda pytest tests/...`` runs the suite on a GPU: every tensor factory
called without a device (in the tests and in the library) creates on that device, as under
``torch.set_default_device``, except that random factories (``randn``, ``rand``, ``randint``,
``randperm``) draw on the CPU, from the CPU generator given or the global one, and move the result,
so seeded problems are the same numbers on every device (module initialisation and ``*_like``
draws still use the device's generator). ``torch.testing.assert_close`` compares values across
devices there (the documented CPU tensors of a solution, its trace and residual history, against
results on the device). Tests that cannot run under a global torch-function mode (torch.compile),
recipes that build their own CPU data and the CPU-vs-CUDA comparisons of tests/test_cuda.py are
marked ``no_device_mode`` and skipped whenever the variable is set. Setting the variable to
``cpu`` runs the same machinery on the CPU.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
from _problems import DEVICE
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

torch.set_num_threads(1)

_REQUESTED = os.environ.get("EQUILIBRIA_TEST_DEVICE")
_RANDOM = (torch.rand, torch.randn, torch.randint, torch.randperm)


class _OnDevice(TorchFunctionMode):
    """Factories without a device create on ``device``; random draws are made on the CPU and
    moved there."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.factories = _device_constructors()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self.factories and kwargs.get("device") is None:
            generator = kwargs.get("generator")
            on_cpu = generator.device.type == "cpu" if generator is not None else func in _RANDOM
            if on_cpu and self.device.type != "cpu":
                requires_grad = kwargs.pop("requires_grad", False)
                return func(*args, **kwargs).to(self.device).requires_grad_(requires_grad)
            kwargs["device"] = self.device
        return func(*args, **kwargs)


def pytest_configure(config: pytest.Config) -> None:
    if _REQUESTED:
        if DEVICE.type == "cuda" and not torch.cuda.is_available():
            raise pytest.UsageError(f"EQUILIBRIA_TEST_DEVICE={DEVICE} but CUDA is not available")
        _OnDevice(DEVICE).__enter__()  # for the whole session
        compare = functools.partial(torch.testing.assert_close, check_device=False)
        torch.testing.assert_close = compare


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not _REQUESTED:
        return
    mode = pytest.mark.skip(reason="runs without the test device mode (see tests/conftest.py)")
    for item in items:
        if "no_device_mode" in item.keywords:
            item.add_marker(mode)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
