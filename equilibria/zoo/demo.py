"""``equilibria demo`` (``make demo``): the core at work end to end, in a few minutes on a laptop.

1. Train the digits DEQ with the phantom gradient (the recipe's defaults) and print test accuracy,
   solver statistics and where the report is.
2. Solve the trained layer's equilibrium on the test set with each solver (Picard, Anderson,
   Broyden) and print their iterations.
3. Compute one batch's gradient with the exact implicit method and with the phantom gradient, and
   print their time and cosine: why cheap gradients matter.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

import equilibria as eq

from .digits import DigitsConfig, DigitsDEQ, DigitsTask, batch_loss, load_data, load_model, train
from .report import format_summary
from .runs import default_run_dir, num_threads


def _solver_table(model: DigitsDEQ, images: torch.Tensor, tol: float) -> list[dict[str, Any]]:
    """Iterations of each solver on the trained layer's equilibrium (test images)."""
    cell = model.deq.cell
    with torch.no_grad():
        x = (model.inject(images), cell.weight())
        rows = []
        for solver in (eq.Picard(), eq.Anderson(m=5), eq.Broyden()):
            tic = time.perf_counter()
            sol = eq.solve(
                lambda z, x=x: cell(z, x), torch.zeros_like(x[0]), solver=solver, tol=tol,
                max_iter=200,
            )  # fmt: skip
            rows.append(
                {
                    "solver": solver.name,
                    "iterations": sol.nstep,
                    "residual": float(sol.residual.max()),
                    "converged": float(sol.converged.double().mean()),
                    "ms": 1e3 * (time.perf_counter() - tic),
                }
            )
    return rows


def _gradient_check(
    config: DigitsConfig, state: dict[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor
) -> dict[str, float]:
    """Time and cosine of the phantom gradient against the exact (implicit) one, one batch."""
    grads, times = {}, {}
    for name, backward in (
        ("implicit", "implicit"),
        ("phantom", "phantom"),
    ):
        cfg = DigitsConfig(**{**_fields(config), "backward": backward, "implicit_tol": 1e-6,
                              "implicit_max_iter": 100})  # fmt: skip
        model = DigitsDEQ(cfg)
        model.load_state_dict(state)
        best = float("inf")
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            tic = time.perf_counter()
            loss, _ = batch_loss(model, images, labels, cfg)
            loss.backward()
            best = min(best, time.perf_counter() - tic)
        times[name] = 1e3 * best
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters()])
    cosine = float(F.cosine_similarity(grads["implicit"], grads["phantom"], dim=0))
    return {"implicit_ms": times["implicit"], "phantom_ms": times["phantom"], "cosine": cosine}


def _fields(config: DigitsConfig) -> dict[str, Any]:
    return {k: getattr(config, k) for k in config.__dataclass_fields__}


def run_demo(*, run_dir: str = "", quiet: bool = False, epochs: int | None = None) -> int:
    """Run the demo; returns the exit status (0)."""
    base = DigitsConfig()
    config = DigitsConfig(
        **{
            **_fields(base),
            "run_dir": run_dir or str(default_run_dir("demo")),
            "quiet": quiet,
            "epochs": base.epochs if epochs is None else epochs,
        }
    )
    print(
        "equilibria demo: a deep equilibrium classifier on scikit-learn's digits\n"
        "  one implicit layer z* = GroupNorm(ReLU(conv(z*) + inject(image))), solved by "
        f"{config.solver} (tol {config.tol:g}, at most {config.max_iter} iterations)\n"
        f"  trained {config.epochs} epochs with the phantom gradient ({config.phantom_steps} "
        f"damped steps, lambda={config.phantom_damping}) on {config.threads} CPU thread(s)\n",
        flush=True,
    )
    summary = train(config)
    print(format_summary(DigitsTask, summary), flush=True)

    with num_threads(config.threads):
        model, _ = load_model(summary["checkpoint"])
        model.eval()
        x_train, y_train, x_test, _ = load_data()
        print(f"\nsolving the trained layer's equilibrium on the {len(x_test)} test images "
              "(tol 1e-4):")  # fmt: skip
        for row in _solver_table(model, x_test, 1e-4):
            print(
                f"  {row['solver']:<9} {row['iterations']:>3} iterations, largest residual "
                f"{row['residual']:.1e}, {100 * row['converged']:.0f}% converged, "
                f"{row['ms']:.0f} ms"
            )
        check = _gradient_check(config, model.state_dict(), x_train[:64], y_train[:64])
    print(
        "\none batch of 64, gradient of the loss w.r.t. all parameters:\n"
        f"  implicit (exact, adjoint solve)  {check['implicit_ms']:.1f} ms\n"
        f"  phantom ({config.phantom_steps} steps)               {check['phantom_ms']:.1f} ms "
        f"({check['implicit_ms'] / check['phantom_ms']:.1f}x faster), cosine to the exact "
        f"gradient {check['cosine']:.3f}\n"
        f"\nreport with plots: {summary.get('report', summary['run_dir'])}\n"
        "next: `equilibria compare-gradients digits` compares every backward method "
        "(accuracy, speed, memory, gradient cosine)"
    )
    return 0
