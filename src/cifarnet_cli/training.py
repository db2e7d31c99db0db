"""Setting up a run for the engine: data, split, model, loaders, run folder, resume.

Both `cifarnet train` and `cifarnet finetune-resnet50` come through :func:`train`; they differ only in
their :class:`TrainConfig` (architecture, weights, freezing, learning rates).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cifarnet_cli import __version__, checkpoint, paths, pretrained, report, runs
from cifarnet_cli.autobatch import fit_micro_batch
from cifarnet_cli.config import TrainConfig
from cifarnet_cli.data.loader import DeviceLoader
from cifarnet_cli.data.sources import DataSource, ImageSet, find_source, load_source
from cifarnet_cli.data.split import stratified_split
from cifarnet_cli.devices import Precision, describe, resolve_device, resolve_precision
from cifarnet_cli.engine import backbone_frozen, fit, set_backbone_trainable
from cifarnet_cli.errors import CifarNetError, UsageError
from cifarnet_cli.events import DownloadProgress, EventCallback, Notice, RunStarted, TrainResult
from cifarnet_cli.fileio import display
from cifarnet_cli.models import Classifier, count_parameters, get_model
from cifarnet_cli.train_step import choose_mode

#: Options that may differ when a run is resumed (the machine may have changed); the recipe may not.
RESUME_OVERRIDABLE = frozenset({"device", "precision", "capture", "data_dir", "batch_size", "accum"})


def download_callbacks(
    name: str, on_event: EventCallback
) -> tuple[Callable[[str], None], Callable[[int, int | None], None]]:
    """The downloader's notify/progress callbacks, turned into events for whoever renders them."""

    def notify(message: str) -> None:
        on_event(Notice(message))

    def progress(done: int, total: int | None) -> None:
        on_event(DownloadProgress(name, done, total))

    return notify, progress


# --------------------------------------------------------------------------------------------------
# Data


def open_data(
    config_data_dir: str | None, *, classes: tuple[str, ...] | None = None, on_event: EventCallback
) -> DataSource:
    """Load the data set; fetch CIFAR-10 into the default location when nothing is there yet."""
    from cifarnet_cli import download  # imported late: only needed when data is missing

    location = Path(absolute_path(config_data_dir)) if config_data_dir else paths.default_data_dir()
    if find_source(location) is None and config_data_dir is None:
        on_event(Notice(f"No CIFAR-10 at {location}; downloading it (cifarnet download cifar10)."))
        notify, progress_cb = download_callbacks("cifar10", on_event)
        download.fetch_cifar10(location, notify=notify, progress=progress_cb)

    def progress(done: int, total: int) -> None:
        if done == total or done % 10240 == 0:
            on_event(Notice(f"Decoding images: {done}/{total}"))

    source = load_source(location, classes=classes, progress=progress)
    for warning in source.warnings:
        on_event(Notice(warning))
    return source


def absolute_path(location: str) -> str:
    """``~`` expanded and made absolute against the current folder (symbolic links are kept as named)."""
    return os.path.abspath(os.path.expanduser(location))


def check_training_data(source: DataSource, val_split: int, *, user_set_val_split: bool) -> None:
    """Refuse data a classifier cannot be trained on, saying what is wrong with the data itself."""
    full = source.train
    where = display(source.location)
    present = sorted(set(full.labels.tolist()))
    if len(present) == 1:
        raise CifarNetError(
            f"{where} has training images of one class only ({source.classes[present[0]]}): a classifier needs "
            "examples of at least two classes to learn anything (a one-class model is 100% right by "
            "construction). Add folders of the other classes."
        )
    if val_split == 0 and not source.has_test and not user_set_val_split:
        raise CifarNetError(
            f"{where} has too few images to hold out a validation split: {len(full)} training image(s) (10% "
            "rounds to 0) and no test split. Add images (at least 10), add a test/<class>/ folder, or choose "
            "how many to hold out with --val-split N."
        )


