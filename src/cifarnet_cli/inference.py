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
from cifarnet_cli.devices import Precision, autocast, resolve_device, resolve_precision
from cifarnet_cli.errors import CifarNetError
from cifarnet_cli.models import Classifier
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
    notice: str | None = None  # e.g. the checkpoint has no completed epoch (untrained)

    @property
    def inference_batch(self) -> int:
        return inference_batch(self.arch)

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


def inference_precision(loaded: LoadedModel, device: torch.device, spec: str | None = None) -> Precision:
    """``--precision`` when given; otherwise, on a GPU, the precision the run trained (and validated) in,
    recorded in the checkpoint, so that evaluate reproduces the run's figures; ``auto`` where the device
    cannot run that precision natively, and on the CPU (where autocast is slower than fp32)."""
    if spec is not None:
        return resolve_precision(spec, device)
    recorded = loaded.meta.get("precision")
    if device.type == "cuda" and recorded in ("fp32", "bf16", "fp16"):
        try:
            return resolve_precision(recorded, device)
        except CifarNetError:  # e.g. a bf16 run evaluated on a GPU without native bf16
            pass
    return resolve_precision("auto", device)


#: Batches of at most this many images of a CIFAR ResNet run on one CPU thread: one 32×32 image takes ~5 ms
#: there, while with two intra-op threads, one of which waits for a busy core, every layer stalls (0.06-1.0 s
#: per image, measured on the 2-core development machine while other processes ran).
ONE_THREAD_BATCH = 16


class TorchClassifier:
    """A checkpoint behind :class:`cifarnet_cli.runtime.ImageClassifier`, so that `predict` treats it
    like an exported model: uint8 pixels in, float32 logits out."""

    def __init__(self, loaded: LoadedModel, device: torch.device, precision: str | None = None) -> None:
        self.model = loaded.model.eval()
        self.path = loaded.path
        self.arch = loaded.arch
        self.classes = loaded.classes
        self.input_size = loaded.input_size
        self.default_batch = loaded.inference_batch
        self.device = device
        self.precision = inference_precision(loaded, device, precision)
        self.notice = loaded.notice
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


def open_checkpoint(ref: str | None, device_spec: str = "auto", precision: str | None = None) -> TorchClassifier:
    device = resolve_device(device_spec)
    return TorchClassifier(load_model(ref, device), device, precision)
