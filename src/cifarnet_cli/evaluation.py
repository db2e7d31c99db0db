"""`cifarnet evaluate`: accuracy, per-class accuracy and the confusion matrix of a trained model on
any split or image folder, optionally restricted to a subset of classes.

torch is imported only for checkpoints: an exported model (ONNX, TensorRT) is evaluated without it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cifarnet_cli import choices, fileio, paths
from cifarnet_cli.data.classes import match_classes
from cifarnet_cli.data.sources import DataSource, ImageSet, find_source, load_source
from cifarnet_cli.errors import CifarNetError, UsageError
from cifarnet_cli.events import DecodeProgress, Notice
from cifarnet_cli.fileio import display
from cifarnet_cli.report import plot_confusion
from cifarnet_cli.runtime import ExportedModel, is_exported, open_exported

if TYPE_CHECKING:
    import torch

    from cifarnet_cli.inference import LoadedModel

SPLITS = choices.SPLITS


def confusion_matrix(predictions: Any, labels: Any, num_classes: int) -> np.ndarray:
    """``m[i, j]`` = images of true class i predicted as class j (numpy or CPU torch inputs)."""
    index = np.asarray(labels, dtype=np.int64) * num_classes + np.asarray(predictions, dtype=np.int64)
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


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
    logits: Any, labels: Any, class_ids: list[int], class_names: list[str]
) -> tuple[float, dict[str, float | None], dict[str, int], list[list[int]]]:
    """Accuracy over the classes ``class_ids`` (argmax restricted to them) with per-class figures."""
    sub_logits = np.asarray(logits)[:, class_ids]
    remap = {c: i for i, c in enumerate(class_ids)}
    sub_labels = np.asarray([remap[int(y)] for y in np.asarray(labels).tolist()], dtype=np.int64)
    preds = sub_logits.argmax(1)
    cm = confusion_matrix(preds, sub_labels, len(class_ids))
    counts = cm.sum(1)
    per_class = {
        name: (float(cm[i, i]) / int(counts[i]) if int(counts[i]) else None) for i, name in enumerate(class_names)
    }
    per_class_n = {name: int(counts[i]) for i, name in enumerate(class_names)}
    accuracy = float(np.trace(cm)) / max(int(cm.sum()), 1)
    return accuracy, per_class, per_class_n, cm.tolist()


def _eval_set(
    loaded: LoadedModel, data_dir: Path | None, split: str | None, on_event: Callable[[object], None]
) -> tuple[ImageSet, str, str]:
    from cifarnet_cli.training import open_data, split_data  # torch: checkpoints only

    def notify(message: str) -> None:
        on_event(Notice(message))

    recorded = loaded.meta.get("data_location")
    location: str | None = str(data_dir) if data_dir is not None else None
    if data_dir is None and isinstance(recorded, str) and recorded:
        if find_source(Path(recorded)) is not None:
            location = recorded
        elif Path(recorded) != paths.default_data_dir() and loaded.meta.get("data_kind") == "image-folder":
            # Not CIFAR-10 from the default place, which would be downloaded: the run's own images are gone.
            raise CifarNetError(
                f"The data this run was trained on ({display(recorded)}) is not there any more; "
                "evaluate on other data with --data-dir DIR."
            )
    source = open_data(
        location,
        classes=loaded.classes,
        on_event=on_event,
    )
    desc = f"{display(source.location)} ({source.kind})"
    same_data = source.fingerprint == loaded.meta.get("data_fingerprint")
    n_val = int(loaded.meta.get("val_split", 0) or 0)
    has_pool = "train" in source.splits or "images" in source.splits
    available = _splits_of(source)
    if has_pool and n_val:
        available.insert(available.index("train"), "val")
    if split is None:
        if source.has_test:
            split = "test"
        elif same_data and n_val > 0:
            split = "val"
        else:
            split = "all"
    if split not in available:
        if split == "val" and has_pool:
            raise CifarNetError("This run validated on the test split (--val-split 0); use --split test.")
        raise _no_such_split(source, split, available)
    if split == "all":
        if same_data:
            notify(
                "These are the run's own data: --split all includes the images it trained on, so the accuracy "
                "overstates how the model does on new images."
            )
        return source.everything(), "all", desc
    if split == "test":
        return source.split("test"), "test", desc
    if not same_data:
        notify("This data differs from the run's training data; the split is recomputed on it.")
    pool = source.train
    if not n_val:
        return pool, split, desc
    train_set, val_set, _ = split_data(source, n_val, int(loaded.meta.get("split_seed", 0)))
    chosen = val_set if split == "val" else train_set
    assert chosen is not None
    return chosen, split, desc


def _subset_suffix(names: list[str]) -> str:
    """``-cat+dog`` for a few classes, ``-subset-<hash>`` for many: each subset keeps its own report."""
    if len(names) <= 3:
        return "-" + "+".join(re.sub(r"[^\w.-]", "_", n) for n in names)
    return "-subset-" + hashlib.sha256("\0".join(names).encode()).hexdigest()[:8]


def _splits_of(source: DataSource) -> list[str]:
    """The splits ``--split`` may name on ``source`` besides a run's val: test where the data has one, train
    where it has a training pool (a folder of class folders is one), and all."""
    has_pool = "train" in source.splits or "images" in source.splits
    return (["test"] if source.has_test else []) + (["train"] if has_pool else []) + ["all"]


def _no_such_split(source: DataSource, split: str, available: list[str]) -> CifarNetError:
    return CifarNetError(
        f"{display(source.location)} has no {split} split; choose one of: {', '.join(available)} "
        "(all = every image it holds)."
    )


def _exported_eval_set(
    model: ExportedModel, data_dir: Path | None, split: str | None, on_event: Callable[[object], None]
) -> tuple[ImageSet, str, str]:
    """The data an exported model is scored on: ``--data-dir`` (else the default CIFAR-10) and its own
    splits. A run's validation split is not available: recomputing it needs the run's record (and torch)."""

    def progress(done: int, total: int) -> None:
        on_event(DecodeProgress(done, total))

    if split == "val":  # refused before decoding anything
        raise UsageError(
            "--split val is a run's own validation split, which an exported model does not record; evaluate the "
            "run's checkpoint for it (cifarnet evaluate RUN --split val), or choose test, train or all of the "
            "data here."
        )
    source = load_source(data_dir or paths.default_data_dir(), classes=model.classes, progress=progress)
    for warning in source.warnings:
        on_event(Notice(warning))
    available = _splits_of(source)
    if split is None:
        split = "test" if source.has_test else "all"
    if split not in available:
        raise _no_such_split(source, split, available)
    if split == "all":
        return source.everything(), "all", f"{display(source.location)} ({source.kind})"
    return source.split(split), split, f"{display(source.location)} ({source.kind})"


def _exported_logits(model: ExportedModel, data: ImageSet, batch_size: int | None, tta: bool) -> np.ndarray:
    step = batch_size or model.default_batch
    out = []
    for start in range(0, len(data), step):
        pixels = data.images[start : start + step]
        logits = model.logits(pixels)
        if tta:  # the horizontal flip of N×H×W×3 pixels, as predict_logits flips N×3×H×W
            logits = (logits + model.logits(np.ascontiguousarray(pixels[:, :, ::-1]))) / 2
        out.append(logits)
    return np.concatenate(out)


def evaluate_model(
    ref: str | None,
    *,
    model_file: Path | None = None,
    data_dir: Path | None = None,
    split: str | None = None,
    classes: list[str] | None = None,
    tta: bool = False,
    batch_size: int | None = None,
    device_spec: str = "auto",
    precision: str | None = None,
    on_event: Callable[[object], None] = lambda _e: None,
    write_report: bool = True,
) -> EvalReport:
    """Score the run or checkpoint ``ref`` (None: the most recent run), or the model file ``model_file``
    (an exported ONNX file or TensorRT engine runs without torch)."""
    if split is not None and split not in SPLITS:
        raise UsageError(choices.unknown("--split", split, SPLITS))
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: give a number of images of at least 1.")
    exported = open_exported(model_file, device_spec) if model_file is not None and is_exported(model_file) else None
    if exported is not None and precision is not None:
        raise UsageError(
            f"--precision is for checkpoints; {exported.path.name} runs in the precision it was exported in."
        )
    loaded: LoadedModel | None = None
    if exported is not None:
        model_classes, model_path, run = exported.classes, exported.path, None
        data, split_name, data_desc = _exported_eval_set(exported, data_dir, split, on_event)
    else:
        from cifarnet_cli.devices import resolve_device
        from cifarnet_cli.inference import load_model

        device = resolve_device(device_spec)
        loaded = load_model(str(model_file) if model_file is not None else ref, device)
        if loaded.notice is not None:
            on_event(Notice(loaded.notice))
        model_classes, model_path, run = loaded.classes, loaded.path, loaded.run
        data, split_name, data_desc = _eval_set(loaded, data_dir, split, on_event)

    def notify(message: str) -> None:
        on_event(Notice(message))

    all_ids = list(range(len(model_classes)))
    class_ids = all_ids
    if classes is not None:
        mapping, unknown = match_classes(classes, model_classes)
        if unknown:
            raise UsageError(
                f"--classes: {', '.join(unknown)} not among the model's classes ({', '.join(model_classes)})."
            )
        class_ids = sorted(set(mapping.values()))
        if len(class_ids) < 2:
            raise UsageError(
                "--classes needs at least two classes: the model chooses among them, so with one every image "
                f"would count as right (the model's classes: {', '.join(model_classes)})."
            )
        keep = np.isin(data.labels, class_ids)
        left_out = int((~keep).sum())
        if left_out:
            notify(f"Left out {left_out} image(s) of classes outside --classes.")
        data = data.subset(np.flatnonzero(keep))
    if len(data) == 0:
        raise CifarNetError("No images to evaluate" + (" in the chosen classes." if classes else "."))

    if exported is not None:
        logits, labels = _exported_logits(exported, data, batch_size, tta), np.asarray(data.labels)
    else:
        assert loaded is not None
        logits, labels = _checkpoint_logits(loaded, data, device, batch_size, tta, precision)
    _check_finite(logits, model_path)
    names = [model_classes[i] for i in class_ids]
    accuracy, per_class, per_class_n, cm = metrics_from_logits(logits, labels, class_ids, names)
    unrestricted = None
    if class_ids != all_ids:
        unrestricted = float((logits.argmax(1) == labels).mean())
    report = EvalReport(
        accuracy,
        int(labels.shape[0]),
        names,
        per_class,
        per_class_n,
        cm,
        split_name,
        str(model_path),
        data_desc,
        tta,
        unrestricted,
    )
    if write_report and run is not None:
        suffix = f"{split_name}" + ("-tta" if tta else "") + (_subset_suffix(names) if class_ids != all_ids else "")
        target = run.dir / f"eval-{suffix}.json"
        picture = run.dir / f"confusion-{suffix}.png"
        try:  # atomically, and a failure worded like every other file error (the results are printed anyway)
            # within: a run that `runs rm` deleted meanwhile stays deleted (no half-run brought back)
            fileio.write_bytes(target, (json.dumps(report.to_json(), indent=2) + "\n").encode(), within=run.dir)
            title = f"{run.name}: {split_name}, accuracy {100 * accuracy:.2f}% of {report.n:,} images"
            drawn = plot_confusion(cm, names, picture, title=title, within=run.dir)
        except CifarNetError as exc:
            notify(f"{exc} The results are not saved in the run folder.")
        except OSError as exc:
            notify(f"{fileio.os_error_message(exc, picture, 'write')} The results are not saved in the run folder.")
        else:
            report = dataclasses.replace(report, files=(str(target),) + ((str(drawn),) if drawn else ()))
    return report


def _check_finite(logits: np.ndarray, model_path: Path) -> None:
    """An accuracy is only a figure when every output is a number: argmax over NaN picks class 0."""
    bad = int((~np.isfinite(np.asarray(logits))).any(axis=1).sum())
    if bad:
        raise CifarNetError(
            f"{display(model_path)} gave outputs that are not numbers (NaN or infinite) for {bad} of {len(logits)} "
            "image(s), so no accuracy is reported (a checkpoint run in half precision may do better with --precision fp32)."
        )


def _checkpoint_logits(
    loaded: LoadedModel, data: ImageSet, device: torch.device, batch_size: int | None, tta: bool, precision: str | None
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels from the device-resident loader (the data moves to the GPU once, as uint8)."""
    import torch

    from cifarnet_cli.data.loader import DeviceLoader
    from cifarnet_cli.engine import predict_logits
    from cifarnet_cli.inference import inference_precision

    loader = DeviceLoader(
        data,
        batch_size=batch_size or loaded.inference_batch,
        device=device,
        train=False,
        channels_last=device.type == "cuda",
    )
    if device.type == "cuda":
        loaded.model.to(memory_format=torch.channels_last)
    logits, labels = predict_logits(
        loaded.model, loader, device=device, precision=inference_precision(loaded, device, precision), tta=tta
    )
    return logits.numpy(), labels.numpy()
