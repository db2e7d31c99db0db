"""TensorBoard scalars of a run, written by a consumer of the engine's events (the loop knows nothing
of it). Needs the ``tensorboard`` package (``pip install 'cifarnet[tensorboard]'``).

Per optimizer step (as often as the engine reports progress, every half second or so): the epoch's
running loss and accuracy, the learning rate and images/s. Per epoch: train/validation loss and
accuracy, the epoch's learning rate and images/s.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cifarnet_cli.events import EpochEnded, EpochStarted, StepProgress

ENV_VAR = "CIFARNET_TENSORBOARD"
INSTALL_HINT = "TensorBoard logging needs the tensorboard package: pip install 'cifarnet[tensorboard]'; training goes on without it."


def wanted(flag: bool) -> bool:
    """--tensorboard, or CIFARNET_TENSORBOARD=1 in the environment."""
    return flag or os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


def available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class TensorBoardLogger:
    """Writes into ``log_dir``; the writer opens at the first epoch, dropping what an interrupted earlier
    attempt logged from that epoch on (``purge_step``), so a resumed run draws one continuous line."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._writer: Any = None
        self._steps = 1
        self.error: str | None = None

    def __call__(self, event: object) -> None:
        if self.error is not None:
            return
        try:
            self._handle(event)
        except Exception as exc:  # noqa: BLE001 - a full disk must not stop training; close() reports it
            self.error = f"{type(exc).__name__}: {exc}"

    def _handle(self, event: object) -> None:
        if isinstance(event, EpochStarted):
            self._steps = max(event.steps, 1)
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.log_dir), purge_step=(event.epoch - 1) * self._steps)
        elif isinstance(event, StepProgress) and self._writer is not None:
            step = (event.epoch - 1) * event.steps + event.step
            self._writer.add_scalar("step/epoch_mean_loss", event.loss, step)
            self._writer.add_scalar("step/epoch_mean_accuracy", event.accuracy, step)
            self._writer.add_scalar("step/lr", event.lr, step)
            self._writer.add_scalar("step/images_per_second", event.images_per_second, step)
        elif isinstance(event, EpochEnded) and self._writer is not None:
            m = event.metrics
            epoch = m["epoch"]
            for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "images_per_second"):
                if m.get(key) is not None:
                    self._writer.add_scalar(f"epoch/{key}", m[key], epoch)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
