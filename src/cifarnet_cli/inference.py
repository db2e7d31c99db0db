"""Loading a trained model for evaluate, predict and export: everything comes from the checkpoint
(architecture, its arguments, class names), so no extra flags are needed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cifarnet_cli import checkpoint, runs
from cifarnet_cli.config import TrainConfig
from cifarnet_cli.errors import CifarNetError
from cifarnet_cli.models import Classifier, get_model


@dataclass(frozen=True)
class LoadedModel:
    model: Classifier
    arch: str
    classes: tuple[str, ...]
    meta: dict[str, Any]
    config: TrainConfig | None
    path: Path
    run: runs.Run | None

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
    ckpt = checkpoint.load(path)
    if not checkpoint.is_cifarnet_checkpoint(ckpt) or "meta" not in ckpt:
        raise CifarNetError(
            f"{path} is not a cifarnet checkpoint (no model/config/meta); pass a run's best.pt or last.pt."
        )
    meta = ckpt["meta"]
    model = get_model(meta["arch"], **meta.get("model_kwargs", {}))
    checkpoint.load_state_strict(model, checkpoint.strip_prefixes(ckpt["model"]), str(path))
    model.to(device).eval()
    config = TrainConfig.from_dict(ckpt["config"]) if isinstance(ckpt.get("config"), dict) else None
    return LoadedModel(model, meta["arch"], tuple(meta["classes"]), meta, config, path, run)
