"""Colour denoising with a grey model in an orthonormal opponent colour space
(equilibria/zoo/denoise_color.py), its loader option and its validation record."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data as skimage_data
from torch import nn

from equilibria.zoo import denoise_color
from equilibria.zoo.denoise import DenoiseConfig, psnr
from equilibria.zoo.denoise_color import (
    OPPONENT,
    OPPONENT_RANGE,
    OpponentColorDenoiser,
    from_opponent,
    to_opponent,
)
from equilibria.zoo.denoise_model import MIN_BLIND_SIGMA_255, build_model
from equilibria.zoo.denoise_sigma import estimate_sigma
from equilibria.zoo.denoise_weights import (
    DEFAULT_COLOR_MODEL,
    ShippedWeightsError,
    load_shipped,
    shipped_paths,
)

ROOT = Path(__file__).resolve().parents[1]


class Identity(nn.Module):
    """A grey "denoiser" that returns its input and records the levels it was given."""

    channels = 1

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[tuple[int, ...], torch.Tensor, int | None]] = []

    def forward(self, noisy: torch.Tensor, sigma: torch.Tensor, *, max_iter: int | None = None):
        self.calls.append((tuple(noisy.shape), sigma.clone(), max_iter))
        return noisy.clone()


def _matrix() -> torch.Tensor:
    return torch.tensor(OPPONENT, dtype=torch.float64)


def _span() -> torch.Tensor:
    return torch.tensor([hi - lo for lo, hi in OPPONENT_RANGE], dtype=torch.float64)


def test_the_transform_is_orthonormal_and_inverted_to_round_off() -> None:
    a = _matrix()
    assert torch.allclose(a @ a.T, torch.eye(3, dtype=torch.float64), atol=1e-15, rtol=0)
    assert torch.allclose(a.T @ a, torch.eye(3, dtype=torch.float64), atol=1e-15, rtol=0)
    gen = torch.Generator().manual_seed(0)
    # noisy images leave [0, 1]: the inverse must hold there too
    x = torch.rand(2, 3, 17, 9, generator=gen, dtype=torch.float64) * 1.6 - 0.3
    opp = to_opponent(x)
    assert opp.dtype == torch.float64
    assert torch.allclose(from_opponent(opp), x, atol=1e-15, rtol=0)
    assert torch.allclose(to_opponent(from_opponent(opp)), opp, atol=1e-15, rtol=0)


def test_the_affine_maps_take_the_rgb_cube_onto_the_unit_cube() -> None:
    corners = torch.tensor(
        [[r, g, b] for r in (0.0, 1.0) for g in (0.0, 1.0) for b in (0.0, 1.0)],
        dtype=torch.float64,
    ).view(8, 3, 1, 1)
    opp = to_opponent(corners).view(8, 3)
    assert torch.allclose(opp.min(0).values, torch.zeros(3, dtype=torch.float64), atol=1e-15)
    assert torch.allclose(opp.max(0).values, torch.ones(3, dtype=torch.float64), atol=1e-15)
    # grey (r = g = b) has no colour: both chrominance channels at the middle, 1/2
    grey = to_opponent(torch.full((1, 3, 1, 1), 0.3, dtype=torch.float64)).flatten()
    assert grey.tolist() == pytest.approx([0.3, 0.5, 0.5], abs=1e-15)


def test_white_noise_stays_white_with_the_same_sigma() -> None:
    """i.i.d. N(0, σ²) noise on R, G, B is i.i.d. N(0, σ²) on the (unmapped) opponent channels,
    hence σ / (hi − lo) on the mapped ones, the levels the grey model is given. Empirical check
    on M = 3 · 10⁵ pixels: the standard error of a sample variance is σ² √(2 / M) (0.26 % of
    σ²) and of a sample correlation 1 / √M (0.0018); the tolerances are 4 standard errors
    (1.05 % and 0.0073), and a non-orthonormal map fails them (below)."""
    sigma, m = 0.1, 300_000
    gen = torch.Generator().manual_seed(1)
    clean = torch.rand(1, 3, 1, m, generator=gen, dtype=torch.float64)
    noise = sigma * torch.randn(1, 3, 1, m, generator=gen, dtype=torch.float64)
    mapped = to_opponent(clean + noise) - to_opponent(clean)  # the noise, mapped channels
    levels = (mapped[0, :, 0] * _span()[:, None]).numpy()  # unmapped opponent noise
    cov = np.cov(levels)
    se_var, se_corr = math.sqrt(2 / m), 1 / math.sqrt(m)
    assert np.allclose(np.diag(cov) / sigma**2, 1, atol=4 * se_var, rtol=0)
    corr = np.corrcoef(levels)
    assert np.abs(corr - np.eye(3)).max() < 4 * se_corr
    std = mapped[0, :, 0].std(dim=1).numpy()
    assert np.allclose(std, sigma / _span().numpy(), rtol=4 * se_var / 2, atol=0)
    # neighbouring pixels stay independent (the transform is per pixel)
    lag = np.corrcoef(levels[0, :-1], levels[0, 1:])[0, 1]
    assert abs(lag) < 4 * se_corr
    # the check has teeth: YCbCr-like rows that are not orthonormal correlate the noise
    ycc = torch.tensor([[0.299, 0.587, 0.114], [-0.169, -0.331, 0.5], [0.5, -0.419, -0.081]])
    bad = torch.einsum("ij,njhw->nihw", ycc.double(), noise)[0, :, 0].numpy()
    assert np.abs(np.corrcoef(bad) - np.eye(3)).max() > 10 * se_corr


def test_an_identity_grey_model_gives_the_input_back() -> None:
    gray = Identity()
    model = OpponentColorDenoiser(gray)
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 12, 10, generator=gen, dtype=torch.float64) * 1.2 - 0.1
    sigma = torch.tensor([15 / 255, 50 / 255], dtype=torch.float64)
    out = model(x, sigma, max_iter=5)
    assert out.dtype == torch.float64
    assert torch.allclose(out, x, atol=1e-15, rtol=0)
    (shape, levels, max_iter), = gray.calls  # fmt: skip
    assert shape == (6, 1, 12, 10) and max_iter == 5  # one batch of 3N grey images
    # image i's channels at 3i, 3i + 1, 3i + 2, each at σ_i / (hi − lo)
    expected = (sigma[:, None] / _span()[None, :]).reshape(6)
    assert torch.allclose(levels, expected, atol=0, rtol=1e-15)


def test_the_batch_layout_matches_one_call_per_channel() -> None:
    """A real grey network (a tiny CNN: no solver coupling the batch) on the batch of 3N equals
    the same network on each opponent channel of each image alone, at that image's σ."""
    torch.manual_seed(0)
    gray = build_model(
        DenoiseConfig(model="cnn", scale=1, width=4, full_res_width=0, jac_reg=0.0)
    ).eval()
    model = OpponentColorDenoiser(gray).eval()
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 16, 16, generator=gen)
    sigma = torch.tensor([20 / 255, 40 / 255])
    with torch.no_grad():
        out = model(x, sigma)
        opp = to_opponent(x)
        span = _span().float()
        parts = torch.stack(
            [
                torch.cat([gray(opp[i : i + 1, c : c + 1], sigma[i : i + 1] / span[c])
                           for c in range(3)], dim=1)[0]
                for i in range(2)
            ]
        )  # fmt: skip
    assert torch.allclose(out, from_opponent(parts), atol=1e-6, rtol=0)


