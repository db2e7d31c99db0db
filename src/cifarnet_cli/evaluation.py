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

    from cifarnet_cli.data.split import SplitRecord
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
    files: tuple[str, ...] = ()  # eval-<suffix>.json and confusion-<suffix>.png, when written
    data_fingerprint: str | None = None  # of the data's content
    runs_own_data: bool | None = None  # the data the run trained on (None: an exported model, not known)
    identities: dict[str, int] | None = None  # on changed data: the run's images found, missing, left out

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
        if self.data_fingerprint is not None:
            out["data_fingerprint"] = self.data_fingerprint
        if self.runs_own_data is not None:
            out["runs_own_data"] = self.runs_own_data
        if self.identities is not None:
            out["identities"] = self.identities
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


@dataclass(frozen=True)
class _EvalData:
    """The images a model is scored on, and what they are."""

    images: ImageSet
    split: str
    description: str  # "<location> (<kind>)"
    fingerprint: str | None  # of the data's content (None: not known)
    runs_own_data: bool  # the data the run trained on (its fingerprint)
    identities: dict[str, int] | None = None  # how changed data relates to the run's images (see _by_identity)


def _eval_set(
    loaded: LoadedModel, data_dir: Path | None, split: str | None, on_event: Callable[[object], None]
) -> _EvalData:
    """The images a run's checkpoint is scored on. On the run's own data (the same fingerprint) val and train
    are its split, recomputed from the recorded seed; on changed data they are found by identity (the run
    records which images it trained on and held out), so a "val" figure never includes a training image."""
    from cifarnet_cli.data.split import SplitRecord
    from cifarnet_cli.training import open_data  # torch: checkpoints only

    source = open_data(_run_data_location(loaded, data_dir), classes=loaded.classes, on_event=on_event)
    desc = f"{display(source.location)} ({source.kind})"
    same_data = source.fingerprint == loaded.meta.get("data_fingerprint")
    record = SplitRecord.from_meta(loaded.meta)
    n_val = int(loaded.meta.get("val_split", 0) or 0)
    has_pool = "train" in source.splits or "images" in source.splits
    available = _splits_of(source)
    if has_pool and n_val:
        available.insert(available.index("train"), "val")
    if split is None:
        split = _default_split(source, same_data, n_val, record)
    if split not in available:
        if split == "val" and has_pool:
            raise CifarNetError("This run validated on the test split (--val-split 0); use --split test.")
        raise _no_such_split(source, split, available)

    def result(images: ImageSet, identities: dict[str, int] | None = None) -> _EvalData:
        return _EvalData(images, split, desc, source.fingerprint, same_data, identities)

    if split in ("all", "test"):
        chosen = source.everything() if split == "all" else source.split("test")
        return result(chosen, _warn_of_training_images(loaded, chosen, split, same_data, record, on_event))
    if same_data:
        from cifarnet_cli.training import split_data

        if not n_val:
            return result(source.train)
        inherited = record.inherited if record is not None else None  # held out of what --init-from's weights saw
        train_set, val_set, _ = split_data(source, n_val, int(loaded.meta.get("split_seed", 0)), seen=inherited)
        part = val_set if split == "val" else train_set
        assert part is not None
        return result(part)
    images, identities = _by_identity(loaded, source, split, record, on_event)
    return result(images, identities)


def _run_data_location(loaded: LoadedModel, data_dir: Path | None) -> str | None:
    """``--data-dir``, else the data the run recorded (None: the default CIFAR-10)."""
    if data_dir is not None:
        return str(data_dir)
    recorded = loaded.meta.get("data_location")
    if isinstance(recorded, str) and recorded:
        if find_source(Path(recorded)) is not None:
            return recorded
        if Path(recorded) != paths.default_data_dir() and loaded.meta.get("data_kind") == "image-folder":
            # Not CIFAR-10 from the default place, which would be downloaded: the run's own images are gone.
            raise CifarNetError(
                f"The data this run was trained on ({display(recorded)}) is not there any more; "
                "evaluate on other data with --data-dir DIR."
            )
    return None


def _default_split(source: DataSource, same_data: bool, n_val: int, record: SplitRecord | None) -> str:
    """test where the data has one; else the run's validation images (on its own data, or those of them
    still in changed data); else every image (said when it includes training images)."""
    if source.has_test:
        return "test"
    if n_val > 0 and same_data:
        return "val"
    if n_val > 0 and record is not None and record.held_out.size:
        from cifarnet_cli.data.split import image_ids

        if np.isin(image_ids(source.train.images), record.held_out).any():
            return "val"
    return "all"