def default_val_split(n_train: int) -> int:
    """10% of the training images, at most 5,000 (CIFAR-10's customary 45k/5k split)."""
    return min(5000, n_train // 10)


def split_data(source: DataSource, val_split: int, seed: int) -> tuple[ImageSet, ImageSet | None, str]:
    """(train set, evaluation set, name of the evaluation split)."""
    full = source.train
    if val_split == 0:
        if not source.has_test:
            raise UsageError(f"{source.location} has no test split to validate on; hold out images with --val-split N.")
        return full, source.split("test"), "test"
    train_idx, val_idx = stratified_split(full.labels, val_split, seed)
    return full.subset(train_idx), full.subset(val_idx), "val"


# --------------------------------------------------------------------------------------------------
# Model


def build_model(config: TrainConfig, num_classes: int, *, load_weights: bool, on_event: EventCallback) -> Classifier:
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if config.image_size is not None:
        kwargs["image_size"] = config.image_size
    model = get_model(config.arch, **kwargs)
    if load_weights and config.weights and config.weights.lower() != "none":
        notify, progress = download_callbacks(config.weights, on_event)
        message = pretrained.load_weights(model, config.weights, notify=notify, progress=progress)
        on_event(Notice(message))
    return model


def model_kwargs(model: Classifier, num_classes: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if hasattr(model, "image_size"):
        kwargs["image_size"] = int(getattr(model, "image_size"))  # noqa: B009
    return kwargs


# --------------------------------------------------------------------------------------------------


def _resume_checkpoint(ref: str) -> tuple[runs.Run, dict[str, Any]]:
    path = Path(ref).expanduser()
    if path.is_file():
        run = runs.Run(path.parent.name, path.parent)
        ckpt_path = path
    else:
        run = runs.resolve_run(ref)
        ckpt_path = run.last
    ckpt = checkpoint.load(ckpt_path)
    checkpoint.validate_resumable(ckpt, ckpt_path)
    return run, ckpt


def train(
    config: TrainConfig | None,
    *,
    run_name: str | None = None,
    resume: str | None = None,
    overrides: dict[str, Any] | None = None,
    on_event: EventCallback,
) -> TrainResult:
    """Start a run from ``config``, or continue the run ``resume`` (a name, a folder or a last.pt)."""
    ckpt: dict[str, Any] | None = None
    if resume is not None:
        run, ckpt = _resume_checkpoint(resume)
        try:
            config = TrainConfig.from_dict(ckpt["config"]).validate()
        except (TypeError, ValueError, UsageError) as exc:  # a hand-edited recipe, or a value out of range
            raise CifarNetError(f"{run.last} records a recipe cifarnet cannot use ({exc}); start a new run.") from exc
        changed = {k: v for k, v in (overrides or {}).items() if v is not None}
        refused = sorted(set(changed) - RESUME_OVERRIDABLE)
        if refused:
            names = ", ".join("--" + k.replace("_", "-") for k in refused)
            raise UsageError(
                f"{names} cannot change when resuming: the run continues with its recorded recipe. "
                "Start a new run to train with other settings."
            )
        config = config.replace(**_resume_micro_batch(config, changed))
        fit_state = ckpt["fit_state"]
        if int(fit_state["epoch"]) >= config.epochs:
            best = run.best if run.best.is_file() else run.last
            rows = run.read_metrics()
            final = rows[-1].get("val_accuracy") if rows else None
            return TrainResult(
                run.name,
                str(run.dir),
                int(fit_state["epoch"]),
                float(fit_state["best_accuracy"]),
                float(final) if final is not None else float("nan"),
                float(fit_state["train_images"]) / max(float(fit_state["train_seconds"]), 1e-9),
                str(best),
                already_finished=True,
            )
    else:
        assert config is not None
        config.validate()
    if config.data_dir is not None:
        # Absolute, so that `evaluate RUN` and `--resume` from another folder find the same data.
        config = config.replace(data_dir=absolute_path(config.data_dir))

    device = resolve_device(config.device)
    precision: Precision = resolve_precision(config.precision, device)
    if device.type == "cpu" and config.arch == "resnet50" and (config.image_size or 0) >= 128:
        # measured: ~8.5 images/s at 160 px, ~59 at 64 px on 2 cores (fp32)
        on_event(
            Notice(
                f"ResNet-50 at {config.image_size} px is slow on a CPU (a few images per second per core); "
                "use a GPU, or --image-size 64 for a quick try."
            )
        )
    source = open_data(config.data_dir, on_event=on_event)
    if ckpt is not None and ckpt.get("meta", {}).get("data_fingerprint") not in (None, source.fingerprint):
        on_event(Notice("The data differs from the data this run started with; continuing anyway."))
    val_split_given = config.val_split is not None
    if ckpt is None:
        n_val = config.val_split if config.val_split is not None else default_val_split(len(source.train))
        config = config.replace(val_split=n_val, data_dir=config.data_dir)
    assert config.val_split is not None
    check_training_data(source, config.val_split, user_set_val_split=ckpt is not None or val_split_given)
    train_set, eval_set, eval_split = split_data(source, config.val_split, config.seed)
    if len(train_set) < 2:
        raise CifarNetError(
            f"{source.location} has {len(train_set)} training image(s) after the validation split; training "
            "needs at least 2 (BatchNorm normalises over a batch)."
        )

    torch.manual_seed(config.seed)  # model initialization is reproducible
    model = build_model(config, len(source.classes), load_weights=ckpt is None, on_event=on_event)
    if ckpt is not None:  # a clear message, not a RuntimeError from load_state_dict, if the weights do not fit
        checkpoint.load_state_strict(model, ckpt["model"], str(run.last))
    channels_last = device.type == "cuda"
    if device.type == "cuda":
        # Let cuDNN pick the fastest convolution algorithms for the few input shapes a run sees.
        torch.backends.cudnn.benchmark = True
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if config.batch_size_auto and device.type == "cuda":
        fitted = fit_micro_batch(
            model, device=device, precision=precision, effective_batch=config.effective_batch, cap=config.batch_size
        )
        config = config.replace(batch_size=fitted.batch_size, accum=fitted.accum)
        on_event(Notice(f"Fitted to this GPU's memory: {fitted.describe()}."))
    step_mode = choose_mode(config.capture, device=device, precision=precision, notice=lambda m: on_event(Notice(m)))
    start_epoch = int(ckpt["fit_state"]["epoch"]) if ckpt is not None else 0
    if config.freeze_backbone:  # so the banner counts the parameters that train in the next epoch
        set_backbone_trainable(model, not backbone_frozen(config, start_epoch + 1))
    if ckpt is None:
        run = runs.create_run(run_name or _unique_name(config.arch))

    train_loader = DeviceLoader(
        train_set,
        batch_size=config.batch_size,
        device=device,
        train=True,
        seed=config.seed,
        channels_last=channels_last,
    )
    eval_loader = (
        DeviceLoader(
            eval_set,
            batch_size=config.batch_size * 2,
            device=device,
            train=False,
            channels_last=channels_last,
        )
        if eval_set is not None
        else None
    )
    meta = {
        "cifarnet_version": __version__,
        "arch": config.arch,
        "model_kwargs": model_kwargs(model, len(source.classes)),
        "classes": list(source.classes),
        "input_size": 32,
        "data_kind": source.kind,
        "data_location": str(source.location),
        "data_fingerprint": source.fingerprint,
        "val_split": config.val_split,
        "split_seed": config.seed,
        "eval_split": eval_split,
        "precision": precision.name,  # evaluate/predict run in it by default, to reproduce the run's figures
    }
    run.write_config({"config": config.to_dict(), "meta": meta, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    on_event(
        RunStarted(
            run=run.name,
            run_dir=str(run.dir),
            device=describe(device),
            precision=precision.name,
            precision_reason=precision.reason,
            step_mode=step_mode,
            data=f"{source.location} ({source.kind})",
            train_images=len(train_set),
            eval_images=len(eval_set) if eval_set is not None else 0,
            eval_split=eval_split,
            arch=config.arch,
            parameters=count_parameters(model),
            trainable_parameters=count_parameters(model, trainable_only=True),
            batch_size=config.batch_size,
            accum=config.accum,
            effective_batch=config.effective_batch,
            peak_lr=config.peak_lr,
            epochs=config.epochs,
            start_epoch=start_epoch,
            on_device_data=train_loader.on_device,
        )
    )
    result = fit(
        model,
        config,
        train_loader=train_loader,
        eval_loader=eval_loader,
        device=device,
        precision=precision,
        run=run,
        meta=meta,
        resume_from=ckpt,
        on_event=on_event,
        step_mode=step_mode,
    )
    curves = report.plot_curves(run)
    on_event(Notice(f"Training curves: {curves}" if curves is not None else report.PLOT_HINT))
    return TrainResult(
        run.name,
        str(run.dir),
        result.epochs,
        result.best_accuracy,
        result.final_accuracy,
        result.images_per_second,
        str(run.best if run.best.is_file() else run.last),
    )


def _resume_micro_batch(config: TrainConfig, changed: dict[str, Any]) -> dict[str, Any]:
    """A resumed run may split its effective batch differently (another GPU, less memory), never change it:
    the recipe and the schedule's steps stay what they were."""
    if "batch_size" not in changed and "accum" not in changed:
        return changed
    effective = config.effective_batch
    batch = changed.get("batch_size") or (effective // changed["accum"] if changed.get("accum") else None)
    accum = changed.get("accum") or (effective // batch if batch else None)
    if not batch or not accum or batch * accum != effective:
        raise UsageError(
            f"--batch-size and --accum may change on resume only if their product stays the run's effective batch "
            f"({effective} = {config.batch_size} × {config.accum}), e.g. --batch-size {max(1, config.batch_size // 2)} "
            f"--accum {config.accum * 2}."
        )
    return {**changed, "batch_size": batch, "accum": accum, "batch_size_auto": False}


def _unique_name(arch: str) -> str:
    base = runs.default_name(arch)
    name, i = base, 2
    while (paths.runs_dir() / name).exists():
        name, i = f"{base}-{i}", i + 1
    return name
