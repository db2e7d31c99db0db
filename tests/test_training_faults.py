"""What training does when the step goes wrong: a diverging loss, the GPU running out of memory, and
the options that choose how the step runs (micro-batch, capture)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from cifarnet_cli.autobatch import choose_micro_batch
from cifarnet_cli.cli import app
from cifarnet_cli.errors import CifarNetError
from cifarnet_cli.train_step import TrainStep

runner = CliRunner()
QUICK = ["--batch-size", "16", "--val-split", "20", "--warmup-epochs", "0", "--device", "cpu"]


def _run_dir(name: str) -> Path:
    return Path(os.environ["CIFARNET_HOME"]) / "runs" / name


def test_a_diverging_run_stops_and_keeps_the_last_good_epoch(image_folder: Callable[..., Path]) -> None:
    data = image_folder(per_class=6)
    args = ["train", "--data-dir", str(data), "--run", "boom", "--epochs", "3", *QUICK]
    result = runner.invoke(app, [*args, "--lr", "100"])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "Training diverged" in text and "it started at" in text and "a lower --lr (now 100)" in text
    assert "Traceback" not in result.output
    # nothing had completed: nothing is kept, and the same command with the fix runs under the same name
    assert "no epoch had completed, so nothing is kept (the run folder is removed)" in text
    assert not _run_dir("boom").exists()
    assert runner.invoke(app, [*args, "--lr", "0.01", "--quiet"]).exit_code == 0


def test_divergence_after_an_epoch_keeps_it(image_folder: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from cifarnet_cli import engine

    data = image_folder(per_class=6)
    original = engine.DivergenceGuard.check

    def check(self: engine.DivergenceGuard, loss: float, epoch: int) -> None:
        original(self, float("nan") if epoch == 2 else loss, epoch)  # the loss turns NaN in epoch 2

    monkeypatch.setattr(engine.DivergenceGuard, "check", check)
    result = runner.invoke(app, ["train", "--data-dir", str(data), "--run", "late", "--epochs", "3", *QUICK])
    assert result.exit_code == 1 and "Training diverged" in result.output
    assert "epoch 1 is the last good one" in " ".join(result.output.split())
    saved = torch.load(_run_dir("late") / "last.pt", weights_only=True)
    assert saved["epoch"] == 1 and all(
        torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point()
    )


def test_freezing_a_random_body_is_refused_up_front() -> None:
    result = runner.invoke(app, ["finetune-resnet50", "--weights", "none", "--freeze-backbone"])
    assert result.exit_code == 2 and "--weights none leaves it random" in " ".join(result.output.split())


def test_out_of_memory_in_the_first_steps_halves_the_micro_batch(
    image_folder: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = image_folder(per_class=6)
    original = TrainStep.micro
    failed: list[int] = []

    def micro(self: TrainStep, x: torch.Tensor, y: torch.Tensor, weight: float) -> None:
        if x.shape[0] == 16 and not failed:
            failed.append(1)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        original(self, x, y, weight)

    monkeypatch.setattr(TrainStep, "micro", micro)
    result = runner.invoke(app, ["train", "--data-dir", str(data), "--run", "oom", "--epochs", "2", *QUICK])
    assert result.exit_code == 0, result.output
    assert "continuing with --batch-size 8 --accum 2" in result.output and "effective batch, 16" in result.output
    saved = torch.load(_run_dir("oom") / "last.pt", weights_only=True)
    assert (saved["config"]["batch_size"], saved["config"]["accum"]) == (8, 2) and saved["epoch"] == 2
    recorded = json.loads((_run_dir("oom") / "config.json").read_text())["config"]
    assert (recorded["batch_size"], recorded["accum"]) == (8, 2)


def test_out_of_memory_later_stops_and_names_the_options(
    image_folder: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = image_folder(per_class=6)
    original = TrainStep.micro
    calls: list[int] = []

    def micro(self: TrainStep, x: torch.Tensor, y: torch.Tensor, weight: float) -> None:
        calls.append(1)
        if len(calls) == 6:  # in epoch 2 (three micro-batches per epoch)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        original(self, x, y, weight)

    monkeypatch.setattr(TrainStep, "micro", micro)
    result = runner.invoke(app, ["train", "--data-dir", str(data), "--run", "late", "--epochs", "3", *QUICK])
    assert result.exit_code == 1
    assert "ran out of memory" in result.output
    assert "cifarnet train --resume late --batch-size 8 --accum 2" in result.output
    assert torch.load(_run_dir("late") / "last.pt", weights_only=True)["epoch"] == 1
    # the suggested command works: same effective batch, split differently
    monkeypatch.setattr(TrainStep, "micro", original)
    resumed = runner.invoke(app, ["train", "--resume", "late", "--batch-size", "8", "--accum", "2", "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    saved = torch.load(_run_dir("late") / "last.pt", weights_only=True)
    assert saved["epoch"] == 3 and (saved["config"]["batch_size"], saved["config"]["accum"]) == (8, 2)


def _model(run: str) -> dict[str, torch.Tensor]:
    return torch.load(_run_dir(run) / "last.pt", weights_only=True)["model"]


def test_out_of_memory_at_the_end_of_the_first_epoch_trains_it_again_halved(
    image_folder: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The epoch's last micro-batch (on a GPU: a short one, run eagerly beside the captured graph's memory), after
    # the epoch's optimizer steps: the epoch is trained again from its start at half the micro-batch, and the
    # run ends where a run started at that micro-batch ends.
    data = image_folder(per_class=6)
    original = TrainStep.micro
    calls: list[int] = []

    def micro(self: TrainStep, x: torch.Tensor, y: torch.Tensor, weight: float) -> None:
        calls.append(1)
        if len(calls) == 3:  # the third of 16 + 16 + 8 images
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        original(self, x, y, weight)

    monkeypatch.setattr(TrainStep, "micro", micro)
    result = runner.invoke(app, ["train", "--data-dir", str(data), "--run", "retried", "--epochs", "1", *QUICK])
    assert result.exit_code == 0, result.output
    assert "continuing with --batch-size 8 --accum 2" in result.output
    monkeypatch.setattr(TrainStep, "micro", original)
    halved = ["--batch-size", "8", "--accum", "2"]
    args = ["train", "--data-dir", str(data), "--run", "halved", "--epochs", "1", *QUICK, *halved, "--quiet"]
    assert runner.invoke(app, args).exit_code == 0
    for key, value in _model("halved").items():
        torch.testing.assert_close(_model("retried")[key], value, rtol=0, atol=0, msg=key)


def test_out_of_memory_in_the_first_evaluation_evaluates_in_smaller_batches(
    image_folder: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from cifarnet_cli import engine

    data = image_folder(per_class=6)
    original = engine.evaluate
    calls: list[int] = []

    def evaluate(model: torch.nn.Module, loader: Any, **kwargs: Any) -> engine.EvalStats:
        calls.append(loader.batch_size)
        if len(calls) in (1, 3):  # the first evaluation's first try; the second evaluation
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return original(model, loader, **kwargs)

    monkeypatch.setattr(engine, "evaluate", evaluate)
    args = ["train", "--data-dir", str(data), "--epochs", "2", *QUICK]
    result = runner.invoke(app, [*args, "--run", "eval-oom"])
    assert "evaluating 32 images at a time: evaluating 16 at a time" in " ".join(result.output.split())
    assert calls == [32, 16, 16]  # the smaller batch is kept
    # a later evaluation running out of memory stops the run, keeping the epochs before it
    assert result.exit_code == 1 and "ran out of memory" in result.output
    assert torch.load(_run_dir("eval-oom") / "last.pt", weights_only=True)["epoch"] == 1
    # the figures do not depend on the evaluation batch
    monkeypatch.setattr(engine, "evaluate", original)
    assert runner.invoke(app, [*args, "--run", "plain", "--quiet"]).exit_code == 0
    rows = {
        run: [json.loads(line) for line in (_run_dir(run) / "metrics.jsonl").read_text().splitlines()]
        for run in ("eval-oom", "plain")
    }
    assert [r["val_accuracy"] for r in rows["eval-oom"]] == [r["val_accuracy"] for r in rows["plain"]][:1]


def test_resume_may_not_change_the_effective_batch(image_folder: Callable[..., Path]) -> None:
    data = image_folder(per_class=4)
    assert (
        runner.invoke(
            app, ["train", "--data-dir", str(data), "--run", "eb", "--epochs", "1", "--quiet", *QUICK]
        ).exit_code
        == 0
    )
    result = runner.invoke(app, ["train", "--resume", "eb", "--batch-size", "8"])
    assert result.exit_code == 0  # 8 × 2 = 16: --accum follows
    result = runner.invoke(app, ["train", "--resume", "eb", "--batch-size", "8", "--accum", "4"])
    assert result.exit_code == 2 and "effective batch (16" in result.output


def test_micro_batch_choice_keeps_the_effective_batch() -> None:
    mib = 2**20
    fit = choose_micro_batch(512, 512, per_image=10 * mib, fixed=500 * mib, budget=3000 * mib)
    assert (fit.batch_size, fit.accum) == (128, 4)  # 250 images fit; 128 is the largest divisor of 512 below
    assert choose_micro_batch(128, 64, per_image=mib, fixed=0, budget=10_000 * mib).batch_size == 64  # the cap
    assert choose_micro_batch(96, 96, per_image=mib, fixed=0, budget=50 * mib).batch_size == 48
    with pytest.raises(CifarNetError, match="micro-batch of 2 images"):
        choose_micro_batch(512, 512, per_image=400 * mib, fixed=500 * mib, budget=1000 * mib)


def test_batch_size_auto_on_the_cpu_keeps_the_recipe(image_folder: Callable[..., Path]) -> None:
    data = image_folder(per_class=4)
    args = [
        "train",
        "--data-dir",
        str(data),
        "--run",
        "auto",
        "--epochs",
        "1",
        "--batch-size",
        "auto",
        "--val-split",
        "20",
    ]
    result = runner.invoke(app, [*args, "--device", "cpu", "--warmup-epochs", "0"])
    assert result.exit_code == 0, result.output
    assert "batch 512 = effective batch 512" in result.output
    bad = runner.invoke(app, ["train", "--batch-size", "auto", "--accum", "2"])
    assert bad.exit_code == 2 and "chooses --accum itself" in bad.output


def test_capture_on_without_cuda_says_why_in_one_line(image_folder: Callable[..., Path]) -> None:
    data = image_folder(per_class=4)
    result = runner.invoke(app, ["train", "--data-dir", str(data), "--epochs", "1", "--capture", "on", *QUICK])
    assert result.exit_code == 0, result.output
    assert result.output.count("CUDA graphs need a CUDA device; training eagerly on cpu") == 1
    bad = runner.invoke(app, ["train", "--data-dir", str(data), "--capture", "maybe"])
    assert bad.exit_code == 2 and "Unknown --capture" in bad.output


def test_each_command_shows_its_own_defaults() -> None:
    train = runner.invoke(app, ["train", "--help"]).output
    finetune = runner.invoke(app, ["finetune-resnet50", "--help"]).output
    assert "[default: 60]" in train and "finetune" not in train.split("Options")[1].lower()
    assert "[default: 5]" in finetune and "[default: 60" not in finetune


def test_bad_numbers_echo_the_value_and_arch_ignores_case(image_folder: Callable[..., Path]) -> None:
    result = runner.invoke(app, ["train", "--epochs", "abc"])
    assert result.exit_code == 2 and "'abc' is not a whole number" in result.output
    result = runner.invoke(app, ["train", "--lr", "fast"])
    assert result.exit_code == 2 and "'fast' is not a number" in result.output
    data = image_folder(per_class=4)
    result = runner.invoke(app, ["train", "--data-dir", str(data), "--arch", "ResNet20", "--epochs", "1", *QUICK])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "args",
    [
        ["finetune-resnet50", "--image-size"],
        ["finetune-resnet50", "--unfreeze-at"],
        ["finetune-resnet50", "--backbone-lr-scale"],
        ["download", "cifar10", "--timeout"],
        ["evaluate", "--batch-size"],
        ["predict", "x.png", "--top-k"],
        ["predict", "x.png", "--batch-size"],
        ["export", "--opset"],
        ["export", "--batch"],
    ],
)
def test_every_numeric_option_echoes_a_bad_value(args: list[str]) -> None:
    """Not only train's: each command's numbers say what was given ("Input should be a valid integer" did not)."""
    result = runner.invoke(app, [*args, "abc"])
    assert result.exit_code == 2
    assert "'abc' is not a" in result.output, result.output
