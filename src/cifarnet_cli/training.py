"""Setting up a run for the engine: data, split, model, loaders, run folder, resume.

Both `cifarnet train` and `cifarnet finetune-resnet50` come through :func:`train`; they differ only in
their :class:`TrainConfig` (architecture, weights, freezing, learning rates).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifarnet_cli import (
    __version__,
    checkpoint,
    ddp,
    distributed,
    interrupts,
    launch,
    paths,
    pretrained,
    report,
    runs,
    tensorboard_log,
)
from cifarnet_cli.autobatch import data_bytes_on_device, fit_micro_batch
from cifarnet_cli.config import TrainConfig
from cifarnet_cli.data.loader import DeviceLoader
from cifarnet_cli.data.sources import DataSource, ImageSet, find_source, load_source
from cifarnet_cli.data.split import (
    SPLIT_IDS,
    SplitRecord,
    seen_count,
    split_unseen,
    stratified_split,
    unseen_mask,
)
from cifarnet_cli.devices import Precision, describe, is_integrated, resolve_device, resolve_precision
from cifarnet_cli.engine import (
    FitResult,
    TrainingDiverged,
    backbone_frozen,
    scheduled_lrs,
    set_backbone_trainable,
)
from cifarnet_cli.engine import fit as engine_fit
from cifarnet_cli.errors import CifarNetError, UsageError
from cifarnet_cli.events import DecodeProgress, DownloadProgress, EventCallback, Notice, RunStarted, TrainResult
from cifarnet_cli.fileio import display
from cifarnet_cli.models import Classifier, count_parameters, get_model
from cifarnet_cli.monitor import BoardMonitor
from cifarnet_cli.tensorboard_log import TensorBoardLogger
from cifarnet_cli.train_step import choose_mode

#: Options that may differ when a run is resumed (the machine may have changed); the recipe may not.
RESUME_OVERRIDABLE = frozenset(
    {"device", "precision", "capture", "data_dir", "batch_size", "accum", "save_every", "save_minutes", "patience"}
)


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
        try:
            download.fetch_cifar10(location, notify=notify, progress=progress_cb)
        except CifarNetError as exc:  # offline, a proxy, ...: data already on disk is the other way
            raise CifarNetError(
                f"{exc} If CIFAR-10 (or your own images) are already on disk, point --data-dir (or CIFARNET_DATA) "
                "at them: a cifar-10-batches-py folder, cifar-10-python.tar.gz, or an image folder with "
                "train/<class>/*.png.",
                exit_code=exc.exit_code,
            ) from exc

    def progress(done: int, total: int) -> None:
        on_event(DecodeProgress(done, total))

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


def split_data(
    source: DataSource, val_split: int, seed: int, *, seen: np.ndarray | None = None, unseen: np.ndarray | None = None
) -> tuple[ImageSet, ImageSet | None, str]:
    """(train set, evaluation set, name of the evaluation split). ``seen``: identities of images the starting
    weights trained on (--init-from), which are never held out; ``unseen`` is the mask of the training images
    not among them, where the caller has it already."""
    full = source.train
    if val_split == 0:
        if not source.has_test:
            raise UsageError(f"{source.location} has no test split to validate on; hold out images with --val-split N.")
        return full, source.split("test"), "test"
    if unseen is None and seen is not None and seen.size:
        unseen = unseen_mask(full.images, seen)
    if unseen is None:
        train_idx, val_idx = stratified_split(full.labels, val_split, seed)
    else:
        train_idx, val_idx = split_unseen(full.labels, unseen, val_split, seed)
    return full.subset(train_idx), full.subset(val_idx), "val"


# --------------------------------------------------------------------------------------------------
# Model


def build_model(config: TrainConfig, num_classes: int, *, load_weights: bool, on_event: EventCallback) -> Classifier:
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if config.image_size is not None:
        kwargs["image_size"] = config.image_size
    model = get_model(config.arch, **kwargs)
    if load_weights and (config.weights or "").lower() == "none" and config.arch == "resnet50":
        from cifarnet_cli.models.resnet50 import ResNet50Transfer

        assert isinstance(model, ResNet50Transfer)
        model.zero_init_residual()  # a random ResNet-50 body: its blocks start as the identity
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


def _resume_target(ref: str) -> tuple[runs.Run, Path]:
    path = Path(ref).expanduser()
    if path.is_file():
        return runs.Run(path.parent.name, path.parent), path
    run = runs.resolve_run(ref)
    return run, run.last


def _load_resumable(path: Path) -> dict[str, Any]:
    ckpt = checkpoint.load(path)
    checkpoint.validate_resumable(ckpt, path)
    return ckpt


def _command(config: TrainConfig) -> str:
    return config.command


def _extend_refusal(run: runs.Run, config: TrainConfig, done: int, wanted: int) -> UsageError:
    """--epochs on a resume: the schedule (warm-up, then cosine to 0 or the milestones) is laid out over
    the planned epochs, so a run cannot be stretched; a new run from its weights can train further."""
    if wanted < config.epochs:
        return UsageError(
            f"--epochs cannot change when resuming: run {run.name!r} is planned for {config.epochs} epochs and "
            "its learning-rate schedule is laid out over them."
        )
    # The new run validates on the same images (--val-split, --seed): otherwise its validation split
    # would hold images this run trained on.
    extra = ["--arch", config.arch] if config.task == "train" and config.arch != TrainConfig().arch else []
    if config.data_dir:
        extra += ["--data-dir", shlex.quote(config.data_dir)]
    extra += ["--val-split", str(config.val_split)] + (["--seed", str(config.seed)] if config.seed else [])
    more = wanted - config.epochs
    command = " ".join([_command(config), "--init-from", shlex.quote(run.name), "--epochs", str(more), *extra])
    if done >= config.epochs:
        return UsageError(
            f"Run {run.name!r} finished its {config.epochs} planned epochs, where its learning-rate schedule ends; "
            f"it cannot be stretched to {wanted}. To train {more} more epochs, start a new run from its weights "
            f"(fresh optimizer and schedule): {command}"
        )
    return UsageError(
        f"Run {run.name!r} is planned for {config.epochs} epochs (its learning-rate schedule is laid out over them; "
        f"{done} done). Finish it with `{_command(config)} --resume {run.name}`, then train further from its "
        f"weights: {command}"
    )


def _reopen_if_patience_allows(config: TrainConfig, fit_state: dict[str, Any]) -> None:
    """A run --patience stopped continues when resumed with a --patience that would not have stopped it
    (larger than the epochs without improvement so far, or 0 = off)."""
    stopped = int(fit_state.get("stopped_early") or 0)
    waited = stopped - int(fit_state.get("best_epoch") or 0)
    if stopped and (config.patience == 0 or config.patience > waited):
        fit_state["stopped_early"] = 0


def _finished_result(run: runs.Run, ckpt: dict[str, Any]) -> TrainResult:
    fit_state, meta = ckpt["fit_state"], ckpt.get("meta")
    rows = run.read_metrics()
    final = rows[-1].get("val_accuracy") if rows else None
    return TrainResult(
        run.name,
        str(run.dir),
        int(fit_state["epoch"]),
        float(fit_state["best_accuracy"]),
        float(final) if final is not None else float("nan"),
        float(fit_state["train_images"]) / max(float(fit_state["train_seconds"]), 1e-9),
        str(run.best if run.best.is_file() else run.last),
        already_finished=True,
        stopped_early=int(fit_state.get("stopped_early", 0)),
        best_epoch=int(fit_state.get("best_epoch", 0)),
        split=str(meta["eval_split"]) if isinstance(meta, dict) and meta.get("eval_split") else None,
    )


def init_defaults(ref: str) -> dict[str, Any]:
    """Options a new run takes from the run it starts from (--init-from) unless given: its architecture,
    read from its config.json (no checkpoint is opened here)."""
    path = Path(ref).expanduser()
    folder = path.parent if path.is_file() else None
    if folder is None:
        try:
            folder = runs.resolve_run(ref).dir
        except CifarNetError:
            return {}
    meta = runs.Run(folder.name, folder).read_config().get("meta")
    arch = meta.get("arch") if isinstance(meta, dict) else None  # a damaged config.json: checkpoint's word
    return {"arch": arch} if isinstance(arch, str) else {}


def recorded_device(ref: str) -> str | None:
    """The --device a run to be resumed recorded (``cuda:0,1`` starts its processes again), read from its
    config.json; None when it cannot be told (the resume itself then says what is wrong)."""
    path = Path(ref).expanduser()
    try:
        run = runs.Run(path.parent.name, path.parent) if path.is_file() else runs.resolve_run(ref)
    except CifarNetError:
        return None
    config = run.read_config().get("config")
    device = config.get("device") if isinstance(config, dict) else None
    return device if isinstance(device, str) else None


def _load_init(ref: str, config: TrainConfig, on_event: EventCallback) -> tuple[Path, dict[str, Any]]:
    """The checkpoint --init-from names (a run's best.pt, or a file), checked against the new run's
    architecture before any data is loaded."""
    path, _run = runs.resolve_checkpoint(ref, prefer="best")
    ckpt = checkpoint.load(path)
    if not checkpoint.is_cifarnet_checkpoint(ckpt):
        hint = " (finetune-resnet50 --weights PATH takes torchvision weights)" if config.arch == "resnet50" else ""
        raise CifarNetError(f"--init-from {ref}: {path} is not a cifarnet checkpoint{hint}.")
    # The same checks as evaluate, predict and export (built once, so weights that do not fit its recorded
    # architecture and classes are named now): a hand-edited file is one sentence, not a traceback.
    validated = checkpoint.validate_model(ckpt, path)
    checkpoint.build_model(validated)
    arch = validated.arch
    if arch != config.arch:
        if arch == "resnet50":
            fix = "use `cifarnet finetune-resnet50 --init-from`"
        elif config.task == "finetune-resnet50":
            fix = "use `cifarnet train --init-from`"
        else:
            fix = f"add --arch {arch}"
        raise UsageError(f"--init-from {ref}: {path} holds a {arch} model and this run trains a {config.arch}; {fix}.")
    if int(ckpt.get("epoch", 1)) == 0:
        on_event(Notice(f"--init-from {ref}: {path} was saved before its first epoch completed (untrained weights)."))
    return path, ckpt


def _init_weights(
    model: Classifier, path: Path, ckpt: dict[str, Any], classes: tuple[str, ...], on_event: EventCallback
) -> None:
    source_classes = list(ckpt["meta"].get("classes", []))
    if source_classes and len(source_classes) != len(classes):
        raise CifarNetError(
            f"--init-from {path}: that model has {len(source_classes)} classes and this data has {len(classes)}; "
            "start from a model trained on the same classes."
        )
    checkpoint.load_state_strict(model, checkpoint.strip_prefixes(ckpt["model"]), f"--init-from {path}")
    if source_classes and source_classes != list(classes):
        on_event(
            Notice(f"The classes differ from those of {path}; its outputs are reused in order ({', '.join(classes)}).")
        )
    on_event(Notice(f"Initial weights from {path} (epoch {ckpt.get('epoch', '?')}); new optimizer and schedule."))


def train(
    config: TrainConfig | None,
    *,
    run_name: str | None = None,
    resume: str | None = None,
    overrides: dict[str, Any] | None = None,
    tensorboard: bool = False,
    split_given: bool = True,
    on_event: EventCallback,
) -> TrainResult:
    """Start a run from ``config``, or continue the run ``resume`` (a name, a folder or a last.pt).

    One process trains a run at a time (a lock in its folder); SIGTERM stops it like Ctrl-C. Under torchrun,
    the processes train it together (:mod:`cifarnet_cli.ddp`): rank 0 opens the run and the others follow.
    ``split_given``: the user chose --batch-size/--accum (a number of processes that cannot share that split
    exactly is refused; otherwise the recipe's effective batch is re-cut for them).
    """
    with (
        interrupts.sigterm_as_interrupt(),
        distributed.session() as world,
        contextlib.ExitStack() as stack,
        distributed.MainRelay() as relay,
    ):
        if not world.is_main:
            return _follow(world, tensorboard, split_given, stack, on_event)
        ckpt: dict[str, Any] | None = None
        if resume is not None:
            run, ckpt_path = _resume_target(resume)
            stack.enter_context(run.lock())
            removed = run.clean_partials()
            if removed:
                on_event(
                    Notice(f"Removed {len(removed)} unfinished temporary file(s) a killed write left in {run.dir}.")
                )
            ckpt = _load_resumable(ckpt_path)
            try:
                config = TrainConfig.from_dict(ckpt["config"]).validate()
            except (TypeError, ValueError, UsageError) as exc:  # a hand-edited recipe, or a value out of range
                raise CifarNetError(
                    f"{ckpt_path} records a recipe cifarnet cannot use ({exc}); start a new run."
                ) from exc
            changed = {k: v for k, v in (overrides or {}).items() if v is not None}
            done = int(ckpt["fit_state"]["epoch"])
            if "epochs" in changed and changed["epochs"] != config.epochs:
                raise _extend_refusal(run, config, done, int(changed.pop("epochs")))
            changed.pop("epochs", None)
            refused = sorted(set(changed) - RESUME_OVERRIDABLE)
            if refused:
                names = ", ".join("--" + k.replace("_", "-") for k in refused)
                raise UsageError(
                    f"{names} cannot change when resuming: the run continues with its recorded recipe. "
                    "Start a new run to train with other settings."
                )
            if changed:  # --device, --patience, ...: checked like a new run's options
                config = config.replace(**_resume_micro_batch(config, changed)).validate()
            if "patience" in changed:
                _reopen_if_patience_allows(config, ckpt["fit_state"])
            if done >= config.epochs or ckpt["fit_state"].get("stopped_early"):
                return relay.send(_finished_result(run, ckpt))
        else:
            assert config is not None
            config.validate()
            if run_name is not None:
                runs.check_new_run(run_name)
        if config.data_dir is not None:
            # Absolute, so that `evaluate RUN` and `--resume` from another folder find the same data.
            config = config.replace(data_dir=absolute_path(config.data_dir))
        opened = (config, ckpt, run if ckpt is not None else None)
        return _train(
            *opened, run_name, tensorboard, stack, on_event, world=world, relay=relay, split_given=split_given
        )


def _follow(
    world: distributed.World,
    tensorboard: bool,
    split_given: bool,
    stack: contextlib.ExitStack,
    on_event: EventCallback,
) -> TrainResult:
    """A process other than rank 0: it trains what rank 0 opened (the recipe, the resumed checkpoint), or
    returns what rank 0 found (a finished run), or raises the error that stopped rank 0."""
    message = distributed.receive_from_main()
    if isinstance(message, TrainResult):
        return message
    config, ckpt, resumed, seen = message
    run = ddp.FollowerRun(resumed.name, resumed.dir) if resumed is not None else None
    return _train(
        config, ckpt, run, None, tensorboard, stack, on_event, world=world, split_given=split_given, seen=seen
    )


@dataclass(frozen=True)
class _Data:
    """The data a run trains and validates on."""

    source: DataSource
    train_set: ImageSet
    eval_set: ImageSet | None
    eval_split: str  # "val" (held out of the training images) or "test"


def _train(
    config: TrainConfig,
    ckpt: dict[str, Any] | None,
    resumed: runs.Run | None,
    run_name: str | None,
    tensorboard: bool,
    stack: contextlib.ExitStack,
    on_event: EventCallback,
    *,
    world: distributed.World = distributed.World(),
    relay: distributed.MainRelay | None = None,
    split_given: bool = True,
    seen: np.ndarray | None = None,
) -> TrainResult:
    """Train a run opened by :func:`train`. ``seen`` (processes other than rank 0): identities of the images
    the starting weights trained on, which rank 0 read (see :func:`_seen_by_start`)."""
    init: tuple[Path, dict[str, Any]] | None = None
    if ckpt is None and config.init_from and world.is_main:
        init = _load_init(config.init_from, config, on_event)
        config = config.replace(init_from=str(init[0].resolve()), weights=None)
    if world.is_main:
        seen = _seen_by_start(init, ckpt, on_event)
    if relay is not None:
        relay.send((config, ckpt, resumed, seen))  # the other processes start from here with rank 0's recipe

    device, precision = _device_and_precision(config, world)
    config = _fit_world(config, world, device, split_given, on_event)
    _warn_if_slow(config, device, on_event)
    config, data = distributed.leader_first(partial(_prepare_data, config, ckpt, resumed, on_event, seen=seen))
    model = distributed.agree(partial(_prepare_world_model, config, data, ckpt, resumed, init, device, world, on_event))
    step_mode = _step_mode(config, device, precision, world, on_event)
    config = _fit_micro_batch(config, model, device, precision, on_event, step_mode=step_mode, data=data, world=world)
    start_epoch = int(ckpt["fit_state"]["epoch"]) if ckpt is not None else 0
    if config.freeze_backbone:  # so the banner counts the parameters that train in the next epoch
        set_backbone_trainable(model, not backbone_frozen(config, start_epoch + 1))
    run = _open_run(config, resumed, run_name, stack, world, on_event)

    train_loader, eval_loader = _loaders(config, _share_eval(data, world), device)
    meta = _run_meta(config, model, data, precision, seen)
    start_step = _saved_step(ckpt, start_epoch)
    if world.is_main:
        _write_run_config(run, config, meta, device, precision, resumed=resumed is not None, world=world)
        launch.note_run(run.name, config.command)
    on_event(
        _run_started(
            run, config, data, model, device, precision, step_mode, start_epoch, train_loader, start_step, world
        )
    )
    monitor = BoardMonitor.for_device(device, on_event) if world.is_main else None  # a Jetson's GPU temperature
    if monitor is not None:
        monitor.start()
    result = _fit_with_views(
        model,
        config,
        run,
        tensorboard,
        on_event,
        world=world,
        monitor=monitor,
        train_loader=train_loader,
        eval_loader=eval_loader,
        device=device,
        precision=precision,
        meta=meta,
        resume_from=ckpt,
        step_mode=step_mode,
    )
    return TrainResult(
        run.name,
        str(run.dir),
        result.epochs,
        result.best_accuracy,
        result.final_accuracy,
        result.images_per_second,
        str(run.best if run.best.is_file() else run.last),
        stopped_early=result.stopped_early,
        best_epoch=result.best_epoch,
        split=data.eval_split,
    )


def _saved_step(ckpt: dict[str, Any] | None, completed: int) -> int:
    """Optimizer steps of the next epoch a resumed last.pt already holds (saved in that epoch's middle)."""
    position = (ckpt or {}).get("position") or {}
    return int(position.get("steps", 0)) if position.get("epoch") == completed + 1 else 0


def _warn_if_slow(config: TrainConfig, device: torch.device, on_event: EventCallback) -> None:
    if device.type == "cpu" and config.arch == "resnet50" and (config.image_size or 0) >= 128:
        # measured: ~8.5 images/s at 160 px, ~59 at 64 px on 2 cores (fp32)
        on_event(
            Notice(
                f"ResNet-50 at {config.image_size} px is slow on a CPU (a few images per second per core); "
                "use a GPU, or --image-size 64 for a quick try."
            )
        )


def _device_and_precision(config: TrainConfig, world: distributed.World) -> tuple[torch.device, Precision]:
    """This process's device and the precision it trains in; under several processes, ``cuda:LOCAL_RANK`` (or
    the GPU of the list that is this process's) in the one precision every process resolves to."""
    if world.size == 1:
        device = resolve_device(config.device)
        return device, resolve_precision(config.precision, device)

    def resolve() -> tuple[torch.device, Precision]:
        device = distributed.worker_device(config.device, world, narrowed=launch.narrowed())
        return device, resolve_precision(config.precision, device)

    device, precision = distributed.agree(resolve)
    names = sorted(set(distributed.gather_objects(precision.name)))
    if len(names) > 1:
        raise distributed.mark_agreed(
            UsageError(
                f"--precision {config.precision} resolves to {' and '.join(names)} on different GPUs of this run; "
                "the processes must compute alike: choose one that every GPU computes natively, e.g. --precision fp32."
            )
        )
    return device, precision


def _fit_world(
    config: TrainConfig, world: distributed.World, device: torch.device, split_given: bool, on_event: EventCallback
) -> TrainConfig:
    """The recipe's micro-batch and accumulation, shared by ``world``'s processes: accum / world micro-batches
    per process and step (the effective batch stays the one-process run's); --sync-bn checked."""
    if world.size == 1:
        return config
    if config.sync_bn and device.type != "cuda":
        raise distributed.mark_agreed(ddp.sync_batchnorm_refusal())
    if config.batch_size_auto and device.type == "cuda":
        return config  # chosen with the memory each GPU has (_fit_micro_batch)
    given = split_given and not config.batch_size_auto
    batch, accum = distributed.agree(
        partial(distributed.split_for_world, config.batch_size, config.accum, world.size, given=given)
    )
    if (batch, accum) == (config.batch_size, config.accum):
        return config
    on_event(
        Notice(
            f"{world.size} processes share the effective batch of {config.effective_batch} as micro-batch {batch} × "
            f"accum {accum} ({accum // world.size} per process and step; one process trains the same with "
            f"--batch-size {batch} --accum {accum})."
        )
    )
    return config.replace(batch_size=batch, accum=accum)


def _fit_micro_batch(
    config: TrainConfig,
    model: Classifier,
    device: torch.device,
    precision: Precision,
    on_event: EventCallback,
    *,
    step_mode: str = "eager",
    data: _Data | None = None,
    world: distributed.World = distributed.World(),
) -> TrainConfig:
    """--batch-size auto: the largest micro-batch that fits, the accumulation making up the effective batch; the
    budget holds a captured step's graph (``step_mode``) and ``data``'s share of the device's memory. Over
    several processes: the smallest that fits their GPUs, split evenly between them.

    It is the default on a GPU that shares the system's memory (a Jetson), where running out of memory is
    often the kernel killing the process rather than a CUDA error a run could recover from. The run
    records what was decided, so a resume does the same."""
    defaulted = config.batch_size_auto is None
    if defaulted:
        config = config.replace(batch_size_auto=device.type == "cuda" and is_integrated(device))
    if not config.batch_size_auto or device.type != "cuda":
        return config
    sets = [s.images.nbytes for s in (data.train_set, data.eval_set) if s is not None] if data is not None else []
    probe = partial(
        fit_micro_batch,
        model,
        device=device,
        precision=precision,
        effective_batch=config.effective_batch,
        cap=config.batch_size,
        captured=step_mode == "graph",
        data_bytes=data_bytes_on_device(sets, device),
    )
    fitted = distributed.agree(probe)  # no collective inside: a failure on one process is agreed on
    if world.size == 1:
        why = " (--batch-size auto: the default on a GPU that shares the system's memory)" if defaulted else ""
        on_event(Notice(f"Fitted to this GPU's memory: {fitted.describe()}{why}."))
        return config.replace(batch_size=fitted.batch_size, accum=fitted.accum)
    (largest,) = distributed.exchange([-fitted.batch_size])
    split = distributed.fit_batch_for_world(config.effective_batch, -largest, world.size)
    if split is None:
        raise distributed.mark_agreed(
            UsageError(
                f"No micro-batch of at least 2 images that fits every GPU splits the effective batch of "
                f"{config.effective_batch} evenly between {world.size} processes; give --batch-size and --accum."
            )
        )
    on_event(
        Notice(f"Fitted to the GPUs' memory: micro-batch {split[0]} × accum {split[1]} over {world.size} processes.")
    )
    return config.replace(batch_size=split[0], accum=split[1])


def _step_mode(
    config: TrainConfig, device: torch.device, precision: Precision, world: distributed.World, on_event: EventCallback
) -> str:
    if world.size == 1:
        return choose_mode(config.capture, device=device, precision=precision, notice=lambda m: on_event(Notice(m)))
    if config.capture == "on":
        on_event(Notice(f"--capture on: {ddp.CAPTURE_REASON}."))
    return "eager"


def _prepare_world_model(
    config: TrainConfig,
    data: _Data,
    ckpt: dict[str, Any] | None,
    resumed: runs.Run | None,
    init: tuple[Path, dict[str, Any]] | None,
    device: torch.device,
    world: distributed.World,
    on_event: EventCallback,
) -> Classifier:
    """:func:`_prepare_model`; processes other than rank 0 skip the pretrained or --init-from weights (DDP
    broadcasts rank 0's weights and buffers when it wraps the model), and --sync-bn converts BatchNorm."""
    if not world.is_main and ckpt is None:
        config = config.replace(weights=None)
    model = _prepare_model(config, data, ckpt, resumed, init, device, on_event)
    if config.sync_bn and world.size > 1:
        model = ddp.sync_batchnorm(model, device)
    return model


def _open_run(
    config: TrainConfig,
    resumed: runs.Run | None,
    run_name: str | None,
    stack: contextlib.ExitStack,
    world: distributed.World,
    on_event: EventCallback,
) -> runs.Run:
    """The resumed run, or a new one: created, locked and written by rank 0 alone; the other processes know it
    by name (:class:`ddp.FollowerRun`, which writes nothing)."""
    if resumed is not None:
        return resumed

    def create() -> runs.Run:
        run, lock = runs.create_run(run_name or runs.default_name(config.arch), unique=run_name is None)
        stack.callback(lock.release)
        stack.push(partial(_discard_if_unsaved, run, on_event))  # runs before the lock is released
        return run

    run = distributed.from_main(create)
    return run if world.is_main else ddp.FollowerRun(run.name, run.dir)


def _share_eval(data: _Data, world: distributed.World) -> _Data:
    """This process's contiguous share of the evaluation images (all of them for one process)."""
    if world.size == 1 or data.eval_set is None:
        return data
    start, end = distributed.shard_bounds(len(data.eval_set), world.size, world.rank)
    return dataclasses.replace(data, eval_set=data.eval_set.subset(np.arange(start, end)))


def _device_words(device: torch.device, world: distributed.World) -> str:
    if world.size == 1:
        return describe(device)
    nodes = f" on {world.nodes} nodes" if world.nodes > 1 else ""
    return f"{describe(device)} × {world.size} processes{nodes}"


def _prepare_data(
    config: TrainConfig,
    ckpt: dict[str, Any] | None,
    resumed: runs.Run | None,
    on_event: EventCallback,
    *,
    seen: np.ndarray | None = None,
) -> tuple[TrainConfig, _Data]:
    """Open the data, fix a new run's validation split (10% by default) and split it, refusing data a
    classifier cannot be trained on. ``seen``: the images the starting weights trained on, never held out."""
    source = open_data(config.data_dir, on_event=on_event)
    if ckpt is not None and resumed is not None:
        _check_resumed_data(resumed, config, ckpt, source)
    val_split_given = config.val_split is not None
    unseen = unseen_mask(source.train.images, seen) if seen is not None and seen.size else None
    if ckpt is None:
        n_val = config.val_split if config.val_split is not None else default_val_split(len(source.train))
        if unseen is not None:
            n_val = _val_split_of_unseen(config, source, n_val, int(unseen.sum()), val_split_given, on_event)
        config = config.replace(val_split=n_val)
    assert config.val_split is not None
    check_training_data(source, config.val_split, user_set_val_split=ckpt is not None or val_split_given)
    train_set, eval_set, eval_split = split_data(source, config.val_split, config.seed, unseen=unseen)
    if eval_split == "test" and eval_set is not None and seen is not None and seen.size:
        _warn_of_seen_test_images(eval_set, seen, on_event)
    if len(train_set) < 2:
        raise CifarNetError(
            f"{source.location} has {len(train_set)} training image(s) after the validation split; training "
            "needs at least 2 (BatchNorm normalises over a batch)."
        )
    return config, _Data(source, train_set, eval_set, eval_split)


def _seen_by_start(
    init: tuple[Path, dict[str, Any]] | None, ckpt: dict[str, Any] | None, on_event: EventCallback
) -> np.ndarray | None:
    """Identities of the images the starting weights trained on: those of --init-from's run (and of its own
    sources), or, on resume, those the run recorded when it started. None: not known, or none."""
    if ckpt is not None:
        record = SplitRecord.from_meta(ckpt.get("meta"))
        return record.inherited if record is not None and record.inherited.size else None
    if init is None:
        return None
    path, source = init
    record = SplitRecord.from_meta(source.get("meta"))
    if record is None:
        on_event(
            Notice(
                f"{display(path)} does not record which images it trained on: if these data hold some of them, "
                "validation may include them and overstate how the model does on new images."
            )
        )
        return None
    return record.seen


def _warn_of_seen_test_images(test: ImageSet, seen: np.ndarray, on_event: EventCallback) -> None:
    """A test split holding images the starting weights (--init-from) trained on: its figure overstates."""
    trained = seen_count(test.images, seen)
    if trained:
        on_event(
            Notice(
                f"{trained:,} of the {len(test):,} test images are images the weights of --init-from trained on: "
                "the validation accuracy overstates how the model does on new images."
            )
        )


def _val_split_of_unseen(
    config: TrainConfig, source: DataSource, n_val: int, n_unseen: int, given: bool, on_event: EventCallback
) -> int:
    """A run started with --init-from holds out only images its starting weights never trained on (a
    validation figure on images the model has seen overstates it): at most ``n_unseen``; the default is
    cut to that, a larger --val-split refused."""
    n = len(source.train)
    if n_unseen == n:
        return n_val
    start = f"the weights of --init-from trained on {n - n_unseen:,} of these {n:,} images"
    nothing_left = CifarNetError(
        f"{start[0].upper()}{start[1:]}: none is left to validate on (a figure on images the model has seen "
        "would overstate it). Add images it has not trained on, or a test/<class>/ folder."
    )
    if given and n_val > n_unseen:
        if n_unseen == 0 and not source.has_test:
            raise nothing_left
        if n_unseen == 0:
            held, advice = "none of them", "use --val-split 0 to validate on the test split"
        else:
            test = " (or 0 to validate on the test split)" if source.has_test else ""
            held, advice = f"at most the {n_unseen:,} others", f"use --val-split {n_unseen} or less{test}"
        raise UsageError(
            f"--val-split {n_val}: {start}, so {held} can be held out as images new to the model; {advice}."
        )
    n_val = min(n_val, n_unseen)
    if n_val == 0 and not source.has_test and not given:
        raise nothing_left
    validates = (
        f"the {n_val:,} validation images are drawn from the {n_unseen:,} others"
        if n_val
        else "the run validates on the test split"
    )
    on_event(Notice(f"{start[0].upper()}{start[1:]}: they all train here, and {validates}."))
    return n_val


def _check_resumed_data(run: runs.Run, config: TrainConfig, ckpt: dict[str, Any], source: DataSource) -> None:
    """A resumed run continues on the data it started with, wherever it lies now (the fingerprint is of the
    content). Other data would draw the recorded --val-split again from other images and mix them with those
    it trained on; a new run from its weights is the way to train on other data."""
    meta = ckpt.get("meta")
    recorded = meta.get("data_fingerprint") if isinstance(meta, dict) else None
    if recorded is None or recorded == source.fingerprint:
        return
    command = f"{config.command} --init-from {shlex.quote(run.name)} --data-dir {shlex.quote(str(source.location))}"
    raise UsageError(
        f"--resume continues run {run.name!r} on the images it started with, and {display(source.location)} holds "
        f"other images (added, removed or changed); to train on these, start a new run from its weights: {command}"
    )


def _prepare_model(
    config: TrainConfig,
    data: _Data,
    ckpt: dict[str, Any] | None,
    resumed: runs.Run | None,
    init: tuple[Path, dict[str, Any]] | None,
    device: torch.device,
    on_event: EventCallback,
) -> Classifier:
    """The model with its starting weights (random and seeded, pretrained, --init-from or the resumed
    run's), on the training device."""
    torch.manual_seed(config.seed)  # model initialization is reproducible
    classes = data.source.classes
    model = build_model(config, len(classes), load_weights=ckpt is None and init is None, on_event=on_event)
    if init is not None:
        _init_weights(model, init[0], init[1], classes, on_event)
    if ckpt is not None and resumed is not None:  # a clear message, not a RuntimeError, if the weights do not fit
        checkpoint.load_state_strict(model, ckpt["model"], str(resumed.last))
    if device.type == "cuda":
        # Let cuDNN pick the fastest convolution algorithms for the few input shapes a run sees.
        torch.backends.cudnn.benchmark = True
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


def _loaders(config: TrainConfig, data: _Data, device: torch.device) -> tuple[DeviceLoader, DeviceLoader | None]:
    channels_last = device.type == "cuda"
    train_loader = DeviceLoader(
        data.train_set,
        batch_size=config.batch_size,
        device=device,
        train=True,
        seed=config.seed,
        channels_last=channels_last,
    )
    eval_loader = (
        DeviceLoader(
            data.eval_set,
            batch_size=config.batch_size * 2,
            device=device,
            train=False,
            channels_last=channels_last,
        )
        if data.eval_set is not None
        else None
    )
    return train_loader, eval_loader


def _run_meta(
    config: TrainConfig, model: Classifier, data: _Data, precision: Precision, seen: np.ndarray | None
) -> dict[str, Any]:
    """What every checkpoint carries besides the weights, so that evaluate/predict/export can rebuild the
    model and its data split from the file alone."""
    source = data.source
    return {
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
        "eval_split": data.eval_split,
        "precision": precision.name,  # evaluate/predict run in it by default, to reproduce the run's figures
        # Which images it trained on and held out, by identity: evaluate finds its validation images in
        # changed data, and never counts a training image as held out. Tensors: checkpoints only.
        SPLIT_IDS: SplitRecord.of(
            data.train_set.images,
            data.eval_set.images if data.eval_split == "val" and data.eval_set else None,
            seen,
        ).to_meta(),
    }


def _write_run_config(
    run: runs.Run,
    config: TrainConfig,
    meta: dict[str, Any],
    device: torch.device,
    precision: Precision,
    *,
    resumed: bool,
    world: distributed.World = distributed.World(),
) -> None:
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    run.write_config(
        {
            "config": config.to_dict(),
            "meta": {k: v for k, v in meta.items() if k != SPLIT_IDS},  # 8 bytes an image: kept in checkpoints
            "created": (run.read_config().get("created") if resumed else None) or now,
            "updated": now,
            "device": _device_words(device, world),
            "precision": precision.name,
            "world_size": world.size,  # processes of the latest invocation (torchrun, --device cuda:0,1)
        }
    )


def _run_started(
    run: runs.Run,
    config: TrainConfig,
    data: _Data,
    model: Classifier,
    device: torch.device,
    precision: Precision,
    step_mode: str,
    start_epoch: int,
    train_loader: DeviceLoader,
    start_step: int = 0,
    world: distributed.World = distributed.World(),
) -> RunStarted:
    return RunStarted(
        run=run.name,
        run_dir=str(run.dir),
        device=_device_words(device, world),
        precision=precision.name,
        precision_reason=precision.reason,
        step_mode=step_mode,
        data=f"{data.source.location} ({data.source.kind})",
        train_images=len(data.train_set),
        eval_images=len(data.eval_set) if data.eval_set is not None else 0,
        eval_split=data.eval_split,
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
        start_step=start_step,
    )


def _fit_with_views(
    model: Classifier,
    config: TrainConfig,
    run: runs.Run,
    tensorboard: bool,
    on_event: EventCallback,
    monitor: BoardMonitor | None = None,
    *,
    world: distributed.World = distributed.World(),
    **fit_kwargs: Any,
) -> FitResult:
    """:func:`engine.fit` (:func:`ddp.fit` for several processes), with the run's other consumers of its
    events beside the caller's view: curves.png after every epoch, TensorBoard scalars when asked for, and a
    Jetson's board monitor (rank 0 alone draws, logs and watches)."""
    fit = engine_fit if world.size == 1 else partial(ddp.fit, world=world)
    if not world.is_main:
        return fit(model, config, run=run, on_event=on_event, **fit_kwargs)
    curves = report.CurvesWriter(
        run,
        epochs=config.epochs,
        lr_schedule=partial(scheduled_lrs, config),
        eval_split=str(fit_kwargs["meta"].get("eval_split", "val")),
        patience=config.patience,
    )
    consumers: list[EventCallback] = [curves] + ([monitor] if monitor is not None else [])
    board: TensorBoardLogger | None = None
    if tensorboard_log.wanted(tensorboard):
        if tensorboard_log.available():
            board = TensorBoardLogger(run.dir / "tensorboard")
            consumers.append(board)
            on_event(Notice(f"TensorBoard: tensorboard --logdir {shlex.quote(str(board.log_dir))}"))
        else:
            on_event(Notice(tensorboard_log.INSTALL_HINT))

    def events(event: object) -> None:
        for consumer in consumers:
            consumer(event)
        on_event(event)

    try:
        result = fit(model, config, run=run, on_event=events, columns=monitor, **fit_kwargs)
    finally:
        curves.close()  # also after Ctrl-C: the picture shows every saved epoch
        if board is not None:
            board.close()
    if curves.error is not None:
        on_event(Notice(f"Could not draw {run.curves_file} ({curves.error})."))
    elif curves.written is not None:
        on_event(Notice(f"Training curves: {curves.written}"))
    elif not report.matplotlib_available():
        on_event(Notice(report.PLOT_HINT))
    if board is not None and board.error is not None:
        on_event(Notice(f"TensorBoard logging stopped ({board.error})."))
    return result


def _discard_if_unsaved(
    run: runs.Run, on_event: EventCallback, exc_type: type | None, exc: BaseException | None, _tb: object
) -> bool:
    """A new run stopped (Ctrl-C, SIGTERM, an error) before its first checkpoint, or diverged before its
    first epoch, holds nothing to resume or use: its folder is removed, so ``cifarnet runs`` keeps no empty
    entry and the same command (with the fix) can run again under the same name. Never swallows the error."""
    if exc_type is None:
        return False
    if isinstance(exc, TrainingDiverged) and exc.discard:
        shutil.rmtree(run.dir, ignore_errors=True)
    elif not run.last.exists() and not run.best.exists():
        shutil.rmtree(run.dir, ignore_errors=True)
        on_event(Notice(f"Nothing was saved yet: removed the new run folder {run.dir}."))
    return False


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
