"""What ``cifarnet runs`` shows: a summary of every run, one run in detail, several side by side, and
deleting runs. Read from config.json, metrics.jsonl, file sizes and the run's lock only: no checkpoint is
opened and torch is never imported, so listing a hundred runs (or completing a run name) is instant.
"""

from __future__ import annotations

import dataclasses
import json
import os
import reprlib
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cifarnet_cli import fileio, paths, report, runs
from cifarnet_cli.config import TrainConfig
from cifarnet_cli.errors import CifarNetError, UsageError, first_line

#: Machine-readable states (``--json``); the table shows :attr:`RunSummary.status`. ``damaged``: a file of
#: the run cannot be read or holds values of the wrong type (the status says which and why).
STATES = ("running", "finished", "stopped-early", "stopped", "untrained", "damaged")

#: Recipe options left out of ``runs compare``: they never change the result.
_NOT_RECIPE = {"device", "precision", "save_every", "save_minutes"}

#: Options that only mean something to finetune-resnet50 (``runs show`` hides them for train runs).
_FINETUNE_ONLY = {"image_size", "weights", "freeze_backbone", "unfreeze_at", "backbone_lr_scale"}

#: Most processes a run's config.json may record (world_size): far beyond any machine's GPUs.
_MAX_WORLD = 1 << 16


@dataclass(frozen=True)
class RunSummary:
    name: str
    path: str
    task: str
    arch: str
    epochs_done: int
    epochs_planned: int
    best_accuracy: float | None
    best_epoch: int | None
    final_accuracy: float | None
    split: str  # what the accuracies were measured on: val, or test with --val-split 0
    images_per_second: float | None
    device: str
    created: str
    updated: str
    state: str  # one of STATES
    status: str  # the state in words: "stopped after epoch 3", "running (pid 12 on host)", ...
    patience: int
    stopped_early: int | None  # epoch after which --patience stopped the run
    world_size: int = 1  # processes that trained its latest invocation (several GPUs, torchrun)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def command(self) -> str:
        return "finetune-resnet50" if self.task == "finetune-resnet50" else "train"


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(ts)) if ts else ""


def _record(run: runs.Run) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], str | None]:
    """config.json's whole record, its ``config`` and ``meta``, and what is wrong with them: a listing shows
    such a run as damaged instead of failing for every run."""
    record, problem = run.read_config_checked()
    config, meta = record.get("config", {}), record.get("meta", {})
    if not isinstance(config, dict) or not isinstance(meta, dict):
        return record, {}, {}, problem or "config.json: config and meta must be JSON objects"
    recipe = TrainConfig.recorded_problem(config)
    if recipe is not None:
        return record, config, meta, problem or f"config.json: {recipe}"
    expected: list[tuple[str, Any, type]] = [
        ("meta.arch", meta.get("arch"), str),
        ("meta.eval_split", meta.get("eval_split"), str),
        ("device", record.get("device"), str),
        ("created", record.get("created"), str),
        ("world_size", record.get("world_size"), int),
    ]
    for key, value, kind in expected:
        wrong = not isinstance(value, kind) or isinstance(value, bool)
        if value is not None and (wrong or (isinstance(value, int) and not 1 <= value <= _MAX_WORLD)):
            return record, config, meta, problem or f"config.json: {key} is {reprlib.repr(value)}"
    return record, config, meta, problem


def summarize(run: runs.Run) -> RunSummary:
    """One run's row. A run whose files are damaged (wrong types, unreadable, oversized lines) is still
    summarized, with state ``damaged`` and the reason as its status."""
    try:
        return _summarize(run)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError, MemoryError) as exc:
        return _damaged(run, f"{type(exc).__name__}: {first_line(exc, 120)}")


def _damaged(run: runs.Run, why: str) -> RunSummary:
    return RunSummary(
        name=run.name,
        path=str(run.dir),
        task="train",
        arch="?",
        epochs_done=0,
        epochs_planned=0,
        best_accuracy=None,
        best_epoch=None,
        final_accuracy=None,
        split="val",
        images_per_second=None,
        device="",
        created="",
        updated=_iso(run.last_activity()),
        state="damaged",
        status=f"damaged: {why}",
        patience=0,
        stopped_early=None,
    )


