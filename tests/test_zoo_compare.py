"""compare-gradients: memory flat in the forward iterations except for unrolled backprop, gradient
cosines, and a tiny end-to-end comparison."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from equilibria.zoo.compare import (
    CompareConfig,
    _recipe_config,
    compare_gradients,
    gradient,
    step_memory,
)
from equilibria.zoo.config import ConfigError
from equilibria.zoo.digits import DigitsConfig, build_model, load_data, train
from equilibria.zoo.runs import MissingExtraError


@pytest.mark.parametrize("backward", ["implicit", "phantom", "neumann", "jfb", "unrolled"])
def test_training_memory_vs_forward_iterations(backward: str) -> None:
    config = DigitsConfig(width=8, groups=2, backward=backward)  # type: ignore[arg-type]
    x, y, _, _ = load_data()
    low, high = (step_memory(config, n, x[:16], y[:16]) for n in (10, 60))
    if backward == "unrolled":
        assert high > 3 * low  # keeps every iteration's activations
    else:
        assert high <= 1.1 * low  # flat: no activations kept per forward iteration


def test_gradient_cosines() -> None:
    config = DigitsConfig(width=8, groups=2, backward="implicit", implicit_tol=1e-8,
                          implicit_max_iter=100, tol=1e-8, max_iter=100)  # fmt: skip
    state = build_model(config).state_dict()
    x, y, _, _ = load_data()
    exact = gradient(state, config, x[:16], y[:16], exact=True)
    implicit = gradient(state, config, x[:16], y[:16])
    assert torch.nn.functional.cosine_similarity(exact, implicit, dim=0) > 1 - 1e-8
    jfb = gradient(state, DigitsConfig(width=8, groups=2, backward="jfb"), x[:16], y[:16])
    cos = float(torch.nn.functional.cosine_similarity(exact, jfb, dim=0))
    assert 0.5 < cos < 1 - 1e-6  # an approximation, but a descent direction


def test_tiny_comparison_writes_table(tmp_path: Path) -> None:
    config = CompareConfig(
        seeds=1, epochs=1, methods=("implicit", "phantom", "unrolled"), memory_iters=(4, 12),
        cosine_batch=8, timing_rounds=1, train_subset=64, run_dir=str(tmp_path), quiet=True,
    )  # fmt: skip
    result = compare_gradients(config)
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["implicit", "phantom", "unrolled"]
    table = (tmp_path / "compare.md").read_text()
    assert table == result["markdown"] and "| phantom, unrolled (UPG) |" in table
    by = {r["method"]: r for r in saved["rows"]}
    assert by["implicit"]["speedup_vs_implicit"] == 1.0
    assert by["unrolled"]["mem_ratio"] > 1.5 and by["phantom"]["mem_ratio"] <= 1.1
    assert by["implicit"]["cos_init_mean"] > 0.99
    assert set(saved["targets"]) >= {"phantom_speedup", "implicit_memory_ratio"}


class _Stop(BaseException):
    """An interruption (not an Exception: the run is not recorded as failed)."""


def test_an_interrupted_comparison_resumes_in_its_folder(tmp_path: Path) -> None:
    """A default comparison takes minutes: an interrupted one was stuck (a rerun was refused
    with advice to pass --resume, which compare-gradients did not have)."""
    tiny = {
        "seeds": 1, "epochs": 2, "methods": ("phantom", "jfb"), "memory_iters": (2, 3),
        "cosine_batch": 8, "timing_rounds": 1, "train_subset": 64, "quiet": True,
    }  # fmt: skip
    part = CompareConfig(**tiny, run_dir=str(tmp_path / "part"))
    first = _recipe_config(part, "phantom", 0, tmp_path / "part" / "runs" / "phantom-seed0")

    def stop(epoch: int) -> None:
        raise _Stop

    with pytest.raises(_Stop):  # killed after the first run's first epoch
        train(first, on_epoch_end=stop)
    with pytest.raises(ConfigError, match="pass --resume to continue it"):
        compare_gradients(part)
    resumed = compare_gradients(dataclasses.replace(part, resume=True))
    full = compare_gradients(CompareConfig(**tiny, run_dir=str(tmp_path / "full")))
    for a, b in zip(resumed["runs"], full["runs"]):  # the resumed run is bitwise the same
        assert (a["method"], a["test_acc"], a["cos_trained"]) == (
            b["method"], b["test_acc"], b["cos_trained"]
        )  # fmt: skip
    with pytest.raises(ConfigError, match=r"already holds a finished sweep \(its compare.json\)"):
        compare_gradients(dataclasses.replace(part, resume=True))
    with pytest.raises(ConfigError, match="holds no sweep to continue"):
        compare_gradients(CompareConfig(**tiny, run_dir=str(tmp_path / "new"), resume=True))


def test_comparison_checks_its_extras_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with pytest.raises(MissingExtraError, match="missing optional dependency tqdm"):
        compare_gradients(CompareConfig(seeds=1, epochs=1, run_dir=str(tmp_path / "c")))
    assert not (tmp_path / "c").exists()
