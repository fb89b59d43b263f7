"""The sweep runner: a recipe's variants × seeds, each a full training run, in one table.

``equilibria sweep RECIPE`` (every recipe's comparison table) and ``equilibria compare-gradients``
run on it. Each (variant, seed) cell is an ordinary run folder under ``<run_dir>/runs/``; the
aggregate is the mean ± std over seeds of the recipe's headline metric and its table metrics (plus
whatever numbers the caller measures per run). A sweep is resumable: with ``--resume`` the
finished cells are read back, not rerun, and an interrupted one resumes from its checkpoint.
Writes ``sweep.md`` and ``sweep.json`` (names chosen by the caller) when every cell is done.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import (
    ConfigError,
    OptionParser,
    add_arguments,
    check_fields,
    from_dict,
    option,
    refuse_repeats,
    to_dict,
)
from .runs import RunFolder, default_run_dir, write_json, write_text
from .task import Metric, Task

# fields of a recipe's config that the sweep sets for each cell
RESERVED = ("seed", "run_dir", "resume")


@dataclass(frozen=True)
class SweepConfig:
    """Options of ``equilibria sweep RECIPE`` (the recipe's own options apply to every run)."""

    seeds: tuple[int, ...] = option((0, 1, 2), "seeds; every variant trains once per seed")
    variants: tuple[str, ...] = option((), "variants to run (default: all of the recipe's)")
    run_dir: str = option("", "output folder (default: runs/sweep-RECIPE/<timestamp>)")
    resume: bool = option(
        False, "continue an interrupted sweep in --run-dir: finished runs are not rerun"
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.seeds:
            raise ConfigError("seeds must name at least one seed, got none")
        for name in ("seeds", "variants"):  # a repeat is one cell, tabulated as if two
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ConfigError(f"{name} must be distinct, got {' '.join(map(str, values))}")
        if self.resume and not self.run_dir:
            raise ConfigError("SweepConfig: resume needs run_dir (the sweep to continue)")

    @classmethod
    def parser(cls, task_cls: type[Task], *, prog: str) -> OptionParser:
        """The sweep's options, then the recipe's options for every run (all but the seed, the
        run folder and resume, which the sweep sets per cell)."""
        parser = OptionParser(prog=prog, add_help=False, allow_abbrev=False,
                              description=cls.__doc__)  # fmt: skip
        add_arguments(parser, cls)
        own = {f.name for f in dataclasses.fields(cls)}
        recipe = [f.name for f in dataclasses.fields(task_cls.config_class)
                  if f.name not in own and f.name not in RESERVED]  # fmt: skip
        group = parser.add_argument_group(f"options of every {task_cls.name} run")
        add_arguments(group, task_cls.config_class, only=recipe)
        return parser

    @classmethod
    def parse(
        cls, task_cls: type[Task], argv: Sequence[str], *, prog: str
    ) -> tuple[SweepConfig, dict[str, Any]]:
        """Split ``argv`` into the sweep's options and the recipe options for every run.

        Raises:
            ConfigError: for unknown or repeated options, naming the allowed ones.
        """
        refuse_repeats(argv)
        parser = cls.parser(task_cls, prog=prog)
        namespace, rest = parser.parse_known_args(list(argv))
        if rest:
            flags = [s for a in parser._actions for s in a.option_strings]
            parts = []
            for word in [w for w in rest if w.startswith("-")] or rest:  # not their values
                close = difflib.get_close_matches(word, flags, 1)
                parts.append(f"{word!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(f"unknown option(s) {', '.join(parts)}; see `{prog} --help`")
        values = vars(namespace)
        own = {f.name for f in dataclasses.fields(cls)}
        sweep = cls(**{k: v for k, v in values.items() if k in own})
        return sweep, {k: v for k, v in values.items() if k not in own}


@dataclass
class SweepResult:
    """What :func:`run_sweep` returns.

    Attributes:
        root: the sweep's folder.
        runs: one record per (variant, seed): the run's summary metrics and the caller's extras.
        rows: one record per variant: ``<metric>_mean`` and ``<metric>_std`` over seeds.
        markdown: the table.
        elapsed_s: wall time.
    """

    root: Path
    runs: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    markdown: str
    elapsed_s: float
    metrics: list[Metric] = field(default_factory=list)


def slug(name: str) -> str:
    """A folder-safe form of a variant name (``"+ Ham NMF, one-step"`` -> ``ham-nmf-one-step``)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "default"


def cell_config(
    task_cls: type[Task],
    root: Path,
    variant: str,
    changes: Mapping[str, Any],
    seed: int,
    overrides: Mapping[str, Any],
    *,
    resume: bool = False,
) -> Any:
    """The validated config of one cell: the overrides, then the variant's changes, the seed and
    the cell's run folder ``<root>/runs/<variant>-seed<seed>``."""
    values = {"quiet": True, "report": False, **overrides, **changes}
    run_dir = root / "runs" / f"{slug(variant)}-seed{seed}"
    cell = {**values, "seed": seed, "run_dir": str(run_dir), "resume": resume}
    return from_dict(task_cls.config_class, cell)


def run_sweep(
    task_cls: type[Task],
    sweep: SweepConfig,
    overrides: Mapping[str, Any] | None = None,
    *,
    variants: Mapping[str, Mapping[str, Any]] | None = None,
    extra_metrics: Sequence[Metric] = (),
    after_run: Callable[[str, int, Any, dict[str, Any]], dict[str, Any]] | None = None,
    files: tuple[str, str] = ("sweep.md", "sweep.json"),
    write: bool = True,
    progress: Callable[[str, int], None] | None = None,
) -> SweepResult:
    """Train every (variant, seed) and tabulate mean ± std over seeds.

    Args:
        task_cls: the recipe.
        sweep: seeds, variant names, folder, resume.
        overrides: recipe options applied to every run (not the variants' or reserved ones).
        variants: name -> config changes (default: the recipe's ``variants``, or one variant
            ``"default"`` without changes).
        extra_metrics: numbers ``after_run`` adds per run, aggregated and tabulated too.
        after_run: called as ``after_run(variant, seed, config, summary)`` after each cell
            (also for a finished cell read back on resume); returns extra numbers for the run.
        files: names of the markdown table and the JSON record written into the folder (a
            folder holding the record is a finished sweep).
        write: whether to write them (``False``: the caller writes them, with more in them).
        progress: called as ``progress(variant, seed)`` before each cell.

    Raises:
        ConfigError: an unknown variant, an override that a variant or the sweep sets, an
            invalid cell config (all checked before the folder is created), or a folder that
            holds something else.
    """
    start = time.perf_counter()
    table = dict(variants if variants is not None else task_cls.variants) or {"default": {}}
    names = list(sweep.variants) or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ConfigError(f"unknown variant(s) {unknown}; allowed: {list(table)}")
    folders: dict[str, str] = {}
    for n in names:  # each variant's runs go to <root>/runs/<slug>-seed<seed>
        if folders.setdefault(slug(n), n) != n:
            raise ConfigError(
                f"variants {folders[slug(n)]!r} and {n!r} would share the run folders "
                f"'{slug(n)}-seed<seed>'; name them apart by more than punctuation and case"
            )
    overrides = dict(overrides or {})
    fixed = sorted(set(RESERVED).union(*(table[n] for n in names)) & set(overrides))
    if fixed:
        raise ConfigError(
            f"overrides {fixed} are set by the compared variants or the seeds (choose them with "
            "variants= / --variants and seeds= / --seeds)"
        )
    root = Path(sweep.run_dir) if sweep.run_dir else default_run_dir(f"sweep-{task_cls.name}")
    cells = {(n, s): cell_config(task_cls, root, n, table[n], s, overrides)
             for n in names for s in sweep.seeds}  # fmt: skip
    _check_folder(root, sweep.resume, files[1])
    from .trainer import train

    folder = RunFolder(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        folder.lock()
    except OSError as e:
        raise ConfigError(f"--run-dir {root} cannot be written ({e.strerror or e})") from None
    try:
        runs = []
        for (name, seed), config in cells.items():
            if progress is not None:
                progress(name, seed)
            run = RunFolder(config.run_dir)
            summary = None
            if sweep.resume and run.holds_run():  # a finished cell only with the same options
                run.check_resume(
                    task_cls.name, to_dict(config), type(config), task_cls.record_defaults
                )
                summary = run.finished()
            if summary is None:
                resume = sweep.resume and run.holds_run()
                summary = train(task_cls(dataclasses.replace(config, resume=resume)))
            record = {"variant": name, "seed": seed, **_numbers(summary)}
            if after_run is not None:
                record.update(after_run(name, seed, config, summary))
            runs.append(record)
        metrics = [task_cls.headline, *task_cls.table_metrics, *extra_metrics]
        rows = aggregate(runs, names, metrics)
        elapsed = time.perf_counter() - start
        markdown = table_markdown(rows, metrics)
        header = (
            f"{task_cls.name}: {len(names)} variant(s) x {len(sweep.seeds)} seed(s) "
            f"({', '.join(map(str, sweep.seeds))}), mean ± std over seeds; options for every "
            f"run: {overrides or 'the defaults'}; {elapsed / 60:.1f} min.\n\n"
        )
        record = {"sweep": to_dict(sweep), "overrides": overrides, "variants": table,
                  "rows": rows, "runs": runs, "elapsed_s": elapsed}  # fmt: skip
        if write:
            write_json(root / files[1], record)
            write_text(root / files[0], header + markdown + "\n")
    finally:
        folder.unlock()
    return SweepResult(root, runs, rows, markdown, elapsed, metrics)


def sweep_folder(
    task_cls: type[Task],
    out: Path | str,
    *,
    seeds: Sequence[int],
    variants: Sequence[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    resume: bool = False,
) -> SweepResult:
    """Every variant of ``task_cls`` for every seed into the folder ``out`` (``sweep.md`` and
    ``sweep.json`` there): the recipes' ``compare`` functions.

    Args:
        task_cls: the recipe.
        out: the sweep's folder (new or empty, unless ``resume``).
        seeds: seeds of the runs.
        variants: names of the recipe's variants (default: all).
        overrides: config fields applied to every run (e.g. ``{"steps": 100}``).
        resume: continue an interrupted sweep in ``out``.
    """
    sweep = SweepConfig(
        seeds=tuple(seeds), variants=tuple(variants or ()), run_dir=str(out), resume=resume
    )
    return run_sweep(task_cls, sweep, overrides)


def _check_folder(root: Path, resume: bool, record: str) -> None:
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--run-dir {root} is a file, not a folder; choose a folder")
    if (root / record).exists():
        raise ConfigError(
            f"{root} already holds a finished sweep (its {record}); choose another --run-dir"
        )
    if resume and not (root / "runs").is_dir():
        raise ConfigError(f"--resume: {root} holds no sweep to continue (no runs/ folder)")
    if not resume and root.is_dir() and any(root.iterdir()):
        raise ConfigError(
            f"{root} already holds (part of) a sweep; pass --resume to continue it or choose "
            "another --run-dir"
        )


def _numbers(summary: dict[str, Any]) -> dict[str, Any]:
    keep = (int, float, str, type(None))
    return {k: v for k, v in summary.items() if isinstance(v, keep) and not isinstance(v, bool)}


def aggregate(
    runs: list[dict[str, Any]], names: Sequence[str], metrics: Sequence[Metric]
) -> list[dict[str, Any]]:
    """Per variant, ``<key>_mean`` and ``<key>_std`` (sample std; 0 for one seed) of each
    metric over its runs (missing values skipped; None when none)."""
    rows = []
    for name in names:
        mine = [r for r in runs if r["variant"] == name]
        row: dict[str, Any] = {"variant": name, "runs": len(mine)}
        for m in metrics:
            values = [r[m.key] for r in mine if isinstance(r.get(m.key), (int, float))]
            row[f"{m.key}_mean"] = statistics.fmean(values) if values else None
            row[f"{m.key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def table_markdown(rows: list[dict[str, Any]], metrics: Sequence[Metric]) -> str:
    """One line per variant: each metric as mean ± std (percentages for percent metrics)."""
    lines = ["| variant | " + " | ".join(m.label for m in metrics) + " |"]
    lines.append("|---|" + "---|" * len(metrics))
    for row in rows:
        cells = [_mean_std(m, row[f"{m.key}_mean"], row[f"{m.key}_std"]) for m in metrics]
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_std(m: Metric, mean: float | None, std: float) -> str:
    if mean is None:
        return "–"
    if m.percent:
        return f"{100 * mean:.2f} ± {100 * std:.2f}"
    return f"{format(mean, m.fmt)} ± {format(std, m.fmt)}"