def _summarize(run: runs.Run) -> RunSummary:
    record, config, meta, problem = _record(run)
    rows, metrics_problem = run.read_metrics_checked()
    problem = problem or metrics_problem
    if problem is None and not run.dir.is_dir():  # listed because it could not be looked into
        problem = "the folder cannot be read"
    if problem is not None:
        return _damaged(run, problem)
    done = max((r["epoch"] for r in rows), default=0)
    planned = int(config.get("epochs") or 0)
    best = report.best_epoch(rows)
    best_acc = next((r["val_accuracy"] for r in rows if r["epoch"] == best), None) if best else None
    final = rows[-1].get("val_accuracy") if rows else None
    timed = [r for r in rows if isinstance(r.get("epoch_seconds"), int | float) and r.get("images_per_second")]
    seconds = sum(r["epoch_seconds"] for r in timed)
    speed = sum(r["images_per_second"] * r["epoch_seconds"] for r in timed) / seconds if seconds > 0 else None
    patience = int(config.get("patience") or 0)
    stopped_early = report.stopped_early(rows, planned, patience)

    holder = runs.holder_of(run)
    if holder is not None:
        state, status = "running", f"running ({runs.describe_holder(holder, since=False)})" if holder else "running"
    elif stopped_early:
        state, status = "stopped-early", f"stopped early after epoch {done} (--patience {patience})"
    elif planned and done >= planned:
        state, status = "finished", "finished"
    elif done:
        state, status = "stopped", f"stopped after epoch {done}"
    else:
        state, status = "untrained", "never completed an epoch"
    return RunSummary(
        name=run.name,
        path=str(run.dir),
        task=str(config.get("task", "train")),
        arch=str(meta.get("arch") or config.get("arch") or "?"),
        epochs_done=done,
        epochs_planned=planned,
        best_accuracy=best_acc,
        best_epoch=best,
        final_accuracy=final if isinstance(final, int | float) else None,
        split=str(meta.get("eval_split") or "val"),
        images_per_second=speed,
        device=str(record.get("device", "")),
        created=str(record.get("created", "")),
        updated=_iso(run.last_activity()),
        state=state,
        status=status,
        patience=patience,
        stopped_early=stopped_early,
        world_size=_world_size(record),
    )


def _world_size(record: dict[str, Any]) -> int:
    value = record.get("world_size")
    return value if isinstance(value, int) and value > 0 else 1


def list_summaries() -> list[RunSummary]:
    """Every run, most recently active first."""
    return [summarize(run) for run in runs.list_runs()]


# --------------------------------------------------------------------------------------------------
# One run in detail


@dataclass(frozen=True)
class RunDetail:
    summary: RunSummary
    config: dict[str, Any]
    meta: dict[str, Any]
    metrics: list[dict[str, Any]]
    evaluations: list[
        dict[str, Any]
    ]  # {"file", "split", "accuracy", "n", "data", "tta", "classes", ...} per eval-*.json
    files: list[tuple[str, int]]  # (name, bytes)
    resume: str | None  # the command that continues an unfinished run

    def to_json(self) -> dict[str, Any]:
        return {
            "summary": self.summary.to_json(),
            "config": self.config,
            "meta": self.meta,
            "metrics": self.metrics,
            "evaluations": self.evaluations,
            "files": [{"name": n, "bytes": b} for n, b in self.files],
            "resume": self.resume,
        }

    def recipe_rows(self) -> list[tuple[str, str]]:
        """The recipe as a reader wants it: option names as typed on the command line, the learning rate
        a default resolved to, options left unset omitted, and fine-tuning options only for fine-tuning."""
        if TrainConfig.recorded_problem(self.config) is not None:  # damaged: the values as recorded
            return [(k.replace("_", "-"), _shown(v)) for k, v in sorted(self.config.items()) if v is not None]
        config = TrainConfig.from_dict(self.config)
        rows = []
        for key, value in sorted(self.config.items()):
            if key in _FINETUNE_ONLY and config.task != "finetune-resnet50":
                continue
            if key == "lr" and value is None:
                rows.append(
                    ("lr", f"{config.peak_lr:.3g} (base-lr scaled to the effective batch of {config.effective_batch})")
                )
            elif key == "milestones" and not value and config.schedule == "multistep":
                rows.append(("milestones", ",".join(map(str, config.resolved_milestones())) + " (50% and 75%)"))
            elif key == "warmup_epochs" and value is None:
                rows.append(("warmup-epochs", f"{config.warmup:g} (default)"))
            elif value is not None and not (key in ("milestones", "gamma") and config.schedule != "multistep"):
                rows.append((key.replace("_", "-"), _shown(value)))
        return rows


