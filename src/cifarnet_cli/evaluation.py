"""`cifarnet evaluate`: accuracy, per-class accuracy and the confusion matrix of a trained model on
any split or image folder, optionally restricted to a subset of classes."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifarnet_cli import choices
from cifarnet_cli.data.classes import match_classes
from cifarnet_cli.data.loader import DeviceLoader
from cifarnet_cli.data.sources import ImageSet, find_source
from cifarnet_cli.devices import resolve_device, resolve_precision
from cifarnet_cli.engine import predict_logits
from cifarnet_cli.errors import CifarNetError, UsageError
from cifarnet_cli.events import Notice
from cifarnet_cli.inference import LoadedModel, load_model
from cifarnet_cli.report import plot_confusion
from cifarnet_cli.training import open_data, split_data

SPLITS = choices.SPLITS


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``m[i, j]`` = images of true class i predicted as class j."""
    index = labels.long() * num_classes + predictions.long()
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


@dataclass(frozen=True)
class EvalReport:
    accuracy: float
    n: int
    classes: list[str]
    per_class: dict[str, float | None]
    per_class_n: dict[str, int]
    confusion: list[list[int]]
    split: str
    checkpoint: str
    data: str
    tta: bool
    unrestricted_accuracy: float | None = None  # with --classes: argmax over every class
    warnings: list[str] = field(default_factory=list)
    files: tuple[str, ...] = ()  # eval-<split>.json and confusion-<split>.png, when written

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "accuracy": self.accuracy,
            "n": self.n,
            "per_class": self.per_class,
            "per_class_n": self.per_class_n,
            "confusion": self.confusion,
            "classes": self.classes,
            "split": self.split,
            "checkpoint": self.checkpoint,
            "data": self.data,
            "tta": self.tta,
        }
        if self.unrestricted_accuracy is not None:
            out["unrestricted_accuracy"] = self.unrestricted_accuracy
        if self.files:
            out["files"] = list(self.files)
        return out


def metrics_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, class_ids: list[int], class_names: list[str]
) -> tuple[float, dict[str, float | None], dict[str, int], list[list[int]]]:
    """Accuracy over the classes ``class_ids`` (argmax restricted to them) with per-class figures."""
    sub_logits = logits[:, class_ids]
    remap = {c: i for i, c in enumerate(class_ids)}
    sub_labels = torch.tensor([remap[int(y)] for y in labels.tolist()], dtype=torch.long)
    preds = sub_logits.argmax(1)
    cm = confusion_matrix(preds, sub_labels, len(class_ids))
    counts = cm.sum(1)
    per_class = {
        name: (float(cm[i, i]) / int(counts[i]) if int(counts[i]) else None) for i, name in enumerate(class_names)
    }
    per_class_n = {name: int(counts[i]) for i, name in enumerate(class_names)}
    accuracy = float(cm.diag().sum()) / max(int(cm.sum()), 1)
    return accuracy, per_class, per_class_n, cm.tolist()


def _eval_set(
    loaded: LoadedModel, data_dir: Path | None, split: str | None, on_event: Callable[[object], None]
) -> tuple[ImageSet, str, str]:
    def notify(message: str) -> None:
        on_event(Notice(message))

    recorded = loaded.meta.get("data_location")
    if data_dir is None and recorded and find_source(Path(recorded)) is not None:
        location: str | None = recorded
    else:
        location = str(data_dir) if data_dir is not None else None
    source = open_data(
        location,
        classes=loaded.classes,
        on_event=on_event,
    )
    same_data = source.fingerprint == loaded.meta.get("data_fingerprint")
    if split is None:
        if source.has_test:
            split = "test"
        elif same_data and int(loaded.meta.get("val_split", 0)) > 0:
            split = "val"
        else:
            split = "all" if "images" in source.splits else "test"
    if split in ("val", "train") and ("train" in source.splits or "images" in source.splits):
        n_val = int(loaded.meta.get("val_split", 0))
        if split == "val" and n_val == 0:
            raise CifarNetError("This run validated on the test split (--val-split 0); use --split test.")
        if not same_data:
            notify("This data differs from the run's training data; the split is recomputed on it.")
        train_set, val_set, _ = (
            split_data(source, n_val, int(loaded.meta.get("split_seed", 0))) if n_val else (source.train, None, "")
        )
        chosen = val_set if split == "val" else train_set
        assert chosen is not None
        return chosen, split, f"{source.location} ({source.kind})"
    if split == "all":
        return source.split("images"), "all", f"{source.location} ({source.kind})"
    return source.split(split), split, f"{source.location} ({source.kind})"


