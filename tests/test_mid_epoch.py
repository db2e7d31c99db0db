"""--save-minutes: last.pt written inside an epoch, at an optimizer step, and --resume continuing from that
exact step with the result of a run that was never stopped."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from cifarnet_cli import engine, paths
from cifarnet_cli.cli import app
from cifarnet_cli.engine import EpochPosition, _first_micro_batch
from cifarnet_cli.errors import CifarNetError

runner = CliRunner()
# 40 images, 10 held out: 30 to train on, micro-batches of 4 (and a last one of 2) in 4 optimizer steps per epoch.
RECIPE = ["--epochs", "2", "--batch-size", "4", "--accum", "2", "--val-split", "10", "--warmup-epochs", "0"]
EVERY_STEP = ["--save-minutes", "0.000001"]  # a save is due at every optimizer step


def _train(data: Path, run: str, *extra: str) -> Any:
    return runner.invoke(app, ["train", "--data-dir", str(data), "--run", run, "--seed", "3", *RECIPE, *extra])


def _last(run: str) -> dict[str, Any]:
    return torch.load(paths.runs_dir() / run / "last.pt", weights_only=True)


def _stop_after_saving(monkeypatch: pytest.MonkeyPatch, epoch: int, step: int) -> list[EpochPosition]:
    """Ctrl-C right after last.pt is written at ``step`` of ``epoch``; the positions saved are recorded."""
    saved: list[EpochPosition] = []
    real = engine._FitLoop.save_position

    def save_position(self: engine._FitLoop, position: EpochPosition) -> None:
        real(self, position)
        saved.append(position)
        if (position.epoch, position.steps) == (epoch, step):
            raise KeyboardInterrupt

    monkeypatch.setattr(engine._FitLoop, "save_position", save_position)
    return saved


def test_resume_from_a_save_inside_an_epoch_equals_the_run_never_stopped(
    image_folder: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = image_folder(per_class=4)
    whole = _train(data, "whole", "--save-minutes", "0")
    assert whole.exit_code == 0, whole.output

    saved = _stop_after_saving(monkeypatch, epoch=2, step=2)
    stopped = _train(data, "stopped", *EVERY_STEP)
    assert stopped.exit_code == 130
    assert "epoch 1 and step 2/4 of epoch 2 are saved in" in stopped.output
    assert [(p.epoch, p.steps) for p in saved] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2)]  # 4/4 ends the epoch
    last = _last("stopped")
    assert last["epoch"] == 1 and (last["position"]["epoch"], last["position"]["steps"]) == (2, 2)
    assert last["position"]["images"] == 16

    monkeypatch.undo()
    resumed = runner.invoke(app, ["train", "--resume", "stopped", "--save-minutes", "0"])  # bookkeeping: may change
    assert resumed.exit_code == 0, resumed.output
    assert "Resuming run stopped at step 2 of epoch 2" in resumed.output

    a, b = _last("whole"), _last("stopped")
    assert a["epoch"] == b["epoch"] == 2
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name  # bit for bit: the same steps on the same batches
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 8
    assert "position" not in b  # an epoch's own save supersedes the one inside it
    same = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr_first", "lr")
    rows = [json.loads(line) for line in (paths.runs_dir() / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert [{k: r[k] for k in same} for r in rows] == [{k: r[k] for k in same} for r in a["history"]]


def test_a_position_between_optimizer_steps_is_refused() -> None:
    sizes = [4] * 10
    assert _first_micro_batch(EpochPosition(2, 2, 16, 0.0, 0, 1.0), sizes, 2) == 4
    assert _first_micro_batch(EpochPosition(2, 0, 0, 0.0, 0, 0.0), sizes, 2) == 0
    assert _first_micro_batch(EpochPosition(2, 2, 16, 0.0, 0, 1.0), [2] * 20, 4) == 8  # micro-batch halved
    with pytest.raises(CifarNetError, match="step 2 of epoch 2"):
        _first_micro_batch(EpochPosition(2, 2, 12, 0.0, 0, 1.0), sizes, 2)


def test_save_minutes_is_checked() -> None:
    bad = runner.invoke(app, ["train", "--save-minutes", "-1"])
    assert bad.exit_code == 2 and "--save-minutes" in bad.output
