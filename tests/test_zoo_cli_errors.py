"""Adversarial command lines and run folders: each is an ``equilibria: error:`` line with exit code
2 (options, folders) or 1 (damaged files), never a traceback, and nothing in the folder changes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from equilibria.zoo.cli import main
from equilibria.zoo.runs import RunFolder

TINY_ARGS = [
    "--width", "8", "--groups", "2", "--train-subset", "64", "--eval-max-iter", "5", "--quiet",
    "--no-report", "--no-measure-memory",
]  # fmt: skip


def _train(run: Path, *extra: str) -> int:
    return main(["train", "digits", *TINY_ARGS, "--epochs", "1", "--run-dir", str(run), *extra])


def _files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run.iterdir()}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "digits", "--epochs", "2", "--epochs", "3"], "--epochs given 2 times"),
        (["train", "digits", "--epochs=2", "--epochs", "3"], "--epochs given 2 times"),
        (["train", "digits", "--report", "--no-report"], "--report given 2 times"),
        (["train", "mosaic", "--steps", "2", "--steps", "3"], "--steps given 2 times"),
        (["compare-gradients", "digits", "--seeds", "1", "--seeds", "2"], "--seeds given 2 times"),
        (["sweep", "mosaic", "--lr", "0.1", "--lr", "0.2"], "--lr given 2 times"),
        (["demo", "--epochs", "1", "--epochs", "2"], "--epochs given 2 times"),
    ],
)
def test_repeated_options_are_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """argparse kept the last one silently (only --run-dir was refused)."""
    assert main([*argv, "--run-dir", str(tmp_path / "run")]) == 2
    assert f"equilibria: error: {message}; give it once" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_repeated_eval_option_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _train(tmp_path / "run") == 0
    capsys.readouterr()
    argv = ["eval", str(tmp_path / "run"), "--eval-max-iter", "3", "--eval-max-iter", "50"]
    assert main(argv) == 2
    assert "--eval-max-iter given 2 times; give it once" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["proc", "under-a-file", "read-only"])
def test_an_unwritable_run_folder_is_an_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    if where == "proc":
        run = Path("/proc/equilibria-x")
    elif where == "under-a-file":
        (tmp_path / "afile").write_text("")
        run = tmp_path / "afile" / "run"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        (tmp_path / "ro").mkdir(mode=0o500)
        run = tmp_path / "ro" / "run"
    assert _train(run) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"equilibria: error: --run-dir {run} cannot be written")
    assert "Traceback" not in err


def test_damaged_run_folder_files_are_error_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert main(["train", "digits", *TINY_ARGS, "--epochs", "2", "--run-dir", str(run)]) == 0
    capsys.readouterr()
    good = _files(run)

    # config.json that is not JSON, or not an object: --resume names the file
    for damaged in ("{not json", "[1, 2]"):
        (run / "config.json").write_text(damaged)
        before = _files(run)
        assert _train(run, "--resume") == 1
        err = capsys.readouterr().err
        assert (
            err.startswith(f"equilibria: error: {run / 'config.json'}") and "Traceback" not in err
        )
        assert _files(run) == before
    (run / "config.json").write_bytes(good["config.json"])

    # metrics.jsonl with a line that is not an object (not the last: not a cut-short write)
    lines = good["metrics.jsonl"].decode().splitlines()
    (run / "metrics.jsonl").write_text("[1, 2]\n" + lines[1] + "\n")
    before = _files(run)
    assert main(["report", str(run)]) == 1
    assert f"{run / 'metrics.jsonl'} is damaged: line 1 is not a JSON object" in (
        capsys.readouterr().err
    )
    assert main(["train", "digits", *TINY_ARGS, "--epochs", "2", "--run-dir", str(run),
                 "--resume"]) == 1  # fmt: skip
    assert "line 1 is not a JSON object" in capsys.readouterr().err
    assert _files(run) == before
    # a row whose epoch is not an epoch number: an error line, the finished run's summary.json
    # untouched (resume recorded a TypeError from cutting the rows back as the run's failure)
    for epoch in ('"1"', "null", "true", "0"):
        (run / "metrics.jsonl").write_text(lines[0].replace('"epoch": 1', f'"epoch": {epoch}', 1)
                                           + "\n" + lines[1] + "\n")  # fmt: skip
        before = _files(run)
        assert main(["train", "digits", *TINY_ARGS, "--epochs", "2", "--run-dir", str(run),
                     "--resume"]) == 1  # fmt: skip
        err = capsys.readouterr().err
        assert f"{run / 'metrics.jsonl'} is damaged: line 1 has no epoch number" in err
        assert _files(run) == before
    # a last line cut short by a kill is skipped, as before
    (run / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][:20])
    assert len(RunFolder(run).read_metrics()) == 1
    (run / "metrics.jsonl").write_bytes(good["metrics.jsonl"])

    # summary.json that is not JSON: report names it
    (run / "summary.json").write_text('{"test_acc": 0.5')
    assert main(["report", str(run)]) == 1
    assert f"equilibria: error: {run / 'summary.json'} cannot be read as JSON" in (
        capsys.readouterr().err
    )
    (run / "summary.json").write_bytes(good["summary.json"])

    # config.json whose 'config' is not an object: report names it (was an AttributeError)
    (run / "config.json").write_text('{"recipe": "digits", "config": [1, 2]}')
    before = _files(run)
    assert main(["report", str(run)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"equilibria: error: {run / 'config.json'} is damaged: it has no")
    assert _files(run) == before


def test_two_resumes_of_one_folder_do_not_both_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both ran and doubled the metrics; the second now fails naming the folder."""
    run = tmp_path / "run"
    assert _train(run) == 0
    capsys.readouterr()
    before = _files(run)
    holder = RunFolder(run)
    holder.lock()  # as the first `--resume` process holds it while it trains
    try:
        assert _train(run, "--resume") == 2
        err = capsys.readouterr().err
        assert f"equilibria: error: run folder {run} is in use by another process" in err
    finally:
        holder.unlock()
    assert _files(run) == before
    assert _train(run, "--resume") == 0
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and json.loads(rows[0])["epoch"] == 1


def test_ctrl_c_is_a_line_and_the_run_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C printed a traceback; now a line, exit 130, the folder unlocked and resumable."""
    from equilibria.zoo.digits import DigitsTask

    real = DigitsTask.train_step
    calls = {"n": 0}

    def interrupted(self, *args):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 6:  # in the second epoch (64 samples, 4 steps an epoch)
            raise KeyboardInterrupt
        return real(self, *args)

    run = tmp_path / "run"
    monkeypatch.setattr(DigitsTask, "train_step", interrupted)
    argv = [
        "train",
        "digits",
        *TINY_ARGS,
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--run-dir",
        str(run),
    ]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "equilibria: interrupted" in err and "Traceback" not in err
    assert (run / "checkpoint.safetensors").exists()
    monkeypatch.setattr(DigitsTask, "train_step", real)
    assert main([*argv, "--resume"]) == 0
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["epoch"] for row in rows] == [1, 2]
