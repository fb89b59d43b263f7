"""Peak training memory, measured the same way on every run.

On CUDA: ``torch.cuda.max_memory_allocated`` above the allocation at entry.

On CPU there is no allocator statistic, so :class:`PeakMemory` counts tensor storages itself: a
``TorchDispatchMode`` sees every operator's outputs (forward, autograd's backward, and the solver's
work alike); each new storage adds its size, and a weak-reference callback subtracts it when the
storage is freed. The peak is the largest total of storages created inside the block and alive at
the same time: activations kept for backward, solver histories, gradients and temporaries.
Storages that existed before the block (parameters, inputs) and views of them are not counted.
The count is deterministic (it does not depend on the allocator or on other processes), which makes
it suitable to compare backward methods: unrolled backprop keeps every iteration's activations, the
implicit and phantom methods do not.

The tracker slows the block down (one Python call per operator); measure a single step.
"""

from __future__ import annotations

import weakref
from types import TracebackType
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _StorageCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._alive: dict[int, Any] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        if self._alive.pop(key, None) is not None:
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in inputs or key in self._alive:
                continue  # a view or an in-place result, or already counted
            self._alive[key] = weakref.ref(storage, lambda _, k=key, n=nbytes: self._freed(k, n))
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        return out


class PeakMemory:
    """Context manager measuring the peak memory of the tensors created inside it.

    Example:
        >>> with PeakMemory(device) as mem:
        ...     loss = model(x).sum(); loss.backward()
        >>> mem.peak_bytes, mem.method

    Args:
        device: the device the work runs on; CUDA uses the allocator's statistics, anything else
            the storage counter described in the module docstring.
        enabled: if False, measure nothing (``peak_bytes`` stays None) at no cost.
    """

    def __init__(self, device: torch.device | str = "cpu", *, enabled: bool = True) -> None:
        self.device = torch.device(device)
        self.enabled = enabled
        self.peak_bytes: int | None = None
        self._counter: _StorageCounter | None = None
        self._base = 0

    @property
    def method(self) -> str:
        """What is measured: ``"cuda-max-allocated"`` or ``"tensor-storages"``."""
        return "cuda-max-allocated" if self.device.type == "cuda" else "tensor-storages"

    def __enter__(self) -> PeakMemory:
        if not self.enabled:
            return self
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._counter = _StorageCounter()
            self._counter.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.enabled:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._counter is not None:
            self._counter.__exit__(exc_type, exc, tb)
            self.peak_bytes = self._counter.peak
            self._counter = None
