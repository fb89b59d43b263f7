"""``equilibria compare-gradients digits``: the same DEQ trained with each backward method.

For every seed and method (implicit, phantom UPG, Neumann NPG, JFB, unrolled backprop) it trains
the digits recipe (fewer epochs than the full recipe, to stay affordable on 2 cores) and measures:

* test accuracy (mean ± std over seeds);
* ms per training step, two ways: the median step of each training run, and an interleaved
  measurement (every method in turn, several rounds, at the same parameters and batch: the
  forward work is identical, so the difference is the backward method; robust to load from other
  processes, which hits all methods alike);
* peak training-step memory at 10 and at 60 forward iterations (tolerance set unreachable so the
  solver runs exactly that many), counted by :class:`equilibria.zoo.memory.PeakMemory`;
* cosine of each method's gradient (all parameters, one batch, float64) to the exact gradient
  (forward solve and implicit adjoint both to 1e-10), at initialisation and after training.

The training runs are the cells of a sweep (:func:`equilibria.zoo.sweep.run_sweep`: one run
folder per method and seed, resumable). Writes ``compare.md`` and ``compare.json`` into its folder.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from . import runs as run_io
from .checkpoint import load_checkpoint
from .config import ConfigError, check_fields, check_range, option, to_dict
from .digits import DigitsConfig, DigitsDEQ, DigitsTask, batch_loss, build_model, load_data
from .memory import PeakMemory
from .sweep import SweepConfig, cell_config, run_sweep
from .task import Metric

Method = Literal["implicit", "phantom", "neumann", "jfb", "unrolled"]
METHOD_LABELS = {
    "implicit": "implicit (exact IFT)",
    "phantom": "phantom, unrolled (UPG)",
    "neumann": "phantom, Neumann (NPG)",
    "jfb": "JFB (one step)",
    "unrolled": "unrolled backprop",
}


@dataclass(frozen=True)
class CompareConfig:
    """Options of ``equilibria compare-gradients digits``."""

    seeds: int = option(3, "number of seeds (0, 1, ...)")
    epochs: int = option(8, "training epochs per run (the full recipe trains 15)")
    methods: tuple[Method, ...] = option(
        ("implicit", "phantom", "neumann", "jfb", "unrolled"), "backward methods to compare"
    )
    memory_iters: tuple[int, ...] = option(
        (10, 60), "forward iterations at which training-step memory is measured"
    )
    cosine_batch: int = option(64, "training images (not augmented) in the gradient-cosine batch")
    timing_rounds: int = option(20, "rounds of interleaved step timing")
    train_subset: int = option(0, "train on the first N training images only (0 = all; tests)")
    threads: int = option(1, "torch CPU threads (0 = torch's default)")
    run_dir: str = option("", "output folder (default: runs/compare-gradients/<timestamp>)")
    resume: bool = option(
        False,
        "continue an interrupted comparison in --run-dir: finished training runs are reused, an "
        "interrupted one resumes from its checkpoint, the measurements are taken again",
    )
    quiet: bool = option(False, "no progress bar; print only the table")

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("seeds", "epochs", "cosine_batch", "timing_rounds"):
            check_range(self, name, low=1)
        check_range(self, "train_subset", low=0)
        check_range(self, "threads", low=0)
        if not self.methods:
            raise ConfigError("CompareConfig: methods must name at least one backward method")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"CompareConfig: methods must be distinct, got {self.methods}")
        if self.resume and not self.run_dir:
            raise ConfigError("CompareConfig: resume needs run_dir (the comparison to continue)")
        if not self.memory_iters or min(self.memory_iters) < 1:
            raise ConfigError(
                f"CompareConfig: memory_iters must be ints >= 1, got {self.memory_iters}"
            )


def _overrides(config: CompareConfig) -> dict[str, Any]:
    """Options of every training run of the comparison."""
    return {"epochs": config.epochs, "threads": config.threads, "measure_memory": False,
            "train_subset": config.train_subset}  # fmt: skip


def _recipe_config(
    config: CompareConfig, method: str, seed: int, run_dir: Path, *, resume: bool = False
) -> DigitsConfig:
    """The digits config of the run of ``method`` and ``seed`` in the comparison's folder
    ``run_dir.parent.parent`` (the sweep's cell config)."""
    root = run_dir.parent.parent
    changes = {"backward": method}
    return cell_config(DigitsTask, root, method, changes, seed, _overrides(config), resume=resume)


def gradient(model_state: dict[str, Tensor], config: DigitsConfig, images: Tensor,
             labels: Tensor, *, exact: bool = False) -> Tensor:  # fmt: skip
    """All parameters' gradient (flat, float64) of the batch loss with ``config``'s method.

    Args:
        model_state: the parameters (any dtype).
        config: the recipe options; its forward budget and backward method are used.
        images: (B, 1, 8, 8).
        labels: (B,).
        exact: instead use the implicit gradient with forward and adjoint solved to 1e-10.
    """
    changes: dict[str, Any] = {"dtype": "float64", "correction_states": 0}
    if exact:
        changes.update(backward="implicit", tol=1e-10, max_iter=300, implicit_tol=1e-10,
                       implicit_max_iter=300)  # fmt: skip
    cfg = dataclasses.replace(config, **changes)
    model = DigitsDEQ(cfg).double()
    model.load_state_dict(model_state)
    model.train()
    loss, _ = batch_loss(model, images.double(), labels, cfg)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    if exact:
        sol = model.deq.last_solution
        assert sol is not None
        if not (bool(sol.converged.all()) and bool(sol.backward.converged.all())):  # type: ignore[union-attr]
            raise RuntimeError("the reference gradient did not converge to 1e-10")
    return torch.cat([g.flatten() for g in grads])


def _cosine(a: Tensor, b: Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=0))