def _by_identity(
    loaded: LoadedModel, source: DataSource, split: str, record: SplitRecord | None, on_event: Callable[[object], None]
) -> tuple[ImageSet, dict[str, int]]:
    """The run's held-out (``val``) or training (``train``) images that are still in changed data."""
    from cifarnet_cli.data.split import identify, image_ids

    what = "held out for validation" if split == "val" else "trained on"
    if record is None:
        raise CifarNetError(
            f"{display(source.location)} differs from the data this run trained on, and the run was trained before "
            f"cifarnet recorded which images it {what}, so its {split} split cannot be found in it (drawing it "
            "again would mix in training images). Evaluate it on its original data, or choose --split test or "
            "--split all (which may include images it trained on)."
        )
    pool = source.train
    ids = image_ids(pool.images)
    found = identify(ids, record)
    index = found.held_out if split == "val" else found.trained
    recorded = record.held_out.size if split == "val" else record.seen.size
    missing = found.held_out_missing if split == "val" else found.trained_missing
    distinct = int(np.unique(ids[index]).size)  # a copy of an image (another name or folder) is found twice
    copies = int(index.size) - distinct
    others = len(pool) - index.size
    if index.size == 0:
        raise CifarNetError(
            f"None of the {recorded:,} images this run {what} are in {display(source.location)} (images are matched "
            "by their decoded pixels, which another Pillow version may also change); choose --split all (or test) "
            "to score this data."
        )
    left_out = f"{found.trained.size:,} it trained on and {found.new:,} new" if split == "val" else f"{others:,} other"
    more = f"{copies:,} more cop{'y' if copies == 1 else 'ies'} of them"
    twice = f"; {more}, {index.size:,} images scored" if copies else ""
    on_event(
        Notice(
            f"This data differs from the run's training data: scoring the {distinct:,} of its {recorded:,} images "
            f"{what} that are still in it ({missing:,} missing{twice}); the {left_out} image(s) are left out."
        )
    )
    identities = {"recorded": int(recorded), "found": distinct, "missing": int(missing)}
    if copies:
        identities["copies"] = copies
    if split == "val":
        identities.update(trained_left_out=int(found.trained.size), new_left_out=int(found.new))
    return pool.subset(index), identities


def _warn_of_training_images(
    loaded: LoadedModel,
    chosen: ImageSet,
    split: str,
    same_data: bool,
    record: SplitRecord | None,
    on_event: Callable[[object], None],
) -> dict[str, int] | None:
    """Say when the images to score include images the run trained on (the accuracy then overstates how the
    model does on new images); return the count when it is known."""
    overstates = "so the accuracy overstates how the model does on new images."
    # On its own data a run never trained on its test split, unless its starting weights did (--init-from).
    inherited = record is not None and record.inherited.size > 0
    if same_data and not (split == "test" and inherited):
        if split == "all":
            on_event(
                Notice(f"These are the run's own data: --split all includes the images it trained on, {overstates}")
            )
        return None
    if record is None:
        if split == "all" and loaded.meta.get("data_fingerprint") is not None:
            on_event(
                Notice(
                    "This data differs from the run's training data and the run does not record which images it "
                    "trained on: some of these images may be among them, so the accuracy may overstate how the model "
                    "does on new images."
                )
            )
        return None
    from cifarnet_cli.data.split import seen_count

    trained = seen_count(chosen.images, record.seen)
    if trained:
        on_event(
            Notice(f"{trained:,} of these {len(chosen):,} images ({split}) are images the run trained on, {overstates}")
        )
    return {"trained_included": trained}


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
) -> _EvalData:
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
    images = source.everything() if split == "all" else source.split(split)
    return _EvalData(images, split, f"{display(source.location)} ({source.kind})", source.fingerprint, False)


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
        chosen = _exported_eval_set(exported, data_dir, split, on_event)
    else:
        from cifarnet_cli.devices import resolve_device
        from cifarnet_cli.inference import load_model

        device = resolve_device(device_spec)
        loaded = load_model(str(model_file) if model_file is not None else ref, device)
        if loaded.notice is not None:
            on_event(Notice(loaded.notice))
        model_classes, model_path, run = loaded.classes, loaded.path, loaded.run
        chosen = _eval_set(loaded, data_dir, split, on_event)
    class_ids = _class_ids(classes, model_classes)
    data = _restrict(chosen.images, class_ids, len(model_classes), on_event)
    if exported is not None:
        logits, labels = _exported_logits(exported, data, batch_size, tta), np.asarray(data.labels)
    else:
        assert loaded is not None
        logits, labels = _checkpoint_logits(loaded, data, device, batch_size, tta, precision)
    _check_finite(logits, model_path)
    names = [model_classes[i] for i in class_ids]
    accuracy, per_class, per_class_n, cm = metrics_from_logits(logits, labels, class_ids, names)
    subset = len(class_ids) < len(model_classes)
    report = EvalReport(
        accuracy,
        int(labels.shape[0]),
        names,
        per_class,
        per_class_n,
        cm,
        chosen.split,
        str(model_path),
        chosen.description,
        tta,
        float((logits.argmax(1) == labels).mean()) if subset else None,
        data_fingerprint=chosen.fingerprint,
        runs_own_data=chosen.runs_own_data if loaded is not None else None,
        identities=chosen.identities,
    )
    if write_report and run is not None:
        report = _save_report(report, run, subset=subset, on_event=on_event)
    return report


