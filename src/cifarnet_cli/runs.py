"""Run folders: ``<home>/runs/<name>/`` with last.pt, best.pt, config.json, metrics.jsonl/.csv and a lock.

Kept free of torch: listing runs, completing run names and ``cifarnet runs`` read only these files.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import reprlib
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifarnet_cli import fileio, paths
from cifarnet_cli.config import MAX_EPOCHS
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
#: A run being deleted is first renamed to ``.deleting-<name>-<random>`` in the runs folder (one atomic
#: step), then removed: a delete killed half-way leaves this hidden folder, which listings skip and the next
#: `runs rm` removes, never a run with half of its files.
TRASH_PREFIX = ".deleting-"
#: The files a run's training writes, which no other command's output may replace.
RECORD_NAMES = ("last.pt", "best.pt", "config.json", "metrics.jsonl", "metrics.csv")
_EPOCH_CHECKPOINT = re.compile(r"epoch-\d+\.pt")
#: What else a run folder keeps and no output may replace: its lock, its curves and evaluate's reports.
_RECORD_FILES = re.compile(r"\.lock|curves\.png|eval-.+\.json|confusion-.+\.png")
#: Longest metrics.jsonl line read (a row is about 250 bytes): a damaged file with a line of hundreds of
#: megabytes is reported instead of read into memory.
MAX_METRICS_LINE = 64 * 1024
#: Largest config.json read (cifarnet writes about 2 KB).
MAX_CONFIG_BYTES = 1024 * 1024


def _write_atomic(path: Path, text: str) -> None:
    """Through fileio's temporary file, into the run folder only while it exists (never re-created)."""
    fileio.write_bytes(path, text.encode("utf-8"), within=path.parent)


def run_file(path: Path) -> str | None:
    """What ``path`` is to a run, when it is a checkpoint or record of one (words for a refusal), else None."""
    name = path.name
    if name not in RECORD_NAMES and not (_EPOCH_CHECKPOINT.fullmatch(name) or _RECORD_FILES.fullmatch(name)):
        return None
    folder = path.parent
    try:
        is_run = any((folder / f).is_file() for f in ("config.json", "last.pt", "best.pt"))
    except OSError:
        is_run = False
    return f"the {name} of run {fileio.display(folder.name)!r}" if is_run else None


#: The range of each metrics column: accuracies are fractions, losses, rates, speeds and times are not
#: negative. Every figure must also be finite (Python's json reads NaN and Infinity).
_METRIC_RANGES: dict[str, tuple[float, float]] = {
    "train_loss": (0.0, math.inf),
    "train_accuracy": (0.0, 1.0),
    "val_loss": (0.0, math.inf),
    "val_accuracy": (0.0, 1.0),
    "lr_first": (0.0, math.inf),
    "lr": (0.0, math.inf),
    "images_per_second": (0.0, math.inf),
    "epoch_seconds": (0.0, math.inf),
}


