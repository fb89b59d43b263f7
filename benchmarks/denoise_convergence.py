"""Convergence check of a grey DEQ denoiser on the validation images (the shipping rule).

The rule, fixed before the second held-out run (``docs/recipes/denoise.md``, "Convergence"): a
grey DEQ is shipped only if, on the central 256² crops of the validation photographs ``coffee``
and ``rocket`` (:data:`equilibria.zoo.denoise_data.VALIDATION_IMAGES`) at σ = 25,

* its solve, at the model's own test-time settings (``eval_tol``, ``eval_max_iter``: 1e-3 and 20),
  reaches a relative residual ≤ ``eval_tol`` within ``eval_max_iter`` iterations on each image,
  and
* its mean PSNR after 32 iterations is at least its mean PSNR after 8 iterations − 0.01 dB
  (both with tolerance 0, the whole iteration budget): more iterations must not degrade it
  (the anytime property of an equilibrium model). The solver returns the iterate of lowest
  residual within the budget, so "after k iterations" is that iterate, not necessarily the k-th.

The shipped model was trained on these two images: this checks the solve, not the denoising
quality, and it never looks at the test images. A model trained with ``--validation`` (its run
folder, ``--run-dir``) was not: there the same rule screens a candidate before any final run.
The PSNR and residual after 1 … 48 iterations are recorded too, and the spectral radius of the
map's Jacobian at each image's fixed point (:func:`equilibria.spectral_radius`, 60 power
iterations: how contractive the solve is there). The noise is seeded per image as in
``train_shipped_denoiser.py --validation``.

Writes ``benchmarks/results/denoise_convergence.json`` (or ``--out NAME``).

Usage::

    python benchmarks/denoise_convergence.py                     # the shipped grey model
    python benchmarks/denoise_convergence.py --weights W.safetensors --out NAME   # another one
    python benchmarks/denoise_convergence.py --run-dir RUN --out NAME   # a training run folder
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

import equilibria as eq
from equilibria.zoo.denoise import DenoiseTask, psnr, validation_pairs
from equilibria.zoo.denoise_model import DEQDenoiser
from equilibria.zoo.denoise_weights import load_shipped
from equilibria.zoo.evaluation import load_model

from common import write_result

SIGMA = 25
STEPS = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 48)
TOLERANCE_DB = 0.01  # PSNR at 32 iterations may be at most this far below PSNR at 8


def noisy_pairs() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(noisy, clean) central 256² crops of the validation images at σ = 25, each ``(1, 1, H, W)``
    (the seed of ``train_shipped_denoiser.validate``)."""
    return {name: (noisy, clean) for name, (clean, noisy) in validation_pairs(False, SIGMA).items()}


@torch.no_grad()
def check(model: DEQDenoiser) -> dict[str, Any]:
    """The rule's two conditions and the PSNR / residual curves (see the module docstring)."""
    if not isinstance(model, DEQDenoiser):
        raise TypeError(f"model must be a DEQDenoiser, got {type(model).__name__}")
    model.eval()
    sigma = torch.tensor([SIGMA / 255.0])
    pairs = noisy_pairs()
    deq = model.deq
    solve: dict[str, Any] = {}
    seen: list[Any] = []  # the cell's input (injection and weights) of the last solve
    hook = deq.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    try:
        for name, (noisy, _) in pairs.items():  # the model's own test-time tolerance and budget
            model(noisy, sigma)
            sol = deq.last_solution
            x = seen[-1]
            gen = torch.Generator().manual_seed(0)
            rho = eq.spectral_radius(lambda z, x=x: deq.cell(z, x), sol.value, iters=60,
                                     generator=gen)  # fmt: skip
            solve[name] = {"iterations": int(sol.nstep), "residual": float(sol.residual.max()),
                           "spectral_radius": float(rho.max())}  # fmt: skip
    finally:
        hook.remove()
    curves: dict[str, dict[str, dict[str, float]]] = {"psnr": {}, "residual": {}}
    eval_tol, deq.eval_tol = deq.eval_tol, 0.0  # the whole budget
    try:
        for k in STEPS:
            for name, (noisy, clean) in pairs.items():
                p = float(psnr(model(noisy, sigma, max_iter=k), clean))
                curves["psnr"].setdefault(name, {})[str(k)] = p
                r = float(deq.last_solution.residual.max())
                curves["residual"].setdefault(name, {})[str(k)] = r
    finally:
        deq.eval_tol = eval_tol
    mean = {str(k): statistics.fmean(c[str(k)] for c in curves["psnr"].values()) for k in STEPS}
    converged = all(s["residual"] <= deq.eval_tol for s in solve.values())
    anytime = mean["32"] >= mean["8"] - TOLERANCE_DB
    return {
        "sigma": SIGMA,
        "eval_tol": deq.eval_tol,
        "eval_max_iter": deq.eval_max_iter,
        "solve": solve,
        "psnr_mean": mean,
        "curves": curves,
        "converged": converged,
        "psnr32_minus_psnr8": mean["32"] - mean["8"],
        "anytime": anytime,
        "passes": converged and anytime,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="", help="a .safetensors other than the shipped")
    parser.add_argument("--run-dir", default="", help="a denoise run folder (its checkpoint)")
    parser.add_argument("--out", default="denoise_convergence", help="results/NAME.json")
    args = parser.parse_args(argv)
    if not args.out.replace("_", "").isalnum():
        parser.error(f"--out must be letters, digits and _, got {args.out!r}")
    if args.weights and args.run_dir:
        parser.error("give --weights or --run-dir, not both")
    torch.set_num_threads(1)
    if args.run_dir:
        model, _ = load_model(DenoiseTask, args.run_dir)
    elif args.weights:
        weights = Path(args.weights)
        model = load_shipped(
            False, weights=weights, config=weights.with_suffix(".json"), nonlocal_stage=False
        )
    else:  # the equilibrium itself, without the non-local stage that follows it by default
        model = load_shipped(False, nonlocal_stage=False)
    result = {
        "command": "python benchmarks/denoise_convergence.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "weights": str(
            args.run_dir or args.weights or "equilibria/zoo/weights/denoise_gray.safetensors"
        ),
        **check(model),  # type: ignore[arg-type]
    }
    path = write_result(args.out, result)
    for name, s in result["solve"].items():
        print(f"{name}: {s['iterations']} iterations, relative residual {s['residual']:.2e}, "
              f"spectral radius at the fixed point {s['spectral_radius']:.3f}")  # fmt: skip
    print("mean PSNR by iterations: "
          + ", ".join(f"{k}: {v:.2f}" for k, v in result["psnr_mean"].items()))  # fmt: skip
    print(f"converged: {result['converged']}; PSNR(32) - PSNR(8) = "
          f"{result['psnr32_minus_psnr8']:+.3f} dB; passes: {result['passes']}")  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