def step_memory(config: DigitsConfig, iters: int, images: Tensor, labels: Tensor) -> int:
    """Peak bytes of one training step (forward + backward) with exactly ``iters`` forward
    iterations (tolerance set unreachable), at the initial parameters of ``config.seed``."""
    cfg = dataclasses.replace(config, tol=1e-12, max_iter=iters)
    model = build_model(cfg)
    with PeakMemory("cpu") as mem:
        loss, _ = batch_loss(model, images, labels, cfg)
        loss.backward()
    sol = model.deq.last_solution
    assert sol is not None and sol.nstep == iters, "the forward solve stopped early"
    assert mem.peak_bytes is not None
    return mem.peak_bytes


def interleaved_step_ms(
    configs: dict[str, DigitsConfig],
    state: dict[str, Tensor],
    batches: list[tuple[Tensor, Tensor]],
    rounds: int,
) -> dict[str, float]:
    """Median ms of a full training step (zero_grad, forward, backward, AdamW step) per method,
    timing every method in turn for ``rounds`` rounds from the same parameters and batches."""
    models, optims = {}, {}
    for name, cfg in configs.items():
        models[name] = build_model(cfg)
        models[name].load_state_dict(state)
        optims[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-5)
    times: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(rounds + 1):
        images, labels = batches[r % len(batches)]
        for name, cfg in configs.items():
            tic = time.perf_counter()
            optims[name].zero_grad(set_to_none=True)
            loss, _ = batch_loss(models[name], images, labels, cfg)
            loss.backward()
            optims[name].step()
            if r:  # round 0 warms up
                times[name].append(1e3 * (time.perf_counter() - tic))
    return {name: statistics.median(t) for name, t in times.items()}


def compare_gradients(config: CompareConfig) -> dict[str, Any]:
    """Run the comparison; write ``compare.md`` and ``compare.json``.

    Returns:
        A dict with ``rows`` (one aggregate row per method), ``runs`` (one per training run),
        ``targets``, ``markdown`` (the table) and the paths ``compare_md`` and ``compare_json``.
    """
    if not isinstance(config, CompareConfig):
        raise TypeError(f"config must be a CompareConfig, got {type(config).__name__}")
    run_io.require_extras(*DigitsTask.extras)  # before anything is written
    with run_io.num_threads(config.threads):
        return _compare(config)


