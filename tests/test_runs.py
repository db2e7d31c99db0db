"""`cifarnet runs` and the run folder: listing and states, show/compare/rm/--path, names, the default
model, and one writer per run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cifarnet_cli import paths, runlist, runs
from cifarnet_cli.cli import app
from cifarnet_cli.config import TrainConfig
from cifarnet_cli.errors import CifarNetError
from cifarnet_cli.events import EpochStarted, TrainingInterrupted
from cifarnet_cli.training import train

runner = CliRunner()


def _config(data: Path, **kw: Any) -> TrainConfig:
    base = dict(epochs=1, batch_size=16, val_split=20, data_dir=str(data), warmup_epochs=0, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def _stop_at(epoch: int) -> Callable[[object], None]:
    def on_event(event: object) -> None:
        if isinstance(event, EpochStarted) and event.epoch == epoch:
            raise KeyboardInterrupt

    return on_event


@pytest.fixture
def three_runs(image_folder: Callable[..., Path]) -> Path:
    """One finished run, one stopped by Ctrl-C after epoch 1 of 3, one stopped before its first epoch."""
    data = image_folder(per_class=4)
    train(_config(data), run_name="done", on_event=lambda e: None)
    with pytest.raises(TrainingInterrupted):
        train(_config(data, epochs=3), run_name="halfway", on_event=_stop_at(2))
    with pytest.raises(TrainingInterrupted):
        train(_config(data, epochs=2), run_name="nothing", on_event=_stop_at(1))
    return data


def _fake_run(name: str, *, epochs: int, rows: list[float], patience: int = 0, checkpoint: bool = True) -> runs.Run:
    """A run folder with the files the listing reads (no training): val accuracy per completed epoch."""
    run = runs.Run(name, paths.runs_dir() / name)
    run.dir.mkdir(parents=True)
    config = TrainConfig(epochs=epochs, patience=patience).to_dict()
    run.write_config({"config": config, "meta": {"arch": "resnet20", "eval_split": "val"}, "device": "cpu"})
    run.write_metrics(
        [
            {"epoch": i + 1, "train_loss": 1.0, "val_accuracy": acc, "images_per_second": 100.0, "epoch_seconds": 2.0}
            for i, acc in enumerate(rows)
        ]
    )
    if checkpoint:
        run.last.write_bytes(b"")
        if rows:
            run.best.write_bytes(b"")
    return run


def test_listing_shows_each_state(three_runs: Path) -> None:
    result = runner.invoke(app, ["runs", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["runs_dir"] == str(paths.runs_dir())  # one object, as every --json prints
    listed = {r["name"]: r for r in out["runs"]}
    assert [r["name"] for r in out["runs"]] == ["nothing", "halfway", "done"]  # newest first
    assert (listed["done"]["state"], listed["done"]["status"]) == ("finished", "finished")
    assert listed["done"]["epochs_done"] == listed["done"]["epochs_planned"] == 1
    assert listed["done"]["best_accuracy"] is not None and listed["done"]["split"] == "val"
    assert listed["done"]["images_per_second"] > 0 and listed["done"]["device"].startswith("cpu")
    assert listed["halfway"]["status"] == "stopped after epoch 1" and listed["halfway"]["epochs_planned"] == 3
    assert listed["nothing"]["status"] == "never completed an epoch"
    table = runner.invoke(app, ["runs"])
    assert table.exit_code == 0 and "stopped after epoch 1" in table.output and "never completed" in table.output
    assert runner.invoke(app, ["runs", "list", "--json"]).stdout == result.stdout


def test_running_and_stopped_early_states() -> None:
    _fake_run("early", epochs=10, rows=[0.5, 0.6, 0.55, 0.58], patience=2)
    live = _fake_run("live", epochs=10, rows=[0.5])
    with live.lock():
        states = {s.name: s for s in runlist.list_summaries()}
        assert states["live"].state == "running" and f"pid {os.getpid()}" in states["live"].status
    assert runlist.summarize(live).state == "stopped"  # the lock is gone with its holder
    assert states["early"].state == "stopped-early" and states["early"].stopped_early == 4
    assert states["early"].status == "stopped early after epoch 4 (--patience 2)"


def test_listing_never_imports_torch() -> None:
    _fake_run("a", epochs=2, rows=[0.5])
    code = (
        "import sys\n"
        "from cifarnet_cli.cli import app\n"
        "try:\n    app(['runs'], prog_name='cifarnet')\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, 'matplotlib' in sys.modules, file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=dict(os.environ)
    )
    assert proc.stderr.strip().splitlines()[-1] == "False False", proc.stderr
    assert "stopped after epoch 1" in proc.stdout


def test_show_compare_and_path(three_runs: Path, tmp_path: Path) -> None:
    shown = runner.invoke(app, ["runs", "show", "halfway", "--json"])
    assert shown.exit_code == 0, shown.output
    d = json.loads(shown.stdout)
    assert d["config"]["epochs"] == 3 and [r["epoch"] for r in d["metrics"]] == [1]
    assert d["resume"] == "cifarnet train --resume halfway"
    assert {"last.pt", "best.pt", "config.json", "metrics.jsonl", "metrics.csv"} <= {f["name"] for f in d["files"]}
    table = runner.invoke(app, ["runs", "show", "halfway"])
    assert "Continue it with: cifarnet train --resume halfway" in table.output and "Per epoch" in table.output
    # the recipe as a reader wants it: the rate a default gave, no JSON nulls, no fine-tuning options
    assert "0.0125 (base-lr scaled to the effective batch of 16)" in table.output
    assert "null" not in table.output and "freeze-backbone" not in table.output
    assert json.loads(runner.invoke(app, ["runs", "show", "done", "--json"]).stdout)["resume"] is None

    plot = tmp_path / "plots" / "cmp.png"  # a folder that does not exist yet is created, as export does
    compared = runner.invoke(app, ["runs", "compare", "done", "halfway", "--plot", str(plot), "--json"])
    assert compared.exit_code == 0, compared.output
    c = json.loads(compared.stdout)
    assert c["differences"] == {"epochs": [1, 3]}  # only the options that differ
    assert [r["name"] for r in c["runs"]] == ["done", "halfway"] and plot.stat().st_size > 1000
    assert "epochs" in runner.invoke(app, ["runs", "compare", "done", "halfway"]).output
    into_folder = runner.invoke(app, ["runs", "compare", "done", "halfway", "--plot", str(tmp_path)])
    assert into_folder.exit_code == 1 and "it is a folder; give the path of a file" in into_folder.output
    assert ".partial" not in into_folder.output
    assert runner.invoke(app, ["runs", "compare", "done"]).exit_code == 2

    path = runner.invoke(app, ["runs", "--path", "last"])
    assert path.exit_code == 0 and path.stdout.strip() == str(paths.runs_dir() / "nothing")
    assert runner.invoke(app, ["runs", "--path", "done"]).stdout.strip().endswith("done")
    missing = runner.invoke(app, ["runs", "--path", "nope"])
    assert missing.exit_code == 1 and "No run named 'nope'" in missing.output
    # a default learning rate is compared as the rate it resolved to (it differs with the effective batch)
    other = runs.Run("bigger", paths.runs_dir() / "bigger")
    other.dir.mkdir()
    record = json.loads((paths.runs_dir() / "done" / "config.json").read_text())
    record["config"]["batch_size"] *= 2
    other.write_config(record)
    lr = json.loads(runner.invoke(app, ["runs", "compare", "done", "bigger", "--json"]).stdout)["differences"]["lr"]
    assert lr[1] == 2 * lr[0] and None not in lr
    table = runner.invoke(app, ["runs", "compare", "done", "bigger"]).output
    assert "null" not in table


def test_rm_asks_and_refuses_a_run_being_trained() -> None:
    a = _fake_run("a", epochs=2, rows=[0.5])
    b = _fake_run("b", epochs=2, rows=[0.5])
    declined = runner.invoke(app, ["runs", "rm", "a"], input="n\n")
    assert declined.exit_code == 1 and "Nothing deleted" in declined.output and a.dir.is_dir()
    assert runner.invoke(app, ["runs", "rm", "a"], input="y\n").exit_code == 0 and not a.dir.exists()
    with b.lock():
        busy = runner.invoke(app, ["runs", "rm", "b", "--yes"])
        assert busy.exit_code == 1 and "being trained" in busy.output and f"pid {os.getpid()}" in busy.output
        # several names with one being trained: refused before the question, and nothing is deleted
        c = _fake_run("c", epochs=2, rows=[0.5])
        mixed = runner.invoke(app, ["runs", "rm", "c", "b"], input="y\n")
        assert mixed.exit_code == 1 and "being trained" in mixed.output and "Delete" not in mixed.output
        assert c.dir.is_dir()
    assert b.dir.is_dir()
    outside = runner.invoke(app, ["runs", "rm", str(b.dir.parent.parent), "--yes"])
    assert outside.exit_code != 0 and paths.runs_dir().is_dir()
    assert runner.invoke(app, ["runs", "rm", "b", "--yes"]).exit_code == 0 and not b.dir.exists()


def test_only_untrained_runs_is_a_clear_error() -> None:
    _fake_run("empty", epochs=2, rows=[])
    with pytest.raises(CifarNetError, match="has completed an epoch"):
        runs.resolve_checkpoint(None)


def test_completion_reads_the_listing() -> None:
    _fake_run("alpha", epochs=2, rows=[0.5])
    _fake_run("beta", epochs=2, rows=[], checkpoint=False)  # only config.json: listed, completed
    from cifarnet_cli.cli import _complete_run

    assert sorted(_complete_run("")) == ["alpha", "beta"] == sorted(s.name for s in runlist.list_summaries())


# --------------------------------------------------------------------------------------------------
# One writer per run


def test_a_new_run_name_is_taken_atomically(other_process_lock: Callable[[Path], subprocess.Popen[str]]) -> None:
    run = runs.Run("same", paths.runs_dir() / "same")
    run.dir.mkdir(parents=True)
    other_process_lock(run.dir)  # another `train --run same` got there first and is loading its data
    with pytest.raises(runs.RunBusy, match="being trained by another process"):
        runs.create_run("same")
    taken, lock = runs.create_run("same-name", unique=True)
    second, lock2 = runs.create_run("same-name", unique=True)  # default names step aside instead
    assert (taken.name, second.name) == ("same-name", "same-name-2")
    lock.release()
    lock2.release()


def test_lock_holder_is_described() -> None:
    run = _fake_run("h", epochs=2, rows=[])
    assert runs.holder_of(run) is None
    with run.lock():
        holder = runs.holder_of(run)
        assert holder is not None and holder["pid"] == os.getpid()
        assert runs.describe_holder(holder).startswith(f"pid {os.getpid()} on ")
    assert runs.holder_of(run) is None and not run.lock_file.exists()


def test_a_home_that_is_a_file_is_not_reported_as_no_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.write_text("not a folder")
    monkeypatch.setenv("CIFARNET_HOME", str(home))
    result = runner.invoke(app, ["runs"])
    assert result.exit_code == 1 and "is a file, not a folder" in result.output and "No runs yet" not in result.output