def evaluate_model(
    ref: str | None,
    *,
    data_dir: Path | None = None,
    split: str | None = None,
    classes: list[str] | None = None,
    tta: bool = False,
    batch_size: int | None = None,
    device_spec: str = "auto",
    on_event: Callable[[object], None] = lambda _e: None,
    write_report: bool = True,
) -> EvalReport:
    if split is not None and split not in SPLITS:
        raise UsageError(f"Unknown --split {split!r}; choose one of: {', '.join(SPLITS)}.")
    if batch_size is not None and batch_size < 1:
        raise UsageError("--batch-size must be at least 1.")
    device = resolve_device(device_spec)
    loaded = load_model(ref, device)
    precision = resolve_precision("auto", device)
    data, split_name, data_desc = _eval_set(loaded, data_dir, split, on_event)

    def notify(message: str) -> None:
        on_event(Notice(message))

    all_ids = list(range(len(loaded.classes)))
    class_ids = all_ids
    if classes:
        mapping, unknown = match_classes(classes, loaded.classes)
        if unknown:
            raise UsageError(
                f"--classes: {', '.join(unknown)} not among the model's classes ({', '.join(loaded.classes)})."
            )
        class_ids = sorted(set(mapping.values()))
        keep = np.isin(data.labels, class_ids)
        left_out = int((~keep).sum())
        if left_out:
            notify(f"Left out {left_out} image(s) of classes outside --classes.")
        data = data.subset(np.flatnonzero(keep))
    if len(data) == 0:
        raise CifarNetError("No images to evaluate" + (" in the chosen classes." if classes else "."))

    loader = DeviceLoader(
        data,
        batch_size=batch_size or loaded.inference_batch,
        device=device,
        train=False,
        channels_last=device.type == "cuda",
    )
    if device.type == "cuda":
        loaded.model.to(memory_format=torch.channels_last)
    logits, labels = predict_logits(loaded.model, loader, device=device, precision=precision, tta=tta)
    names = [loaded.classes[i] for i in class_ids]
    accuracy, per_class, per_class_n, cm = metrics_from_logits(logits, labels, class_ids, names)
    unrestricted = None
    if class_ids != all_ids:
        unrestricted = float((logits.argmax(1) == labels).double().mean())
    report = EvalReport(
        accuracy,
        int(labels.numel()),
        names,
        per_class,
        per_class_n,
        cm,
        split_name,
        str(loaded.path),
        data_desc,
        tta,
        unrestricted,
    )
    if write_report and loaded.run is not None:
        suffix = f"{split_name}" + ("-tta" if tta else "") + ("-subset" if classes else "")
        target = loaded.run.dir / f"eval-{suffix}.json"
        picture = loaded.run.dir / f"confusion-{suffix}.png"
        try:
            target.write_text(json.dumps(report.to_json(), indent=2) + "\n")
            title = f"{loaded.run.name}: {split_name}, accuracy {100 * accuracy:.2f}% of {report.n:,} images"
            drawn = plot_confusion(cm, names, picture, title=title)
        except OSError as exc:
            notify(f"Could not write {target} or {picture.name} ({exc}).")
        else:
            report = dataclasses.replace(report, files=(str(target),) + ((str(drawn),) if drawn else ()))
    return report
