"""Faults around a run folder (issue 13 items 7-10 and 14, issue 10 item 4), each injected inside the
test at the exact moment: a kill between two writes, Ctrl-C or SIGTERM during a checkpoint write, a second
process on the same run, a hostile name, damaged metrics. Only the public commands and ``runs`` are used,
so the same tests show the defects on a tree without the fixes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from cifarnet_cli import checkpoint, engine, paths, report, runs
from cifarnet_cli.cli import app

runner = CliRunner()
QUICK = ["--batch-size", "16", "--val-split", "20", "--warmup-epochs", "0", "--seed", "3"]


def _train(data: Path, run: str, epochs: int, *extra: str) -> Any:
    return runner.invoke(app, ["train", "--data-dir", str(data), "--run", run, "--epochs", str(epochs), *QUICK, *extra])


def _epochs(run: str) -> list[int]:
    lines = (paths.runs_dir() / run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["epoch"] for line in lines]


def _saved_epoch(run: str) -> int:
    return int(torch.load(paths.runs_dir() / run / "last.pt", weights_only=True)["epoch"])


def _stop_when(monkeypatch: pytest.MonkeyPatch, saving_epoch: int, fault: Callable[[], None]) -> None:
    """Call ``fault`` right after last.pt of ``saving_epoch`` is on disk (before anything else is written)."""
    real = checkpoint.save_atomic

    def save(obj: dict[str, Any], path: Path) -> None:
        real(obj, path)
        if path.name == "last.pt" and obj["epoch"] == saving_epoch:
            fault()

    monkeypatch.setattr(checkpoint, "save_atomic", save)


def _interrupt_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int) -> None:
    """Ctrl-C as epoch ``epoch`` starts training."""
    real = engine.train_one_epoch

    def train_one_epoch(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("epoch") == epoch:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", train_one_epoch)


def test_kill_between_last_pt_and_the_metrics_line_is_mended_on_resume(
    image_folder: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = image_folder(per_class=4)

    def killed() -> None:
        raise SystemExit(137)  # the process dies: nothing after this point runs

    with monkeypatch.context() as mp:
        _stop_when(mp, 2, killed)
        assert _train(data, "k", 4).exit_code == 137
    assert (_saved_epoch("k"), _epochs("k")) == (2, [1])  # the row of epoch 2 never reached the file
    resumed = runner.invoke(app, ["train", "--resume", "k", "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    assert _epochs("k") == [1, 2, 3, 4]  # not [1, 3, 4]: rebuilt from last.pt
    csv_lines = (paths.runs_dir() / "k" / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in csv_lines] == ["epoch", "1", "2", "3", "4"]


def test_ctrl_c_while_last_pt_is_written_reports_the_epoch_on_disk(
    image_folder: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = image_folder(per_class=4)
    with monkeypatch.context() as mp:
        _stop_when(mp, 1, lambda: os.kill(os.getpid(), signal.SIGINT))
        result = _train(data, "c", 3)
    assert result.exit_code == 130, result.output
    assert _saved_epoch("c") == 1 and _epochs("c") == [1]
    assert "epoch 1 is saved" in result.output and "--resume c" in result.output
    resumed = runner.invoke(app, ["train", "--resume", "c"])
    assert "Resuming run c after epoch 1" in resumed.output and _epochs("c") == [1, 2, 3]


_SIGTERM_MID_WRITE = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from cifarnet_cli import checkpoint
    real_save = torch.save

    def save(obj, fh):
        # SIGTERM lands while last.pt of epoch 1 is half written (docker stop, systemd, `timeout`)
        if obj.get("kind") == "last" and obj.get("epoch") == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        real_save(obj, fh)

    torch.save = save
    from cifarnet_cli.cli import main
    sys.argv = ["cifarnet", "train", *sys.argv[1:]]
    main()
    """
)


def test_sigterm_stops_like_ctrl_c_and_leaves_no_partial_file(image_folder: Callable[..., Path]) -> None:
    data = image_folder(per_class=4)
    args = ["--data-dir", str(data), "--run", "t", "--epochs", "3", *QUICK]
    proc = subprocess.run(
        [sys.executable, "-c", _SIGTERM_MID_WRITE, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ),
    )
    assert proc.returncode == 143, proc.stderr
    assert "Stopped by SIGTERM; epoch 1 is saved" in proc.stderr and "--resume t" in proc.stderr
    assert "Traceback" not in proc.stderr
    run_dir = paths.runs_dir() / "t"
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".partial")]
    assert _saved_epoch("t") == 1 and _epochs("t") == [1]
    assert runner.invoke(app, ["train", "--resume", "t", "--quiet"]).exit_code == 0 and _epochs("t") == [1, 2, 3]


