"""The non-local second stage of the denoisers (equilibria/zoo/denoise_nonlocal.py): the guided
NL-means against a direct implementation, its gradients, the wrapper, its tiling halo, the
loader's default and its validation record."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from equilibria.zoo.denoise import crop_center, psnr
from equilibria.zoo.denoise_data import add_noise, load_image
from equilibria.zoo.denoise_model import DEQDenoiser
from equilibria.zoo.denoise_nonlocal import SHIPPED_STAGE, NonLocalStage, guided_nl_means
from equilibria.zoo.denoise_sigma import noise_levels
from equilibria.zoo.denoise_tiling import tiled_apply
from equilibria.zoo.denoise_weights import DEFAULT_NONLOCAL_STAGE, load_shipped

ROOT = Path(__file__).resolve().parents[1]


def reference_nl_means(
    noisy: np.ndarray, guide: np.ndarray, h: float, s: int, k: int, mode: str = "reflect"
) -> np.ndarray:
    """Guided NL-means pixel by pixel, (C, H, W) float64: for each pixel, every offset of the
    search window; the patch distance is the mean over the patch pixels that lie inside the image
    (and over channels) of the squared difference between the guide around p and the reflected
    guide around q (``mode``: numpy's padding, "edge" for the replicated borders)."""
    c, height, width = noisy.shape
    pad = ((0, 0), (s, s), (s, s))
    guide_p = np.pad(guide, pad, mode=mode)
    noisy_p = np.pad(noisy, pad, mode=mode)
    out = np.zeros_like(noisy)
    r = k // 2
    for i in range(height):
        for j in range(width):
            num, den = np.zeros(c), 0.0
            for dy in range(-s, s + 1):
                for dx in range(-s, s + 1):
                    total, count = 0.0, 0
                    for u in range(-r, r + 1):
                        for v in range(-r, r + 1):
                            a, b = i + u, j + v
                            if not (0 <= a < height and 0 <= b < width):
                                continue
                            shifted = guide_p[:, a + dy + s, b + dx + s]
                            total += float(np.mean((guide[:, a, b] - shifted) ** 2))
                            count += 1
                    w = math.exp(-total / count / h**2)
                    num += w * noisy_p[:, i + dy + s, j + dx + s]
                    den += w
            out[:, i, j] = num / den
    return out


@pytest.mark.parametrize(("s", "k", "channels"), [(2, 3, 1), (1, 1, 1), (2, 3, 3), (3, 5, 1)])
def test_guided_nl_means_matches_the_direct_sum(s: int, k: int, channels: int) -> None:
    gen = torch.Generator().manual_seed(s + 10 * k + channels)
    noisy = torch.rand(1, channels, 7, 9, generator=gen, dtype=torch.float64)
    guide = torch.rand(1, channels, 7, 9, generator=gen, dtype=torch.float64)
    got = guided_nl_means(noisy, guide, 0.3, search=s, patch=k)[0].numpy()
    want = reference_nl_means(noisy[0].numpy(), guide[0].numpy(), 0.3, s, k)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_guided_nl_means_limits() -> None:
    gen = torch.Generator().manual_seed(0)
    noisy = torch.rand(2, 1, 12, 12, generator=gen, dtype=torch.float64)
    # a constant image stays constant; a flat guide gives the plain window mean
    flat = torch.full_like(noisy, 0.3)
    torch.testing.assert_close(guided_nl_means(flat, noisy, 0.1, search=2), flat)
    box = torch.nn.functional.avg_pool2d(
        torch.nn.functional.pad(noisy, (2, 2, 2, 2), mode="reflect"), 5, 1
    )
    torch.testing.assert_close(guided_nl_means(noisy, flat, 0.1, search=2), box)
    # a tiny h keeps only the pixel itself (every other patch of a random guide differs)
    torch.testing.assert_close(guided_nl_means(noisy, noisy, 1e-4, search=2), noisy)
    # search 0: the identity whatever h
    torch.testing.assert_close(guided_nl_means(noisy, flat, 5.0, search=0), noisy)


def test_guided_nl_means_per_image_h_and_small_images() -> None:
    gen = torch.Generator().manual_seed(1)
    noisy = torch.rand(2, 1, 10, 10, generator=gen)
    guide = torch.rand(2, 1, 10, 10, generator=gen)
    both = guided_nl_means(noisy, guide, torch.tensor([0.1, 0.4]), search=3)
    for i, h in enumerate((0.1, 0.4)):
        torch.testing.assert_close(
            both[i : i + 1], guided_nl_means(noisy[i : i + 1], guide[i : i + 1], h, search=3)
        )
    # an image no larger than the search radius: replicated borders, checked pixel by pixel
    tiny = torch.rand(1, 1, 2, 3, generator=gen, dtype=torch.float64)
    guide_t = torch.rand(1, 1, 2, 3, generator=gen, dtype=torch.float64)
    out = guided_nl_means(tiny, guide_t, 0.3, search=3)
    want = reference_nl_means(tiny[0].numpy(), guide_t[0].numpy(), 0.3, 3, 3, mode="edge")
    np.testing.assert_allclose(out[0].numpy(), want, rtol=1e-12, atol=1e-12)


def test_guided_nl_means_with_autograd_keeps_memory_bounded() -> None:
    """With autograd recording, rows of offsets are checkpointed: forward + backward through the
    stage costs a few times the no-grad forward, not the ~(2s + 1)² image buffers of the whole
    window's graph (about 1 GB for 256², s = 10, before), and gives the same gradients."""
    from equilibria.zoo.memory import PeakMemory

    gen = torch.Generator().manual_seed(7)
    noisy = torch.rand(1, 1, 96, 96, generator=gen)
    conv = nn.Conv2d(1, 1, 3, padding=1)
    with torch.no_grad(), PeakMemory("cpu") as plain:
        guided_nl_means(noisy, conv(noisy), 0.1, search=10)
    with PeakMemory("cpu") as recorded:
        guided_nl_means(noisy, conv(noisy), 0.1, search=10).square().mean().backward()
    assert recorded.peak_bytes < 8 * max(plain.peak_bytes, 1 << 20), (recorded, plain)
    grad = conv.weight.grad.clone()
    # the same gradient from a hand-rolled window without checkpointing (a small window)
    conv.zero_grad()
    small = torch.rand(1, 1, 12, 12, generator=gen, dtype=torch.float64)
    conv64 = conv.double()
    out = guided_nl_means(small, conv64(small), 0.2, search=2)
    (g_ckpt,) = torch.autograd.grad(out.sum(), conv64.weight)
    want = torch.from_numpy(
        reference_nl_means(small[0].numpy(), conv64(small)[0].detach().numpy(), 0.2, 2, 3)
    )
    torch.testing.assert_close(out[0].detach(), want)
    eps = 1e-6
    w0 = conv64.weight.detach().clone()
    numeric = torch.zeros_like(w0)
    for idx in np.ndindex(*w0.shape):
        for sign in (1, -1):
            with torch.no_grad():
                conv64.weight.copy_(w0)
                conv64.weight[idx] += sign * eps
                value = guided_nl_means(small, conv64(small), 0.2, search=2).sum()
            numeric[idx] += sign * value / (2 * eps)
    torch.testing.assert_close(g_ckpt, numeric, rtol=1e-5, atol=1e-7)
    assert bool(torch.isfinite(grad).all())


def test_guided_nl_means_accepts_numpy_numbers_and_half_precision() -> None:
    x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(
        guided_nl_means(x, x, np.float32(0.1), search=2), guided_nl_means(x, x, 0.1, search=2)
    )
    # small h in float16: computed in float32 (exp(−d / h²) would give 0 / 0 = nan)
    half = guided_nl_means(x.half(), x.half(), 2 / 255, search=2)
    assert half.dtype == torch.float16 and bool(torch.isfinite(half).all())


def test_guided_nl_means_gradcheck() -> None:
    gen = torch.Generator().manual_seed(2)
    noisy = torch.rand(1, 1, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    guide = torch.rand(1, 1, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    h = torch.tensor([0.4], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda y, g, hh: guided_nl_means(y, g, hh, search=2, patch=3), (noisy, guide, h)
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"h": 0.0}, "h must be"),
        ({"h": float("nan")}, "h must be"),
        ({"h": torch.tensor([0.1, -0.1])}, "h must be finite and > 0"),
        ({"h": torch.tensor([0.1, 0.2, 0.3])}, r"h must be a number or an \(2,\) tensor"),
        ({"search": -1}, "search must be an int ≥ 0"),
        ({"search": True}, "search must be"),
        ({"patch": 2}, "patch must be an odd int ≥ 1"),
        ({"patch": 0}, "patch must be"),
    ],
)
def test_guided_nl_means_rejects_bad_options(kwargs: dict, match: str) -> None:
    x = torch.rand(2, 1, 8, 8)
    args = {"h": 0.1, **kwargs}
    with pytest.raises(ValueError, match=match):
        guided_nl_means(x, x, args.pop("h"), **args)