def test_blind_estimates_sigma_once_on_the_rgb_image() -> None:
    gray = Identity()
    model = OpponentColorDenoiser(gray, blind=True)
    rng = np.random.default_rng(4)
    clean = skimage_data.astronaut()[100:164, 200:264] / 255.0
    noisy = clean + 20 / 255 * rng.standard_normal(clean.shape)
    x = torch.from_numpy(noisy).permute(2, 0, 1)[None]
    model(x)
    est = estimate_sigma(noisy)  # the mean of the three channels' estimates
    assert abs(est * 255 / 20 - 1) < 0.2
    assert torch.allclose(gray.calls[0][1], est / _span(), rtol=1e-12, atol=0)
    # a noiseless flat image is raised to the least level, as the colour models do
    model(torch.full((1, 3, 16, 16), 0.4, dtype=torch.float64))
    floor = MIN_BLIND_SIGMA_255 / 255
    assert torch.allclose(gray.calls[1][1], floor / _span(), rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("make", "call", "error", "match"),
    [
        (lambda: OpponentColorDenoiser("grey"), None, TypeError, "gray must be a torch.nn.Module"),
        (lambda: OpponentColorDenoiser(build_model(DenoiseConfig(color=True, width=2))), None,
         ValueError, "gray must be a one-channel .* got channels=3"),
        (lambda: OpponentColorDenoiser(_blind_gray()), None, ValueError, "gray must be a known-σ"),
        (None, lambda m: m([[0.5]], torch.ones(1)), TypeError, "noisy must be a tensor, got list"),
        (None, lambda m: m(torch.rand(1, 1, 8, 8), torch.ones(1)), ValueError,
         r"noisy must have shape \(N, 3, H, W\), got \(1, 1, 8, 8\)"),
        (None, lambda m: m(torch.full((1, 3, 8, 8), math.nan), torch.ones(1)), ValueError,
         "noisy has non-finite values"),
        (None, lambda m: m(torch.zeros(1, 3, 8, 8, dtype=torch.int64), torch.ones(1)), TypeError,
         "noisy must be a floating-point tensor, got torch.int64"),
        (None, lambda m: m(torch.rand(1, 3, 8, 8), None), ValueError, "sigma is required"),
        (None, lambda m: m(torch.rand(2, 3, 8, 8), torch.ones(1)), ValueError,
         r"sigma must have shape \(2,\) \(one level per image\), got \(1,\)"),
        (None, lambda m: m(torch.rand(1, 3, 8, 8), torch.zeros(1)), ValueError,
         r"sigma must be finite and > 0"),
        (None, lambda m: m(torch.rand(1, 3, 8, 8), torch.tensor([math.inf])), ValueError,
         r"sigma must be finite and > 0"),
        (None, lambda m: m(torch.rand(1, 3, 8, 8), 0.1), TypeError, "sigma must be a tensor"),
        (lambda: OpponentColorDenoiser(Identity(), blind=True),
         lambda m: m(torch.rand(1, 3, 8, 8), torch.ones(1)), ValueError,
         "sigma must be None for a blind model"),
        (None, lambda m: to_opponent(torch.rand(3, 8, 8)), ValueError,
         r"rgb must have shape \(N, 3, H, W\), got \(3, 8, 8\)"),
        (None, lambda m: from_opponent(torch.rand(1, 4, 8, 8)), ValueError,
         r"opp must have shape \(N, 3, H, W\), got \(1, 4, 8, 8\)"),
    ],
)  # fmt: skip
def test_bad_inputs_name_the_argument(make, call, error, match) -> None:
    with pytest.raises(error, match=match):
        model = make() if make is not None else OpponentColorDenoiser(Identity())
        if call is not None:
            call(model)


