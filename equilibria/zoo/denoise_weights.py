"""The denoising recipe's shipped models: files, hash check and loading.

:func:`load_shipped` loads the trained models shipped in ``equilibria/zoo/weights``
(``denoise_gray`` / ``denoise_color``: safetensors weights, their config and SHA-256 in the
``.json`` beside them; ``benchmarks/train_shipped_denoiser.py`` wrote them), rebuilt with
:func:`equilibria.zoo.denoise_model.build_model` from the recorded config. For RGB images it
offers two models (``color_model``): ``"rgb"``, the colour DEQ (``denoise_color``), and
``"opponent"``, the grey DEQ run on the three channels of an orthonormal opponent colour space
(:class:`equilibria.zoo.denoise_color.OpponentColorDenoiser`); :data:`DEFAULT_COLOR_MODEL` is
the one the validation rule of ``docs/recipes/denoise.md`` chose. By default every model is
followed by the non-local second stage (:class:`equilibria.zoo.denoise_nonlocal.NonLocalStage`:
NL-means of the noisy image guided by the network's output, options
:data:`~equilibria.zoo.denoise_nonlocal.SHIPPED_STAGE`); ``nonlocal_stage=False`` gives the
network alone.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from .denoise_model import build_model

__all__ = [
    "COLOR_MODELS",
    "DEFAULT_COLOR_MODEL",
    "DEFAULT_NONLOCAL_STAGE",
    "WEIGHTS_DIR",
    "ShippedWeightsError",
    "load_shipped",
    "sha256_of",
    "shipped_paths",
]

WEIGHTS_DIR = Path(__file__).with_name("weights")
# the models for RGB images: the grey DEQ in opponent colour space, or the colour DEQ
COLOR_MODELS = ("opponent", "rgb")
# chosen by the rule fixed before the validation run (docs/recipes/denoise.md, "Colour");
# benchmarks/results/denoise_color_validation.json
DEFAULT_COLOR_MODEL = "opponent"
# the non-local second stage follows the shipped networks: chosen by the validation rule of
# benchmarks/denoise_nonlocal_validation.py (its JSON's "rule"; docs/recipes/denoise.md)
DEFAULT_NONLOCAL_STAGE = True


class ShippedWeightsError(RuntimeError):
    """A shipped weights file is missing, or its SHA-256 differs from the one recorded."""


def shipped_paths(color: bool) -> tuple[Path, Path]:
    """(weights, config) paths of the shipped grayscale or colour model."""
    stem = WEIGHTS_DIR / ("denoise_color" if color else "denoise_gray")
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def sha256_of(path: Path) -> str:
    """The SHA-256 hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_shipped(
    color: bool = False,
    blind: bool = False,
    *,
    color_model: str | None = None,
    nonlocal_stage: bool | None = None,
    weights: str | Path | None = None,
    config: str | Path | None = None,
) -> nn.Module:
    """The shipped trained denoiser, in eval mode on the CPU.

    Args:
        color: a model for RGB images (3 channels) instead of the grayscale one.
        blind: the model estimates σ itself (:func:`equilibria.zoo.denoise_sigma.estimate_sigma`)
            and is called as ``model(noisy, None)``; otherwise ``model(noisy, sigma)``. An
            estimate below :data:`~equilibria.zoo.denoise_sigma.MIN_BLIND_SIGMA_255` / 255
            (e.g. 0 for a noiseless image) is raised to it, as ``equilibria denoise`` does.
        color_model: with ``color``, which model (:data:`COLOR_MODELS`): ``"rgb"``, the colour
            DEQ, or ``"opponent"``, the shipped grey DEQ on the channels of an orthonormal
            opponent colour space (:class:`~equilibria.zoo.denoise_color.OpponentColorDenoiser`);
            None: :data:`DEFAULT_COLOR_MODEL`. Checked, but otherwise ignored, without
            ``color``.
        nonlocal_stage: follow the network by the non-local second stage
            (:class:`~equilibria.zoo.denoise_nonlocal.NonLocalStage` with
            :data:`~equilibria.zoo.denoise_nonlocal.SHIPPED_STAGE`; for ``"opponent"`` on each
            opponent channel); None: :data:`DEFAULT_NONLOCAL_STAGE`. False: the network alone
            (its ``deq`` attribute is the equilibrium layer either way). With the stage the
            network is ``model.pilot`` and the state dict's keys carry the ``pilot.`` prefix;
            the stage costs about 0.6 CPU s per 256² grey image on top of the network's 0.13.
        weights, config: other files than the shipped ones (tests); with ``color_model=
            "opponent"`` those of the grey model it wraps.

    Raises:
        ValueError: ``color_model`` is not one of :data:`COLOR_MODELS`.
        ShippedWeightsError: a file is missing, or the weights' SHA-256 is not the one recorded
            in the config (a damaged or replaced file).

    Example:
        >>> model = load_shipped(color=False)
        >>> clean = model(noisy, torch.full((noisy.shape[0],), 25 / 255)).clamp(0, 1)
        >>> rgb = load_shipped(color=True, color_model="opponent")  # the grey DEQ on Y, C1, C2
        >>> net = load_shipped(nonlocal_stage=False)  # the DEQ without the non-local stage
    """
    from safetensors.torch import load_file

    from .denoise import config_from_record

    if color_model is None:
        color_model = DEFAULT_COLOR_MODEL
    if color_model not in COLOR_MODELS:
        raise ValueError(
            f"color_model must be one of {', '.join(map(repr, COLOR_MODELS))}, got {color_model!r}"
        )
    if nonlocal_stage is None:
        nonlocal_stage = DEFAULT_NONLOCAL_STAGE
    if not isinstance(nonlocal_stage, bool):
        raise TypeError(f"nonlocal_stage must be a bool or None, got {nonlocal_stage!r}")
    if color and color_model == "opponent":
        from .denoise_color import OpponentColorDenoiser

        gray = load_shipped(False, nonlocal_stage=nonlocal_stage, weights=weights, config=config)
        return OpponentColorDenoiser(gray, blind=blind).eval()

    weights_path, config_path = shipped_paths(bool(color))
    weights_path = Path(weights) if weights is not None else weights_path
    config_path = Path(config) if config is not None else config_path
    for path in (weights_path, config_path):
        if not path.is_file():
            raise ShippedWeightsError(f"shipped denoiser file {path} is missing")
    try:
        record = json.loads(config_path.read_text())
        expected, saved = str(record["sha256"]), dict(record["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise ShippedWeightsError(
            f"shipped denoiser config {config_path} is damaged (not JSON with 'sha256' and "
            f"'config'): {e!r}"
        ) from None
    digest = sha256_of(weights_path)
    if digest != expected:
        raise ShippedWeightsError(
            f"{weights_path} has SHA-256 {digest}, expected {expected} (recorded in "
            f"{config_path.name}): the file is damaged or was replaced"
        )
    cfg = config_from_record(saved)  # an option added since is taken at its value then
    if cfg.color != bool(color):
        raise ShippedWeightsError(f"{config_path} holds a model with color={cfg.color}")
    with torch.random.fork_rng(devices=[]):  # build_model seeds; leave the caller's RNG be
        model = build_model(cfg)
    state = load_file(str(weights_path))
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    if nonlocal_stage:
        from .denoise_nonlocal import SHIPPED_STAGE, NonLocalStage

        return NonLocalStage(model, **SHIPPED_STAGE, blind=bool(blind)).eval()
    model.blind = bool(blind)
    return model.eval()