def test_guided_nl_means_rejects_bad_images() -> None:
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match="guide must have noisy's shape"):
        guided_nl_means(x, torch.rand(1, 1, 8, 9), 0.1)
    with pytest.raises(ValueError, match=r"noisy must have shape \(N, C, H, W\)"):
        guided_nl_means(x[0], x[0], 0.1)
    with pytest.raises(TypeError, match="guide must be a floating-point tensor"):
        guided_nl_means(x, (x * 255).to(torch.uint8), 0.1)
    bad = x.clone()
    bad[0, 0, 1, 1] = float("inf")
    with pytest.raises(ValueError, match="noisy has non-finite values"):
        guided_nl_means(bad, x, 0.1)


class Smooth(nn.Module):
    """A stand-in pilot: a fixed 3 × 3 mean (receptive radius 1), known σ only."""

    channels = 1
    blind = False
    scale = 1
    receptive_field = 3

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, noisy: torch.Tensor, sigma: torch.Tensor, *, max_iter: int | None = None):
        self.seen.append(sigma)
        return torch.nn.functional.avg_pool2d(noisy, 3, 1, 1, count_include_pad=False)


def test_stage_output_is_the_blend_of_pilot_and_guided_average() -> None:
    gen = torch.Generator().manual_seed(3)
    noisy = torch.rand(2, 1, 20, 20, generator=gen)
    sigma = torch.tensor([0.1, 0.2])
    pilot = Smooth()
    stage = NonLocalStage(pilot, strength=0.2, blend=0.4, search=4, patch=3)
    first = pilot(noisy, sigma)
    nl = guided_nl_means(noisy, first, math.sqrt(0.2) * sigma, search=4, patch=3)
    torch.testing.assert_close(stage(noisy, sigma), 0.4 * first + 0.6 * nl)
    # blend 1: the pilot alone
    torch.testing.assert_close(NonLocalStage(pilot, blend=1.0)(noisy, sigma), first)
    assert stage.receptive_field == 3 + 2 * (4 + 1) and stage.tile_halo == 5
    assert stage.scale == 1 and stage.channels == 1 and stage.deq is None
    assert "strength=0.2, blend=0.4, search=4, patch=3" in repr(stage)


