"""What the library reports while it works, as plain dataclasses: the engine and the run set-up emit
them through a callback, and whoever renders them (the CLI's Rich views, a notebook, a test) decides how.

Kept free of torch so that the terminal side can import it cheaply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cifarnet_cli.runs import Run

EventCallback = Callable[[Any], None]


def ignore(_event: Any) -> None:
    pass


# --------------------------------------------------------------------------------------------------
# Run set-up


@dataclass(frozen=True)
class RunStarted:
    run: str
    run_dir: str
    device: str
    precision: str
    precision_reason: str  # why --precision auto chose it ("asked for" when given)
    step_mode: str  # train_step.MODES: "graph" when the step is captured as CUDA graphs
    data: str
    train_images: int
    eval_images: int
    eval_split: str
    arch: str
    parameters: int
    trainable_parameters: int
    batch_size: int
    accum: int
    effective_batch: int
    peak_lr: float
    epochs: int
    start_epoch: int  # completed epochs before this invocation (resume)
    on_device_data: bool
    start_step: int = 0  # optimizer steps of the next epoch already done (a resume from a save inside it)


@dataclass(frozen=True)
class Notice:
    message: str


@dataclass(frozen=True)
class DownloadProgress:
    name: str
    done: int
    total: int | None


@dataclass(frozen=True)
class DecodeProgress:
    """Images of a folder decoded so far (the first read of a folder; later runs read the cache)."""

    done: int
    total: int


# --------------------------------------------------------------------------------------------------
# The training loop


@dataclass(frozen=True)
class EpochStarted:
    epoch: int  # 1-based
    epochs: int
    steps: int  # optimizer steps in this epoch
    micro_batches: int


@dataclass(frozen=True)
class StepProgress:
    epoch: int
    step: int  # optimizer steps done in this epoch
    steps: int
    images: int  # images seen in this epoch
    loss: float
    accuracy: float
    lr: float  # the rate of the latest optimizer step (as metrics.jsonl's lr for an epoch's last step)
    images_per_second: float


@dataclass(frozen=True)
class EpochEnded:
    metrics: dict[str, Any]
    is_best: bool


@dataclass(frozen=True)
class CheckpointSaved:
    """last.pt was written in the middle of an epoch (``--save-minutes``), after ``step`` of its ``steps``."""

    epoch: int
    step: int
    steps: int
    path: str


@dataclass(frozen=True)
class BoardStatus:
    """A Jetson's GPU during training, read from sysfs every few seconds (see cifarnet_cli.monitor)."""

    temp_c: float | None
    clock_mhz: float | None
    throttling: tuple[str, ...]  # the thermal zones at or above their throttling point


@dataclass(frozen=True)
class BenchProgress:
    """`cifarnet bench`: one measurement is about to start (``index`` of ``total``)."""

    what: str
    index: int
    total: int


# --------------------------------------------------------------------------------------------------
# Outcomes


class TrainingInterrupted(Exception):
    """Ctrl-C (exit code 130) or SIGTERM (143) during training; the run's last.pt holds the last
    completed epoch."""

    def __init__(
        self,
        run: Run,
        completed_epochs: int,
        *,
        exit_code: int = 130,
        command: str = "cifarnet train",
        saved_step: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(f"interrupted after {completed_epochs} completed epoch(s)")
        self.run = run
        self.completed_epochs = completed_epochs
        self.exit_code = exit_code
        self.command = command  # the one that resumes it: cifarnet train or cifarnet finetune-resnet50
        self.saved_step = saved_step  # (step, steps) of the next epoch, when last.pt was saved in its middle


@dataclass(frozen=True)
class TrainResult:
    run: str
    run_dir: str
    epochs: int
    best_accuracy: float
    final_accuracy: float
    images_per_second: float
    checkpoint: str
    already_finished: bool = False
    stopped_early: int = 0  # the epoch after which --patience stopped the run; 0 = it did not
    best_epoch: int = 0
    split: str | None = None  # what the accuracies were measured on: "val", or "test" with --val-split 0

    def to_json(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "run_dir": self.run_dir,
            "epochs": self.epochs,
            "best_accuracy": self.best_accuracy,
            "final_accuracy": self.final_accuracy,
            "split": self.split,
            "images_per_second": self.images_per_second,
            "checkpoint": self.checkpoint,
            "best_epoch": self.best_epoch,
            "stopped_early": self.stopped_early or None,
        }
