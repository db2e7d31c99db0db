"""A Jetson's GPU while it trains: its temperature, clock and throttling, read through cifarnet_cli.board at
most every few seconds, reported as events for the view and summed up per epoch for the metrics, so that a
slow epoch is explained. A power mode below the board's fastest, and throttling, are said once each, with
the line that fixes them.

The monitor listens to the engine's events (it samples when an epoch starts and, at most every
``every_s`` seconds, when progress is reported), so the engine itself reads no sysfs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from statistics import fmean
from typing import Any

import torch

from cifarnet_cli import board as boards
from cifarnet_cli.board import GpuSample, SystemView
from cifarnet_cli.events import BoardStatus, EpochStarted, EventCallback, Notice, StepProgress

#: Seconds between two reads of sysfs: the temperature moves in seconds, progress is reported twice a second.
SAMPLE_EVERY_S = 5.0

#: The metrics columns a Jetson's runs add (metrics.jsonl and metrics.csv, after the usual ones).
COLUMNS = ("gpu_temp_max_c", "gpu_clock_mhz", "throttled")


class BoardMonitor:
    def __init__(
        self,
        view: SystemView = boards.LOCAL,
        *,
        on_event: EventCallback,
        every_s: float = SAMPLE_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.view = view
        self.on_event = on_event
        self.every_s = every_s
        self.clock = clock
        self.last = -float("inf")
        self.samples: list[GpuSample] = []
        self.warned_throttling = False

    @classmethod
    def for_device(
        cls, device: torch.device, on_event: EventCallback, view: SystemView = boards.LOCAL
    ) -> BoardMonitor | None:
        """A monitor when training runs on a Jetson's GPU; None elsewhere (a desktop GPU has nvidia-smi)."""
        if device.type != "cuda" or not boards.is_jetson(view):
            return None
        return cls(view, on_event=on_event)

    def start(self) -> None:
        """As training starts: a power mode below the board's fastest is said once, with its fix."""
        power = boards.read_power_modes(self.view)
        current, fastest = power.current, power.maximum
        if power.is_maximum is False and current is not None and fastest is not None:
            self.on_event(
                Notice(
                    f"Power mode {current.name} is not this board's fastest ({fastest.name}): training runs slower. "
                    f"For full speed: sudo nvpmodel -m {fastest.id} && sudo jetson_clocks"
                )
            )

    def __call__(self, event: Any) -> None:
        if isinstance(event, EpochStarted):
            self.sample(force=True)  # at least one reading per epoch
        elif isinstance(event, StepProgress):
            self.sample()

    def sample(self, *, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        s = boards.sample_gpu(self.view)
        self.samples.append(s)
        self.on_event(BoardStatus(s.temp_c, s.clock_hz / 1e6 if s.clock_hz else None, s.throttling))
        if s.throttling and not self.warned_throttling:
            self.warned_throttling = True
            self.on_event(
                Notice(
                    f"The board is throttling ({', '.join(s.throttling)} at its limit): its clocks are lowered and "
                    "training slows down. More cooling: sudo jetson_clocks --fan (the fan at full speed), and air."
                )
            )

    def epoch_columns(self) -> dict[str, Any]:
        """The epoch's figures for its metrics row (the hottest GPU reading, the mean GPU clock, the share of
        readings that found the board throttling); the next epoch starts afresh."""
        temps = [s.temp_c for s in self.samples if s.temp_c is not None]
        clocks = [s.clock_hz for s in self.samples if s.clock_hz is not None]
        row = {
            "gpu_temp_max_c": round(max(temps), 1) if temps else None,
            "gpu_clock_mhz": round(fmean(clocks) / 1e6) if clocks else None,
            "throttled": round(sum(bool(s.throttling) for s in self.samples) / len(self.samples), 3)
            if self.samples
            else None,
        }
        self.samples = []
        return row
