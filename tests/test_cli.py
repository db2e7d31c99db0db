from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cifarnet_cli import __version__, paths, runs
from cifarnet_cli.cli import app
from cifarnet_cli.config import TrainConfig

from .conftest import wait_until

runner = CliRunner()

FAST = ["--epochs", "2", "--batch-size", "16", "--accum", "2", "--val-split", "20", "--warmup-epochs", "0.5"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_help_lists_the_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "finetune-resnet50", "evaluate", "predict", "export", "download", "info"):
        assert command in result.output


@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_run_argument_help_shows_its_default(command: str) -> None:
    """A bracket in help text is Rich markup unless escaped: "[default: ...]" vanished from the argument's help."""
    result = runner.invoke(app, [command, "--help"])
    assert "[default: the most recent run]" in " ".join(result.output.replace("│", " ").split())


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_train_json_and_run_folder(image_folder: Callable[..., Path]) -> None:
    data = image_folder(per_class=6)
    result = runner.invoke(app, ["train", "--data-dir", str(data), "--run", "cli", "--json", "--quiet", *FAST])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(out) == {
        "run",
        "run_dir",
        "epochs",
        "best_accuracy",
        "final_accuracy",
        "split",
        "images_per_second",
        "checkpoint",
        "best_epoch",
        "stopped_early",
    }
    assert out["run"] == "cli" and out["epochs"] == 2 and out["images_per_second"] > 0
    assert out["split"] == "val"  # what the accuracies were measured on, as in `runs --json`
    again = runner.invoke(app, ["train", "--resume", "cli", "--json"])  # finished: the same object, same split
    assert again.exit_code == 0 and json.loads(again.stdout)["split"] == "val"
    assert "best accuracy (val)" in again.output
    run_dir = Path(out["run_dir"])
    assert run_dir == Path(os.environ["CIFARNET_HOME"]) / "runs" / "cli"
    assert {"last.pt", "best.pt", "metrics.jsonl", "metrics.csv", "config.json", "curves.png"} <= {
        p.name for p in run_dir.iterdir()
    }


def test_train_shows_effective_batch_and_device(image_folder: Callable[..., Path]) -> None:
    data = image_folder(per_class=4)
    result = runner.invoke(app, ["train", "--data-dir", str(data), "--device", "cpu", *FAST, "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert "effective batch 32" in result.output and "Device: cpu" in result.output
    assert "Training finished" in result.output


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["--arch", "resnet18"], 2, "Choose one of: resnet20"),
        (["--arch", "ResNt20"], 2, "Unknown --arch 'ResNt20'. Did you mean resnet20?"),  # as typed, and the fix
        (["--accum", "0"], 2, "--accum must be at least 1"),
        (["--device", "tpu"], 2, "Unknown --device"),
        (["--schedule", "linear"], 2, "Unknown --schedule"),
        (["--schedule", "cosin"], 2, "Did you mean cosine?"),
        (["--milestones", "a,b"], 2, "--milestones"),
        (["--schedule", "multistep", "--milestones", "5,2"], 2, "--milestones 5,2: 5 comes before 2"),
        (["--schedule", "multistep", "--milestones", "2,2"], 2, "give each epoch once, in increasing order (2)"),
        (["--epochs", "4", "--milestones", "2,5"], 2, "--milestones 2,5: 5 is not an epoch of this run"),
        # a run name: the message states the rule the name breaks
        (["--run", "-x"], 2, "starting with a letter or a digit; it starts with '-'"),
        (["--run", "ünï"], 2, "ASCII letters (a-z, A-Z), digits, '.', '_' and '-'"),
        (["--run", "ünï"], 2, "it contains 'ï', 'ü'"),
        (["--run", "a" * 101], 2, "1 to 100 characters"),
        (["--run", "a", "--name", "b"], 2, "--run and --name are the same option"),
    ],
)
def test_bad_options_end_in_one_line(
    image_folder: Callable[..., Path], args: list[str], code: int, message: str
) -> None:
    data = image_folder(per_class=2)
    result = runner.invoke(app, ["train", "--data-dir", str(data), *args])
    assert result.exit_code == code
    assert message in result.output
    assert "Traceback" not in result.output


def test_missing_data_dir_is_a_runtime_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--data-dir", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert "No CIFAR-10 data" in result.output and "cifarnet download cifar10" in result.output


def test_no_data_and_no_network_fails_fast_with_instructions() -> None:
    start = time.monotonic()
    result = runner.invoke(app, ["train"])  # default location is empty; CIFARNET_OFFLINE=1 in the tests
    assert result.exit_code == 1
    assert "--from-file" in result.output and "Traceback" not in result.output
    assert "point --data-dir (or CIFARNET_DATA) at them" in result.output.replace("\n", " ")  # data on disk
    assert time.monotonic() - start < 10


def test_unreadable_resume_checkpoint(tmp_path: Path) -> None:
    bad = tmp_path / "last.pt"
    bad.write_text("nope")
    result = runner.invoke(app, ["train", "--resume", str(bad)])
    assert result.exit_code == 1 and "last.pt is not a checkpoint (not a PyTorch file)" in result.output


