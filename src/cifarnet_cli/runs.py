"""Run folders: ``<home>/runs/<name>/`` with last.pt, best.pt, config.json, metrics.jsonl/.csv and a lock.

Kept free of torch: listing runs, completing run names and ``cifarnet runs`` read only these files.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifarnet_cli import fileio, paths
from cifarnet_cli.errors import CifarNetError, UsageError

try:  # POSIX (Linux, macOS, Jetson): a lock the kernel releases when its process dies, however it dies
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

# fullmatch: `$` would also match before a trailing newline (`--run $'nl\n'`).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

#: The columns of metrics.jsonl / metrics.csv, in order. ``lr_first`` and ``lr`` are the learning rates
#: of the epoch's first and last optimizer steps (the rates it trained with; the schedule moves per step).
METRIC_COLUMNS = (
    "epoch",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "lr_first",
    "lr",
    "images_per_second",
    "epoch_seconds",
)

LOCK_NAME = ".lock"
#: Temporary files the training writer leaves only when it is killed mid-write (checkpoint.save_atomic,
#: Run.write_*, report's atomic PNG): safe to delete once this process holds the run's lock.
_PARTIAL_PATTERNS = (
    ".last.pt.*.partial",
    ".best.pt.*.partial",
    ".epoch-*.pt.*.partial",
    "*.json.partial",
    "*.jsonl.partial",
    "*.csv.partial",
    ".curves.png.partial",
)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@dataclass(frozen=True)
class Run:
    name: str
    dir: Path

    @property
    def last(self) -> Path:
        return self.dir / "last.pt"

    @property
    def best(self) -> Path:
        return self.dir / "best.pt"

    @property
    def config_file(self) -> Path:
        return self.dir / "config.json"

    @property
    def metrics_file(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def csv_file(self) -> Path:
        return self.dir / "metrics.csv"

    @property
    def curves_file(self) -> Path:
        return self.dir / "curves.png"

    @property
    def lock_file(self) -> Path:
        return self.dir / LOCK_NAME

    def epoch_checkpoint(self, epoch: int) -> Path:
        return self.dir / f"epoch-{epoch:03d}.pt"

    # ---------------------------------------------------------------------------------------------
    # config.json

    def write_config(self, data: dict[str, Any]) -> None:
        _write_atomic(self.config_file, json.dumps(data, indent=2, sort_keys=True) + "\n")

    def read_config(self) -> dict[str, Any]:
        """config.json as a dict; {} when it is missing or unreadable (a listing must not fail)."""
        try:
            data = json.loads(self.config_file.read_bytes().decode("utf-8", errors="replace"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    # ---------------------------------------------------------------------------------------------
    # metrics.jsonl (+ metrics.csv, the same rows for spreadsheets)

    def update_config(self, config: dict[str, Any]) -> None:
        """Replace the recorded training config (the micro-batch can change after running out of memory)."""
        data = json.loads(self.config_file.read_text()) if self.config_file.is_file() else {}
        data["config"] = config
        self.write_config(data)

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics_file.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        self.write_csv(self.read_metrics())

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Replace metrics.jsonl (and .csv) with ``rows``: how a resume makes them agree with last.pt."""
        _write_atomic(self.metrics_file, "".join(json.dumps(r) + "\n" for r in rows))
        self.write_csv(rows)

    def write_csv(self, rows: list[dict[str, Any]]) -> None:
        columns = list(METRIC_COLUMNS) + sorted({k for r in rows for k in r} - set(METRIC_COLUMNS))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        _write_atomic(self.csv_file, buf.getvalue())

    def read_metrics(self) -> list[dict[str, Any]]:
        """The rows of metrics.jsonl; lines that are not JSON objects (cut short by a crash, damaged,
        not UTF-8) are skipped rather than failing a resume or a listing."""
        try:
            raw = self.metrics_file.read_bytes()
        except OSError:
            return []
        rows = []
        for line in raw.decode("utf-8", errors="replace").splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("epoch"), int):
                rows.append(row)
        return rows

    def truncate_metrics(self, epochs: int) -> None:
        """Keep rows 1..``epochs`` (checkpoints written before the rows were stored in last.pt)."""
        self.write_metrics([r for r in self.read_metrics() if r["epoch"] <= epochs])

    # ---------------------------------------------------------------------------------------------

    def completed_epochs(self) -> int:
        """Completed epochs as metrics.jsonl records them (no checkpoint is opened)."""
        return max((r["epoch"] for r in self.read_metrics()), default=0)

    def has_model(self) -> bool:
        """Whether at least one epoch completed: best.pt is first written at the end of epoch 1."""
        return self.best.is_file() or self.completed_epochs() > 0

    def last_activity(self) -> float:
        times = [p.stat().st_mtime for p in (self.last, self.best, self.metrics_file, self.config_file) if p.exists()]
        return max(times, default=0.0)

    def clean_partials(self) -> list[Path]:
        """Delete temporary files a killed writer left behind; call with the run's lock held."""
        removed = []
        for pattern in _PARTIAL_PATTERNS:
            for path in self.dir.glob(pattern):
                try:
                    path.unlink()
                    removed.append(path)
                except OSError:
                    pass
        return removed

    def lock(self) -> RunLock:
        return RunLock(self)


