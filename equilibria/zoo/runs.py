"""Run folders: ``config.json``, ``metrics.jsonl``, ``checkpoint.safetensors``, ``report.md``.

A run folder belongs to one run. Starting a run in a folder that already holds one is an error
(pass ``--resume`` to continue it, or pick another ``--run-dir``), so a finished run is never
overwritten by accident. While a process trains in a folder it holds an exclusive lock on it
(``flock`` on the folder itself), so two processes never write one run. Files are written
atomically (:func:`write_bytes`: temporary file, then rename); ``metrics.jsonl`` is appended one
line per epoch and cut back to the checkpoint's epoch on resume.

This module also holds the package's one thread-count context (:func:`num_threads`).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, differences

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.safetensors"
SUMMARY = "summary.json"
REPORT = "report.md"


def default_run_dir(recipe: str, root: str | os.PathLike[str] = "runs") -> Path:
    """``runs/<recipe>/<YYYYmmdd-HHMMSS>`` (with a suffix if that folder exists)."""
    base = Path(root) / recipe / time.strftime("%Y%m%d-%H%M%S")
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` atomically: a temporary file in the same folder, flushed to disk, renamed
    over ``path`` (``os.replace`` is atomic on POSIX), so a crash leaves the old file or the new
    one, never a mix. The package's one atomic write (checkpoints and JSON go through it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` atomically (see :func:`write_bytes`)."""
    return write_bytes(path, text.encode())


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def num_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` torch CPU threads (0: leave torch's setting), then restore.

    The one thread-count context of the package (trainer, evaluation, demo, benchmarks).
    """
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def require_new_folder(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """Return ``path`` if it does not exist or is an empty folder, so nothing is overwritten.

    Raises:
        ConfigError: naming the option and the folder when it is a file or holds files.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        what = "is not a folder" if not path.is_dir() else "is not empty"
        raise ConfigError(
            f"{option} {path} {what}; choose a new or empty folder (earlier results are never "
            "overwritten)"
        )
    return path


def require_extras(*modules: str) -> None:
    """Import the optional dependencies a run needs, before anything is written.

    Raises:
        MissingExtraError: naming the missing package(s) and ``pip install 'equilibria[zoo]'``.
    """
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExtraError(
            f"missing optional dependenc{'y' if len(missing) == 1 else 'ies'} "
            f"{', '.join(missing)} (needed by this run); install the recipe extras with "
            "pip install 'equilibria[zoo]'"
        )


class MissingExtraError(ImportError):
    """An optional dependency of the recipes (the ``zoo`` extra) is not installed."""


class RunFailedError(RuntimeError):
    """Training stopped with an error after its run folder was written (recorded in it)."""


class ReportFailedError(RuntimeError):
    """Training finished and its summary is written, but writing its report failed."""


class RunFolderError(RuntimeError):
    """A file of a run folder is damaged (not the JSON it should be) or cannot be read."""


def read_json(path: str | os.PathLike[str], *, kind: type = dict) -> Any:
    """Read a JSON file that must hold a ``kind`` (an object by default).

    Raises:
        RunFolderError: naming the file when it cannot be read or is not such JSON.
    """
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RunFolderError(f"{path} cannot be read as JSON ({type(e).__name__}: {e})") from None
    if not isinstance(value, kind):
        raise RunFolderError(
            f"{path} is damaged: it holds a JSON {type(value).__name__}, expected {kind.__name__}"
        )
    return value


class RunFolder:
    """The files of one run.

    Args:
        path: the folder.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock: int | None = None

    @property
    def checkpoint(self) -> Path:
        """Path of ``checkpoint.safetensors``."""
        return self.path / CHECKPOINT

    @property
    def metrics_path(self) -> Path:
        """Path of ``metrics.jsonl``."""
        return self.path / METRICS

    def holds_run(self) -> bool:
        """Whether the folder already holds (part of) a run."""
        return any((self.path / name).exists() for name in (CONFIG, METRICS, CHECKPOINT))

    def lock(self) -> None:
        """Take an exclusive, non-blocking lock on the folder (released by :meth:`unlock` or when
        the process ends, also by SIGKILL).

        Raises:
            ConfigError: naming the folder when another process holds it.
        """
        if self._lock is not None:
            return
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"run folder {self.path} is in use by another process (it holds the folder's "
                "lock); wait for it to finish or choose another --run-dir"
            ) from None
        self._lock = fd

    def unlock(self) -> None:
        """Release the lock taken by :meth:`lock` (if any)."""
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the flock
            self._lock = None

    def start(self, recipe: str, config: dict[str, Any], *, resumable: bool = True) -> None:
        """Create and lock the folder for a new run and write ``config.json``.

        Args:
            recipe: the recipe's name.
            config: the run's options.
            resumable: whether the recipe has ``--resume`` (suggested in the error if so).

        Raises:
            ConfigError: if the folder already holds a run, is locked, or cannot be written.
        """
        self.check_new(resumable=resumable)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.lock()
            self.check_new(resumable=resumable)  # under the lock: no other run started here
            write_json(self.path / CONFIG, {"recipe": recipe, "config": config})
        except OSError as e:
            self.unlock()
            raise ConfigError(
                f"--run-dir {self.path} cannot be written ({e.strerror or e}); choose a folder "
                "you can write to"
            ) from None

    def check_new(self, *, resumable: bool = True, holds: bool | None = None) -> None:
        """Raise :class:`ConfigError` if the folder already holds a run.

        Args:
            resumable: whether the recipe has ``--resume`` (suggested in the error if so).
            holds: whether it does, as decided elsewhere (e.g. by rank 0 for every process);
                ``None``: look.

        Raises:
            ConfigError: also if the path exists and is not a folder.
        """
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--run-dir {self.path} is a file, not a folder; choose a folder")
        if self.holds_run() if holds is None else holds:
            hint = "pass --resume to continue it or " if resumable else ""
            failed = self.failure()
            what = f"a run that failed ({failed})" if failed else "a run"
            raise ConfigError(
                f"run folder {self.path} already holds {what}; {hint}choose another --run-dir"
            )

    def fail(self, error: BaseException, *, record: bool = True) -> RunFailedError:
        """Record in ``summary.json`` that the run stopped with ``error`` (unless ``record`` is
        false: a process other than rank 0) and return the error to raise from it."""
        text = f"{type(error).__name__}: {error}"
        if record:
            write_json(self.path / SUMMARY, {"status": "failed", "error": text})
        where = f"the run folder {self.path} records the failure" if record else "rank 0 records it"
        return RunFailedError(f"training stopped: {text}; {where}")

    def failure(self) -> str | None:
        """The error a failed run recorded with :meth:`fail`, else None."""
        try:
            summary = read_json(self.path / SUMMARY)
        except RunFolderError:  # missing or damaged: no failure recorded
            return None
        if summary.get("status") == "failed":
            return str(summary.get("error"))
        return None

    def finished(self) -> dict[str, Any] | None:
        """The summary of a run that finished (``summary.json`` without a failure), else None."""
        path = self.path / SUMMARY
        if not path.is_file():
            return None
        summary = read_json(path)
        return None if summary.get("status") == "failed" else summary

    def check_resume(
        self,
        recipe: str,
        config: dict[str, Any],
        config_cls: type,
        saved_defaults: Mapping[str, Any] | None = None,
    ) -> None:
        """Check that the folder holds a run of ``recipe`` with a compatible config.

        ``saved_defaults``: values for options the saved config lacks (added to the recipe after
        the run was saved; the task's ``record_defaults``).

        Raises:
            ConfigError: if there is nothing to resume, or if options other than the resumable
                ones (run control such as ``quiet``) differ from the saved ``config.json``.
            RunFolderError: if ``config.json`` is damaged.
        """
        if not (self.path / CONFIG).is_file():
            raise ConfigError(f"--resume: {self.path} holds no run (no {CONFIG})")
        saved = read_json(self.path / CONFIG)
        if saved.get("recipe") != recipe:
            raise ConfigError(
                f"--resume: {self.path} holds a run of recipe {saved.get('recipe')!r}, not "
                f"{recipe!r}"
            )
        if not isinstance(saved.get("config"), dict):
            raise RunFolderError(f"{self.path / CONFIG} is damaged: it has no 'config' object")
        diff = differences(saved["config"], config, config_cls, saved_defaults)
        if diff:
            lines = "\n".join(f"  {k}: saved {a!r}, now {b!r}" for k, a, b in diff)
            raise ConfigError(
                f"--resume: the options differ from the run saved in {self.path}:\n{lines}\n"
                "resume with the same options (only run-control options may change)"
            )

    def remove_temporaries(self) -> list[Path]:
        """Delete temporary files left by a process killed while writing (``.<name>.<pid>.tmp``)."""
        stale = [p for p in self.path.glob(".*.tmp") if p.is_file()]
        for p in stale:
            p.unlink()
        return stale

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append one JSON line to ``metrics.jsonl`` and flush it to disk."""
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """The rows of ``metrics.jsonl`` (a partly written last line is skipped).

        Raises:
            RunFolderError: naming the file and line when another line is not a JSON object
                with an ``epoch`` number (an int >= 1).
        """
        if not self.metrics_path.is_file():
            return []
        try:
            lines = self.metrics_path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise RunFolderError(f"{self.metrics_path} cannot be read ({e})") from None
        rows = []
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # a write cut short by a kill
                    break
                row = None
            if not isinstance(row, dict):
                raise RunFolderError(
                    f"{self.metrics_path} is damaged: line {number} is not a JSON object"
                )
            epoch = row.get("epoch")
            if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
                raise RunFolderError(
                    f"{self.metrics_path} is damaged: line {number} has no epoch number "
                    f"(an int >= 1), got {epoch!r}"[:300]
                )
            rows.append(row)
        return rows

    def truncate_metrics(self, epoch: int) -> None:
        """Keep only the rows of epochs ``<= epoch`` (the ones the checkpoint includes)."""
        rows = [r for r in self.read_metrics() if r.get("epoch", 0) <= epoch]
        write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