def _class_ids(classes: list[str] | None, model_classes: tuple[str, ...]) -> list[int]:
    """The model's outputs ``--classes`` names (every one without it), checked."""
    if classes is None:
        return list(range(len(model_classes)))
    mapping, unknown = match_classes(classes, model_classes)
    if unknown:
        raise UsageError(f"--classes: {', '.join(unknown)} not among the model's classes ({', '.join(model_classes)}).")
    class_ids = sorted(set(mapping.values()))
    if len(class_ids) < 2:
        raise UsageError(
            "--classes needs at least two classes: the model chooses among them, so with one every image "
            f"would count as right (the model's classes: {', '.join(model_classes)})."
        )
    return class_ids


def _restrict(data: ImageSet, class_ids: list[int], num_classes: int, on_event: Callable[[object], None]) -> ImageSet:
    """The images of the chosen classes (all of them without --classes); none at all is an error."""
    if len(class_ids) < num_classes:
        keep = np.isin(data.labels, class_ids)
        left_out = int((~keep).sum())
        if left_out:
            on_event(Notice(f"Left out {left_out} image(s) of classes outside --classes."))
        data = data.subset(np.flatnonzero(keep))
    if len(data) == 0:
        raise CifarNetError(
            "No images to evaluate" + (" in the chosen classes." if len(class_ids) < num_classes else ".")
        )
    return data


def report_suffix(split: str, classes: list[str] | None, tta: bool, data_id: str | None) -> str:
    """``<split>[-<classes>][-tta][-<data id>]``: one report per data, split, class subset and TTA, so that an
    evaluation never replaces another's. The data id (the first 8 hex digits of the data's content
    fingerprint) is left out on the run's own data, whose reports keep their plain names (eval-val.json).
    Long class names are shortened (:func:`_bounded`) so that the file names fit the file system."""
    subset = _subset_suffix(classes) if classes else ""
    rest = ("-tta" if tta else "") + (f"-{data_id[:8]}" if data_id else "")
    room = MAX_SUFFIX_BYTES - len(f"{split}{rest}".encode())
    return split + _bounded(subset, room) + rest


#: The longest report suffix, in bytes: "confusion-" + suffix + ".png" and atomic_writer's temporary name
#: (".<name>.<8 hex>.partial", 18 bytes more) stay under the 255 bytes a file name may have (ext4, APFS).
MAX_SUFFIX_BYTES = 200
_KEPT_BYTES = 40  # of a shortened part: enough to recognise the first class


def _bounded(part: str, limit: int) -> str:
    """``part`` when it fits ``limit`` bytes (UTF-8); else its first 40 bytes and 8 hex digits of a hash of
    the whole (a different subset keeps a different name; the report itself lists the classes)."""
    raw = part.encode("utf-8", "surrogateescape")
    if len(raw) <= limit:
        return part
    head = raw[:_KEPT_BYTES].decode("utf-8", "ignore").rstrip("-_.+")  # never half a character
    return f"{head}-{hashlib.blake2b(raw, digest_size=4).hexdigest()}"


def _save_report(report: EvalReport, run: Any, *, subset: bool, on_event: Callable[[object], None]) -> EvalReport:
    """eval-<suffix>.json and confusion-<suffix>.png in the run folder; a failure to write is a notice (the
    results are printed anyway)."""
    data_id = None if report.runs_own_data or report.data_fingerprint is None else report.data_fingerprint
    suffix = report_suffix(report.split, report.classes if subset else None, report.tta, data_id)
    target = run.dir / f"eval-{suffix}.json"
    picture = run.dir / f"confusion-{suffix}.png"
    try:  # atomically, and a failure worded like every other file error
        # within: a run that `runs rm` deleted meanwhile stays deleted (no half-run brought back)
        fileio.write_bytes(target, (json.dumps(report.to_json(), indent=2) + "\n").encode(), within=run.dir)
        title = confusion_title(run.name, report)
        drawn = plot_confusion(report.confusion, report.classes, picture, title=title, within=run.dir)
    except CifarNetError as exc:
        on_event(Notice(f"{exc} The results are not saved in the run folder."))
    except OSError as exc:
        message = fileio.os_error_message(exc, picture, "write")
        on_event(Notice(f"{message} The results are not saved in the run folder."))
    else:
        return dataclasses.replace(report, files=(str(target),) + ((str(drawn),) if drawn else ()))
    return report


def confusion_title(run_name: str, report: EvalReport) -> str:
    """What a confusion picture shows: the run, the split and the data it was measured on (with TTA when
    used), the classes when a subset, and the accuracy."""
    where, _, kind = report.data.rpartition(" (")  # "<location> (<kind>)": the folder's name is enough here
    data = f"{Path(where).name or where} ({kind}" if where else report.data
    if report.runs_own_data:
        data = data[:-1] + ", the run's own data)"
    elif report.data_fingerprint:
        data = data[:-1] + f", data {report.data_fingerprint[:8]})"
    lines = [f"{run_name}: {report.split} split of {data}" + (", flip TTA" if report.tta else "")]
    if report.unrestricted_accuracy is not None:
        lines.append(f"{len(report.classes)} classes: {', '.join(report.classes)}")
    lines.append(f"accuracy {100 * report.accuracy:.2f}% of {report.n:,} images")
    return "\n".join(lines)


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
