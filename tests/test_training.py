"""Run set-up and per-epoch bookkeeping: --init-from, extending a finished run, --save-every, --patience,
the learning rates in metrics.jsonl/.csv, curves.png during training, TensorBoard."""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cifarnet_cli import engine, paths, runlist, runs, training
from cifarnet_cli.cli import app
from cifarnet_cli.config import TrainConfig
from cifarnet_cli.engine import EvalStats, scheduled_lrs
from cifarnet_cli.events import EpochStarted, Notice

runner = CliRunner()
QUICK = ["--batch-size", "16", "--val-split", "20", "--warmup-epochs", "0", "--quiet"]


def _rows(run: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (paths.runs_dir() / run / "metrics.jsonl").read_text().splitlines()]


def test_init_from_a_run_and_extending_a_finished_one(image_folder: Callable[..., Path]) -> None:
    data = image_folder(per_class=8)
    first = runner.invoke(
        app,
        [
            "train",
            "--data-dir",
            str(data),
            "--run",
            "a",
            "--epochs",
            "2",
            "--save-every",
            "1",
            "--seed",
            "4",
            "--lr",
            "0.05",
        ]
        + QUICK,
    )
    assert first.exit_code == 0, first.output
    best_a = max(r["val_accuracy"] for r in _rows("a"))
    assert best_a >= 0.3  # the colours are being learnt; a fresh model scores 10% after its first epoch here

    # A finished run cannot be stretched: the refusal gives the command that trains further instead.
    longer = runner.invoke(app, ["train", "--resume", "a", "--epochs", "5"])
    assert longer.exit_code == 2
    command = longer.output.split("(fresh optimizer and schedule): ")[1].strip()
    assert (
        command
        == f"cifarnet train --init-from a --epochs 3 --data-dir {shlex.quote(str(data))} --val-split 20 --seed 4"
    )

    args = shlex.split(command)[1:] + ["--run", "b", "--lr", "1e-6", "--batch-size", "16", "--quiet"]
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    b = _rows("b")
    assert b[0]["val_accuracy"] >= best_a - 0.1  # epoch 1 starts from a's weights, not from scratch
    record = json.loads((paths.runs_dir() / "b" / "config.json").read_text())
    assert record["config"]["init_from"] == str(paths.runs_dir() / "a" / "best.pt")
    assert len(b) == 3 and record["config"]["epochs"] == 3  # a new run with its own schedule

    # --save-every 1 kept every epoch; those files are models like best.pt
    assert sorted(p.name for p in (paths.runs_dir() / "a").glob("epoch-*.pt")) == ["epoch-001.pt", "epoch-002.pt"]
    evaluated = runner.invoke(
        app, ["evaluate", str(paths.runs_dir() / "a" / "epoch-001.pt"), "--split", "val", "--json"]
    )
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["accuracy"] == pytest.approx(_rows("a")[0]["val_accuracy"], abs=1e-6)

    wrong = runner.invoke(app, ["train", "--data-dir", str(data), "--init-from", "a", "--arch", "resnet32", *QUICK])
    assert wrong.exit_code == 2 and "holds a resnet20 model" in wrong.output and "--arch resnet20" in wrong.output
    assert "Traceback" not in wrong.output
    resnet50 = runner.invoke(app, ["finetune-resnet50", "--data-dir", str(data), "--init-from", "a"])
    assert resnet50.exit_code == 2 and "holds a resnet20 model and this run trains a resnet50" in resnet50.output
    assert "cifarnet train --init-from" in resnet50.output and "--arch" not in resnet50.output  # finetune has none
    both = runner.invoke(app, ["finetune-resnet50", "--init-from", "a", "--weights", "none"])
    assert both.exit_code == 2 and "--weights and --init-from" in both.output
    other_classes = image_folder("six", per_class=4, classes=("a", "b", "c", "d", "e", "f"), seed=50)
    mismatch = runner.invoke(app, ["train", "--data-dir", str(other_classes), "--init-from", "a", *QUICK])
    assert mismatch.exit_code == 1 and "has 10 classes and this data has 6" in mismatch.output