def test_ctrl_c_before_the_first_checkpoint_leaves_no_empty_run(
    image_folder: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = image_folder(per_class=4)

    def interrupted(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt  # Ctrl-C after the run folder and its config.json exist, before last.pt

    with monkeypatch.context() as patch:
        patch.setattr(report, "CurvesWriter", interrupted)
        result = _train(data, "early", 2)
    assert result.exit_code == 130 and "removed the new run folder" in result.output
    assert not (paths.runs_dir() / "early").exists()
    listed = json.loads(runner.invoke(app, ["runs", "--json"]).stdout)
    assert [r["name"] for r in listed["runs"]] == []
    assert _train(data, "early", 1).exit_code == 0 and _epochs("early") == [1]


def test_stale_partial_file_is_removed_when_the_run_is_next_opened(image_folder: Callable[..., Path]) -> None:
    data = image_folder(per_class=4)
    assert _train(data, "p", 1).exit_code == 0
    stale = paths.runs_dir() / "p" / ".last.pt.k9x1.partial"  # kill -9 during checkpoint.save_atomic
    stale.write_bytes(b"\0" * 4096)
    result = runner.invoke(app, ["train", "--resume", "p"])  # even resuming a finished run opens it
    assert not stale.exists(), result.output


def test_two_writers_of_one_run(
    image_folder: Callable[..., Path], other_process_lock: Callable[[Path], subprocess.Popen[str]]
) -> None:
    data = image_folder(per_class=4)
    assert _train(data, "conc", 1, "--quiet").exit_code == 0
    run_dir = paths.runs_dir() / "conc"
    for stale in ("last.pt", "best.pt"):
        (run_dir / stale).unlink()  # make the name free again: only the other process's lock stands in the way
    holder = other_process_lock(run_dir)
    second = _train(data, "conc", 1)
    assert second.exit_code == 1 and f"pid {holder.pid} on " in second.output, second.output
    holder.kill()  # kill -9: its lock file stays behind, and must not block anyone
    holder.wait()
    assert (run_dir / ".lock").exists()
    third = _train(data, "conc", 2, "--quiet")
    assert third.exit_code == 0, third.output
    holder = other_process_lock(run_dir)
    resumed = runner.invoke(app, ["train", "--resume", "conc", "--epochs", "2"])
    assert resumed.exit_code == 1 and f"pid {holder.pid}" in resumed.output


def test_run_name_with_a_trailing_newline_is_refused(image_folder: Callable[..., Path]) -> None:
    data = image_folder(per_class=4)
    result = _train(data, "nl\n", 1)
    assert result.exit_code == 2 and "--run" in result.output
    assert not paths.runs_dir().exists() or list(paths.runs_dir().iterdir()) == []


def test_metrics_with_bytes_that_are_not_utf8_do_not_stop_a_resume(
    image_folder: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = image_folder(per_class=4)
    with monkeypatch.context() as mp:
        _interrupt_epoch(mp, 2)
        assert _train(data, "u", 2).exit_code == 130
    metrics = paths.runs_dir() / "u" / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes() + b'{"epoch": 9, "note": "\xff\xfe"}\n\xc3\x28 garbage\n')
    result = runner.invoke(app, ["train", "--resume", "u"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and _epochs("u") == [1, 2]


def test_default_model_is_never_a_run_without_a_completed_epoch(
    image_folder: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = image_folder(per_class=4)
    assert _train(data, "trained", 1, "--quiet").exit_code == 0

    with monkeypatch.context() as mp:
        _interrupt_epoch(mp, 1)
        assert _train(data, "untrained", 1).exit_code == 130  # newer, with a last.pt at epoch 0
    assert runs.resolve_run("last").name == "untrained"  # --resume last still means the newest run
    result = runner.invoke(app, ["evaluate", "--json"])
    assert result.exit_code == 0, result.output
    assert Path(json.loads(result.stdout)["checkpoint"]).parent.name == "trained"