def test_blind_stage_estimates_sigma_once_and_gives_it_to_the_pilot() -> None:
    clean = crop_center(load_image("camera"), 64)[None]
    noisy = add_noise(clean, torch.tensor([20 / 255]), torch.Generator().manual_seed(4))
    pilot = Smooth()
    blind = NonLocalStage(pilot, blind=True)
    est = noise_levels(noisy, None, blind=True, hint="")
    out = blind(noisy, None)
    torch.testing.assert_close(pilot.seen[-1], est)
    torch.testing.assert_close(out, NonLocalStage(pilot)(noisy, est))
    with pytest.raises(ValueError, match="sigma is required"):
        NonLocalStage(pilot)(noisy, None)


def test_stage_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match=r"pilot must be a torch\.nn\.Module"):
        NonLocalStage(lambda x, s: x)  # type: ignore[arg-type]
    blind_pilot = Smooth()
    blind_pilot.blind = True  # type: ignore[misc]
    with pytest.raises(ValueError, match="pilot must be a known-σ model"):
        NonLocalStage(blind_pilot)
    for kwargs, match in (
        ({"strength": 0}, "strength must be a finite number > 0"),
        ({"blend": 1.5}, r"blend must be a number in \[0, 1\]"),
        ({"search": 2.0}, "search must be an int"),
        ({"patch": 4}, "patch must be an odd int"),
    ):
        with pytest.raises(ValueError, match=match):
            NonLocalStage(Smooth(), **kwargs)
    with pytest.raises(ValueError, match=r"noisy must have shape \(N, 1, H, W\)"):
        NonLocalStage(Smooth())(torch.rand(1, 3, 8, 8), torch.tensor([0.1]))