def test_a_run_from_another_validates_on_images_its_weights_never_trained_on(
    image_folder: Callable[..., Path],
) -> None:
    """--init-from with another seed (or --val-split) on the same images would draw a validation split that
    holds images the starting weights trained on: its figure would overstate the model. The child holds out
    only images new to them, evaluate finds the same split again, and a larger --val-split is refused."""
    from cifarnet_cli import checkpoint
    from cifarnet_cli.checkpoint import read_model
    from cifarnet_cli.data.split import SplitRecord, image_ids

    data = image_folder(per_class=4)
    base = ["train", "--data-dir", str(data), "--epochs", "1", *QUICK]
    assert runner.invoke(app, [*base, "--run", "p", "--seed", "4"]).exit_code == 0
    parent = SplitRecord.from_meta(read_model(paths.runs_dir() / "p" / "best.pt").meta)
    assert parent is not None and parent.held_out.size == 20

    child_run = runner.invoke(app, [*base, "--run", "c", "--init-from", "p", "--json"])
    assert child_run.exit_code == 0, child_run.output
    child = SplitRecord.from_meta(read_model(paths.runs_dir() / "c" / "best.pt").meta)
    assert child is not None and np.array_equal(child.held_out, parent.held_out)  # the only 20 it never saw
    assert np.array_equal(child.inherited, parent.seen)
    # A resume draws the same split again from the record (rank 0 sends it to the other processes).
    saved = checkpoint.load(paths.runs_dir() / "c" / "last.pt")
    seen = training._seen_by_start(None, saved, lambda _event: None)
    resumed = TrainConfig.from_dict(saved["config"])
    _, split = training._prepare_data(resumed, saved, None, lambda _event: None, seen=seen)
    assert split.eval_set is not None and np.array_equal(np.unique(image_ids(split.eval_set.images)), child.held_out)
    evaluated = runner.invoke(app, ["evaluate", "c", "--split", "val", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["accuracy"] == pytest.approx(_rows("c")[-1]["val_accuracy"], abs=1e-6)

    too_many = runner.invoke(app, [*base, "--run", "c2", "--init-from", "p", "--val-split", "21"])
    assert too_many.exit_code == 2 and "use --val-split 20 or less" in too_many.output.replace("\n", " ")
    assert not (paths.runs_dir() / "c2").exists()


def test_a_run_from_another_says_when_its_test_split_was_trained_on(image_folder: Callable[..., Path]) -> None:
    """A test split the starting weights trained on is said, in train and in evaluate; with nothing new to hold
    out, the refusal says what works (no --val-split advice that is refused in turn)."""
    a = image_folder("a", per_class=2, splits=("train", "test"))
    swapped = image_folder("b", per_class=2, splits=("test", "train"))  # b/test holds a/train's images
    quick = ["--epochs", "1", "--batch-size", "16", "--warmup-epochs", "0", "--device", "cpu"]
    first = runner.invoke(app, ["train", "--data-dir", str(a), "--run", "all", "--val-split", "0", *quick, "--quiet"])
    assert first.exit_code == 0, first.output
    child = runner.invoke(
        app, ["train", "--data-dir", str(swapped), "--init-from", "all", "--val-split", "0", "--run", "x", *quick]
    )
    assert child.exit_code == 0, child.output
    said = " ".join(child.output.split())
    assert "20 of the 20 test images are images the weights of --init-from trained on" in said
    evaluated = runner.invoke(app, ["evaluate", "x"])
    assert evaluated.exit_code == 0, evaluated.output
    assert "20 of these 20 images (test) are images the run trained on" in " ".join(evaluated.output.split())

    args = ["--init-from", "all", "--val-split", "3", "--run", "y", *quick]
    flat = runner.invoke(app, ["train", "--data-dir", str(a / "train"), *args])  # every image seen, no test split
    assert flat.exit_code == 1 and "none is left to validate on" in " ".join(flat.output.split())
    tested = runner.invoke(app, ["train", "--data-dir", str(a), *args])
    assert tested.exit_code == 2
    assert "use --val-split 0 to validate on the test split" in " ".join(tested.output.split())


def test_resume_of_an_unfinished_run_with_more_epochs_says_how() -> None:
    run = runs.Run("u", paths.runs_dir() / "u")
    run.dir.mkdir(parents=True)
    config = TrainConfig(epochs=4, val_split=20, data_dir="/d")
    err = training._extend_refusal(run, config, done=2, wanted=10)
    assert "Finish it with `cifarnet train --resume u`" in str(err)
    assert str(err).endswith("cifarnet train --init-from u --epochs 6 --data-dir /d --val-split 20")
    assert "cannot change" in str(training._extend_refusal(run, config, done=2, wanted=3))


def test_init_defaults_take_the_source_architecture() -> None:
    run = runs.Run("deep", paths.runs_dir() / "deep")
    run.dir.mkdir(parents=True)
    run.write_config({"config": {}, "meta": {"arch": "resnet56"}})
    assert training.init_defaults("deep") == {"arch": "resnet56"}
    assert training.init_defaults("nothing-here") == {}


def test_patience_stops_and_is_recorded(image_folder: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    data = image_folder(per_class=4)
    scripted = iter([0.5, 0.4, 0.45, 0.9, 0.9])  # best at epoch 1, then two epochs without improvement

    def evaluate(*_args: Any, **_kwargs: Any) -> EvalStats:
        return EvalStats(1.0, next(scripted), 20)

    monkeypatch.setattr(engine, "evaluate", evaluate)
    seen_curves: list[bool] = []
    notices: list[str] = []

    def on_event(event: object) -> None:
        if isinstance(event, EpochStarted) and event.epoch == 2:
            deadline = time.monotonic() + 300  # drawn in the background after epoch 1
            while not (paths.runs_dir() / "pat" / "curves.png").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            seen_curves.append((paths.runs_dir() / "pat" / "curves.png").exists())
        if isinstance(event, Notice):
            notices.append(event.message)

    config = TrainConfig(epochs=5, batch_size=16, val_split=20, data_dir=str(data), warmup_epochs=0, patience=2)
    result = training.train(config, run_name="pat", on_event=on_event)
    assert (result.epochs, result.stopped_early, result.best_epoch) == (3, 3, 1)
    assert result.to_json()["stopped_early"] == 3
    assert seen_curves == [True]
    assert any("Stopped early after epoch 3" in n and "--patience 2" in n for n in notices)
    assert runlist.summarize(runs.resolve_run("pat")).state == "stopped-early"
    assert torch.load(paths.runs_dir() / "pat" / "last.pt", weights_only=True)["fit_state"]["stopped_early"] == 3
    again = runner.invoke(app, ["train", "--resume", "pat"])
    assert again.exit_code == 0 and "stopped early after epoch 3" in again.output
    assert "resume with --patience 3 or more" in again.output.replace("\n", " ")
    same = runner.invoke(app, ["train", "--resume", "pat", "--patience", "2"])  # would have stopped it again
    assert same.exit_code == 0 and "nothing to do" in same.output and len(_rows("pat")) == 3
    # a --patience that would not have stopped it continues the run (the README lists it as changeable)
    more = runner.invoke(app, ["train", "--resume", "pat", "--patience", "3", "--json", "--quiet"])
    assert more.exit_code == 0, more.output
    assert json.loads(more.stdout)["epochs"] == 5 and len(_rows("pat")) == 5
    assert runlist.summarize(runs.resolve_run("pat")).state == "finished"


def test_metrics_record_the_rates_the_epoch_trained_with(image_folder: Callable[..., Path]) -> None:
    data = image_folder(per_class=4)  # 20 training images, batch 8: 3 optimizer steps per epoch
    result = runner.invoke(
        app, ["train", "--data-dir", str(data), "--run", "lr", "--epochs", "2", "--batch-size", "8", "--lr", "0.1",
              "--val-split", "20", "--warmup-epochs", "0", "--quiet"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = _rows("lr")
    lrs = scheduled_lrs(TrainConfig(epochs=2, lr=0.1, warmup_epochs=0), 3)
    assert [(r["lr_first"], r["lr"]) for r in rows] == [(lrs[0], lrs[2]), (lrs[3], lrs[5])]
    assert rows[0]["lr_first"] == pytest.approx(0.1) and rows[1]["lr"] > 0  # the cosine reaches 0 after it
    lines = (paths.runs_dir() / "lr" / "metrics.csv").read_text().splitlines()
    assert lines[0].split(",") == list(runs.METRIC_COLUMNS)
    assert [float(v) for v in lines[2].split(",")[5:7]] == [rows[1]["lr_first"], rows[1]["lr"]]
    assert len(lines) == 3


def test_tensorboard_logs_scalars(image_folder: Callable[..., Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = image_folder(per_class=4)
    result = runner.invoke(
        app, ["train", "--data-dir", str(data), "--run", "tb", "--epochs", "2", "--tensorboard", *QUICK[:-1]]
    )
    assert result.exit_code == 0, result.output
    log_dir = paths.runs_dir() / "tb" / "tensorboard"
    assert f"tensorboard --logdir {log_dir}" in result.output
    events = EventAccumulator(str(log_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"epoch/val_accuracy", "epoch/train_loss", "epoch/lr", "step/lr", "step/images_per_second"} <= tags
    assert [e.step for e in events.Scalars("epoch/val_accuracy")] == [1, 2]


def test_tensorboard_without_the_package_is_one_line(
    image_folder: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now fails
    monkeypatch.setenv("CIFARNET_TENSORBOARD", "1")
    data = image_folder(per_class=4)
    result = runner.invoke(app, ["train", "--data-dir", str(data), "--run", "notb", "--epochs", "1", *QUICK[:-1]])
    assert result.exit_code == 0, result.output
    assert result.output.count("pip install 'cifarnet[tensorboard]'") == 1
    assert not (paths.runs_dir() / "notb" / "tensorboard").exists()


def test_resume_continues_on_the_same_images_only(image_folder: Callable[..., Path], tmp_path: Path) -> None:
    """Other data would draw the recorded --val-split again from other images: refused before anything is
    written, naming --init-from. The same images in another folder (moved, copied) continue."""
    import shutil

    from cifarnet_cli.events import TrainingInterrupted

    data = image_folder(per_class=4)

    def stop_in_epoch_2(event: object) -> None:
        if isinstance(event, EpochStarted) and event.epoch == 2:
            raise KeyboardInterrupt

    config = TrainConfig(epochs=2, batch_size=16, val_split=20, data_dir=str(data), warmup_epochs=0)
    with pytest.raises(TrainingInterrupted):
        training.train(config, run_name="same", on_event=stop_in_epoch_2)
    recorded = (paths.runs_dir() / "same" / "config.json").read_bytes()
    other = image_folder("other", per_class=5)
    refused = runner.invoke(app, ["train", "--resume", "same", "--data-dir", str(other)])
    assert refused.exit_code == 2
    assert f"cifarnet train --init-from same --data-dir {other}" in refused.output.replace("\n", " ")
    assert (paths.runs_dir() / "same" / "config.json").read_bytes() == recorded  # nothing written
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    resumed = runner.invoke(app, ["train", "--resume", "same", "--data-dir", str(moved), "--quiet", "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["epochs"] == 2
    assert json.loads((paths.runs_dir() / "same" / "config.json").read_text())["config"]["data_dir"] == str(moved)


def test_batch_size_auto_is_the_default_on_a_gpu_that_shares_the_systems_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a Jetson (an integrated GPU, mocked here) running out of memory is the kernel killing the process:
    the micro-batch is fitted to the memory by default, and --accum keeps the recipe's effective batch."""
    from cifarnet_cli.autobatch import MemoryFit
    from cifarnet_cli.config import make_config
    from cifarnet_cli.devices import Precision

    asked: list[tuple[int, int]] = []
    budgeted: list[tuple[bool, int]] = []

    def fit_micro_batch(
        _model: Any, *, device: Any, precision: Any, effective_batch: int, cap: int, captured: bool, data_bytes: int
    ) -> MemoryFit:
        asked.append((effective_batch, cap))
        budgeted.append((captured, data_bytes))
        return MemoryFit(64, effective_batch // 64, 1 << 20, 1 << 28, 5 << 30, measured=True)

    monkeypatch.setattr(training, "fit_micro_batch", fit_micro_batch)
    cuda, fp32 = torch.device("cuda", 0), Precision("fp32", None)

    def fitted(config: TrainConfig, integrated: bool) -> tuple[TrainConfig, list[Any]]:
        monkeypatch.setattr(training, "is_integrated", lambda _device: integrated)
        events: list[Any] = []
        return training._fit_micro_batch(config, torch.nn.Identity(), cuda, fp32, events.append), events

    default = make_config("train", {})
    assert default.batch_size_auto is None  # nothing asked: the device decides
    jetson, events = fitted(default, integrated=True)
    assert (jetson.batch_size, jetson.accum, jetson.effective_batch, jetson.peak_lr) == (64, 8, 512, 0.4)
    assert jetson.batch_size_auto is True and asked == [(512, 512)]  # recorded, so a resume does the same
    assert "the default on a GPU that shares the system's memory" in events[0].message

    desktop, events = fitted(default, integrated=False)
    assert desktop == default.replace(batch_size_auto=False) and not events and len(asked) == 1

    for given in ({"batch_size": 16, "accum": 32}, {"accum": 8}, {"batch_size": 128}):
        own = make_config("train", given)
        assert own.batch_size_auto is False and fitted(own, integrated=True) == (own, [])  # the user's, as given
    finetune = make_config("finetune-resnet50", {})
    assert finetune.batch_size_auto is True and fitted(finetune, integrated=False)[0].effective_batch == 128
    # the budget is told whether the step is captured (its graph keeps its own memory)
    training._fit_micro_batch(finetune, torch.nn.Identity(), cuda, fp32, lambda e: None, step_mode="graph")
    assert [captured for captured, _data in budgeted] == [False, False, True]
