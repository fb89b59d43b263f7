"""Shared pieces of the benchmarks: problems, call counting, timing and result files.

Benchmarks measure their baselines in the same run, print ratios and write a JSON result; nothing
here is imported by the library.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def write_result(name: str, payload: dict[str, Any], out: Path = RESULTS) -> Path:
    """Write ``<out>/<name>.json`` atomically (the package's one atomic write)."""
    from equilibria.zoo.runs import write_json

    out.mkdir(parents=True, exist_ok=True)
    return write_json(out / f"{name}.json", {"machine": machine(), **payload})


class Counted:
    """Wraps a map and counts its calls."""

    def __init__(self, f: Callable[[Any], Any]) -> None:
        self.f = f
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.f(*args, **kwargs)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], Any], *, repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def interleaved_ms(fns: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 2) -> dict:
    """Median wall time of several functions, run round-robin so that drifts in machine load hit
    every contender alike."""
    samples = interleaved_samples(fns, repeats=repeats, warmup=warmup)
    return {k: statistics.median(v) for k, v in samples.items()}


def interleaved_samples(
    fns: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 2
) -> dict[str, list[float]]:
    """Wall times (ms) of several functions, run round-robin: sample i of every contender comes
    from the same round, so ratios can be taken per round (see :func:`paired_ratio`)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[key].append(1e3 * (time.perf_counter() - t0))
    return times


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a_i / b_i: robust to the machine's speed drifting between rounds."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


# ----------------------------------------------------------------------------------------------
# Problems


class ResBlock(nn.Module):
    """MDEQ-style residual cell: z -> GN(relu(z + GN(conv2(relu(GN(conv1 z))) + x)))."""

    def __init__(self, channels: int = 32, hidden: int = 64, groups: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(groups, hidden, affine=False)
        self.gn2 = nn.GroupNorm(groups, channels, affine=False)
        self.gn3 = nn.GroupNorm(groups, channels, affine=False)
        self.scale = 1.0

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.block(z, x, self.scale)

    def block(self, z: torch.Tensor, x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
        """The cell with conv2 scaled by ``scale``: a float or a per-sample (B, 1, 1, 1) tensor."""
        y = torch.relu(self.gn1(self.conv1(z)))
        y = self.gn2(scale * self.conv2(y) + x)
        return self.gn3(torch.relu(z + y))
