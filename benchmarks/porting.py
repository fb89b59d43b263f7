"""What a naive port of outside DEQ code costs, before and after the porting fixes (issue 11).

1. Backward settings that follow the forward. The implicit-layers tutorial's DEQ (Kolter, Duvenaud &
   Johnson, NeurIPS 2020 tutorial, chapter 4) solves forward and adjoint with Anderson at tol 1e-2
   within 25 iterations. Ported as ``eq.DEQ(cell, tol=1e-2, max_iter=25)``, the default
   ``eq.Implicit()`` now solves its adjoint with those settings too; before, it ran at tol 1e-6
   within 50 iterations. Both are timed here round-robin on the benchmarks' MDEQ-style residual
   cell: ``eq.Implicit()`` (follows the forward) against ``eq.Implicit(tol=1e-6, max_iter=50)``
   (the old default, spelled out), with the adjoint iterations of each.
2. ``torch.save(model)`` after a training step at batch 1024: the bytes written, against the same
   model saved before any step (a DEQ's last solution and caches are no longer pickled).

Run: ``python benchmarks/porting.py [--repeats N]``; writes ``benchmarks/results/porting.json``.
"""

from __future__ import annotations

import argparse
import io
from typing import Any

import torch
from torch import nn

import equilibria as eq

from common import ResBlock, interleaved_samples, paired_ratio, write_result


def backward_settings(repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    cell = ResBlock(channels=16, hidden=32)
    x = torch.randn(32, 16, 16, 16)
    layers = {
        "follows_forward": eq.DEQ(cell, tol=1e-2, max_iter=25),
        "old_default": eq.DEQ(
            cell, tol=1e-2, max_iter=25, backward=eq.Implicit(tol=1e-6, max_iter=50)
        ),
    }
    adjoint: dict[str, list[int]] = {k: [] for k in layers}

    def step(key: str) -> None:
        layer = layers[key]
        layer(x).square().mean().backward()
        adjoint[key].append(layer.last_solution.backward.nstep)
        cell.zero_grad(set_to_none=True)

    samples = interleaved_samples({k: (lambda k=k: step(k)) for k in layers}, repeats=repeats)
    median = {k: sorted(v)[len(v) // 2] for k, v in samples.items()}
    return {
        "cell": "ResBlock(channels=16, hidden=32), batch 32, 16x16, Anderson tol 1e-2, 25 iters",
        "step_ms": median,
        "adjoint_nstep_median": {k: sorted(v)[len(v) // 2] for k, v in adjoint.items()},
        "old_over_new_step_time": paired_ratio(samples["old_default"], samples["follows_forward"]),
    }


class TanhCell(nn.Module):
    """z -> tanh(0.5 W z + b + x), 64 features (module level: torch.save pickles it)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 64)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(0.5 * self.lin(z) + x)


def saved_size() -> dict[str, Any]:
    torch.manual_seed(0)

    model = nn.Sequential(eq.DEQ(TanhCell(), tol=1e-3, max_iter=25), nn.Linear(64, 64))

    def size() -> int:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        return buffer.tell()

    before = size()
    model(torch.randn(1024, 64)).square().mean().backward()
    return {"bytes_before_a_step": before, "bytes_after_a_batch_1024_step": size()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per contender")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {"backward_settings": backward_settings(args.repeats), "torch_save": saved_size()}
    b, s = result["backward_settings"], result["torch_save"]
    print(
        f"adjoint iterations: {b['adjoint_nstep_median']['follows_forward']} (follows the "
        f"forward) vs {b['adjoint_nstep_median']['old_default']} (tol 1e-6, 50); training step "
        f"{b['step_ms']['follows_forward']:.1f} vs {b['step_ms']['old_default']:.1f} ms, old/new "
        f"x{b['old_over_new_step_time']:.2f}"
    )
    print(
        f"torch.save(model): {s['bytes_before_a_step']} bytes before a step, "
        f"{s['bytes_after_a_batch_1024_step']} after a batch-1024 step"
    )
    print(f"wrote {write_result('porting', result)}")


if __name__ == "__main__":
    main()