def test_a_dtype_other_than_the_grey_models_is_refused_by_name() -> None:
    """float64 images (e.g. skimage's img_as_float) into the float32 shipped grey model: a
    TypeError naming both dtypes and the fix (was: torch's 'Input type (double) and bias type
    (float) should be the same' from inside a convolution); the model in float64 takes them."""
    gray = build_model(DenoiseConfig(width=2, scale=2)).eval()
    model = OpponentColorDenoiser(gray).eval()
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([25 / 255])
    with pytest.raises(TypeError, match=r"noisy has dtype torch.float64 and the grey model's "):
        model(x, sigma)
    with torch.no_grad():
        out = model.double()(x, sigma)
    assert out.dtype == torch.float64 and out.shape == x.shape


def _blind_gray() -> nn.Module:
    gray = Identity()
    gray.blind = True
    return gray


def test_load_shipped_offers_both_colour_models() -> None:
    rgb = load_shipped(color=True, color_model="rgb")
    opponent = load_shipped(color=True, color_model="opponent")
    gray = load_shipped(color=False)
    assert isinstance(opponent, OpponentColorDenoiser) and not isinstance(
        rgb, OpponentColorDenoiser
    )
    assert not opponent.training and opponent.channels == rgb.channels == 3
    assert opponent.scale == gray.scale == 2 and opponent.deq is opponent.gray.deq
    assert opponent.receptive_field == gray.receptive_field
    for a, b in zip(opponent.gray.state_dict().values(), gray.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    blind = load_shipped(color=True, blind=True, color_model="opponent")
    assert blind.blind and not blind.gray.blind
    default = load_shipped(color=True)
    assert isinstance(default, OpponentColorDenoiser) == (DEFAULT_COLOR_MODEL == "opponent")
    assert load_shipped(color=False, color_model="opponent").channels == 1  # grey: ignored
    with pytest.raises(ValueError, match="color_model must be one of 'opponent', 'rgb', got 'yuv'"):
        load_shipped(color=True, color_model="yuv")


def test_the_opponent_model_checks_the_grey_weights(tmp_path: Path) -> None:
    weights, config = shipped_paths(False)
    bad = tmp_path / weights.name
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    bad.write_bytes(bytes(data))
    with pytest.raises(ShippedWeightsError, match="SHA-256"):
        load_shipped(color=True, color_model="opponent", weights=bad, config=config)
    color_weights, color_config = shipped_paths(True)
    with pytest.raises(ShippedWeightsError, match="color=True"):  # the colour DEQ's files
        load_shipped(color=True, color_model="opponent", weights=color_weights, config=color_config)


def test_the_colour_deq_still_checks_its_own_weights(tmp_path: Path) -> None:
    """``color_model="rgb"`` loads and hash-checks the colour DEQ's files (since the default
    became the opponent model, ``load_shipped(True)`` in tests/test_zoo_denoise.py checks the
    grey files), and refuses the grey model's files."""
    weights, config = shipped_paths(True)
    model = load_shipped(True, color_model="rgb")
    assert not isinstance(model, OpponentColorDenoiser) and model.channels == 3
    bad = tmp_path / weights.name
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    bad.write_bytes(bytes(data))
    with pytest.raises(ShippedWeightsError, match="SHA-256"):
        load_shipped(True, color_model="rgb", weights=bad, config=config)
    gray_weights, gray_config = shipped_paths(False)
    with pytest.raises(ShippedWeightsError, match="color=False"):
        load_shipped(True, color_model="rgb", weights=gray_weights, config=gray_config)


def test_the_shipped_grey_model_denoises_a_colour_photograph() -> None:
    """The opponent model on a 64² crop of ``astronaut`` (a test image: this checks that it runs
    and denoises, no number from it is reported): +5 dB over the noisy input, and the solver
    statistics are those of the three channels' joint solve."""
    model = load_shipped(color=True, color_model="opponent")
    clean = torch.from_numpy(skimage_data.astronaut()[200:264, 180:244] / 255.0)
    clean = clean.permute(2, 0, 1)[None].float()
    gen = torch.Generator().manual_seed(5)
    sigma = torch.tensor([25 / 255])
    noisy = clean + sigma * torch.randn(clean.shape, generator=gen)
    with torch.no_grad():
        out = model(noisy, sigma)
    sol = model.deq.last_solution
    assert sol.residual.shape == (3,) and bool(sol.converged.all())
    assert float(psnr(out, clean)) > float(psnr(noisy, clean)) + 5


def _load_script(name: str):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_the_rule_decides_on_every_sigma(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = _load_script("denoise_color_validation")
    means = {"color_deq": {"15": 30.0, "25": 28.0, "50": 25.0}}
    ahead = {**means, "gray_opponent": {"15": 30.5, "25": 28.0, "50": 25.1}}
    assert bench.rule(ahead)["default_color_model"] == "opponent"
    behind = {**means, "gray_opponent": {"15": 31.0, "25": 29.0, "50": 24.99}}
    out = bench.rule(behind)
    assert out["default_color_model"] == "rgb" and not out["passed"]
    assert out["margin_db"]["50"] == pytest.approx(-0.01)


def test_the_validation_script_runs_and_records_its_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """benchmarks/denoise_color_validation.py on two tiny untrained models and 24² crops (the
    loading and the images replaced): every method, σ and image has a PSNR, the colour DEQ's
    equals the training script's own validate() on the same model, and the command is kept."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = _load_script("denoise_color_validation")
    train = _load_script("train_shipped_denoiser")
    torch.manual_seed(0)
    tiny = {"width": 2, "eval_max_iter": 2, "validation": True}
    models = {c: build_model(DenoiseConfig(color=c, **tiny)) for c in (False, True)}
    tasks = {c: type("T", (), {"config": DenoiseConfig(color=c, **tiny)})() for c in (False, True)}
    runs = {False: tmp_path / "g", True: tmp_path / "c"}
    for run in runs.values():
        run.mkdir()
        (run / "checkpoint.safetensors").write_bytes(b"x")

    def load(cls, run):  # type: ignore[no-untyped-def]
        color = run == runs[True]
        return models[color], tasks[color]

    monkeypatch.setattr(bench, "load_model", load)
    from equilibria.zoo import denoise as denoise_module

    # both scripts draw their images through equilibria.zoo.denoise.validation_pairs
    small = {name: im[:, :24, :24] for name, im in bench.validation_images(True).items()}
    monkeypatch.setattr(denoise_module, "validation_images", lambda color: small)
    written = {}
    monkeypatch.setattr(bench, "write_result", lambda name, r: written.setdefault(name, r))
    argv = ["--gray-run", str(runs[False]), "--color-run", str(runs[True]), "--out", "t"]
    bench.main(argv)
    result = written["t"]
    assert result["command"] == "python benchmarks/denoise_color_validation.py " + " ".join(argv)
    for method in bench.METHODS:
        for sigma in ("15", "25", "50"):
            cells = result["psnr"][method][sigma]
            assert set(cells) == {"coffee", "rocket", "mean"}
            assert all(math.isfinite(v) for v in cells.values())
    own = train.validate(models[True], True)
    assert result["mean_psnr"]["color_deq"] == pytest.approx(own, abs=1e-5)
    assert result["rule"] == bench.rule(result["mean_psnr"])


def test_the_default_colour_model_is_the_rules_outcome() -> None:
    """The committed validation record decides the default (docs/recipes/denoise.md, "Colour"):
    its rule is recomputed from its mean PSNRs, and the loader's and the command's defaults are
    the outcome."""
    import argparse
    import sys

    from equilibria.zoo.denoise_cli import add_denoise_parser

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        bench = _load_script("denoise_color_validation")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    record = json.loads((ROOT / "benchmarks/results/denoise_color_validation.json").read_text())
    assert record["command"].startswith("python benchmarks/denoise_color_validation.py ")
    means = record["mean_psnr"]
    for method, per_sigma in record["psnr"].items():
        for sigma, cells in per_sigma.items():
            assert means[method][sigma] == pytest.approx((cells["coffee"] + cells["rocket"]) / 2)
    outcome = bench.rule(means)
    assert record["rule"] == outcome
    assert DEFAULT_COLOR_MODEL == outcome["default_color_model"]
    parser = argparse.ArgumentParser()
    add_denoise_parser(parser.add_subparsers())
    args = parser.parse_args(["denoise", "in.png", "-o", "out.png"])
    assert args.color_model == outcome["default_color_model"]
    # the two runs are the shipped designs at the same budget, as the rule fixed
    for kind, flag in (("gray", ""), ("color", " --color")):
        command = record["training"][kind]["command"]
        assert command.startswith(f"python benchmarks/train_shipped_denoiser.py --validation{flag}")
        assert "--budget-cpu-s 300 --models deq" in command and "--options" not in command


def test_module_docstring_cites_cbm3d() -> None:
    doc = denoise_color.__doc__ or ""
    assert "Dabov, Foi, Katkovnik & Egiazarian" in doc and "ICIP 2007" in doc


def _table(text: str, header: str) -> list[list[str]]:
    start = text.index(header)
    lines = text[start:].split("\n\n")[0].splitlines()[2:]
    return [[c.strip().replace("**", "") for c in line.strip("|").split("|")] for line in lines]


def test_the_docs_colour_tables_are_the_json_records() -> None:
    """The colour tables of docs/recipes/denoise.md, cell by cell: the held-out table against
    ``denoise.json`` (PSNR / SSIM means, median CPU s of the six runs) and the validation table
    against ``denoise_color_validation.json`` (steps, CPU s, mean PSNR); the margins the text
    quotes too."""
    text = (ROOT / "docs" / "recipes" / "denoise.md").read_text()
    sigmas = ("15", "25", "50")
    color = json.loads((ROOT / "benchmarks/results/denoise.json").read_text())["color"]
    rows = _table(text, "| colour method |")
    keys = ["deq_opponent_nl", "deq_opponent", "deq", "nlmeans", "tv", "wavelet", "bm3d"]
    assert len(rows) == len(keys), rows
    for key, cells in zip(keys, rows, strict=True):
        mean = [color[key][s]["mean"] for s in sigmas]
        assert cells[1:4] == [f"{m['psnr']:.2f} / {m['ssim']:.3f}" for m in mean], key
        cpu = sorted(color[key][s][im]["cpu_s"] for s in sigmas for im in ("astronaut", "chelsea"))
        assert cells[4] == f"{(cpu[2] + cpu[3]) / 2:.2f}", key

    def gaps(a: str, b: str) -> str:
        return " / ".join(
            f"{color[a][s]['mean']['psnr'] - color[b][s]['mean']['psnr']:+.2f}".replace("-", "−")
            for s in sigmas
        )

    flat = " ".join(text.split())
    assert f"grey DEQ it is {gaps('deq_opponent', 'deq')} dB above the colour DEQ" in flat
    assert f"{gaps('deq_opponent', 'nlmeans')} above NL-means, above TV and wavelet" in flat
    below = gaps("bm3d", "deq_opponent").replace("+", "")
    assert f"{below} dB below BM3D" in flat
    # the non-local stage on each channel lowers the opponent model at σ 15 and 25 here
    stage = gaps("deq_opponent_nl", "deq_opponent")
    assert f"test images at σ 15 and 25 ({stage} dB)" in flat
    assert all(
        color["deq_opponent_nl"][s]["mean"]["psnr"] < color["deq_opponent"][s]["mean"]["psnr"]
        for s in ("15", "25")
    )
    record = json.loads((ROOT / "benchmarks/results/denoise_color_validation.json").read_text())
    means, train = record["mean_psnr"], record["training"]
    rows = _table(text, "| colour validation (`coffee`, `rocket`), mean PSNR |")
    keys = [("color_deq", "color"), ("gray_opponent", "gray"), ("gray_per_channel", "gray"),
            ("nlmeans", None)]  # fmt: skip
    assert len(rows) == len(keys), rows
    for (key, run), cells in zip(keys, rows, strict=True):
        if run is None:
            assert cells[1:3] == ["–", "–"]
        else:
            assert cells[1:3] == [str(train[run]["steps"]), f"{train[run]['train_cpu_s']:.0f}"]
        assert cells[3:6] == [f"{means[key][s]:.2f}" for s in sigmas], key
    margins = " / ".join(f"{record['rule']['margin_db'][s]:+.2f}" for s in sigmas)
    assert f"The rule passed ({margins} dB)" in flat and record["rule"]["passed"]
    per_channel = " / ".join(
        f"{means['gray_opponent'][s] - means['gray_per_channel'][s]:+.2f}" for s in sigmas
    )
    assert f"worth {per_channel} dB over the same grey model" in flat
    # the commands shown are the ones recorded
    for run in ("gray", "color"):
        assert " ".join(train[run]["command"].split()) in flat.replace(" \\ ", " "), run
    assert record["command"] in flat.replace(" \\ ", " ")
