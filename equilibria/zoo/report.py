"""``report.md`` with PNG plots from a run folder, and the text printed after ``train``/``eval``.

Everything is driven by the recipe's :class:`~equilibria.zoo.task.Task` declarations (its headline
metric, epoch columns and plots); nothing here names a recipe's metrics.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from .runs import (
    CONFIG,
    METRICS,
    REPORT,
    SUMMARY,
    RunFolder,
    RunFolderError,
    read_json,
    require_extras,
    write_bytes,
    write_text,
)
from .task import Metric, Plot, Task


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(spec: Plot, rows: list[dict[str, Any]], path: Path, config: dict[str, Any]) -> str:
    """Draw one :class:`Plot` of the per-epoch ``rows`` into ``path`` (PNG, atomically)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    epochs = [r.get("epoch") for r in rows]
    for key, label in spec.series:
        if spec.trace:  # a list per row: a few epochs, value against its index
            for i in sorted({0, len(rows) // 2, len(rows) - 1}):
                trace = rows[i].get(key) or []
                ax.plot(range(1, len(trace) + 1), trace, "o-", ms=3, label=f"{label} {epochs[i]}")
        else:
            ys = [r.get(key) for r in rows]
            ax.plot(epochs, [float("nan") if y is None else y for y in ys], "o-", label=label)
    line = config.get(spec.hline) if spec.hline else None
    if isinstance(line, (int, float)):
        ax.axhline(line, color="gray", ls="--", lw=1, label=f"{spec.hline} {line:g}")
    ax.set(xlabel="iteration" if spec.trace else "epoch", ylabel=spec.ylabel, title=spec.title)
    if spec.log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes(path, buf.getvalue())
    return path.name


class ReportError(FileNotFoundError):
    """The folder is not a run folder with per-epoch metrics (``metrics.jsonl``)."""


def _task_class(run: RunFolder) -> type[Task]:
    from .registry import RecipeError, get_recipe

    if not (run.path / CONFIG).is_file():
        raise ReportError(f"report: {run.path} holds no {CONFIG}; give the run folder of a recipe")
    recipe = read_json(run.path / CONFIG).get("recipe")
    try:
        return get_recipe(str(recipe)).task_class()
    except RecipeError as e:
        raise ReportError(f"report: {run.path / CONFIG} names {e}") from None


def write_report(run_dir: str | os.PathLike[str]) -> Path:
    """Write ``report.md`` and its plots into ``run_dir``; returns the report's path.

    Raises:
        ReportError: if ``run_dir`` is no folder, holds no ``metrics.jsonl`` rows or names no
            registered recipe.
        RunFolderError: if one of its files is damaged.
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
    task = _task_class(run)
    require_extras("matplotlib")
    summary = read_json(run.path / SUMMARY) if (run.path / SUMMARY).is_file() else {}
    config = read_json(run.path / CONFIG).get("config", {})
    if not isinstance(config, dict):
        raise RunFolderError(f"{run.path / CONFIG} is damaged: it has no 'config' object")
    figures = [(p.name.replace("_", " "), plot(p, rows, run.path / f"{p.name}.png", config))
               for p in task.plots]  # fmt: skip
    last = rows[-1]
    shown = [task.headline, *task.table_metrics]
    shown += [m for m in task.epoch_columns if m.key not in {s.key for s in shown}]
    lines = [f"# Run report: {task.name}", "", f"Run folder: `{run.path}`", "", "## Result", ""]
    lines += ["| metric | value |", "|---|---|"]
    lines += [f"| {m.label} | {m.show(last.get(m.key))} |" for m in shown]
    lines += [
        f"| epochs | {last.get('epoch')} |",
        f"| training time (sum of epochs) | {_num(summary.get('train_time_s'), '.1f')} s |",
        f"| peak training memory | {_num(summary.get('peak_mem_mb'), '.2f')} MB "
        f"({last.get('mem_method') or 'not measured'}) |",
        f"| parameters | {_num(summary.get('params'), ',')} |",
        "",
        "Peak memory: bytes of tensor storages alive at once during one training step (forward + "
        "backward), counted by a dispatch-mode tracker on CPU or `torch.cuda.max_memory_allocated` "
        "on CUDA; parameters and inputs excluded.",
        "",
        "## Plots",
        "",
    ]
    lines += [f"![{title}]({name})\n" for title, name in figures]
    cols = [Metric("epoch", "epoch"), *task.epoch_columns]
    cols += [Metric("epoch_time_s", "s", fmt=".1f"), Metric("peak_mem_mb", "MB", fmt=".2f")]
    lines += ["## Per epoch", "", "| " + " | ".join(m.label for m in cols) + " |"]
    lines.append("|" + "---|" * len(cols))
    lines += ["| " + " | ".join(m.show(r.get(m.key)) for m in cols) + " |" for r in rows]
    lines += ["", "## Options", "", "| option | value |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in config.items()]
    return write_text(run.path / REPORT, "\n".join(lines) + "\n")


def _num(value: Any, spec: str) -> str:
    return "–" if not isinstance(value, (int, float)) else format(value, spec)


def format_summary(task_cls: type[Task], summary: dict[str, Any]) -> str:
    """Lines printed after training: the headline, the task's own lines, time, memory, files."""
    head = task_cls.headline
    lines = [
        f"{summary.get('recipe', '')}: {head.label} {head.show(summary.get(head.key))} after "
        f"{summary.get('epochs')} epochs (training {_num(summary.get('train_time_s'), '.1f')} s, "
        f"wall {_num(summary.get('wall_time_s'), '.1f')} s, {summary.get('threads')} thread(s), "
        f"{summary.get('world_size', 1)} process(es), {summary.get('device')})",
        *task_cls(_config(task_cls, summary)).describe(summary),
        f"peak training-step memory {_num(summary.get('peak_mem_mb'), '.2f')} MB "
        f"({summary.get('mem_method') or 'not measured'})",
        f"run folder: {summary.get('run_dir')}",
    ]
    if summary.get("report"):
        lines.append(f"report: {summary['report']}")
    return "\n".join(lines)


def format_eval(task_cls: type[Task], result: dict[str, Any]) -> str:
    """Lines printed by ``equilibria eval``."""
    head = task_cls.headline
    task = task_cls(_config(task_cls, result))
    first = f"{result['checkpoint']}: {head.label} {head.show(result.get(head.key))}"
    rest = [*task.describe_eval(result), f"evaluated in {result['eval_time_s']:.2f} s"]
    return "\n".join([first, *rest])


def _config(task_cls: type[Task], record: dict[str, Any]) -> Any:
    from .config import from_dict

    saved = record.get("config")
    return (
        from_dict(task_cls.config_class, saved)
        if isinstance(saved, dict)
        else task_cls.config_class()
    )