def test_tiling_with_the_halo_is_exact_for_a_local_pilot() -> None:
    """With a pilot of receptive radius ≤ the blending margin and a halo ≥ the stage's reach,
    the tiled stage equals the whole-image one to round-off; without the halo it does not."""
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(1, 1, 70, 90, generator=gen)
    sigma = torch.tensor([0.1])
    stage = NonLocalStage(Smooth(), search=5, patch=3)
    whole = stage(x, sigma)
    tiled = tiled_apply(lambda t: stage(t, sigma), x, tile=32, overlap=8, halo=stage.tile_halo)
    torch.testing.assert_close(tiled, whole, atol=1e-6, rtol=0)
    plain = tiled_apply(lambda t: stage(t, sigma), x, tile=32, overlap=8)
    assert float((plain - whole).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="halo must be an int ≥ 0"):
        tiled_apply(lambda t: t, x, tile=32, overlap=8, halo=-1)


def test_tiling_halo_keeps_tiles_aligned() -> None:
    """Every widened tile starts at an even row and column (align 2; the halo 3 is rounded up
    to 4), reaches at most 4 pixels beyond its tile, and only the tile's own pixels are kept."""
    height, width = 40, 46
    rows = torch.arange(height, dtype=torch.float64).view(1, 1, -1, 1).expand(1, 1, height, width)
    cols = torch.arange(width, dtype=torch.float64).view(1, 1, 1, -1).expand(1, 1, height, width)
    x = torch.cat([rows, cols], dim=1)  # each pixel carries its own coordinates
    seen = []

    def fn(t: torch.Tensor) -> torch.Tensor:
        seen.append((int(t[0, 0, 0, 0]), int(t[0, 1, 0, 0]), *t.shape[2:]))
        return t

    out = tiled_apply(fn, x, tile=16, overlap=4, align=2, halo=3)
    torch.testing.assert_close(out, x)
    assert seen and all(top % 2 == 0 and left % 2 == 0 for top, left, _, _ in seen), seen
    assert max(h for _, _, h, _ in seen) == 16 + 2 * 4
    assert any(top > 0 and h == 16 + 2 * 4 for top, _, h, _ in seen)  # an inner tile, widened


# ----------------------------------------------------------------------------------------------
# the shipped default and its validation record


def test_the_shipped_stage_is_the_validation_choice_and_the_default() -> None:
    record = json.loads((ROOT / "benchmarks/results/denoise_nonlocal_validation.json").read_text())
    assert record["chosen"] == SHIPPED_STAGE
    best = max(record["grid"], key=lambda r: r["overall"])
    assert best["setting"] == SHIPPED_STAGE
    axes = record["grid_axes"]
    assert len(record["grid"]) == math.prod(len(v) for v in axes.values())
    gray_pass = all(best["mean_psnr"][s] > record["deq_alone"][s] for s in ("15", "25", "50"))
    color = record["color"]
    color_pass = all(
        color["opponent_with_stage"][s] > color["opponent_alone"][s] for s in ("15", "25", "50")
    )
    assert record["rule"] == {"gray_default": gray_pass, "color_default": color_pass}
    assert DEFAULT_NONLOCAL_STAGE == (gray_pass and color_pass)


@torch.no_grad()
def test_load_shipped_wraps_the_network_in_the_stage_by_default() -> None:
    staged = load_shipped(False)
    assert isinstance(staged, NonLocalStage) and isinstance(staged.pilot, DEQDenoiser)
    assert staged.deq is staged.pilot.deq and staged.scale == 2
    assert {k: getattr(staged, k) for k in SHIPPED_STAGE} == SHIPPED_STAGE
    alone = load_shipped(False, nonlocal_stage=False)
    assert isinstance(alone, DEQDenoiser)
    blind = load_shipped(False, blind=True)
    assert blind.blind and not blind.pilot.blind
    assert load_shipped(True, color_model="opponent").gray.tile_halo == staged.tile_halo
    assert isinstance(load_shipped(True, color_model="rgb").pilot, DEQDenoiser)
    with pytest.raises(TypeError, match="nonlocal_stage must be a bool or None"):
        load_shipped(False, nonlocal_stage="yes")  # type: ignore[arg-type]
    # on a held-out crop the stage improves on the network alone (+0.13 dB on this 96² crop;
    # +0.11 / +0.22 / +0.74 dB at σ 15 / 25 / 50 on the 256² crops of denoise.json)
    clean = crop_center(load_image("camera"), 96)[None]
    noisy = add_noise(clean, torch.tensor([25 / 255]), torch.Generator().manual_seed(6))
    sigma = torch.tensor([25 / 255])
    gain = float(psnr(staged(noisy, sigma), clean) - psnr(alone(noisy, sigma), clean))
    assert gain > 0.05, gain


