"""How close the Hamburger's one-step-style gradients come to BPTT on the mosaic recipe, and memory.

For mosaic models (freshly initialised, and the checkpoints of trained runs given by --runs), the
training loss of a few training batches is differentiated with each ``grad`` of :data:`MODES`:
``one_step`` (the paper's: last coefficient update, bases constant), ``jfb`` (the last update of
both factors from the detached iterate), ``phantom`` with 2 or 3 recorded updates, each of the
last two also with ``grad_init`` (NMF's initialisation gradient kept through the no-grad updates),
and ``unrolled`` (BPTT, the reference). The forward passes are identical (same random initial
bases, drawn after the same seed). Reported per model: the cosine between each gradient and BPTT's,
over all parameters and over the stem's (which only receive context through the block), and the
bytes autograd saves inside the block for K = 6 and K = 24 steps (flat in K for all but BPTT).

Writes ``benchmarks/results/hamburger_jfb.json``.

Usage::

    python benchmarks/hamburger_jfb.py --runs runs/mosaic-jfb/runs/* runs/mosaic-phantom/runs/*
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from equilibria.zoo.evaluation import load_model
from equilibria.zoo.mosaic import MosaicConfig, MosaicNet, MosaicTask, make_canvases

from common import write_result

# name -> (grad, grad_steps, grad_init) of the Hamburger; "unrolled" (BPTT) is the reference
MODES = {
    "one_step": ("one_step", 1, False),
    "jfb": ("jfb", 1, False),
    "jfb_init": ("jfb", 1, True),
    "phantom2": ("phantom", 2, False),
    "phantom2_init": ("phantom", 2, True),
    "phantom3": ("phantom", 3, False),
    "unrolled": ("unrolled", 1, False),
}
COMPARED = [m for m in MODES if m != "unrolled"]


def set_mode(block: torch.nn.Module, mode: str) -> None:
    block.grad, block.grad_steps, block.grad_init = MODES[mode]


@contextlib.contextmanager
def saved_bytes() -> Iterator[dict[int, int]]:
    """Bytes of the distinct storages autograd saves for backward inside the block."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(F.cosine_similarity(torch.cat([g.flatten() for g in a]),
                                     torch.cat([g.flatten() for g in b]), dim=0))  # fmt: skip


def measure(model: torch.nn.Module, task: MosaicTask, batches: int) -> dict[str, object]:
    model.train()
    block = model.context
    params = [p for p in model.parameters() if p.requires_grad]
    stem = [i for i, p in enumerate(params) if any(p is q for q in model.stem.parameters())]
    cos: dict[str, list[float]] = {f"{m}_{part}": [] for m in COMPARED for part in ("all", "stem")}
    for b in range(batches):
        canvas = make_canvases(np.random.default_rng(5000 + b), *task.pool, 16, **task.canvas)
        batch = tuple(torch.from_numpy(a) for a in (canvas.inputs, canvas.targets, canvas.digits))
        grads = {}
        for mode in MODES:
            set_mode(block, mode)
            torch.manual_seed(b)  # the same random initial bases for every mode
            loss = task.train_step(model, model, batch).loss
            grads[mode] = torch.autograd.grad(loss, params)
        for mode in COMPARED:
            cos[f"{mode}_all"].append(cosine(list(grads[mode]), list(grads["unrolled"])))
            cos[f"{mode}_stem"].append(cosine([grads[mode][i] for i in stem],
                                              [grads["unrolled"][i] for i in stem]))  # fmt: skip
    memory = {}
    stem_out = model.stem(batch[0]).detach().requires_grad_()
    for mode in MODES:
        set_mode(block, mode)
        for steps in (6, 24):
            block.train_steps = steps
            with saved_bytes() as seen:
                block(stem_out)
            memory[f"{mode}_K{steps}"] = sum(seen.values())
    block.train_steps = task.config.ham_train_steps
    c = task.config
    block.grad, block.grad_steps, block.grad_init = c.grad, c.grad_steps, c.grad_init
    return {"cosine_vs_bptt": {k: statistics.fmean(v) for k, v in cos.items()},
            "cosine_vs_bptt_per_batch": cos, "saved_bytes": memory}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="*", default=[], help="trained mosaic run folders")
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    config = MosaicConfig(block="ham", ham="nmf", grad="jfb", seed=0)
    task = MosaicTask(config)
    task.setup(torch.device("cpu"))
    torch.manual_seed(0)
    results["initialisation (seed 0)"] = measure(MosaicNet(config), task, args.batches)
    for run in args.runs:
        model, run_task = load_model(MosaicTask, run)
        run_task.setup(torch.device("cpu"))
        results[f"trained: {Path(run).name}"] = measure(model, run_task, args.batches)
    for name, r in results.items():
        c, m = r["cosine_vs_bptt"], r["saved_bytes"]
        print(f"{name}: cos with bptt (all/stem) "
              + ", ".join(f"{mode} {c[f'{mode}_all']:.3f}/{c[f'{mode}_stem']:.3f}"
                          for mode in COMPARED)
              + "; saved KiB K=6/24: "
              + ", ".join(f"{mode} {m[f'{mode}_K6'] / 1024:.0f}/{m[f'{mode}_K24'] / 1024:.0f}"
                          for mode in MODES))  # fmt: skip
    modes = {m: dict(zip(("grad", "grad_steps", "grad_init"), v)) for m, v in MODES.items()}
    write_result("hamburger_jfb", {"command": "python benchmarks/hamburger_jfb.py "
                                   + " ".join(sys.argv[1:] if argv is None else argv),
                                   "batches": args.batches, "modes": modes,
                                   "models": results})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
