"""Loading a trained model for evaluate, predict and export: everything comes from the checkpoint
(architecture, its arguments, class names), so no extra flags are needed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifarnet_cli import checkpoint, runs
from cifarnet_cli.config import TrainConfig
from cifarnet_cli.devices import autocast, resolve_device, resolve_precision
from cifarnet_cli.errors import CifarNetError
from cifarnet_cli.models import Classifier, get_model
from cifarnet_cli.runtime import inference_batch


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
        return inference_batch(self.arch)

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


#: Batches of at most this many images of a CIFAR ResNet run on one CPU thread: one 32×32 image takes ~5 ms
#: there, while with two intra-op threads, one of which waits for a busy core, every layer stalls (0.06-1.0 s
#: per image, measured on the 2-core development machine while other processes ran).
ONE_THREAD_BATCH = 16


class TorchClassifier:
    """A checkpoint behind :class:`cifarnet_cli.runtime.ImageClassifier`, so that `predict` treats it
    like an exported model: uint8 pixels in, float32 logits out."""

    def __init__(self, loaded: LoadedModel, device: torch.device) -> None:
        self.model = loaded.model.eval()
        self.path = loaded.path
        self.arch = loaded.arch
        self.classes = loaded.classes
        self.input_size = loaded.input_size
        self.default_batch = loaded.inference_batch
        self.device = device
        self.precision = resolve_precision("auto", device)
        self.runtime = f"torch {torch.__version__} on {device}, {self.precision.name}"

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(pixels).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        threads = torch.get_num_threads()
        one_thread = self.device.type == "cpu" and self.arch != "resnet50" and len(pixels) <= ONE_THREAD_BATCH
        if one_thread:
            torch.set_num_threads(1)
        try:
            with torch.inference_mode(), autocast(self.device, self.precision):
                return self.model(x).float().cpu().numpy()
        finally:
            if one_thread:
                torch.set_num_threads(threads)


def open_checkpoint(ref: str | None, device_spec: str = "auto") -> TorchClassifier:
    device = resolve_device(device_spec)
    return TorchClassifier(load_model(ref, device), device)