def _metric_problem(row: dict[str, Any]) -> str | None:
    """Why a metrics row cannot be used (a value of the wrong type, not finite or out of its range), or None."""
    epoch = row.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 1 <= epoch <= MAX_EPOCHS:
        return f"epoch is {reprlib.repr(epoch)}, not a whole number from 1 to {MAX_EPOCHS:,}"
    for key in METRIC_COLUMNS[1:]:
        value = row.get(key)
        if value is None:
            continue
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            return f"{key} is {reprlib.repr(value)}, not a number"
        low, high = _METRIC_RANGES[key]
        if not low <= value <= high:
            within = f"from {low:g} to {high:g}" if math.isfinite(high) else f"at least {low:g}"
            return f"{key} is {reprlib.repr(value)}, not {within}"
    return None


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
        return self.read_config_checked()[0]

    def read_config_checked(self) -> tuple[dict[str, Any], str | None]:
        """config.json as a dict ({} when missing), and what is wrong with the file when it cannot be read."""
        try:
            with fileio.open_regular(self.config_file) as fh:
                raw = fh.read(MAX_CONFIG_BYTES + 1)
        except FileNotFoundError:
            return {}, None
        except OSError as exc:
            return {}, f"config.json cannot be read ({fileio.problem(exc, self.config_file)})"
        if len(raw) > MAX_CONFIG_BYTES:
            return {}, f"config.json is larger than {MAX_CONFIG_BYTES // 1024 // 1024} MB"
        try:
            data = json.loads(raw.decode("utf-8", errors="replace"))
        except (ValueError, RecursionError):
            return {}, "config.json is not valid JSON"
        if not isinstance(data, dict):
            return {}, "config.json does not hold a JSON object"
        return data, None

    # ---------------------------------------------------------------------------------------------
    # metrics.jsonl (+ metrics.csv, the same rows for spreadsheets)

    def update_config(self, config: dict[str, Any]) -> None:
        """Replace the recorded training config (the micro-batch can change after running out of memory)."""
        data = self.read_config()
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
        not UTF-8) or hold values of the wrong type are skipped rather than failing a resume or a listing."""
        return self.read_metrics_checked()[0]

    def read_metrics_checked(self) -> tuple[list[dict[str, Any]], str | None]:
        """The usable rows of metrics.jsonl, and the first sign of damage: a row with a value of the wrong
        type, a line longer than :data:`MAX_METRICS_LINE` (not read), an unreadable file. A line that is not
        JSON is what a crash in the middle of a write leaves: skipped, not damage."""
        rows: list[dict[str, Any]] = []
        problem: str | None = None
        try:
            with fileio.open_regular(self.metrics_file) as fh:
                for number, line in enumerate(_lines(fh), start=1):
                    if line is None:
                        problem = problem or f"metrics.jsonl line {number} is longer than {MAX_METRICS_LINE // 1024} KB"
                        continue
                    try:
                        row = json.loads(line.decode("utf-8", errors="replace"))
                    except (ValueError, RecursionError):
                        continue
                    if not isinstance(row, dict):
                        continue
                    why = _metric_problem(row)
                    if why is None:
                        rows.append(row)
                    else:
                        problem = problem or f"metrics.jsonl line {number}: {why}"
        except FileNotFoundError:
            pass
        except OSError as exc:
            problem = f"metrics.jsonl cannot be read ({fileio.problem(exc, self.metrics_file)})"
        return rows, problem

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
        times = []
        for path in (self.last, self.best, self.metrics_file, self.config_file):
            try:
                times.append(path.stat().st_mtime)
            except OSError:  # missing, or a folder that cannot be read
                continue
        return max(times, default=0.0)

    def clean_partials(self) -> list[Path]:
        """Delete temporary files killed writers left behind (those still being written stay)."""
        return fileio.remove_partials(self.dir, legacy=True)

    def check_writable(self) -> None:
        """Refuse a run folder that is a symbolic link (training would write wherever it points, outside
        the runs folder), or whose record files are folders (training would fail an epoch in)."""
        if self.dir.is_symlink():
            raise CifarNetError(
                f"{fileio.display(self.dir)} is a symbolic link (to {fileio.display(os.readlink(self.dir))}), not a "
                "run folder; cifarnet writes runs only into real folders. Remove the link, or train under another name."
            )
        for path in (self.last, self.best, self.config_file, self.metrics_file, self.csv_file, self.curves_file):
            if path.is_dir():
                raise CifarNetError(
                    f"Cannot write {fileio.display(path)}: it is a folder; move it out of the run folder first."
                )

    def lock(self) -> RunLock:
        return RunLock(self)


def _lines(fh: Any) -> Iterator[bytes | None]:
    """The lines of a binary file, each read with at most :data:`MAX_METRICS_LINE` bytes in memory; None
    for a line longer than that (skipped to its end)."""
    while True:
        line = fh.readline(MAX_METRICS_LINE + 1)
        if not line:
            return
        if len(line) > MAX_METRICS_LINE and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = fh.readline(MAX_METRICS_LINE + 1)
            yield None
            continue
        yield line


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

    def acquire(self, *, attempts: int = 10, writing: bool = True) -> None:
        """Take the lock (``attempts`` tries, 50 ms apart); ``writing``: the holder will write into the run,
        so the folder is checked first (:meth:`Run.check_writable`)."""
        if writing:
            self.run.check_writable()
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

    def release(self, *, remove_file: bool = True) -> None:
        """Drop the lock. ``remove_file=False`` after the folder was renamed away (runs.trash): the path
        may by then name another process's new lock file."""
        if self._fd is None:
            return
        if remove_file:
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
        fd = os.open(run.lock_file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block
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
    run.check_writable()
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
        run.check_writable()  # before mkdir: a link would be followed
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


def _listed(d: Path) -> bool:
    """A folder of the runs folder that the listing shows: a run, or one it cannot look into (shown as
    damaged, with the reason). Hidden names (a run being deleted) are not runs."""
    if d.name.startswith("."):
        return False
    try:
        return _is_run_dir(d)
    except OSError:  # e.g. no permission to look inside: a run, damaged, rather than a failed listing
        return d.is_dir()


def list_runs() -> list[Run]:
    """Run folders (with a checkpoint or a config.json), most recently active first."""
    root = paths.runs_dir()
    try:
        dirs = [d for d in root.iterdir() if _listed(d)]
    except FileNotFoundError:
        return []  # nothing trained yet
    except OSError as exc:  # CIFARNET_HOME is a file, or unreadable: say so (training would fail there too)
        raise fileio.os_error(exc, root, "read") from exc
    return sorted((Run(d.name, d) for d in dirs), key=Run.last_activity, reverse=True)


def trash(run: Run) -> Path:
    """Rename ``run``'s folder (or link) to a hidden name in its folder, in one atomic step: from here on it
    is no run (listings, resolving and writers skip it), and a process killed while deleting it leaves this
    folder for :func:`empty_trash`, not half a run."""
    target = run.dir.parent / f"{TRASH_PREFIX}{run.name}-{secrets.token_hex(4)}"
    os.rename(run.dir, target)
    return target


def empty_trash() -> None:
    """Remove what deletes killed half-way left (see :func:`trash`)."""
    try:
        leftovers = [d for d in paths.runs_dir().iterdir() if d.name.startswith(TRASH_PREFIX)]
    except OSError:
        return
    for folder in leftovers:
        if folder.is_symlink():
            folder.unlink(missing_ok=True)
        else:
            shutil.rmtree(folder, ignore_errors=True)


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
    if "/" not in ref and _listed(run.dir):  # one it cannot look into too: shown as damaged, with the reason
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
