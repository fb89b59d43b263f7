"""mkdocs hook: the benchmark figures are published under ``results/`` of the site.

The figures live in ``benchmarks/results/`` (where the scripts that make them write them); pages
refer to them as ``results/...png`` relative to the site root, so the site needs no copies that
could go stale."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

RESULTS = Path(__file__).resolve().parent / "benchmarks" / "results"


def on_files(files, config):
    """Add every PNG under ``benchmarks/results`` to the site under ``results/`` (same
    relative path)."""
    for png in sorted(RESULTS.rglob("*.png")):
        files.append(
            File(
                f"results/{png.relative_to(RESULTS).as_posix()}",
                src_dir=str(RESULTS.parent),
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    return files
