"""Run folders: ``<home>/runs/<name>/`` with last.pt, best.pt, config.json and metrics.jsonl."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifarnet_cli import paths
from cifarnet_cli.errors import CifarNetError, UsageError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


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

    def write_config(self, data: dict[str, Any]) -> None:
        tmp = self.config_file.with_suffix(".json.partial")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.config_file)

    def update_config(self, config: dict[str, Any]) -> None:
        """Replace the recorded training config (the micro-batch can change after running out of memory)."""
        data = json.loads(self.config_file.read_text()) if self.config_file.is_file() else {}
        data["config"] = config
        self.write_config(data)

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics_file.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_file.is_file():
            return []
        rows = []
        for line in self.metrics_file.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
        return rows

    def truncate_metrics(self, epochs: int) -> None:
        """Drop rows after ``epochs`` (an interrupted epoch may have logged before its checkpoint)."""
        rows = [r for r in self.read_metrics() if int(r.get("epoch", 0)) <= epochs]
        tmp = self.metrics_file.with_suffix(".jsonl.partial")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.metrics_file)


def default_name(arch: str) -> str:
    return f"{arch}-{time.strftime('%Y%m%d-%H%M%S')}"


def create_run(name: str) -> Run:
    if not _NAME.match(name):
        raise UsageError(f"--run {name!r}: use letters, digits, '.', '_' and '-' (up to 100 characters).")
    run = Run(name, paths.runs_dir() / name)
    if run.last.exists() or run.best.exists():
        raise CifarNetError(
            f"Run {name!r} already exists at {run.dir}; continue it with --resume {name} or pick another --run."
        )
    run.dir.mkdir(parents=True, exist_ok=True)
    return run


def list_runs() -> list[Run]:
    """Runs with a checkpoint, newest first."""
    root = paths.runs_dir()
    if not root.is_dir():
        return []
    runs = [
        Run(d.name, d) for d in root.iterdir() if d.is_dir() and ((d / "last.pt").exists() or (d / "best.pt").exists())
    ]
    return sorted(runs, key=lambda r: max(p.stat().st_mtime for p in (r.last, r.best) if p.exists()), reverse=True)


def latest_run() -> Run:
    runs = list_runs()
    if not runs:
        raise CifarNetError(
            f"No runs yet in {paths.runs_dir()}; train one with `cifarnet train`, or pass a checkpoint file "
            "(--checkpoint PATH for predict)."
        )
    return runs[0]


def resolve_run(ref: str | None) -> Run:
    """A run from a name, a run folder, or None / 'last' for the most recent."""
    if ref is None or ref == "last":
        return latest_run()
    path = Path(ref).expanduser()
    if path.is_dir() and ((path / "last.pt").exists() or (path / "best.pt").exists()):
        return Run(path.name, path)
    run = Run(ref, paths.runs_dir() / ref)
    if run.dir.is_dir() and (run.last.exists() or run.best.exists()):
        return run
    names = [r.name for r in list_runs()[:10]]
    hint = f" Known runs: {', '.join(names)}." if names else f" No runs in {paths.runs_dir()} yet."
    raise CifarNetError(f"No run named {ref!r}.{hint}")


def resolve_checkpoint(ref: str | None, *, prefer: str = "best") -> tuple[Path, Run | None]:
    """A checkpoint file from a path, or from a run (its best.pt, else last.pt)."""
    if ref is not None:
        path = Path(ref).expanduser()
        if path.is_file():
            run = Run(path.parent.name, path.parent) if (path.parent / "config.json").is_file() else None
            return path, run
        if not path.is_dir() and (path.suffix in (".pt", ".pth") or os.sep in ref):
            raise CifarNetError(f"No checkpoint or run folder at {path}.")
    run = resolve_run(ref)
    order = (run.best, run.last) if prefer == "best" else (run.last, run.best)
    for candidate in order:
        if candidate.is_file():
            return candidate, run
    raise CifarNetError(f"Run {run.name!r} has no checkpoint yet.")