def _compare(config: CompareConfig) -> dict[str, Any]:
    from tqdm.auto import tqdm

    start = time.perf_counter()
    root = Path(config.run_dir) if config.run_dir else run_io.default_run_dir("compare-gradients")
    x_train, y_train, _, _ = load_data()
    cos_images, cos_labels = x_train[: config.cosine_batch], y_train[: config.cosine_batch]
    timing_batches = [(x_train[i * 64 : (i + 1) * 64], y_train[i * 64 : (i + 1) * 64])
                      for i in range(4)]  # fmt: skip
    configs: dict[tuple[str, int], DigitsConfig] = {}
    states: dict[tuple[str, int], dict[str, Tensor]] = {}

    def measure(method: str, seed: int, cfg: DigitsConfig, summary: dict[str, Any]) -> dict:
        """Gradient cosines at initialisation and after training, and the run's statistics."""
        rows = run_io.RunFolder(summary["run_dir"]).read_metrics()
        trained = DigitsDEQ(cfg)
        trained.load_state_dict(load_checkpoint(summary["checkpoint"]).model)
        configs[method, seed], states[method, seed] = cfg, trained.state_dict()
        cos = {}
        for when, state in (
            ("init", build_model(cfg).state_dict()),
            ("trained", states[method, seed]),
        ):
            g = gradient(state, cfg, cos_images, cos_labels)
            cos[when] = _cosine(g, gradient(state, cfg, cos_images, cos_labels, exact=True))
        bar.update(1)
        return {
            "method": method,
            "train_step_ms": statistics.median(
                r["step_ms"] for r in rows if r.get("step_ms") is not None
            ),
            "fwd_iters_mean": statistics.fmean(r["fwd_iters_mean"] for r in rows),
            "bwd_iters_mean": statistics.fmean(r["bwd_iters_mean"] for r in rows),
            "cos_init": cos["init"],
            "cos_trained": cos["trained"],
        }

    sweep = SweepConfig(seeds=tuple(range(config.seeds)), run_dir=str(root), resume=config.resume)
    variants = {m: {"backward": m} for m in config.methods}
    bar = tqdm(total=config.seeds * len(config.methods), disable=config.quiet, desc="compare",
               unit="run", dynamic_ncols=True)  # fmt: skip
    with bar:
        result = run_sweep(
            DigitsTask, sweep, _overrides(config), variants=variants, after_run=measure,
            files=("compare.md", "compare.json"), write=False, extra_metrics=_MEASURED,
            progress=lambda method, seed: bar.set_postfix(seed=seed, method=method),
        )  # fmt: skip
        timing = {}
        for seed in range(config.seeds):
            seed_configs = {m: configs[m, seed] for m in config.methods}
            ref_state = states.get(("implicit", seed), states[config.methods[0], seed])
            timing[seed] = interleaved_step_ms(
                seed_configs, ref_state, timing_batches, config.timing_rounds
            )
        memory = {
            method: {
                n: step_memory(configs[method, 0], n, cos_images, cos_labels)
                for n in config.memory_iters
            }
            for method in config.methods
        }
    runs = result.runs
    rows = _aggregate(config, result.rows, timing, memory)
    targets = _targets(config, rows)
    elapsed = time.perf_counter() - start
    markdown = _markdown(config, rows, targets, elapsed)
    record = {
        "config": to_dict(config),
        "rows": rows,
        "runs": runs,
        "interleaved_step_ms": {str(k): v for k, v in timing.items()},
        "memory_bytes": {m: {str(n): b for n, b in v.items()} for m, v in memory.items()},
        "targets": targets,
        "elapsed_s": elapsed,
        "threads": torch.get_num_threads(),
    }
    run_io.write_json(root / "compare.json", record)
    run_io.write_text(root / "compare.md", markdown)
    record.update(markdown=markdown, compare_md=str(root / "compare.md"),
                  compare_json=str(root / "compare.json"))  # fmt: skip
    return record


# per-run numbers that the sweep aggregates besides the recipe's headline and table metrics
_MEASURED = (
    Metric("cos_init", "cos to exact (init)"),
    Metric("cos_trained", "cos to exact (trained)"),
    Metric("train_step_ms", "ms / step in training", higher_is_better=False),
)


def _aggregate(
    config: CompareConfig,
    sweep_rows: list[dict[str, Any]],
    timing: dict[int, dict[str, float]],
    memory: dict[str, dict[int, int]],
) -> list[dict[str, Any]]:
    """The sweep's mean ± std per method, with the interleaved timing and the memory."""
    lo, hi = min(config.memory_iters), max(config.memory_iters)
    implicit_ms = (
        statistics.fmean(t["implicit"] for t in timing.values())
        if "implicit" in config.methods
        else None
    )
    rows = []
    for row in sweep_rows:
        method = row["variant"]
        ms = statistics.fmean(t[method] for t in timing.values())
        rows.append(
            {
                "method": method,
                "label": METHOD_LABELS[method],
                "test_acc_mean": 100 * row["test_acc_mean"],
                "test_acc_std": 100 * row["test_acc_std"],
                "train_step_ms": row["train_step_ms_mean"],
                "step_ms": ms,
                "speedup_vs_implicit": None if implicit_ms is None else implicit_ms / ms,
                "fwd_iters": row["fwd_iters_mean_mean"],
                "bwd_iters": row["bwd_iters_mean_mean"],
                "mem_lo_mb": memory[method][lo] / 2**20,
                "mem_hi_mb": memory[method][hi] / 2**20,
                "mem_ratio": memory[method][hi] / memory[method][lo],
                **{k: row[k] for k in ("cos_init_mean", "cos_init_std", "cos_trained_mean",
                                       "cos_trained_std")},
            }
        )  # fmt: skip
    return rows


