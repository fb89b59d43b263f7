"""Hamburger (NMF / VQ / CD) vs self-attention blocks: MACs, time and peak memory against n.

Every block maps (B, C, H, W) → (B, C, H, W) with C = d channels:

* ``ham-nmf``, ``ham-vq``, ``ham-cd``: :class:`equilibria.layers.Hamburger` (rank r, K train steps,
  one-step gradient, training mode, float32 throughout);
* ``ham-nmf-bf16``: the same NMF block with ``iter_dtype=torch.bfloat16``: the K no-grad
  iterations multiply in bfloat16 (fp32 iterates, fp32 differentiated step and breads);
* ``nonlocal``: the classic embedded-Gaussian non-local block (Wang et al., CVPR 2018), θ/φ/g/W_z
  1×1 convolutions with C channels, the n×n map materialised, BatchNorm, residual;
* ``sdpa``: fused q/k/v projection, ``torch.nn.functional.scaled_dot_product_attention`` (its fused
  CPU kernel), output projection, residual; the head count is picked per n as the fastest of
  1, 2, 4, 8 (``--sdpa-heads``), i.e. the best configuration a user would choose.

Times are medians over interleaved repetitions (blocks alternate inside each repetition, so load
from other processes hits all of them alike); ratios are medians of the per-repetition ratios to
``sdpa``. Peak memory is measured in a fresh subprocess per (block, n): the peak resident set of
one forward+backward above what is resident before it (``/proc/self/clear_refs``), with glibc
told to mmap every allocation over 64 KiB so that freed memory leaves the resident set.

Usage::

    python benchmarks/hamburger.py                 # full sweep, writes results/hamburger.{json,png}
    python benchmarks/hamburger.py --quick         # small smoke run
    python benchmarks/hamburger.py --device cuda --sides 16 32 48 64 128
                                                   # on a GPU: writes results/hamburger-cuda.*

On a CUDA device every timing synchronises the device, SDPA picks its fused CUDA kernel, and peak
memory is the peak of ``torch.cuda.max_memory_allocated`` during one forward+backward above what
was allocated before it (in process; the CPU thread counts do not apply).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from equilibria.layers import Hamburger  # noqa: E402

BLOCKS = ("ham-nmf", "ham-nmf-bf16", "ham-vq", "ham-cd", "nonlocal", "sdpa")
HEAD_CHOICES = (1, 2, 4, 8)


# ---------------------------------------------------------------------------------------------
# Baseline blocks.


class NonLocal(nn.Module):
    """Embedded-Gaussian non-local block: z = x + BN(W_z · g(x) softmax(θ(x)ᵀφ(x))ᵀ)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.theta = nn.Conv2d(channels, channels, 1)
        self.phi = nn.Conv2d(channels, channels, 1)
        self.g = nn.Conv2d(channels, channels, 1)
        self.out = nn.Conv2d(channels, channels, 1, bias=False)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, p, v = self.theta(x).flatten(2), self.phi(x).flatten(2), self.g(x).flatten(2)
        attn = torch.softmax(t.mT @ p, dim=-1)  # (B, n, n)
        y = (v @ attn.mT).view_as(x)  # (B, C, H, W)
        return x + self.norm(self.out(y))


