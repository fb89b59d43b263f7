"""Shared test configuration: one thread, deterministic seeds, an optional device to run on.

``EQUILIBRIA_TEST_DEVICE=cuda pytest tests/...`` runs the suite on a GPU: every tensor factory
called without a device (in the tests and in the library) creates on that device, as under
``torch.set_default_device``, except that random factories (``randn``, ``rand``, ``randint``,
``randperm``) draw on the CPU, from the CPU generator given or the global one, and move the result,
so seeded problems are the same numbers on every device (module initialisation and ``*_like``
draws still use the device's generator). Tests that cannot run under a global torch-function
mode (torch.compile) are marked ``no_device_mode`` and skipped whenever the variable is set.
Setting it to ``cpu`` runs the same machinery on the CPU.
"""

from __future__ import annotations

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
                return func(*args, **kwargs).to(self.device)
            kwargs["device"] = self.device
        return func(*args, **kwargs)


def pytest_configure(config: pytest.Config) -> None:
    if _REQUESTED:
        if DEVICE.type == "cuda" and not torch.cuda.is_available():
            raise pytest.UsageError(f"EQUILIBRIA_TEST_DEVICE={DEVICE} but CUDA is not available")
        _OnDevice(DEVICE).__enter__()  # for the whole session


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not _REQUESTED:
        return
    mode = pytest.mark.skip(reason="cannot run under the test device mode (torch.compile)")
    for item in items:
        if "no_device_mode" in item.keywords:
            item.add_marker(mode)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
