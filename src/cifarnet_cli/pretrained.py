"""Pretrained weights for transfer learning: torchvision's ImageNet ResNet-50 through the SSL-safe
downloader (and the torch hub cache), a torchvision state dict file, or a cifarnet checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from cifarnet_cli import checkpoint, download
from cifarnet_cli.errors import CifarNetError, UsageError
from cifarnet_cli.models import Classifier

#: torchvision's ``ResNet50_Weights`` member names → cifarnet's pinned assets.
RESNET50_WEIGHTS = {"IMAGENET1K_V1": "resnet50-v1", "IMAGENET1K_V2": "resnet50-v2"}
WEIGHTS_CHOICES = ("IMAGENET1K_V1", "IMAGENET1K_V2", "none", "PATH")


def resolve_weights_file(
    spec: str, *, notify: download.Notify = lambda _m: None, progress: download.Progress | None = None
) -> Path:
    key = spec.upper()
    if key in RESNET50_WEIGHTS:
        try:
            return download.fetch(RESNET50_WEIGHTS[key], notify=notify, progress=progress)
        except download.DownloadError as exc:
            raise download.DownloadError(
                f"{exc} Or pass --weights PATH to a local weights file, or --weights none to train from random "
                "weights (much lower accuracy)."
            ) from exc
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    raise UsageError(f"--weights {spec!r}: not a file; choose one of: {', '.join(WEIGHTS_CHOICES)}.")


def load_weights(
    model: Classifier,
    spec: str,
    *,
    notify: download.Notify = lambda _m: None,
    progress: download.Progress | None = None,
) -> str:
    """Load ``spec`` into ``model`` strictly; return a sentence saying what was loaded."""
    path = resolve_weights_file(spec, notify=notify, progress=progress)
    state = checkpoint.load(path)
    if checkpoint.is_cifarnet_checkpoint(state):
        ckpt = checkpoint.validate_model(state, path)
        checkpoint.load_state_strict(model, checkpoint.strip_prefixes(ckpt.state), str(path))
        return f"Loaded the whole model from the cifarnet checkpoint {path}."
    weights = checkpoint.state_dict_of(state, path)
    from cifarnet_cli.models.resnet50 import ResNet50Transfer  # torchvision: only ResNet-50 reads these files

    if not isinstance(model, ResNet50Transfer):
        raise CifarNetError(f"{path} is a torchvision state dict; only resnet50 loads those.")
    body = checkpoint.strip_prefixes(weights)
    # The ImageNet classifier (1000 classes) is replaced by the new head: its keys are expected to differ.
    body = {k: v for k, v in body.items() if not k.startswith("fc.")}
    target = model.body
    head = {f"fc.{k}": v for k, v in target.fc.state_dict().items()}
    with torch.no_grad():
        checkpoint.load_state_strict(target, {**body, **head}, str(path))
    return f"Loaded pretrained ResNet-50 weights from {path} (new {model.get_classifier().out_features}-class head)."
