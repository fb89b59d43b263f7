"""``report.md`` with PNG plots, built from a run folder's ``metrics.jsonl`` and ``summary.json``.

Plots: learning curves (loss and accuracy per epoch), residual vs iteration of the evaluation solve
(a few epochs), and solver iterations per epoch (forward in training and evaluation, backward).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .runs import CONFIG, METRICS, REPORT, SUMMARY, RunFolder, read_json, require_extras


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> str:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    return path.name


def plot_learning_curves(rows: list[dict[str, Any]], path: Path) -> str:
    """Loss and accuracy per epoch, training and test."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
    ax1.plot(epochs, [r["test_loss"] for r in rows], "s-", label="test")
    ax1.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="loss")
    ax2.plot(epochs, [100 * r["train_acc"] for r in rows], "o-", label="train")
    ax2.plot(epochs, [100 * r["test_acc"] for r in rows], "s-", label="test")
    ax2.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    name = _save(fig, path)
    plt.close(fig)
    return name


def plot_residuals(rows: list[dict[str, Any]], path: Path, tol: float | None) -> str:
    """Largest residual over the test set vs solver iteration, for a few epochs."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    picks = sorted({0, len(rows) // 2, len(rows) - 1}) if rows else []
    for i in picks:
        trace = rows[i].get("eval_trace") or []
        ax.semilogy(range(1, len(trace) + 1), trace, "o-", ms=3, label=f"epoch {rows[i]['epoch']}")
    if tol is not None:
        ax.axhline(tol, color="gray", ls="--", lw=1, label=f"tol {tol:g}")
    ax.set(xlabel="solver iteration", ylabel="max relative residual", title="evaluation solve")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    name = _save(fig, path)
    plt.close(fig)
    return name


def plot_iterations(rows: list[dict[str, Any]], path: Path) -> str:
    """Forward (training and evaluation) and backward iterations per epoch."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(epochs, [r["fwd_iters_mean"] for r in rows], "o-", label="forward (train, mean)")
    ax.plot(epochs, [r["eval_iters"] for r in rows], "s-", label="forward (eval)")
    ax.plot(epochs, [r["bwd_iters_mean"] for r in rows], "^-", label="backward (mean)")
    ax.set(xlabel="epoch", ylabel="iterations", title="solver iterations per epoch")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    name = _save(fig, path)
    plt.close(fig)
    return name


def _fmt(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


class ReportError(FileNotFoundError):
    """The folder is not a run folder with per-epoch metrics (``metrics.jsonl``)."""


def write_report(run_dir: str | os.PathLike[str]) -> Path:
    """Write ``report.md`` and its plots into ``run_dir``; returns the report's path.

    Raises:
        ReportError: if ``run_dir`` is no folder or holds no ``metrics.jsonl`` rows.
    """
    run = RunFolder(run_dir)
    if not run.path.is_dir():
        raise ReportError(f"report: {run.path} is not a folder; give a run folder of a recipe")
    rows = run.read_metrics()
    if not rows:
        raise ReportError(
            f"report: {run.path} holds no per-epoch metrics ({METRICS}); a report needs the run "
            "folder of a recipe that writes them (e.g. `equilibria train digits`)"
        )
    require_extras("matplotlib")
    summary = read_json(run.path / SUMMARY) if (run.path / SUMMARY).is_file() else {}
    saved = read_json(run.path / CONFIG) if (run.path / CONFIG).is_file() else {}
    config = saved.get("config", {})
    curves = plot_learning_curves(rows, run.path / "learning_curves.png")
    residuals = plot_residuals(rows, run.path / "residuals.png", config.get("eval_tol"))
    iterations = plot_iterations(rows, run.path / "iterations.png")
    last = rows[-1]
    lines = [
        f"# Run report: {saved.get('recipe', '?')}",
        "",
        f"Run folder: `{run.path}`",
        "",
        "## Result",
        "",
        "| metric | value |",
        "|---|---|",
        f"| test accuracy | {100 * last['test_acc']:.2f}% |",
        f"| test loss | {last['test_loss']:.4f} |",
        f"| epochs | {last['epoch']} |",
        f"| training time (sum of epochs) | {_fmt(summary.get('train_time_s'), '.1f')} s |",
        f"| ms per training step (median, last epoch) | {_fmt(last.get('step_ms'), '.1f')} |",
        f"| forward iterations, training (mean, last epoch) | {last['fwd_iters_mean']:.1f} |",
        f"| forward iterations, evaluation | {last['eval_iters']} |",
        f"| evaluation residual (max over test set) | {last['eval_residual_max']:.2e} |",
        f"| test samples converged | {100 * last['eval_converged']:.1f}% |",
        f"| backward iterations (mean, last epoch) | {last['bwd_iters_mean']:.1f} |",
        f"| peak training memory | {_fmt(summary.get('peak_mem_mb'), '.2f')} MB "
        f"({last.get('mem_method') or 'not measured'}) |",
        f"| parameters | {_fmt(summary.get('params'))} |",
        "",
        "Peak memory: bytes of tensor storages alive at once during one training step (forward + "
        "backward), counted by a dispatch-mode tracker on CPU or `torch.cuda.max_memory_allocated` "
        "on CUDA; parameters and inputs excluded.",
        "",
        "## Plots",
        "",
        f"![learning curves]({curves})",
        "",
        f"![residual vs iteration]({residuals})",
        "",
        f"![iterations per epoch]({iterations})",
        "",
        "## Per epoch",
        "",
        "| epoch | train loss | train acc | test acc | fwd it | fwd res | bwd it | eval it "
        "| s | MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['epoch']} | {r['train_loss']:.4f} | {100 * r['train_acc']:.2f} "
            f"| {100 * r['test_acc']:.2f} | {r['fwd_iters_mean']:.1f} "
            f"| {r['fwd_residual_max']:.1e} | {r['bwd_iters_mean']:.1f} | {r['eval_iters']} "
            f"| {r['epoch_time_s']:.1f} | {_fmt(r.get('peak_mem_mb'), '.2f')} |"
        )
    lines += ["", "## Options", "", "| option | value |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in config.items()]
    path = run.path / REPORT
    tmp = path.with_name(f".{REPORT}.{os.getpid()}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path