# --------------------------------------------------------------------------------------------------
# One writer per run


class RunBusy(CifarNetError):
    """Another process holds the run's lock."""


class RunLock:
    """An exclusive lock on a run folder, held while a process trains it.

    On POSIX it is a ``flock`` on ``<run>/.lock``: the kernel drops it when the process dies (``kill -9``,
    a crash), so a stale file never blocks a resume. The file also names the holder (pid, host, start
    time) for the message another process shows.
    """

    def __init__(self, run: Run) -> None:
        self.run = run
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, *, attempts: int = 10) -> None:
        path = self.run.lock_file
        for attempt in range(attempts):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                holder = _read_holder(fd)
                os.close(fd)
                if attempt + 1 < attempts:
                    # A listing probes the lock for an instant (holder_of): try again briefly before refusing.
                    time.sleep(0.05)
                    continue
                raise RunBusy(
                    f"Run {self.run.name!r} is being trained by another process ({describe_holder(holder)}); "
                    "wait for it to finish, or stop that process first (Ctrl-C saves it)."
                )
            try:
                same_file = os.path.samestat(os.stat(path), os.fstat(fd))
            except FileNotFoundError:
                same_file = False
            if not same_file:  # the previous holder removed the file between our open and lock
                os.close(fd)
                continue
            info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode())
            self._fd = fd
            return
        raise RunBusy(f"Could not lock run {self.run.name!r} at {path}; try again.")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.run.lock_file.unlink(missing_ok=True)  # while still holding it (see acquire's inode check)
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None


def _try_lock(fd: int) -> bool:
    if fcntl is None:  # pragma: no cover - Windows: the file's existence is the lock
        return os.fstat(fd).st_size == 0
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096).decode("utf-8", errors="replace") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe_holder(holder: dict[str, Any], *, since: bool = True) -> str:
    if not holder.get("pid"):
        return "pid unknown"
    text = f"pid {holder['pid']} on {holder.get('host', '?')}"
    return text + (f", since {holder['since']}" if since and holder.get("since") else "")


