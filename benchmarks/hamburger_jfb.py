"""How close the Hamburger's one-step gradients come to BPTT on the mosaic recipe, and their memory.

For mosaic models (freshly initialised, and the checkpoints of trained runs given by --runs), the
training loss of a few batches is differentiated three ways: ``grad="one_step"`` (the paper's:
last coefficient update, bases constant), ``grad="jfb"`` (the last update of both factors from the
detached iterate) and ``grad="unrolled"`` (BPTT, the reference). The forward passes are identical
(same random initial bases, drawn after the same seed). Reported per model: the cosine between
each one-step gradient and BPTT's, over all parameters and over the stem's (which only receive
context through the block), and the bytes autograd saves inside the block for K = 6 and K = 24
steps (memory flat in K for one_step and jfb, growing for BPTT).

Writes ``benchmarks/results/hamburger_jfb.json``.

Usage::

    python benchmarks/hamburger_jfb.py --runs runs/mosaic-jfb/runs/*
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

MODES = ("one_step", "jfb", "unrolled")


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
    cos: dict[str, list[float]] = {f"{m}_{part}": [] for m in MODES[:2] for part in ("all", "stem")}
    for b in range(batches):
        canvas = make_canvases(np.random.default_rng(5000 + b), *task.pool, 16, **task.canvas)
        batch = tuple(torch.from_numpy(a) for a in (canvas.inputs, canvas.targets, canvas.digits))
        grads = {}
        for mode in MODES:
            block.grad = mode
            torch.manual_seed(b)  # the same random initial bases for every mode
            loss = task.train_step(model, model, batch).loss
            grads[mode] = torch.autograd.grad(loss, params)
        for mode in MODES[:2]:
            cos[f"{mode}_all"].append(cosine(list(grads[mode]), list(grads["unrolled"])))
            cos[f"{mode}_stem"].append(cosine([grads[mode][i] for i in stem],
                                              [grads["unrolled"][i] for i in stem]))  # fmt: skip
    memory = {}
    stem_out = model.stem(batch[0]).detach().requires_grad_()
    for mode in MODES:
        block.grad = mode
        for steps in (6, 24):
            block.train_steps = steps
            with saved_bytes() as seen:
                block(stem_out)
            memory[f"{mode}_K{steps}"] = sum(seen.values())
    block.train_steps = task.config.ham_train_steps
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
        print(f"{name}: cos(one_step, bptt) all {c['one_step_all']:.3f} stem "
              f"{c['one_step_stem']:.3f}; cos(jfb, bptt) all {c['jfb_all']:.3f} stem "
              f"{c['jfb_stem']:.3f}; saved KiB K=6/24: "
              + ", ".join(f"{mode} {m[f'{mode}_K6'] / 1024:.0f}/{m[f'{mode}_K24'] / 1024:.0f}"
                          for mode in MODES))  # fmt: skip
    write_result("hamburger_jfb", {"command": "python benchmarks/hamburger_jfb.py "
                                   + " ".join(sys.argv[1:] if argv is None else argv),
                                   "batches": args.batches, "models": results})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
