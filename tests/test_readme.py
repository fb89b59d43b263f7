"""The README's Python examples run as written and give what their comments say; the recipe
engine sketch of docs/recipes/index.md names the real interface."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

import equilibria as eq

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RECIPES = ROOT / "docs" / "recipes" / "index.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _run(code: str, name: str) -> dict:
    torch.manual_seed(0)  # the examples draw their data and weights from the global generator
    namespace = {"__name__": "__readme__"}
    exec(compile(code, name, "exec"), namespace)
    return namespace


def _check_quickstart(ns: dict) -> None:
    layer, cell, x, z, loss = ns["layer"], ns["cell"], ns["x"], ns["z"], ns["loss"]
    assert x.shape == (32, 64) and z.shape == (32, 64)
    sol = layer.last_solution
    assert sol.status is eq.Status.CONVERGED and sol.all_converged
    assert loss.dim() == 0 and math.isfinite(float(loss.detach()))
    # loss.backward() reached the weight-norm originals and the biases
    for name, p in cell.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
        assert float(p.grad.abs().max()) > 0, name
    # z is the equilibrium of the cell (to the solver's tolerance, before the phantom steps)
    with torch.no_grad():
        fz = cell(z, x)
        err = float((fz - z).norm() / fz.norm())
    assert err < 1e-3


CHECKS = {"layer = eq.DEQ(": _check_quickstart}


def test_the_readme_has_python_examples():
    blocks = _python_blocks()
    assert len(blocks) >= 1
    # every check below has its example
    for marker in CHECKS:
        assert any(marker in code for code in blocks), marker


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_example_runs(index, capsys):
    code = _python_blocks()[index]
    ns = _run(code, f"README.md example {index}")
    checks = [check for marker, check in CHECKS.items() if marker in code]
    assert checks, f"README example {index} has no assertions in this test"
    for check in checks:
        check(ns)
    if "print(layer.last_solution)" in code:  # what the example prints
        assert "status=converged" in capsys.readouterr().out


def test_the_engine_sketch_names_the_real_interface():
    """The "recipe engine" sketch of the recipes page uses the Task interface as it is: its base
    classes, helpers and methods exist, and every method it defines is one the trainer calls."""
    from equilibria.zoo import registry, task

    text = RECIPES.read_text()
    assert "## The recipe engine" in text
    sketch = text.split("## The recipe engine", 1)[1].split("```text\n", 1)[1]
    sketch = sketch.split("```", 1)[0]
    for name in ("RunOptions", "Task", "Metric", "Schedule", "StepOutput"):
        assert re.search(rf"\b{name}\b", sketch) and hasattr(task, name), name
    assert "register(Recipe(" in sketch and hasattr(registry, "register")
    methods = re.findall(r"def (\w+)\(", sketch)
    assert len(methods) >= 6
    for name in methods:
        assert callable(getattr(task.Task, name, None)), name
    for attr in re.findall(r"^    (\w+)(?:, \w+)* = ", sketch, flags=re.M):
        assert attr in task.Task.__annotations__, attr  # a declared class attribute