def test_the_docs_stage_section_is_the_json_records() -> None:
    """The validation table of "The non-local second stage" (docs/recipes/denoise.md) against
    ``denoise_nonlocal_validation.json``, and the test-image gains it quotes against
    ``denoise.json``."""
    text = (ROOT / "docs" / "recipes" / "denoise.md").read_text()
    flat = " ".join(text.split())
    record = json.loads((ROOT / "benchmarks/results/denoise_nonlocal_validation.json").read_text())
    sigmas = ("15", "25", "50")

    def cells(row: dict) -> list[str]:
        return [f"{row[s]:.2f}" for s in sigmas]

    start = text.index("| validation, mean PSNR (dB) |")
    lines = text[start:].split("\n\n")[0].splitlines()[2:]
    rows = [[c.strip() for c in line.strip("|").split("|")][1:] for line in lines]
    rec = record["record"]
    expected = [
        record["deq_alone"], record["chosen_mean_psnr"], rec["iterated"]["2"],
        rec["iterated"]["4"], rec["cnn"]["alone"], rec["cnn"]["with_stage"],
        record["color"]["opponent_alone"], record["color"]["opponent_with_stage"],
    ]  # fmt: skip
    assert rows == [cells(r) for r in expected]
    # iterating the stage lost at every σ, as the module docstring and the page say
    assert all(rec["iterated"]["2"][s] < rec["iterated"]["1"][s] for s in sigmas)
    result = json.loads((ROOT / "benchmarks/results/denoise.json").read_text())
    gray, color = result["gray"], result["color"]

    def gain(rows: dict, a: str, b: str, image: str = "mean") -> str:
        return " / ".join(
            _signed(rows[a][s][image]["psnr"] - rows[b][s][image]["psnr"]) for s in sigmas
        )

    # the DEQ the stage was chosen after (now the 300 s row)
    assert f"with the 300 s DEQ {gain(gray, 'deq_300s_nl', 'deq_300s')} dB" in flat
    assert f"(`camera` {gain(gray, 'deq_300s_nl', 'deq_300s', 'camera')}: it lost" in flat
    # the shipped (Jacobian-penalised) DEQ, its baselines and the opponent colour model
    assert f"the shipped DEQ by {gain(gray, 'deq_nl', 'deq')} dB" in flat
    for image in ("camera", "coins", "moon"):
        assert f"`{image}` {gain(gray, 'deq_nl', 'deq', image)}" in flat, image
    assert f"the CNN of its set by {gain(gray, 'cnn_nl', 'cnn')}" in flat
    assert f"its unrolled net by {gain(gray, 'unrolled_nl', 'unrolled')}" in flat
    assert f"colour model by {gain(color, 'deq_opponent_nl', 'deq_opponent')}" in flat


def _signed(x: float) -> str:
    return f"{'+' if x >= 0 else '−'}{abs(x):.2f}"


def test_the_shipped_only_check_refuses_to_overwrite_the_grid_record(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``denoise_nonlocal_validation.py --shipped-only`` (one setting, the check of a new model)
    without its own ``--out`` would have overwritten the 48-setting grid's record, which
    ``SHIPPED_STAGE`` is tested against: it is refused before any model is loaded."""
    import importlib.util

    bench = ROOT / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))  # its ``from common import write_result``
    spec = importlib.util.spec_from_file_location(
        "nl_validation", bench / "denoise_nonlocal_validation.py"
    )
    script = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(script)  # type: ignore[union-attr]
    with pytest.raises(SystemExit):
        script.main(["--gray-run", "/nonexistent", "--shipped-only"])
    assert "--shipped-only needs its own --out" in capsys.readouterr().err
