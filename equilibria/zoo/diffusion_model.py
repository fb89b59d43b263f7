"""The diffusion recipe's data, ε-model and quality score.

Data: scikit-learn's 1797 digits (8×8, no download), the digits recipe's stratified split (1437
training, 360 test images, ``random_state=0``), scaled from [0, 16] to [-1, 1].

ε-model (:class:`EpsMLP`): an MLP on the 64 pixels with a sinusoidal time embedding (Ho et al.,
"Denoising Diffusion Probabilistic Models", NeurIPS 2020, use the same embedding in a U-Net): input
projection, ``depth`` pre-norm residual blocks each adding a projection of the time embedding,
output projection; 264,224 parameters at the defaults (width 160, depth 3, emb 64).

Quality score (:func:`frechet_distance` on :class:`FeatureNet` features): the Fréchet distance
between Gaussians fitted to the penultimate-layer features of a small digits classifier (Heusel et
al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", NeurIPS
2017, with Inception replaced by this classifier). The classifier is trained once,
deterministically (seed 0, full-batch Adam in float64, one thread), by :func:`feature_net`; its
weights are cached as ``fd_classifier.safetensors`` in the run folder so ``eval`` scores with the
very same features.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .digits_model import TEST_SIZE

__all__ = [
    "EpsMLP",
    "FeatureNet",
    "feature_net",
    "frechet_distance",
    "image_grid",
    "linear_alphas_cumprod",
    "load_digits01",
]

CLASSIFIER_FILE = "fd_classifier.safetensors"


@lru_cache(maxsize=1)
def _split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = data.images.astype(np.float64) / 8.0 - 1.0  # (1797, 8, 8) in [-1, 1]
    labels = data.target.astype(np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=TEST_SIZE, random_state=0, stratify=labels
    )
    return images[idx_train], labels[idx_train], images[idx_test], labels[idx_test]


def load_digits01(dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train images (1437, 1, 8, 8) in [-1, 1], labels, test images (360, 1, 8, 8), labels."""
    x_train, y_train, x_test, y_test = _split()

    def images(a: np.ndarray) -> Tensor:
        return torch.from_numpy(a).to(dtype).unsqueeze(1)

    return images(x_train), torch.from_numpy(y_train), images(x_test), torch.from_numpy(y_test)


def linear_alphas_cumprod(steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
    """ᾱ_t = Π_{s≤t} (1 - β_s) for DDPM's linear β schedule, float64 (``steps``,)."""
    betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of integer timesteps: (N,) -> (N, dim) (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10_000.0) * torch.arange(half, dtype=torch.float64, device=t.device) / half
    )
    angles = t.to(torch.float64)[:, None] * freqs[None]  # (N, half)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class _Block(nn.Module):
    """h + W₂ SiLU(W₁ LayerNorm(h) + E t_emb): a pre-norm residual MLP block with time input."""

    def __init__(self, width: int, emb: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.time = nn.Linear(emb, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        return h + self.fc2(F.silu(self.fc1(self.norm(h)) + self.time(emb)))


class EpsMLP(nn.Module):
    """ε_θ(x, t) for 8×8 images: ``model(x, t) -> eps`` with x (N, 1, 8, 8), t int64 (N,).

    Args:
        width: hidden width.
        depth: residual blocks.
        emb: time-embedding size.
    """

    def __init__(self, width: int = 160, depth: int = 3, emb: int = 64) -> None:
        super().__init__()
        for name, value in (("width", width), ("depth", depth), ("emb", emb)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EpsMLP: {name} must be a positive int, got {value!r}")
        if emb % 2:
            raise ValueError(f"EpsMLP: emb must be even (sin and cos halves), got {emb}")
        self.emb = emb
        self.time_mlp = nn.Sequential(nn.Linear(emb, width), nn.SiLU())
        self.inp = nn.Linear(64, width)
        self.blocks = nn.ModuleList(_Block(width, width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, 64)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        dtype = self.inp.weight.dtype
        emb = self.time_mlp(timestep_embedding(t, self.emb).to(dtype))  # (N, width)
        h = self.inp(x.reshape(x.shape[0], 64).to(dtype))  # (N, width)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.norm(h))).reshape(x.shape).to(x.dtype)


class FeatureNet(nn.Module):
    """The digits classifier whose 64-dim penultimate features define the Fréchet distance."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 64), nn.SiLU())
        self.head = nn.Linear(64, 10)

    def features(self, x: Tensor) -> Tensor:
        """(N, 1, 8, 8) images in [-1, 1] -> (N, 64) features."""
        return self.body(x.reshape(x.shape[0], 64).to(self.head.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _train_feature_net(steps: int = 400) -> FeatureNet:
    net = FeatureNet().double()
    net.load_state_dict(_feature_net_state(steps))
    return net.eval().requires_grad_(False)


@lru_cache(maxsize=1)
def _feature_net_state(steps: int) -> dict[str, Tensor]:
    """The trained classifier's weights (computed once per process; deterministic)."""
    x_train, y_train, _, _ = load_digits01(torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same numbers whatever the caller's thread count
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = FeatureNet().double()
            opt = torch.optim.Adam(net.parameters(), lr=1e-2)
            for _ in range(steps):
                opt.zero_grad()
                with torch.enable_grad():
                    F.cross_entropy(net(x_train), y_train).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def feature_net(run_dir: str | Path | None = None) -> FeatureNet:
    """The FD classifier: loaded from ``run_dir/fd_classifier.safetensors`` if present, else
    trained (deterministically) and saved there when ``run_dir`` is an existing folder."""
    from safetensors.torch import load_file, save_file

    path = Path(run_dir) / CLASSIFIER_FILE if run_dir else None
    if path is not None and path.is_file():
        net = FeatureNet().double()
        net.load_state_dict(load_file(str(path)))
        return net.eval().requires_grad_(False)
    net = _train_feature_net()
    if path is not None and path.parent.is_dir():
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
        tmp.replace(path)
    return net


def _gaussian(features: Tensor) -> tuple[Tensor, Tensor]:
    f = features.to(torch.float64)
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^{1/2}) of two feature sets (N, D), float64.

    Tr (Σ_a Σ_b)^{1/2} = Σ √λ_i(Σ_a^{1/2} Σ_b Σ_a^{1/2}) (symmetric PSD: eigh is stable).
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"features must be (N, D) with one D, got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    if min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(
            f"features need at least 2 rows each (a covariance), got {a.shape[0]} and {b.shape[0]}"
        )
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("features must be finite (a sample diverged?)")
    mu_a, cov_a = _gaussian(a)
    mu_b, cov_b = _gaussian(b)
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    middle = root_a @ cov_b @ root_a
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    value = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_root
    return float(value.clamp_min(0))


def image_grid(images: Tensor, path: Path, columns: int = 16) -> None:
    """Save images (N, 1, 8, 8) in [-1, 1] as one PNG grid (matplotlib, atomically)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .runs import write_bytes

    n = images.shape[0]
    rows = -(-n // columns)
    canvas = torch.full((rows * 9 + 1, columns * 9 + 1), -1.0, dtype=torch.float64)
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[1 + 9 * r : 9 + 9 * r, 1 + 9 * c : 9 + 9 * c] = images[i, 0].double().clamp(-1, 1)
    fig, ax = plt.subplots(figsize=(columns * 0.4, rows * 0.4))
    ax.imshow(canvas.numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    ax.axis("off")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    write_bytes(path, buf.getvalue())