def test_resume_refuses_recipe_changes_and_reports_finished_runs(image_folder: Callable[..., Path]) -> None:
    data = image_folder(per_class=4)
    # --name is --run's alias (the word other training tools use)
    assert runner.invoke(app, ["train", "--data-dir", str(data), "--name", "r", "--quiet", *FAST]).exit_code == 0
    changed = runner.invoke(app, ["train", "--resume", "r", "--lr", "1.0"])
    assert changed.exit_code == 2 and "--lr cannot change when resuming" in changed.output
    done = runner.invoke(app, ["train", "--resume", "r"])
    assert done.exit_code == 0 and "already finished" in done.output


def test_module_entry_point_in_a_subprocess(image_folder: Callable[..., Path]) -> None:
    data = image_folder(per_class=4)
    proc = subprocess.run(
        [sys.executable, "-m", "cifarnet_cli", "train", "--data-dir", str(data), "--json", *FAST, "--epochs", "1"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["epochs"] == 1
    # stderr is not a terminal here: plain log lines, no progress-bar control codes
    assert "epoch   1/1" in proc.stderr and "\x1b[?25l" not in proc.stderr


def test_ctrl_c_saves_and_resume_continues(image_folder: Callable[..., Path]) -> None:
    data = image_folder(per_class=10)
    home = Path(os.environ["CIFARNET_HOME"])
    cmd = [
        sys.executable,
        "-m",
        "cifarnet_cli",
        "train",
        "--data-dir",
        str(data),
        "--run",
        "sig",
        "--epochs",
        "50",
        "--batch-size",
        "8",
        "--val-split",
        "20",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    metrics = home / "runs" / "sig" / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, "the first epoch", proc=proc)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume sig" in err and "Traceback" not in err
    saved = torch.load(home / "runs" / "sig" / "last.pt", weights_only=True)
    assert saved["epoch"] >= 1
    done_before = saved["epoch"]
    # resume, then stop again right after it has trained one more epoch
    proc = subprocess.Popen(
        [sys.executable, "-m", "cifarnet_cli", "train", "--resume", "sig"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    wait_until(lambda: metrics.read_text().count("\n") >= done_before + 1, "one more epoch after the resume", proc=proc)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"Resuming run sig after epoch {done_before}" in err
    assert torch.load(home / "runs" / "sig" / "last.pt", weights_only=True)["epoch"] > done_before
    epochs = [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()]
    assert epochs == list(range(1, len(epochs) + 1))  # continued, not restarted


@pytest.mark.parametrize("args", [["info"], ["info", "--json"], ["train", "--help"], ["--help"]])
def test_a_closed_pipe_is_not_reported_as_an_error(args: list[str]) -> None:
    """`cifarnet info | head -1`: the reader goes away; exit 141 (as ls or cat report it), not 1 (an error),
    for tables and for JSON alike, and for --help, which Typer's own console prints."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cifarnet_cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the program writes anything (it takes a while to start)
    assert proc.wait(timeout=300) == 141
    said = proc.stderr.read()
    assert b"Traceback" not in said and b"Error" not in said
    proc.stderr.close()


def test_a_reader_that_leaves_during_a_long_write_is_exit_141() -> None:
    """`cifarnet predict photos/ | head -1` with more output than the pipe holds, printed in one write: the
    reader leaves while the write waits, the operating system takes part of it, and Python dropped the rest
    without an error (exit 0, the output cut short). The README's rule: 141."""
    run = runs.Run("long", paths.runs_dir() / "long")
    run.dir.mkdir(parents=True)
    run.write_config({"config": TrainConfig(epochs=4000).to_dict(), "meta": {"arch": "resnet20"}, "device": "cpu"})
    rows = [{"epoch": i + 1, "train_loss": 1.0, "val_accuracy": 0.5, "epoch_seconds": 2.0} for i in range(4000)]
    run.write_metrics(rows)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cifarnet_cli", "runs", "show", "long", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert os.read(proc.stdout.fileno(), 16)  # the one write of ~400 KB has begun, and fills the pipe
    proc.stdout.close()
    assert proc.wait(timeout=300) == 141
    assert b"Traceback" not in proc.stderr.read()
    proc.stderr.close()


def test_help_names_options_as_typed() -> None:
    """--run is shown alone (Typer printed "--run,--name"), and --name still works; finetune's --init-from
    speaks of fine-tuning, not of train."""
    shown = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output
    assert "--run " in shown and "--run,--name" not in shown and "--name works too" in shown
    finetune = runner.invoke(app, ["finetune-resnet50", "--help"], env={"COLUMNS": "200"}).output
    assert "another ResNet-50 run's weights" in finetune and "train takes" not in finetune


def test_run_name_help_states_the_rule_the_check_applies() -> None:
    """'-x' and 'ünï' are letters, digits and '-' as the help put it, yet refused: the help says ASCII and
    how a name starts, as the refusal does."""
    shown = " ".join(runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output.split())
    assert "ASCII letters, digits, '.', '_' and '-', starting with a letter or a digit" in shown
    for name in ("-x", "ünï"):
        refused = runner.invoke(app, ["train", "--run", name, "--epochs", "1"])
        assert refused.exit_code == 2 and "starting with a letter or a digit" in refused.output


def test_flags_show_no_value_type_in_help() -> None:
    """`--json <bool>` read as if the flag took a value (`--json true` is refused)."""
    for command in (["info"], ["export"], ["train"]):
        shown = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "120"}).output
        assert "--json" in shown and "<bool>" not in shown
    assert "<int>" in runner.invoke(app, ["train", "--help"], env={"COLUMNS": "120"}).output  # values keep theirs
