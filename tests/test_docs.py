"""The documentation site's pages: their Python examples run, every public name has an API entry
with an example, and the links of the README and the pages resolve.

Each page's ```python blocks run in order in one namespace, in a fresh process (examples register
solvers and recipes; they must not leak into other tests), from an empty working folder. Blocks
fenced as ```py are shown but not run (GPU-only or long commands); ```bash/```text never run.
``make docs`` builds the site with ``mkdocs build --strict`` (broken references fail it)."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
API_MODULES = ("equilibria", "equilibria.layers", "equilibria.sampling")
# names documented by a page of their own rather than a ``:::`` entry
OWN_PAGE = {
    "equilibria.layers": DOCS / "api" / "layers.md",
    "equilibria.sampling": DOCS / "api" / "sampling.md",
}

pytestmark = pytest.mark.no_device_mode


def _blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def _page_id(page: Path) -> str:
    return str(page.relative_to(DOCS))


def test_the_site_has_its_pages():
    names = {_page_id(p) for p in PAGES}
    assert {"index.md", "api/core.md", "api/layers.md", "api/engine.md"} <= names
    config = (ROOT / "mkdocs.yml").read_text()
    for page in names:  # every page is in the navigation (strict mode only warns about it)
        assert page in config, f"{page} is not in mkdocs.yml's nav"


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p.read_text())], ids=_page_id)
def test_page_examples_run(page, tmp_path):
    code = "\n\n".join(
        f"# --- {_page_id(page)} example {i}\n{block}"
        for i, block in enumerate(_blocks(page.read_text()))
    )
    script = tmp_path / "page.py"
    prelude = "import matplotlib\nmatplotlib.use('Agg')\nimport torch\ntorch.set_num_threads(1)\n"
    script.write_text(prelude + code)
    run = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, (
        f"{_page_id(page)} failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    )


def _entries() -> dict[str, str]:
    """``module.name`` -> the text between its ``:::`` line and the next one."""
    out: dict[str, str] = {}
    for page in sorted((DOCS / "api").glob("*.md")):
        parts = re.split(r"^::: ([\w.]+)\s*$", page.read_text(), flags=re.M)
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            out[name] = body
    return out


def _public(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    return [f"{module_name}.{name}" for name in module.__all__]


@pytest.mark.parametrize("module_name", API_MODULES)
def test_every_public_name_has_an_entry_with_an_example(module_name):
    entries = _entries()
    for full in _public(module_name):
        if full in OWN_PAGE:
            assert OWN_PAGE[full].exists(), full
            continue
        assert full in entries, f"{full} has no '::: {full}' entry under docs/api/"
        assert _blocks(entries[full]), f"the entry of {full} has no ```python example"


_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(md: Path) -> set[str]:
    """The ids mkdocs (toc) and GitHub give the headings of a page."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", md.read_text(), flags=re.M):
        text = re.sub(r"[`*]", "", heading).strip().lower()
        out.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return out


@pytest.mark.parametrize("doc", [ROOT / "README.md", *PAGES], ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    for target in _LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path, _, anchor = target.partition("#")
        resolved = (doc.parent / path).resolve()
        if resolved.is_relative_to(DOCS / "results"):  # published from benchmarks/results
            resolved = ROOT / "benchmarks" / "results" / resolved.relative_to(DOCS / "results")
        assert resolved.exists(), f"{doc.name}: link to {target} does not resolve"
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved), f"{doc.name}: no heading #{anchor} in {path}"
