"""Loading a trained model for evaluate, predict and export: everything comes from the checkpoint
(architecture, its arguments, class names), so no extra flags are needed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cifarnet_cli import checkpoint, runs
from cifarnet_cli.config import TrainConfig
from cifarnet_cli.models import Classifier


@dataclass(frozen=True)
class LoadedModel:
    model: Classifier
    arch: str
    classes: tuple[str, ...]
    meta: dict[str, Any]
    config: TrainConfig | None
    path: Path
    run: runs.Run | None
    notice: str | None = None  # e.g. the checkpoint has no completed epoch (untrained)

    @property
    def inference_batch(self) -> int:
        """Default images per forward pass: small for ResNet-50 (it upsamples inside; Jetson memory)."""
        return 128 if self.arch == "resnet50" else 500

    @property
    def input_size(self) -> int:
        return int(self.meta.get("input_size", 32))


def load_model(ref: str | None, device: torch.device, *, prefer: str = "best") -> LoadedModel:
    """``ref`` is a run name, a run folder or a checkpoint file; None means the most recent run."""
    path, run = runs.resolve_checkpoint(ref, prefer=prefer)
    ckpt = checkpoint.read_model(path)  # validated: a foreign or edited file is refused in one sentence
    model = checkpoint.build_model(ckpt)
    model.to(device).eval()
    try:
        config = TrainConfig.from_dict(ckpt.config) if ckpt.config is not None else None
    except (TypeError, ValueError):
        config = None  # the recipe is informative only; the model itself loaded
    return LoadedModel(model, ckpt.arch, ckpt.classes, ckpt.meta, config, path, run, ckpt.untrained_notice())
