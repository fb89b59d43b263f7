"""Random draws that accept a generator living on another device than the result."""

from __future__ import annotations

import torch
from torch import Tensor


def check_generator(generator: object) -> None:
    """A torch.Generator or None; else a TypeError naming the argument."""
    if generator is not None and not isinstance(generator, torch.Generator):
        kind = type(generator).__name__
        raise TypeError(f"generator must be a torch.Generator or None, got {kind} {generator!r}")


def draw(
    shape: tuple[int, ...],
    *,
    normal: bool,
    generator: torch.Generator | None,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
) -> Tensor:
    """Standard normal (``normal=True``) or uniform [0, 1) samples of ``shape`` on ``device``.

    A generator on another device than ``device`` (a CPU generator for CUDA data, the usual way to
    seed, or one on another GPU) draws where it lives and the result is moved, so one seeded CPU
    generator gives the same numbers on every device; torch itself would refuse the mix.
    """
    check_generator(generator)
    sample = torch.randn if normal else torch.rand
    if generator is not None:
        # torch.empty(0).device: the default device, also before torch.get_default_device (2.3)
        target = torch.device(device) if device is not None else torch.empty(0).device
        here = generator.device
        if here.type != target.type or (target.index is not None and here.index != target.index):
            out = sample(shape, generator=generator, dtype=dtype, device=generator.device)
            return out.to(target)
    return sample(shape, generator=generator, dtype=dtype, device=device)
