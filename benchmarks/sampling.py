"""Parallel DDIM sampling: rounds and NFE until the sample matches the sequential one.

Every solver of ``equilibria.sampling`` solves the joint DDIM fixed point (eta = 0) of two
models: an exact-score Gaussian mixture (its epsilon in closed form, d = 64) and the trained
digits epsilon-model of the ``diffusion`` recipe (trained here into ``--digits-run`` if that folder
holds no finished run). For T = 25, 100, 1000 and several noise seeds, each solver runs at its
published defaults and over a small grid of tuned options; the count is the first round after
which the final sample is within 1e-3 of the sequential sample (max over samples of the relative
L2 error), read off the per-round samples (``trace=True``, tolerance 1e-10 so no solver stops
early). NFE are the (sample, step) model evaluations up to that round; CPU time is the process
time of a second run stopped at that round (``time.process_time``: the cores are shared, so
wall-clock is not meaningful), next to the sequential loop's.

With ``--recipe-runs RUN [RUN ...]`` it does something else: the ``diffusion`` recipe's own
evaluation (what ``equilibria eval RUN --solver S --eta E`` prints) of trained runs, for each
sampler variant of :data:`RECIPE_VARIANTS` (FD of the parallel and sequential samples, rounds, NFE,
largest relative difference, from the recipe's fixed noise), with the mean ± sample std over the
runs; these are the rows of ``docs/recipes/diffusion.md`` beside the sweep's.

Usage::

    python benchmarks/sampling.py                 # full: T = 25, 100, 1000, 2 seeds
    python benchmarks/sampling.py --quick         # T = 25, 100, 1 seed, fewer samples
    python benchmarks/sampling.py --recipe-runs runs/diffusion-sweep/runs/default-seed{0,1,2}

Writes ``benchmarks/results/sampling.json`` and ``sampling.png`` (error vs rounds, T = 100); with
``--recipe-runs``, ``benchmarks/results/diffusion_eval.json`` only.
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from equilibria import sampling
from equilibria.sampling._anderson import Anderson, Triangular
from equilibria.sampling._default import Default, Secant

from common import RESULTS, write_result

# (solver, eta) of the recipe evaluations of --recipe-runs: the sweep's own row first (it must come
# out as the sweep recorded it), then cumulative Picard, then the stochastic sampler (eta = 1,
# pre-drawn noise shared by both samplers)
RECIPE_VARIANTS: tuple[tuple[str, float], ...] = (("default", 0.0), ("picard", 0.0),
                                                   ("default", 1.0))  # fmt: skip
TARGET = 1e-3  # max relative error of the final sample against the sequential one
SOLVE_TOL = 1e-10  # the driver's tolerance: far below TARGET, so no solver stops before it


class MixtureEps:
    """Exact epsilon of a Gaussian mixture with diagonal covariances under the VP schedule.

    Data ``x_0 ~ sum_i w_i N(mu_i, diag(s_i^2))``; then ``x_t = sqrt(a) x_0 + sqrt(1 - a) eps``
    is the mixture of ``N(sqrt(a) mu_i, diag(a s_i^2 + 1 - a))`` and
    ``eps(x, t) = -sqrt(1 - a) * grad log p_t(x)`` (Tweedie / the score's definition), with
    ``grad log p_t(x) = -sum_i r_i(x) (x - sqrt(a) mu_i) / (a s_i^2 + 1 - a)`` and ``r_i`` the
    component posteriors.
    """

    def __init__(self, alphas: Tensor, d: int = 64, k: int = 8, spread: float = 2.0,
                 std: float = 0.1, seed: int = 0) -> None:  # fmt: skip
        g = torch.Generator().manual_seed(seed)
        self.alphas = alphas.double()
        self.mu = torch.randn(k, d, generator=g, dtype=torch.float64) * spread  # (K, D)
        self.var = (std * (0.5 + torch.rand(k, d, generator=g, dtype=torch.float64))) ** 2
        self.logw = torch.log_softmax(0.5 * torch.randn(k, generator=g, dtype=torch.float64), 0)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        a = self.alphas[t].to(x.dtype)[:, None, None]  # (M, 1, 1)
        v = a * self.var + (1 - a)  # (M, K, D)
        diff = x[:, None, :] - a.sqrt() * self.mu  # (M, K, D)
        logp = self.logw - 0.5 * (diff.pow(2) / v + v.log()).sum(-1)  # (M, K)
        r = torch.softmax(logp, -1).unsqueeze(-1)  # (M, K, 1)
        score = -(r * diff / v).sum(1)  # (M, D)
        return -(1 - a[:, 0]).sqrt() * score


def linear_alphas(n: int = 1000) -> Tensor:
    betas = torch.linspace(1e-4, 0.02, n, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def ddim(alphas: Tensor, T: int) -> sampling.DDIM:
    """DDIM over T "leading"-spaced timesteps (t_k = k * floor(n / T)), final alpha 1."""
    n = alphas.shape[0]
    return sampling.DDIM(alphas, torch.arange(T).flip(0) * (n // T))


def solver_table(T: int) -> list[tuple[str, str, Any]]:
    """(kind, label, solver object): each solver at its published defaults, then a tuned grid."""
    table: list[tuple[str, str, Any]] = [
        ("published", "picard", sampling.Picard()),
        ("published", "paradigms", sampling.Paradigms()),  # window 10
        ("published", "anderson", Anderson()),  # m 5, lam 1e-3, one mixing vector per sample
        ("published", "anderson-timestep", Anderson(weights="timestep")),  # DEQ-DDIM's layout
        ("published", "triangular", Triangular()),  # m 2, lam 1e-3, order 20
        ("published", "default", Default()),
    ]
    for w in (25, 100):
        if w < T:
            table.append(("tuned", f"paradigms(window={w})", sampling.Paradigms(window=w)))
    for m in (2, 3):
        table.append(("tuned", f"anderson(m={m})", Anderson(m=m)))
    table.append(("tuned", "anderson(m=3, beta=0.5)", Anderson(m=3, beta=0.5)))
    table.append(("tuned", "triangular(order=None)", Triangular(order=None)))
    table.append(("tuned", "triangular(order=None, m=3)", Triangular(order=None, m=3)))
    table.append(("tuned", "triangular(m=3)", Triangular(m=3)))
    table.append(("tuned", "secant(gate=False)", Secant(gate=False)))
    return table


def measure(model, x_T: Tensor, sched, solver, ref: Tensor, cap: int) -> dict[str, Any]:
    """Rounds, NFE and CPU time until the final sample is within TARGET of ``ref``."""
    _, sol = sampling.sample(model, x_T, sched, solver=solver, tol=SOLVE_TOL, max_rounds=cap,
                             trace=True)  # fmt: skip
    assert sol.sample_history is not None and sol.residual_history is not None
    err = (sol.sample_history - ref).flatten(2).norm(dim=2) / ref.flatten(1).norm(dim=1)
    curve = err.amax(1)  # (rounds,) max over samples
    hit = (curve < TARGET).nonzero()
    rounds = int(hit[0, 0]) + 1 if hit.numel() else None
    nfe_per_round = (~sol.residual_history.isnan()).sum((1, 2))  # (rounds,)
    out: dict[str, Any] = {
        "rounds": rounds,
        "nfe": int(nfe_per_round[:rounds].sum()) if rounds else None,
        "curve": [float(c) for c in curve],
        "cap": cap,
    }
    if rounds:
        tic = time.process_time()
        sampling.sample(model, x_T, sched, solver=solver, tol=SOLVE_TOL, max_rounds=rounds)
        out["cpu_s"] = time.process_time() - tic
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    alphas = linear_alphas()
    models: dict[str, Any] = {"gmm": (MixtureEps(alphas), (64,))}
    if not args.no_digits:
        from equilibria.zoo.diffusion import trained_eps_model

        digits, digit_alphas = trained_eps_model(args.digits_run, dtype=torch.float64)
        models["digits"] = (lambda x, t: digits(x, t), (1, 8, 8), digit_alphas)
    records: list[dict[str, Any]] = []
    for name, spec in models.items():
        model, shape = spec[0], spec[1]
        al = spec[2] if len(spec) > 2 else alphas
        for T in args.steps:
            sched = ddim(al, T)
            for seed in range(args.seeds):
                gen = torch.Generator().manual_seed(1000 + seed)
                x_T = torch.randn((args.samples, *shape), generator=gen, dtype=torch.float64)
                tic = time.process_time()
                ref, _ = sampling.sample(model, x_T, sched, solver="sequential")
                seq_cpu = time.process_time() - tic
                cap = T
                for kind, label, solver in solver_table(T):
                    # a sliding window needs at least T / window rounds: no cap below T
                    window = isinstance(solver, sampling.Paradigms)
                    r = measure(model, x_T, sched, solver, ref, T if window else cap)
                    if label == "picard" and r["rounds"]:
                        cap = min(T, max(60, 6 * r["rounds"]))  # bounds the slow solvers' runs
                    r.update(model=name, T=T, seed=seed, kind=kind, solver=label,
                             seq_cpu_s=seq_cpu, samples=args.samples)  # fmt: skip
                    records.append(r)
                    print(f"{name:6s} T={T:4d} seed={seed} {label:30s} rounds={r['rounds']} "
                          f"nfe={r['nfe']} cpu={r.get('cpu_s', math.nan):.2f}s "
                          f"(sequential {T} rounds, {seq_cpu:.2f}s)", flush=True)  # fmt: skip
    return {"records": records, "summary": summarise(records)}


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, T): mean rounds/NFE per solver over seeds, and the acceptance checks."""
    rows = []
    for key in sorted({(r["model"], r["T"]) for r in records}):
        rs = [r for r in records if (r["model"], r["T"]) == key]
        seeds = sorted({r["seed"] for r in rs})
        by = {}
        for label in dict.fromkeys(r["solver"] for r in rs):
            got = [r for r in rs if r["solver"] == label]
            ok = all(r["rounds"] for r in got)
            by[label] = {
                "kind": got[0]["kind"],
                "rounds": [r["rounds"] for r in got],
                "mean_rounds": sum(r["rounds"] for r in got) / len(got) if ok else None,
                "mean_nfe": sum(r["nfe"] for r in got) / len(got) if ok else None,
                "mean_cpu_s": sum(r["cpu_s"] for r in got) / len(got) if ok else None,
            }
        worst = []  # per seed: default's rounds minus the best published solver's
        for s in seeds:
            pub = [r for r in rs if r["seed"] == s and r["kind"] == "published"]
            d = next(r for r in pub if r["solver"] == "default")
            others = [r["rounds"] for r in pub if r["solver"] != "default" and r["rounds"]]
            worst.append((d["rounds"] or math.inf) - min(others))
        pic, dft = by["picard"], by["default"]
        tuned_best = min((v["mean_rounds"], k) for k, v in by.items() if v["mean_rounds"])
        rows.append({
            "model": key[0], "T": key[1], "seeds": len(seeds),
            "sequential_cpu_s": sum(r["seq_cpu_s"] for r in rs if r["solver"] == "picard")
            / len(seeds),
            "solvers": by,
            "default_vs_picard_rounds": dft["mean_rounds"] / pic["mean_rounds"]
            if dft["mean_rounds"] and pic["mean_rounds"] else None,
            "default_vs_picard_nfe": dft["mean_nfe"] / pic["mean_nfe"]
            if dft["mean_nfe"] and pic["mean_nfe"] else None,
            "default_never_more_rounds_than_published": max(worst) <= 0,
            "default_minus_best_published_rounds": worst,
            "best_overall": tuned_best[1],
        })  # fmt: skip
    return rows


def plot(records: list[dict[str, Any]], path: Path, T: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["model"] for r in records))
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for r in records:
            if r["model"] == name and r["T"] == T and r["seed"] == 0 and r["kind"] == "published":
                c = r["curve"][:60]
                ax.plot(range(1, len(c) + 1), c, label=r["solver"],
                        lw=2.2 if r["solver"] == "default" else 1.2)  # fmt: skip
        ax.axhline(TARGET, color="k", ls=":", lw=1)
        ax.set(yscale="log", xlabel="rounds (batched model calls)",
               ylabel="max relative error vs sequential",
               title=f"{name}, DDIM T = {T}")  # fmt: skip
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def recipe_eval(runs: list[str]) -> dict[str, Any]:
    """``equilibria eval RUN --solver S --eta E`` (``evaluate_checkpoint``) of every run for every
    variant of :data:`RECIPE_VARIANTS`; per variant the mean and sample std over the runs."""
    from equilibria.zoo.diffusion import DiffusionTask
    from equilibria.zoo.evaluation import evaluate_checkpoint

    keys = ("fd_parallel", "fd_sequential", "rounds", "nfe", "max_rel_diff", "par_cpu_s",
            "seq_cpu_s", "fd_train_images")  # fmt: skip
    records: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for solver, eta in RECIPE_VARIANTS:
        got = []
        for run_dir in runs:
            tic = time.process_time()
            r = evaluate_checkpoint(DiffusionTask, run_dir, solver=solver, eta=eta)
            r.update(run=run_dir, variant_solver=solver, variant_eta=eta,
                     cpu_s=time.process_time() - tic)  # fmt: skip
            got.append(r)
            print(f"{run_dir} solver={solver} eta={eta:g}: FD parallel {r['fd_parallel']:.2f}, "
                  f"sequential {r['fd_sequential']:.2f}, rounds {r['rounds']}, NFE {r['nfe']}, "
                  f"max rel. diff {r['max_rel_diff']:.1e}, converged {r['converged']:.3f} "
                  f"({r['cpu_s']:.1f} CPU s)", flush=True)  # fmt: skip
        row: dict[str, Any] = {"solver": solver, "eta": eta, "runs": len(got)}
        for k in keys:
            values = [float(r[k]) for r in got]
            row[f"{k}_mean"] = statistics.fmean(values)
            row[f"{k}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        row["max_rel_diff_max"] = max(float(r["max_rel_diff"]) for r in got)
        row["all_converged"] = all(r["converged"] == 1.0 for r in got)
        rows.append(row)
        records.extend(got)
    return {"variants": [list(v) for v in RECIPE_VARIANTS], "runs": runs, "rows": rows,
            "records": records}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="T = 25, 100; 1 seed; 4 samples")
    parser.add_argument(
        "--digits-run",
        default="runs/diffusion/bench",
        help="diffusion run folder (trained there if it has no finished run)",
    )
    parser.add_argument("--no-digits", action="store_true", help="the Gaussian mixture only")
    parser.add_argument("--steps", type=int, nargs="+", default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--samples", type=int, default=None, help="samples per seed")
    parser.add_argument(
        "--recipe-runs",
        nargs="+",
        default=None,
        metavar="RUN",
        help="instead: the diffusion recipe's evaluation of these finished runs with each "
        "sampler variant (writes diffusion_eval.json)",
    )
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    cmd = shlex.join(["python", "benchmarks/sampling.py", *sys.argv[1:]])  # as it was run
    if args.recipe_runs is not None:
        # "is not": an explicit 0 (--seeds 0) equals False and slipped through "not in"
        given = [o for o in ("quick", "no_digits", "steps", "seeds", "samples")
                 if getattr(args, o) is not None and getattr(args, o) is not False]  # fmt: skip
        if given:
            opts = ", ".join("--" + o.replace("_", "-") for o in given)
            parser.error(f"--recipe-runs takes no solver-benchmark options, got {opts}")
        missing = [r for r in args.recipe_runs if not (Path(r) / "summary.json").is_file()]
        if missing:
            parser.error(f"--recipe-runs must be finished diffusion runs, no summary.json in "
                         f"{', '.join(missing)}")  # fmt: skip
        torch.set_num_threads(1)
        result = recipe_eval(args.recipe_runs)
        for row in result["rows"]:
            fd = {k: f"{row[k + '_mean']:.2f} ± {row[k + '_std']:.2f}"
                  for k in ("fd_parallel", "fd_sequential")}  # fmt: skip
            print(f"{row['solver']} eta={row['eta']:g}: FD parallel {fd['fd_parallel']}, "
                  f"sequential {fd['fd_sequential']}, rounds {row['rounds_mean']:.1f}, NFE "
                  f"{row['nfe_mean']:.0f}, largest rel. diff "
                  f"{row['max_rel_diff_max']:.1e}")  # fmt: skip
        print(write_result("diffusion_eval", {"command": cmd, **result}, Path(args.out)))
        return
    # an explicit 0 was silently replaced by the default; refused by name instead
    for name in ("seeds", "samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.steps is not None and not all(1 <= T <= 1000 for T in args.steps):
        parser.error(f"--steps must be in [1, 1000] (the schedule), got {args.steps}")
    args.steps = args.steps or ([25, 100] if args.quick else [25, 100, 1000])
    args.seeds = args.seeds or (1 if args.quick else 2)
    args.samples = args.samples or (4 if args.quick else 8)
    torch.set_num_threads(1)
    result = run(args)
    for row in result["summary"]:
        s = row["solvers"]
        pub = ", ".join(f"{k} {v['mean_rounds']}" for k, v in s.items() if v["kind"] == "published")
        print(f"{row['model']:6s} T={row['T']:4d}: {pub}; default/picard rounds "
              f"{row['default_vs_picard_rounds']}, NFE {row['default_vs_picard_nfe']}; never "
              f"more than published: {row['default_never_more_rounds_than_published']}; best "
              f"{row['best_overall']}")  # fmt: skip
    out = Path(args.out)
    payload = {"command": cmd, "target": TARGET, "solve_tol": SOLVE_TOL, "steps": args.steps,
               "seeds": args.seeds, "samples": args.samples, **result}  # fmt: skip
    print(write_result("sampling", payload, out))
    plot(result["records"], out / "sampling.png", 100 if 100 in args.steps else args.steps[0])


if __name__ == "__main__":
    main()
