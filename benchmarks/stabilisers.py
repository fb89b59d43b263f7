"""Jacobian regularisation on a small DEQ trained on scikit-learn's digits.

The same conv DEQ classifier (MDEQ-style residual cell, 24 channels on the 8x8 images, Anderson
forward, implicit backward) is trained twice from the same seed: once on the task loss alone and
once with ``gamma * Solution.jacobian_penalty()`` added. After every epoch it reports, on a fixed
held-out batch, the Jacobian's spectral radius at the equilibrium (``eq.spectral_radius``) and the
iterations Anderson needs to reach rel tol 1e-4 (budget 200), plus test accuracy. At the end it
measures the cost of the penalty per training step on the same parameters (steps with and without
the penalty, interleaved).

Run: ``python benchmarks/stabilisers.py [--quick]``; writes ``benchmarks/results/stabilisers.json``
and ``benchmarks/results/stabilisers.png`` (the plot in the README's stability section).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch
from torch import nn

import equilibria as eq

from common import RESULTS, interleaved_ms, write_result


class Cell(nn.Module):
    def __init__(self, channels: int, groups: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.conv2 = nn.Conv2d(2 * channels, channels, 3, padding=1)
        self.gn1 = nn.GroupNorm(groups, 2 * channels)
        self.gn2 = nn.GroupNorm(groups, channels)
        self.gn3 = nn.GroupNorm(groups, channels)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.gn1(self.conv1(z)))
        y = self.gn2(self.conv2(y) + x)
        return self.gn3(torch.relu(z + y))


class Model(nn.Module):
    def __init__(self, channels: int = 24) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.GroupNorm(4, channels))
        self.deq = eq.DEQ(
            Cell(channels),
            solver="anderson",
            backward=eq.Implicit(tol=1e-4, max_iter=30),
            tol=1e-4,
            max_iter=30,
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(channels * 64, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.deq(self.stem(images)))


def digits(seed: int = 0) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_test = 360
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def probe(model: Model, x_test: torch.Tensor, y_test: torch.Tensor) -> dict[str, float]:
    """Spectral radius, iterations to tolerance and accuracy on held-out data."""
    model.eval()
    with torch.no_grad():
        inj = model.stem(x_test[:128])
        f = (lambda x: lambda z: model.deq.cell(z, x))(inj)
        sol = eq.solve(f, torch.zeros_like(inj), solver="anderson", tol=1e-4, max_iter=200)
        logits = model(x_test)
    rho = eq.spectral_radius(f, sol.value, iters=40, generator=torch.Generator().manual_seed(0))
    model.train()
    return {
        "spectral_radius": float(rho.mean()),
        "spectral_radius_max": float(rho.max()),
        "iterations_to_tol": sol.nstep,
        "converged": float(sol.converged.float().mean()),
        "test_accuracy": float((logits.argmax(1) == y_test).float().mean()),
    }


def train(gamma: float, epochs: int, seed: int = 0) -> tuple[Model, list[dict[str, Any]]]:
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = digits()
    model = Model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = [{"epoch": 0, **probe(model, x_test, y_test)}]
    order = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        perm = torch.randperm(len(y_train), generator=order)
        forward_iters, penalties = [], []
        for i in range(0, len(perm) - 63, 64):
            idx = perm[i : i + 64]
            logits = model(x_train[idx])
            loss = nn.functional.cross_entropy(logits, y_train[idx])
            sol = model.deq.last_solution
            forward_iters.append(sol.nstep)
            if gamma > 0:
                penalty = sol.jacobian_penalty()
                penalties.append(float(penalty.detach()))
                loss = loss + gamma * penalty
            opt.zero_grad()
            loss.backward()
            opt.step()
        row = {
            "epoch": epoch,
            "train_forward_iterations": float(np.mean(forward_iters)),
            "penalty": float(np.mean(penalties)) if penalties else None,
            "epoch_seconds": time.perf_counter() - t0,
            **probe(model, x_test, y_test),
        }
        history.append(row)
        print(
            f"  gamma={gamma:g} epoch {epoch:2d}: acc {row['test_accuracy']:.3f}  "
            f"rho {row['spectral_radius']:.3f}  iterations to tol {row['iterations_to_tol']:3d}  "
            f"train iterations {row['train_forward_iterations']:.1f}"
        )
    return model, history


def penalty_cost(model: Model, repeats: int) -> dict[str, float]:
    """Training-step time with and without the penalty on the same parameters (no update)."""
    x_train, y_train, _, _ = digits()
    xb, yb = x_train[:64], y_train[:64]

    def step(gamma: float) -> None:
        loss = nn.functional.cross_entropy(model(xb), yb)
        if gamma > 0:
            loss = loss + gamma * model.deq.last_solution.jacobian_penalty()
        model.zero_grad()
        loss.backward()

    times = interleaved_ms(
        {"without": lambda: step(0.0), "with": lambda: step(1.0)}, repeats=repeats
    )
    return {"ms_without": times["without"], "ms_with": times["with"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs (a smoke run)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--gamma", type=float, default=4.0)
    args = parser.parse_args(argv)
    epochs = 2 if args.quick else args.epochs
    runs = {}
    for gamma in (0.0, args.gamma):
        model, history = train(gamma, epochs)
        runs[f"gamma={gamma:g}"] = history
    cost = penalty_cost(model, repeats=5 if args.quick else 20)
    cost["relative_cost"] = cost["ms_with"] / cost["ms_without"] - 1
    plain, reg = runs["gamma=0"][-1], runs[f"gamma={args.gamma:g}"][-1]
    results = {
        "epochs": epochs,
        "gamma": args.gamma,
        "runs": runs,
        "penalty_cost": cost,
        "final": {"plain": plain, "regularised": reg},
        "regularised_needs_fewer_iterations": reg["iterations_to_tol"] < plain["iterations_to_tol"],
    }
    print(
        f"final: plain rho {plain['spectral_radius']:.3f}, {plain['iterations_to_tol']} it, "
        f"acc {plain['test_accuracy']:.3f} | regularised rho {reg['spectral_radius']:.3f}, "
        f"{reg['iterations_to_tol']} it, acc {reg['test_accuracy']:.3f}"
    )
    print(
        f"penalty cost per step: {cost['ms_without']:.1f} ms -> {cost['ms_with']:.1f} ms "
        f"(+{100 * cost['relative_cost']:.0f}%)"
    )
    print(f"wrote {write_result('stabilisers', results)}")
    _plot(runs)
    return 0


def _plot(runs: dict[str, list[dict[str, Any]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for label, history in runs.items():
        epochs = [r["epoch"] for r in history]
        axes[0].plot(epochs, [r["spectral_radius"] for r in history], marker="o", label=label)
        axes[1].plot(epochs, [r["iterations_to_tol"] for r in history], marker="o", label=label)
        axes[2].plot(epochs, [r["test_accuracy"] for r in history], marker="o", label=label)
    axes[0].set_ylabel("spectral radius of J at z*")
    axes[1].set_ylabel("Anderson iterations to rel tol 1e-4")
    axes[2].set_ylabel("test accuracy")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Digits DEQ with and without Jacobian regularisation")
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "stabilisers.png", dpi=110)
    print(f"wrote {RESULTS / 'stabilisers.png'}")


if __name__ == "__main__":
    raise SystemExit(main())