def _targets(config: CompareConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    by = {r["method"]: r for r in rows}
    out: dict[str, Any] = {}
    if "implicit" in by and "phantom" in by:
        speed = by["phantom"]["speedup_vs_implicit"]
        gap = by["implicit"]["test_acc_mean"] - by["phantom"]["test_acc_mean"]
        out["phantom_speedup"] = {"value": speed, "target": ">= 1.5", "met": speed >= 1.5}
        out["phantom_acc_gap_points"] = {"value": gap, "target": "<= 0.5", "met": gap <= 0.5}
    flat = [m for m in ("implicit", "phantom", "neumann", "jfb") if m in by]
    for m in flat:
        ratio = by[m]["mem_ratio"]
        out[f"{m}_memory_ratio"] = {"value": ratio, "target": "<= 1.1", "met": ratio <= 1.1}
    if "unrolled" in by:
        ratio = by["unrolled"]["mem_ratio"]
        out["unrolled_memory_ratio"] = {"value": ratio, "target": "> 1.1 (grows)",
                                        "met": ratio > 1.1}  # fmt: skip
    return out


def _markdown(
    config: CompareConfig, rows: list[dict[str, Any]], targets: dict[str, Any], elapsed: float
) -> str:
    lo, hi = min(config.memory_iters), max(config.memory_iters)
    lines = [
        "| backward method | test acc. (%) | ms / step | speed vs implicit | ms / step in "
        f"training | fwd / bwd it. | peak MB @{lo} it. | @{hi} it. | ratio "
        "| cos to exact (init) | cos to exact (trained) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = "–" if r["speedup_vs_implicit"] is None else f"{r['speedup_vs_implicit']:.2f}x"
        lines.append(
            f"| {r['label']} | {r['test_acc_mean']:.2f} ± {r['test_acc_std']:.2f} "
            f"| {r['step_ms']:.1f} | {speed} | {r['train_step_ms']:.1f} "
            f"| {r['fwd_iters']:.1f} / {r['bwd_iters']:.1f} | {r['mem_lo_mb']:.2f} "
            f"| {r['mem_hi_mb']:.2f} | {r['mem_ratio']:.2f}x "
            f"| {r['cos_init_mean']:.4f} ± {r['cos_init_std']:.4f} "
            f"| {r['cos_trained_mean']:.4f} ± {r['cos_trained_std']:.4f} |"
        )
    base = DigitsConfig()
    lines += [
        "",
        f"{config.seeds} seeds x {config.epochs} epochs (the full recipe trains {base.epochs}), "
        f"{config.threads or torch.get_num_threads()} thread(s), {elapsed / 60:.1f} min in all. "
        f"Forward: {base.solver}, tol {base.tol:g}, at most {base.max_iter} iterations; phantom "
        f"k={base.phantom_steps}, lambda={base.phantom_damping}; implicit adjoint tol "
        f"{base.implicit_tol:g}, at most {base.implicit_max_iter} iterations.",
        "",
        "- *ms / step*: full training step (forward, backward, AdamW), median over "
        f"{config.timing_rounds} interleaved rounds at the same parameters and batch (the "
        "implicit run's trained parameters), mean over seeds. *ms / step in training*: median "
        "step of each training run, mean over seeds (more exposed to load from other processes).",
        f"- *peak MB*: tensor storages alive at once during one training step, batch "
        f"{config.cosine_batch}, with exactly {lo} and {hi} forward iterations.",
        "- *cos to exact*: cosine between the method's gradient (all parameters, float64, "
        "training settings) and the implicit gradient with forward and adjoint solved to 1e-10, "
        f"on {config.cosine_batch} training images; mean ± std over seeds.",
        "",
        "Targets:",
        "",
    ]
    for name, t in targets.items():
        lines.append(
            f"- {name}: {t['value']:.3g} (target {t['target']}): {'met' if t['met'] else 'NOT met'}"
        )
    return "\n".join(lines) + "\n"