def _shown(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) if value else "—"
    return json.dumps(value)


def _evaluation(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """One eval-*.json's summary, or what makes the file unusable (damaged, edited, oversized, a figure of
    the wrong type or out of range)."""
    try:
        with fileio.open_regular(path) as fh:
            raw = fh.read(runs.MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        return None, f"{path.name} cannot be read ({fileio.problem(exc, path)})"
    if len(raw) > runs.MAX_CONFIG_BYTES:
        return None, f"{path.name} is larger than {runs.MAX_CONFIG_BYTES // 1024 // 1024} MB"
    try:
        data = json.loads(raw.decode("utf-8", errors="replace"))
    except (ValueError, RecursionError):
        return None, f"{path.name} is not valid JSON"
    if not isinstance(data, dict):
        return None, f"{path.name} does not hold a JSON object"
    accuracy, n, split = data.get("accuracy"), data.get("n"), data.get("split")
    if not isinstance(accuracy, int | float) or isinstance(accuracy, bool) or not 0 <= accuracy <= 1:
        return None, f"{path.name}: accuracy is {reprlib.repr(accuracy)}, not a number from 0 to 1"  # NaN too
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return None, f"{path.name}: n is {reprlib.repr(n)}, not a count of images"
    classes = data.get("classes") if "unrestricted_accuracy" in data else None  # a class subset

    def text(key: str) -> str | None:
        value = data.get(key)
        return value if isinstance(value, str) else None

    return {
        "file": path.name,
        "split": str(split),
        "accuracy": accuracy,
        "n": n,
        "data": text("data"),  # "<location> (<kind>)"; older reports have it too
        "data_fingerprint": text("data_fingerprint"),
        # None in reports written before it was recorded
        "runs_own_data": data["runs_own_data"] if isinstance(data.get("runs_own_data"), bool) else None,
        "tta": data.get("tta") is True,
        "classes": [str(c) for c in classes] if isinstance(classes, list) else None,
    }, None


def _evaluations(run: runs.Run) -> tuple[list[dict[str, Any]], str | None]:
    """The run's usable evaluation reports, and what is wrong with the first that is not one."""
    try:
        found = sorted(run.dir.glob("eval-*.json"))
    except OSError:
        return [], None
    read = [_evaluation(path) for path in found]
    return [e for e, _ in read if e is not None], next((why for _, why in read if why is not None), None)


def _files(folder: Path) -> list[tuple[str, int]]:
    """The run's files and their sizes; its lock and the temporary files of writes in progress (or of
    killed ones) are not the run's."""
    out = []
    try:
        found = sorted(folder.rglob("*"))
    except OSError:
        return []
    for path in found:
        if path.name == runs.LOCK_NAME or fileio.is_partial(path.name):
            continue
        try:
            if path.is_file():
                out.append((str(path.relative_to(folder)), path.stat().st_size))
        except OSError:
            continue
    return out


def detail(ref: str) -> RunDetail:
    """One run in full; a damaged run shows what can still be read, with the reason in its summary."""
    run = runs.resolve_run(ref)
    summary = summarize(run)
    _record_all, config, meta, _problem = _record(run)
    evaluations, evaluation_problem = _evaluations(run)
    resume = None
    if summary.state in ("stopped", "untrained") and run.last.is_file():
        resume = f"cifarnet {summary.command} --resume {run.name}"
        device = str(config.get("device", "")) if isinstance(config, dict) else ""
        if summary.world_size > 1 and "," not in device and device != "cuda:all":
            resume += f" --nproc {summary.world_size}"  # its processes came from --nproc, not from a list of GPUs
    if evaluation_problem is not None and summary.state != "damaged":  # its training records stay as read
        summary = dataclasses.replace(summary, state="damaged", status=f"damaged: {evaluation_problem}")
    return RunDetail(
        summary=summary,
        config=config,
        meta=meta,
        metrics=run.read_metrics(),
        evaluations=evaluations,
        files=_files(run.dir),
        resume=resume,
    )


# --------------------------------------------------------------------------------------------------
# Several runs side by side


@dataclass(frozen=True)
class Comparison:
    summaries: list[RunSummary]
    differences: dict[str, list[Any]]  # recipe option → its value in each run (only options that differ)
    curves: dict[str, list[dict[str, Any]]]  # run → its metrics rows
    plot: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "runs": [s.to_json() for s in self.summaries],
            "differences": self.differences,
            "plot": self.plot,
        }


def _recipe(run: runs.Run) -> dict[str, Any]:
    """The run's options with the current defaults filled in, so that a run recorded before an option
    existed does not differ from one that left it at its default."""
    recorded = run.read_config().get("config", {})
    if TrainConfig.recorded_problem(recorded) is not None:  # damaged: compared as recorded
        return recorded if isinstance(recorded, dict) else {}
    config = TrainConfig.from_dict(recorded)
    # The rate a default resolved to (base-lr scaled to the effective batch): what the runs trained with.
    return {**config.to_dict(), "lr": float(f"{config.peak_lr:.6g}")}


def compare(refs: list[str], *, plot: Path | None = None) -> Comparison:
    if len(refs) < 2:
        raise UsageError("Name at least two runs to compare.")
    chosen = [runs.resolve_run(ref) for ref in refs]
    if len({r.dir.resolve() for r in chosen}) < len(chosen):
        raise UsageError("Name each run once.")
    if plot is not None:
        plot = fileio.check_output(plot, option="--plot")
    configs = [_recipe(r) for r in chosen]
    keys = sorted({k for c in configs for k in c} - _NOT_RECIPE)
    differences = {k: [c.get(k) for c in configs] for k in keys if len({json.dumps(c.get(k)) for c in configs}) > 1}
    curves = {r.name: r.read_metrics() for r in chosen}
    summaries = [summarize(r) for r in chosen]
    written = None
    if plot is not None:
        path = report.plot_compare(curves, plot, splits={s.name: s.split for s in summaries})
        if path is None:
            raise CifarNetError(report.PLOT_HINT.replace("curves.png in the run folder", "the comparison plot"))
        written = str(path)
    return Comparison(summaries, differences, curves, written)


# --------------------------------------------------------------------------------------------------
# Deleting


def removable(ref: str) -> runs.Run:
    """A run folder directly inside the runs folder, by name (or 'last', or its path): `runs rm` deletes
    nothing else. An empty name, "." and ".." are refused whatever folder they would mean (an unset shell
    variable must not delete the run the shell stands in)."""
    name = ref.strip()
    if os.path.basename(name.rstrip("/" + os.sep)) in ("", ".", ".."):
        raise UsageError(f"{ref!r} is not a run name; `runs rm` takes run names (see `cifarnet runs`).")
    run = runs.resolve_run(name)
    root = paths.runs_dir().resolve()
    folder = run.dir.parent.resolve() / run.dir.name  # the run's own entry, not where a link points
    if folder.parent != root or folder == root or run.dir.name.startswith("."):
        raise UsageError(f"{ref!r} is not a run in {paths.runs_dir()}; `runs rm` takes run names.")
    run = runs.Run(run.dir.name, folder)
    holder = runs.holder_of(run)
    if holder is not None:  # refused before the question, so that nothing is deleted (remove() checks again)
        raise CifarNetError(
            f"Not deleting {run.name!r}: it is being trained ({runs.describe_holder(holder)}); wait for it to "
            "finish, or stop that process first (Ctrl-C saves it). Nothing was deleted."
        )
    return run


def remove(run: runs.Run) -> None:
    """Delete the run's folder (a link: the link only); refused while another process trains it. The
    folder is renamed away first (runs.trash), so a delete killed half-way leaves no half-run behind."""
    runs.empty_trash()
    if run.dir.is_symlink():
        trashed = runs.trash(run)
        trashed.unlink()
        return
    lock = run.lock()
    try:
        lock.acquire(attempts=3, writing=False)
    except runs.RunBusy as exc:
        raise CifarNetError(f"Not deleting {run.name!r}: {exc}") from None
    try:
        trashed = runs.trash(run)
    except OSError as exc:
        lock.release()
        raise CifarNetError(f"Could not delete {run.dir} ({exc.strerror or exc}); nothing was deleted.") from None
    lock.release(remove_file=False)  # its file went with the folder
    try:
        shutil.rmtree(trashed)
    except OSError as exc:
        raise CifarNetError(
            f"{run.name!r} is deleted from the runs, but its files could not all be removed ({exc.strerror or exc}); "
            f"they are in {trashed}."
        ) from None