class SDPABlock(nn.Module):
    """x + W_o · SDPA(W_q x, W_k x, W_v x) with a fused q/k/v projection."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = x.flatten(2).mT  # (B, n, C)
        shape = (3, self.heads, channels // self.heads)
        q, k, v = self.qkv(tokens).unflatten(-1, shape).permute(2, 0, 3, 1, 4)  # (B, h, n, c)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # (B, n, C)
        return x + self.out(y).mT.reshape(batch, channels, height, width)


def make_block(name: str, channels: int, rank: int, steps: int, heads: int = 1) -> nn.Module:
    if name.startswith("ham-"):
        ham, _, low = name[4:].partition("-")
        iter_dtype = torch.bfloat16 if low == "bf16" else None
        return Hamburger(
            channels, ham=ham, dim=channels, rank=rank, train_steps=steps, iter_dtype=iter_dtype
        )
    if name == "nonlocal":
        return NonLocal(channels)
    if name == "sdpa":
        return SDPABlock(channels, heads)
    raise ValueError(f"unknown block {name!r}; allowed: {BLOCKS}")


# ---------------------------------------------------------------------------------------------
# Analytic multiply-accumulates of one forward pass (per sample).


def macs(name: str, n: int, c: int, d: int, r: int, k: int, *, fused: bool = True) -> int:
    """Forward MACs per sample. ``fused=False`` counts the Hamburger as the paper does (upper bread
    on the d×n reconstruction); ``fused=True`` counts this implementation (upper bread on the
    factors, BatchNorm folded, the first Xᵀ D shared by the initialisation and the first update).
    """
    if name in ("sdpa", "nonlocal"):
        return 4 * n * c * c + 2 * n * n * c  # q, k, v, out projections + QKᵀ + AV
    lower = n * c * d
    name = name.removesuffix("-bf16")
    if name == "ham-nmf":
        step = 2 * n * d * r + 2 * n * r * r + 2 * d * r * r  # XᵀD, XC, CᵀC, C·DᵀD, DᵀD, D·CᵀC
        final = n * d * r + n * r * r + d * r * r  # one more C update
        if not fused:
            return lower + n * d * r + k * step + final + n * d * r + n * d * c
        return lower + n * d * r + k * step - n * d * r + final + c * d * r + n * r * r + n * c * r
    step = 2 * n * d * r  # cos(X, D) and XC
    final = n * d * r + (d * r * r if name == "ham-cd" else 0)
    upper = n * d * r + n * d * c if not fused else c * d * r + n * r * r + n * c * r
    return lower + k * step + final + upper


# ---------------------------------------------------------------------------------------------
# Timing and memory.


def sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def fwd_bwd(block: nn.Module, x: torch.Tensor) -> None:
    block.zero_grad(set_to_none=True)
    x.grad = None
    block(x).sum().backward()


def forward(block: nn.Module, x: torch.Tensor) -> None:
    block(x)


def pick_heads(channels: int, x: torch.Tensor, reps: int) -> tuple[int, dict[int, float]]:
    """Fastest SDPA head count for forward+backward on x."""
    times = {}
    for heads in HEAD_CHOICES:
        block = SDPABlock(channels, heads).to(x.device)
        fwd_bwd(block, x)
        samples = []
        for _ in range(reps):
            sync(x)
            tic = time.perf_counter()
            fwd_bwd(block, x)
            sync(x)
            samples.append(time.perf_counter() - tic)
        times[heads] = statistics.median(samples)
    return min(times, key=times.get), times


def measure_time(blocks: dict[str, nn.Module], x: torch.Tensor, reps: int, warmup: int) -> dict:
    """Interleaved median times (ms) of forward and forward+backward, and ratios to sdpa."""
    samples: dict[str, dict[str, list[float]]] = {b: {"fwd": [], "fwd_bwd": []} for b in blocks}
    for rep in range(warmup + reps):
        for name, block in blocks.items():
            for kind, fn in (("fwd_bwd", fwd_bwd), ("fwd", forward)):
                sync(x)
                tic = time.perf_counter()
                fn(block, x)
                sync(x)
                if rep >= warmup:
                    samples[name][kind].append(1e3 * (time.perf_counter() - tic))
    out = {}
    for name, s in samples.items():
        out[name] = {
            "fwd_ms": statistics.median(s["fwd"]),
            "fwd_bwd_ms": statistics.median(s["fwd_bwd"]),
            "fwd_bwd_min_ms": min(s["fwd_bwd"]),
        }
        if "sdpa" in samples:
            for kind in ("fwd", "fwd_bwd"):
                ratios = [a / b for a, b in zip(s[kind], samples["sdpa"][kind])]
                out[name][f"{kind}_ratio"] = statistics.median(ratios)
    return out


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def memory_probe(args: argparse.Namespace) -> None:
    """Child process: peak resident memory (MiB) of one forward+backward, printed as JSON."""
    torch.set_num_threads(args.threads[0])
    torch.manual_seed(0)
    block = make_block(args.probe, args.dim, args.rank, args.steps, args.heads)
    x = torch.randn(args.batch, args.dim, args.side, args.side, requires_grad=True)
    fwd_bwd(block, x)  # warm-up: one-time allocations (thread pools, kernels) happen here
    block.zero_grad(set_to_none=True)
    x.grad = None
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    block(x).sum().backward()
    print(json.dumps({"peak_mib": (_status("VmHWM") - before) / 2**20}))


def cuda_memory(block: nn.Module, x: torch.Tensor) -> float:
    """Peak CUDA memory (MiB) of one forward+backward above what is allocated before it."""
    fwd_bwd(block, x)  # warm-up: workspaces and lazily built kernels
    block.zero_grad(set_to_none=True)
    x.grad = None
    sync(x)
    before = torch.cuda.memory_allocated(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    block(x).sum().backward()
    sync(x)
    return (torch.cuda.max_memory_allocated(x.device) - before) / 2**20


def measure_memory(
    name: str, side: int, heads: int, threads: int, args: argparse.Namespace
) -> float:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    cmd = [
        sys.executable, __file__, "--probe", name, "--side", str(side), "--heads", str(heads),
        "--dim", str(args.dim), "--rank", str(args.rank), "--steps", str(args.steps),
        "--batch", str(args.batch), "--threads", str(threads),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]


# ---------------------------------------------------------------------------------------------
# Sweep, report, plot.


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    panels = [(run, "fwd_bwd_ms") for run in runs] + [(runs[0], "peak_mib"), (runs[0], "gmacs")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5))
    for ax, (run, key) in zip(axes, panels):
        ns = [row["n"] for row in run["sweep"]]
        for name in BLOCKS:
            style = "-o" if name.startswith("ham") else "--s"
            ax.plot(ns, [row["blocks"][name][key] for row in run["sweep"]], style, label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("n = H·W")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(
            {
                "fwd_bwd_ms": f"fwd+bwd time, ms (median, {_label(run, long=True)})",
                "peak_mib": "peak memory of fwd+bwd, MiB",
                "gmacs": "forward GMACs (analytic)",
            }[key]
        )
    axes[0].legend(fontsize=8)
    cfg = results["config"]
    fig.suptitle(
        f"Hamburger vs attention blocks on {cfg.get('device', 'CPU')}: B={cfg['batch']}, "
        f"C=d={cfg['dim']}, r={cfg['rank']}, K={cfg['steps']}, float32, torch {cfg['torch']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def sweep(args: argparse.Namespace, threads: int) -> dict:
    """Times every block at every n with ``threads`` threads; memory is probed per (block, n)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    c, r, k = args.dim, args.rank, args.steps
    device = torch.device(args.device)
    run: dict = {"threads": threads, "load_avg_start": os.getloadavg(), "sweep": []}
    if device.type != "cpu":
        run["device"] = device.type
    for side in args.sides:
        n = side * side
        x = torch.randn(args.batch, c, side, side, device=device, requires_grad=True)
        if args.sdpa_heads == "auto":
            heads, head_times = pick_heads(c, x, reps=3)
        else:
            heads, head_times = int(args.sdpa_heads), {}
        blocks = {name: make_block(name, c, r, k, heads).to(device) for name in BLOCKS}
        timing = measure_time(blocks, x, args.reps, args.warmup)
        row = {"side": side, "n": n, "sdpa_heads": heads, "blocks": {}}
        row["sdpa_head_fwd_bwd_ms"] = {h: 1e3 * t for h, t in head_times.items()}
        for name in BLOCKS:
            row["blocks"][name] = {
                **timing[name],
                "gmacs": args.batch * macs(name, n, c, c, r, k) / 1e9,
                "peak_mib": (
                    cuda_memory(blocks[name], x)
                    if x.is_cuda
                    else measure_memory(name, side, heads, threads, args)
                ),
            }
        run["sweep"].append(row)
        print(f"\n{_label(run, long=True)}, n = {side}² = {n}, B={args.batch}, SDPA heads={heads}")
        print(f"{'block':13s} {'GMACs':>7s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} "
              f"{'x sdpa':>7s} {'peak MiB':>9s}")  # fmt: skip
        for name, m in row["blocks"].items():
            print(f"{name:13s} {m['gmacs']:7.3f} {m['fwd_ms']:9.2f} {m['fwd_bwd_ms']:11.2f} "
                  f"{m['fwd_bwd_ratio']:7.3f} {m['peak_mib']:9.1f}")  # fmt: skip
    # growth exponents k in cost ∝ n^k, over the whole sweep and between the two largest n
    last = run["sweep"][-1]
    for label, first in (
        ("growth_exponent", run["sweep"][0]),
        ("growth_exponent_top", run["sweep"][max(0, len(run["sweep"]) - 2)]),
    ):
        span = math.log(last["n"] / first["n"]) or 1.0
        run[label] = {
            name: {
                key: round(
                    math.log(last["blocks"][name][key] / first["blocks"][name][key]) / span, 3
                )
                for key in ("fwd_bwd_ms", "peak_mib", "gmacs")
            }
            for name in BLOCKS
        }
    run["load_avg_end"] = os.getloadavg()
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[16, 32, 48, 64])
    parser.add_argument("--dim", type=int, default=256, help="C = d")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6, help="K (training steps)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--sdpa-heads", default="auto", help="'auto' or a head count")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: cpu)")
    parser.add_argument("--quick", action="store_true", help="sides 16 32, 3 repetitions")
    parser.add_argument("--probe", choices=BLOCKS, help=argparse.SUPPRESS)
    parser.add_argument("--side", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--heads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        memory_probe(args)
        return 0
    if args.quick:
        args.sides, args.reps = [16, 32], 3
    device = torch.device(args.device)
    if device.type != "cpu":
        args.threads = [torch.get_num_threads()]  # one run: the host threads barely matter
    start = time.perf_counter()
    c, r, k = args.dim, args.rank, args.steps
    results: dict = {
        "command": "python benchmarks/hamburger.py " + " ".join(argv or sys.argv[1:]),
        "config": {
            "batch": args.batch,
            "dim": c,
            "rank": r,
            "steps": k,
            "threads": args.threads,
            "reps": args.reps,
            "dtype": "float32",
            "torch": torch.__version__,
            "cpu": _cpu_name(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        },
        "runs": [sweep(args, threads) for threads in args.threads],
    }
    results["paper_setting"] = {
        "setting": "1x512x128x128, r=64, K=6 (Geng et al. 2021, Table 2)",
        "attention_gmacs": macs("sdpa", 128 * 128, 512, 512, 64, 6) / 1e9,
        "ham_nmf_gmacs_paper_count": macs("ham-nmf", 128 * 128, 512, 512, 64, 6, fused=False) / 1e9,
        "ham_nmf_gmacs_this_implementation": macs("ham-nmf", 128 * 128, 512, 512, 64, 6) / 1e9,
    }
    results["config"]["elapsed_s"] = time.perf_counter() - start
    for run in results["runs"]:
        last = run["sweep"][-1]
        print(f"\n{_label(run, long=True)}, n={last['n']}: forward+backward / SDPA:")
        for name in ("ham-nmf", "ham-nmf-bf16", "ham-vq", "ham-cd", "nonlocal"):
            print(f"  {name:13s} {last['blocks'][name]['fwd_bwd_ratio']:.4f}")
        print("  growth exponents k, cost ∝ n^k (whole sweep / two largest n):")
        for name, g in run["growth_exponent"].items():
            top = run["growth_exponent_top"][name]
            print(f"    {name:13s} time {g['fwd_bwd_ms']:.2f} / {top['fwd_bwd_ms']:.2f}  "
                  f"memory {g['peak_mib']:.2f} / {top['peak_mib']:.2f}  "
                  f"MACs {g['gmacs']:.2f} / {top['gmacs']:.2f}")  # fmt: skip
    paper = results["paper_setting"]
    print(
        f"\npaper setting {paper['setting']}: attention {paper['attention_gmacs']:.1f} GMACs, "
        f"Ham-NMF {paper['ham_nmf_gmacs_paper_count']:.1f} GMACs (paper's count; "
        f"{paper['ham_nmf_gmacs_this_implementation']:.1f} as implemented here)"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "hamburger" if device.type == "cpu" else f"hamburger-{device.type}"
    json_path, png_path = args.out / f"{stem}.json", args.out / f"{stem}.png"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(results))
    plot(results, png_path)
    print("\n" + markdown(results))
    print(f"wrote {json_path} and {png_path} in {results['config']['elapsed_s']:.0f} s")
    return 0


def markdown(results: dict) -> str:
    """The README table: every block at the largest n, for every thread count."""
    cfg = results["config"]
    last_n = results["runs"][0]["sweep"][-1]["n"]
    side = results["runs"][0]["sweep"][-1]["side"]
    lines = [
        f"n = {side}² = {last_n}, B = {cfg['batch']}, C = d = {cfg['dim']}, r = {cfg['rank']}, "
        f"K = {cfg['steps']}, float32, {cfg.get('device', 'CPU')} ({cfg['cpu']}); times are "
        f"medians of {cfg['reps']} interleaved repetitions, ratios are medians of per-repetition "
        f"ratios to SDPA; k is the growth exponent between the two largest n "
        f"({_label(results['runs'][-1], long=True)}).",
        "",
        "| block | fwd GMACs | "
        + " | ".join(
            f"fwd ms ({t}) | fwd+bwd ms ({t}) | × SDPA ({t})"
            for t in (_label(run) for run in results["runs"])
        )
        + " | peak MiB | time ∝ n^k | memory ∝ n^k |",
        "|---|---|" + "---|---|---|" * len(results["runs"]) + "---|---|---|",
    ]
    for name in BLOCKS:
        cells = [name, f"{results['runs'][0]['sweep'][-1]['blocks'][name]['gmacs']:.2f}"]
        for run in results["runs"]:
            m = run["sweep"][-1]["blocks"][name]
            cells += [f"{m['fwd_ms']:.1f}", f"{m['fwd_bwd_ms']:.1f}", f"{m['fwd_bwd_ratio']:.3f}"]
        growth = results["runs"][-1]["growth_exponent_top"][name]
        m0 = results["runs"][0]["sweep"][-1]["blocks"][name]
        cells += [
            f"{m0['peak_mib']:.1f}",
            f"{growth['fwd_bwd_ms']:.2f}",
            f"{growth['peak_mib']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _label(run: dict, long: bool = False) -> str:
    """How a run is named in tables: its thread count on CPU, its device otherwise."""
    if "device" in run:
        return run["device"].upper()
    return f"{run['threads']} thread(s)" if long else f"{run['threads']}T"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