def holder_of(run: Run) -> dict[str, Any] | None:
    """Who trains ``run`` right now ({} if unknown), or None when nobody holds its lock."""
    try:
        fd = os.open(run.lock_file, os.O_RDONLY)
    except OSError:
        return None
    try:
        if fcntl is None:  # pragma: no cover
            return _read_holder(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None  # a file left by a killed process: nobody holds it
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------
# Creating, listing and finding runs


def default_name(arch: str) -> str:
    return f"{arch}-{time.strftime('%Y%m%d-%H%M%S')}"


#: What a run name may be, in words: a folder name that is the same on every file system and shell, never
#: read as an option (`--resume -x`) and never hidden (`.x`).
NAME_RULE = (
    "a run name is 1 to 100 characters: ASCII letters (a-z, A-Z), digits, '.', '_' and '-', starting with a "
    "letter or a digit"
)


def check_name(name: str) -> None:
    if _NAME.fullmatch(name):
        return
    if not name:
        broken = "it is empty"
    elif len(name) > 100:
        broken = f"it has {len(name)} characters"
    elif not re.fullmatch(r"[A-Za-z0-9._-]*", name):
        others = sorted({c for c in name if not re.fullmatch(r"[A-Za-z0-9._-]", c)})
        broken = "it contains " + ", ".join(repr(c) for c in others)
    else:
        broken = f"it starts with {name[0]!r}"
    raise UsageError(f"--run {name!r}: {NAME_RULE}; {broken}.")


def _exists_message(run: Run) -> str:
    return f"Run {run.name!r} already exists at {run.dir}; continue it with --resume {run.name} or pick another --run."


def check_new_run(name: str) -> None:
    """Fail early (before loading data) when ``name`` is invalid or taken; :func:`create_run` decides."""
    check_name(name)
    run = Run(name, paths.runs_dir() / name)
    if run.last.exists() or run.best.exists():
        raise CifarNetError(_exists_message(run))


def create_run(name: str, *, unique: bool = False) -> tuple[Run, RunLock]:
    """Create the run folder ``name`` and lock it, atomically: of two processes creating the same run,
    one gets it and the other is refused. ``unique`` (default names) takes ``name-2``, ``name-3``, ...
    instead of refusing."""
    check_name(name)
    for i in range(1, 1000):
        candidate = name if i == 1 else f"{name}-{i}"
        run = Run(candidate, paths.runs_dir() / candidate)
        run.dir.mkdir(parents=True, exist_ok=True)
        lock = run.lock()
        try:
            lock.acquire(attempts=1 if unique else 10)
        except RunBusy:
            if unique:
                continue
            raise
        if run.last.exists() or run.best.exists():
            lock.release()
            if unique:
                continue
            raise CifarNetError(_exists_message(run))
        run.clean_partials()
        return run, lock
    raise CifarNetError(f"Could not find a free run name like {name!r} in {paths.runs_dir()}.")


def _is_run_dir(d: Path) -> bool:
    return d.is_dir() and any((d / f).exists() for f in ("last.pt", "best.pt", "config.json"))


def list_runs() -> list[Run]:
    """Run folders (with a checkpoint or a config.json), most recently active first."""
    root = paths.runs_dir()
    try:
        dirs = [d for d in root.iterdir() if _is_run_dir(d)]
    except FileNotFoundError:
        return []  # nothing trained yet
    except OSError as exc:  # CIFARNET_HOME is a file, or unreadable: say so (training would fail there too)
        raise fileio.os_error(exc, root, "read") from exc
    return sorted((Run(d.name, d) for d in dirs), key=Run.last_activity, reverse=True)


def latest_run(*, trained_only: bool = False) -> Run:
    """The most recently active run; ``trained_only`` skips runs that never completed an epoch (their
    last.pt is a resume point with initial weights, not a model to evaluate or deploy by default)."""
    all_runs = list_runs()
    candidates = [r for r in all_runs if r.has_model()] if trained_only else all_runs
    if not candidates:
        if all_runs:
            raise CifarNetError(
                f"No run in {paths.runs_dir()} has completed an epoch yet ({', '.join(r.name for r in all_runs[:5])} "
                "stopped before the first one); resume one with `cifarnet train --resume NAME`, or name a run."
            )
        raise CifarNetError(
            f"No runs yet in {paths.runs_dir()}; train one with `cifarnet train`, or pass a checkpoint file "
            "(--checkpoint PATH for predict)."
        )
    return candidates[0]


def resolve_run(ref: str | None, *, trained_only: bool = False) -> Run:
    """A run from a name, a run folder, or None / 'last' for the most recent."""
    if ref is None or ref == "last":
        return latest_run(trained_only=trained_only)
    path = Path(ref).expanduser()
    if _is_run_dir(path):
        return Run(path.name, path)
    run = Run(ref, paths.runs_dir() / ref)
    if "/" not in ref and _is_run_dir(run.dir):
        return run
    if path.is_dir():
        raise CifarNetError(
            f"{path} is a folder, not a run (it has no config.json, last.pt or best.pt): give a run name, a run "
            "folder or a checkpoint file."
        )
    names = [r.name for r in list_runs()[:10]]
    hint = f" Known runs: {', '.join(names)}." if names else f" No runs in {paths.runs_dir()} yet."
    raise CifarNetError(f"No run named {ref!r}.{hint}")


def resolve_checkpoint(ref: str | None, *, prefer: str = "best") -> tuple[Path, Run | None]:
    """A checkpoint file from a path, or from a run (its best.pt, else last.pt). The default (None or
    'last') is the most recent run that completed an epoch."""
    if ref is not None:
        path = Path(ref).expanduser()
        if path.is_file():
            run = Run(path.parent.name, path.parent) if (path.parent / "config.json").is_file() else None
            return path, run
        if not path.is_dir() and (path.suffix in (".pt", ".pth") or os.sep in ref):
            raise CifarNetError(f"No checkpoint or run folder at {path}.")
    run = resolve_run(ref, trained_only=ref in (None, "last"))
    order = (run.best, run.last) if prefer == "best" else (run.last, run.best)
    for candidate in order:
        if candidate.is_file():
            return candidate, run
    raise CifarNetError(f"Run {run.name!r} has no checkpoint yet.")
