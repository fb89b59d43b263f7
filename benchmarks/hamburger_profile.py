"""Where a Hamburger step's CPU time goes at the issue's target size, and what bounds its ratio.

At n = 64² (C = d = 256, r = 64, K = 6, batch 1, float32, one thread unless ``--threads``):

1. forward+backward of the Ham block and of the SDPA block (``benchmarks/hamburger.py``'s blocks),
   interleaved, medians, and the median of the per-repetition ratios;
2. ``torch.profiler`` over the Ham block's forward+backward: the share of the time spent in matrix
   products (``aten::bmm``, ``baddbmm``, ``mm``, ``addmm``, outermost calls only) and, per product
   shape, the multiply-accumulates (from the recorded input shapes) and the rate achieved;
3. the SDPA block's forward rate: its analytic MACs (projections, QKᵀ, AV) over its forward time;
4. two bounds on the Ham/SDPA forward+backward ratio: the Ham step's products alone at the rate
   they ran (every other operator free), and at the SDPA forward's rate (the products as fast as
   attention's).

Run: ``python benchmarks/hamburger_profile.py [--block ham-nmf-bf16] [--threads 2]``; about a
minute. Writes ``benchmarks/results/hamburger_profile[-<block>][-<threads>t].json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from common import write_result
from hamburger import forward, fwd_bwd, macs, make_block

PRODUCTS = ("aten::bmm", "aten::baddbmm", "aten::mm", "aten::addmm")


def product_macs(name: str, shapes: list[list[int]]) -> int:
    """MACs of one matrix-product call from its recorded input shapes."""
    if name in ("aten::bmm", "aten::mm"):
        a, b = shapes[0], shapes[1]
    else:  # baddbmm / addmm: (input, mat1, mat2, beta, alpha)
        a, b = shapes[1], shapes[2]
    batch = a[0] if len(a) == 3 else 1
    return batch * a[-2] * a[-1] * b[-1]


def _inside_product(event: Any) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in PRODUCTS:
            return True
        parent = parent.cpu_parent
    return False


def profile_products(block: torch.nn.Module, x: torch.Tensor, steps: int) -> dict[str, Any]:
    """Share of the forward+backward time in matrix products, and MACs and rate per shape."""
    fwd_bwd(block, x)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            fwd_bwd(block, x)
    events = prof.events()
    total_us = sum(e.self_cpu_time_total for e in events)
    by_shape: dict[str, dict[str, float]] = defaultdict(lambda: {"calls": 0, "us": 0.0, "macs": 0})
    for e in events:
        if e.name not in PRODUCTS or _inside_product(e):
            continue
        shapes = [list(s) for s in e.input_shapes if s]
        key = f"{e.name} {' x '.join(str(tuple(s)) for s in shapes)}"
        row = by_shape[key]
        row["calls"] += 1
        row["us"] += e.cpu_time_total  # inclusive: a product's own copies count as the product
        row["macs"] += product_macs(e.name, shapes)
    product_us = sum(r["us"] for r in by_shape.values())
    product_macs_total = sum(r["macs"] for r in by_shape.values())
    shapes_out = {
        key: {
            "calls_per_step": r["calls"] / steps,
            "ms_per_step": r["us"] / steps / 1e3,
            "gmacs_per_step": r["macs"] / steps / 1e9,
            "gmac_per_s": r["macs"] / r["us"] / 1e3,
        }
        for key, r in sorted(by_shape.items(), key=lambda kv: -kv[1]["us"])
    }
    return {
        "profiled_ms_per_step": total_us / steps / 1e3,
        "product_ms_per_step": product_us / steps / 1e3,
        "product_share": product_us / total_us,
        "product_gmacs_per_step": product_macs_total / steps / 1e9,
        "product_gmac_per_s": product_macs_total / product_us / 1e3,
        "by_shape": shapes_out,
    }


def timed(blocks: dict[str, torch.nn.Module], x: torch.Tensor, reps: int) -> dict[str, Any]:
    """Interleaved forward and forward+backward times (ms): medians and per-rep ratios."""
    samples: dict[str, dict[str, list[float]]] = {b: {"fwd": [], "fwd_bwd": []} for b in blocks}
    for rep in range(reps + 1):
        for name, block in blocks.items():
            for kind, fn in (("fwd_bwd", fwd_bwd), ("fwd", forward)):
                tic = time.perf_counter()
                fn(block, x)
                if rep:  # the first round warms up
                    samples[name][kind].append(1e3 * (time.perf_counter() - tic))
    ham, sdpa = samples["ham"], samples["sdpa"]
    return {
        "ham_fwd_bwd_ms": statistics.median(ham["fwd_bwd"]),
        "sdpa_fwd_ms": statistics.median(sdpa["fwd"]),
        "sdpa_fwd_bwd_ms": statistics.median(sdpa["fwd_bwd"]),
        "ratio": statistics.median(a / b for a, b in zip(ham["fwd_bwd"], sdpa["fwd_bwd"])),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block", default="ham-nmf", choices=("ham-nmf", "ham-nmf-bf16",
                                                                "ham-vq", "ham-cd"))  # fmt: skip
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--dim", type=int, default=256, help="C = d")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6, help="K (training steps)")
    parser.add_argument("--heads", type=int, default=1, help="SDPA heads (1: fastest at 64²)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    c, n = args.dim, args.side**2
    blocks = {
        "ham": make_block(args.block, c, args.rank, args.steps),
        "sdpa": make_block("sdpa", c, args.rank, args.steps, args.heads),
    }
    x = torch.randn(1, c, args.side, args.side, requires_grad=True)
    times = timed(blocks, x, args.reps)
    prof = profile_products(blocks["ham"], x, steps=5)
    sdpa_rate = macs("sdpa", n, c, c, args.rank, args.steps) / (times["sdpa_fwd_ms"] * 1e6)
    ham_at_own_rate = prof["product_ms_per_step"] * times["ham_fwd_bwd_ms"]
    ham_at_own_rate /= prof["profiled_ms_per_step"]  # profiled time rescaled to the timed one
    bounds = {
        "products_only_at_their_rate": ham_at_own_rate / times["sdpa_fwd_bwd_ms"],
        "products_at_sdpa_forward_rate": prof["product_gmacs_per_step"]
        / sdpa_rate
        * 1e3
        / times["sdpa_fwd_bwd_ms"],
    }
    result = {
        "command": "python benchmarks/hamburger_profile.py " + " ".join(argv or sys.argv[1:]),
        "config": {**vars(args), "out": str(args.out), "n": n, "dtype": "float32"},
        "times": times,
        "sdpa_forward_gmac_per_s": sdpa_rate,
        "ham_profile": prof,
        "ratio_bounds": bounds,
    }
    suffix = ("" if args.block == "ham-nmf" else f"-{args.block}") + (
        "" if args.threads == 1 else f"-{args.threads}t"
    )
    path = write_result("hamburger_profile" + suffix, result, args.out)
    print(
        f"{args.block} vs SDPA at n = {args.side}², {args.threads} thread(s): fwd+bwd "
        f"{times['ham_fwd_bwd_ms']:.1f} ms vs {times['sdpa_fwd_bwd_ms']:.1f} ms, ratio "
        f"{times['ratio']:.3f}"
    )
    print(
        f"matrix products: {100 * prof['product_share']:.0f}% of the profiled step, "
        f"{prof['product_gmacs_per_step']:.2f} GMACs at {prof['product_gmac_per_s']:.1f} GMAC/s; "
        f"SDPA forward runs at {sdpa_rate:.1f} GMAC/s"
    )
    for key, row in list(prof["by_shape"].items())[:8]:
        print(
            f"  {key:70s} {row['ms_per_step']:6.2f} ms/step {row['gmac_per_s']:6.1f} GMAC/s "
            f"({row['calls_per_step']:.0f} calls)"
        )
    print(
        f"ratio if only the products cost: {bounds['products_only_at_their_rate']:.3f} at their "
        f"rate, {bounds['products_at_sdpa_forward_rate']:.3f} at SDPA's forward rate"
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
