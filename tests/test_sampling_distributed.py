"""sampling.sample(process_group=...): 2 gloo processes on the CPU give the sample of 1 process."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from equilibria import sampling

pytestmark = pytest.mark.no_device_mode

T, N, D = 12, 3, 5
RUNS = (
    ("sequential", {}),
    ("picard", {}),
    ("paradigms", {"window": 4}),
    ("picard-chunked", {"chunk": 2}),
)


def _problem():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    sched = sampling.DDIM(
        torch.cumprod(1 - betas, 0), torch.arange(0, T).mul(1000 // T).flip(0) + 1, eta=0.5
    )
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn(N, D, generator=g, dtype=torch.float64)
    noise = torch.randn(T, N, D, generator=g, dtype=torch.float64)
    W = torch.randn(D, D, generator=g, dtype=torch.float64) / math.sqrt(D)

    rows: list[int] = []

    def model(x, t):  # row-wise: the same output whatever rows share the call
        rows.append(x.shape[0])
        return torch.tanh((x.unsqueeze(1) @ W).squeeze(1) + t.double()[:, None] / 1000)

    return sched, x_T, noise, model, rows


def _run(process_group, solver, **kw):
    sched, x_T, noise, model, rows = _problem()
    x0, sol = sampling.sample(
        model, x_T, sched, solver=solver, tol=1e-10, noise=noise, process_group=process_group, **kw
    )
    return x0, sol, sum(rows)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name, kw in RUNS:
            x0, sol, rows = _run(dist.group.WORLD, name.split("-")[0], **kw)
            np.save(os.path.join(out_dir, f"{name}_{rank}.npy"), x0.numpy())
            np.save(
                os.path.join(out_dir, f"{name}_{rank}_stats.npy"),
                np.array([sol.rounds, sol.nfe, rows, int(sol.converged.all())]),
            )
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world)
    for name, kw in RUNS:
        x0, sol, rows = _run(None, name.split("-")[0], **kw)
        for rank in range(world):
            got = torch.from_numpy(np.load(tmp_path / f"{name}_{rank}.npy"))
            torch.testing.assert_close(got, x0, rtol=0, atol=1e-13)
            rounds, nfe, rows_rank, converged = np.load(tmp_path / f"{name}_{rank}_stats.npy")
            assert (rounds, nfe, converged) == (sol.rounds, sol.nfe, 1)
            assert rows_rank < rows  # each rank evaluated a share of the rows
        shares = [np.load(tmp_path / f"{name}_{r}_stats.npy")[2] for r in range(world)]
        assert sum(shares) == rows
