"""compare-gradients: memory flat in the forward iterations except for unrolled backprop, gradient
cosines, and a tiny end-to-end comparison."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from equilibria.zoo.compare import CompareConfig, compare_gradients, gradient, step_memory
from equilibria.zoo.digits import DigitsConfig, build_model, load_data


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
