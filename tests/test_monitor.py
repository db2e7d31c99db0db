"""The board monitor during training on a Jetson: temperature and throttling in the progress line, a power
mode below the fastest and throttling said once each with their fix, per-epoch GPU columns in the metrics,
sysfs read at most every few seconds. On recorded trees of real boards (tests/board_trees.py)."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from cifarnet_cli import board as boards
from cifarnet_cli import paths, runs, training, ui
from cifarnet_cli.cli import app
from cifarnet_cli.events import BoardStatus, EpochStarted, Notice, StepProgress
from cifarnet_cli.monitor import COLUMNS, BoardMonitor

from .board_trees import agx_orin_maxn, cpu_laptop, orin_nano_15w

runner = CliRunner()


def _progress(step: int) -> StepProgress:
    return StepProgress(1, step, 100, step * 64, 1.5, 0.4, 0.1, 900.0)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _monitor(view: boards.SystemView) -> tuple[BoardMonitor, list[Any], Clock]:
    events: list[Any] = []
    clock = Clock()
    return BoardMonitor(view, on_event=events.append, every_s=5.0, clock=clock), events, clock


def test_a_throttling_board_is_said_once_and_read_every_few_seconds(tmp_path: Path) -> None:
    monitor, events, clock = _monitor(agx_orin_maxn().build(tmp_path))
    monitor.start()  # MAXN: nothing to say about the power mode
    monitor(EpochStarted(1, 2, 100, 200))
    for second in range(1, 13):  # progress twice a second for 12 seconds
        clock.now = second / 2
        monitor(_progress(second))
    clock.now = 10.0
    monitor(_progress(20))
    statuses = [e for e in events if isinstance(e, BoardStatus)]
    assert len(statuses) == 3  # at the epoch's start, at 5 s and at 10 s: not at every progress report
    assert statuses[0] == BoardStatus(99.5, 1300.5, ("gpu-thermal", "tj-thermal"))
    warnings = [e.message for e in events if isinstance(e, Notice)]
    assert len(warnings) == 1 and "throttling (gpu-thermal, tj-thermal at its limit)" in warnings[0]
    assert "sudo jetson_clocks --fan" in warnings[0]
    assert monitor.epoch_columns() == {"gpu_temp_max_c": 99.5, "gpu_clock_mhz": 1300, "throttled": 1.0}
    assert monitor.epoch_columns() == dict.fromkeys(COLUMNS)  # a new epoch starts afresh


def test_a_power_mode_below_the_fastest_is_said_once_with_its_number(tmp_path: Path) -> None:
    monitor, events, _clock = _monitor(orin_nano_15w().build(tmp_path))
    monitor.start()
    monitor(EpochStarted(1, 2, 100, 200))
    notices = [e.message for e in events if isinstance(e, Notice)]
    assert notices == [
        "Power mode 15W is not this board's fastest (MAXN_SUPER): training runs slower. "
        "For full speed: sudo nvpmodel -m 2 && sudo jetson_clocks"
    ]
    assert events[-1] == BoardStatus(48.3, 306.0, ())


def test_only_a_jetsons_gpu_is_monitored(tmp_path: Path) -> None:
    jetson = orin_nano_15w().build(tmp_path / "orin")
    assert BoardMonitor.for_device(torch.device("cuda", 0), print, jetson) is not None
    assert BoardMonitor.for_device(torch.device("cpu"), print, jetson) is None
    assert BoardMonitor.for_device(torch.device("cuda", 0), print, cpu_laptop().build(tmp_path / "pc")) is None


def test_the_progress_line_shows_the_gpu_temperature_and_throttling(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(ui, "err_console", Console(file=out, width=200))
    view = ui.TrainView(live=False, log_every_s=0.0)
    view(BoardStatus(71.4, 612.0, ()))
    view(_progress(1))
    view(BoardStatus(99.5, 612.0, ("gpu-thermal",)))
    view(_progress(2))
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("900 img/s  GPU 71°C") and lines[1].endswith("900 img/s  GPU 100°C throttling")


def test_a_jetson_run_records_gpu_columns_and_a_desktop_run_none(
    image_folder: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The engine adds the monitor's columns to each epoch's row; metrics.csv keeps its usual columns first."""
    data = image_folder(per_class=2)
    args = ["train", "--data-dir", str(data), "--epochs", "1", "--batch-size", "8", "--val-split", "10", "--quiet"]
    assert runner.invoke(app, [*args, "--run", "pc"]).exit_code == 0
    view = agx_orin_maxn().build(tmp_path / "orin")
    monkeypatch.setattr(
        training.BoardMonitor, "for_device", classmethod(lambda cls, device, on_event: cls(view, on_event=on_event))
    )
    result = runner.invoke(app, [*args, "--run", "orin"])
    assert result.exit_code == 0, result.output
    row = runs.Run("orin", paths.runs_dir() / "orin").read_metrics()[0]
    assert {k: row[k] for k in COLUMNS} == {"gpu_temp_max_c": 99.5, "gpu_clock_mhz": 1300, "throttled": 1.0}
    header = (paths.runs_dir() / "orin" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[: len(runs.METRIC_COLUMNS)] == list(runs.METRIC_COLUMNS) and header[-3:] == sorted(COLUMNS)
    pc = (paths.runs_dir() / "pc" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert pc == list(runs.METRIC_COLUMNS)
