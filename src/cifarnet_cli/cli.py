"""The command-line interface. The only module that imports Typer: each command turns its options
into a config, calls one library function and renders the result."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import typer

from cifarnet_cli import __version__, choices
from cifarnet_cli.config import FINETUNE_DEFAULTS, FINETUNE_SCRATCH_DEFAULTS, TrainConfig
from cifarnet_cli.errors import (
    EXIT_BROKEN_PIPE,
    CifarNetError,
    StdoutWatch,
    UsageError,
    quiet_stdout_after_broken_pipe,
)

app = typer.Typer(
    name="cifarnet",
    help="Train, evaluate, fine-tune, run and export CIFAR-10 classifiers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _hide_flag_types() -> None:
    """Typer 0.2x prints a type after every flag in help (`--json <bool>`), which reads as if the flag took
    a value (`--json true` is refused). A flag takes none: show none. Left alone where Typer lacks the hook."""
    option = getattr(typer.core, "TyperOption", None)
    shown = getattr(option, "display_type_rich", None)
    if option is None or shown is None:
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        return None if getattr(self, "is_flag", False) else shown(self, ctx)

    option.display_type_rich = display_type_rich


_hide_flag_types()


# --------------------------------------------------------------------------------------------------
# Helpers


def _ui() -> ModuleType:
    """The Rich rendering module, imported on first use: it pulls in torch, which --help and shell
    completion do not need."""
    from cifarnet_cli import ui

    return ui


def _usage(message: str) -> typer.Exit:
    _ui().error(message)
    return typer.Exit(2)


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """A user error ends in one red line and its exit code; Ctrl-C in exit code 130."""
    from cifarnet_cli.events import TrainingInterrupted

    try:
        yield
    except CifarNetError as exc:
        _say(exc, _ui().error, str(exc))
        raise typer.Exit(_exit(exc, exc.exit_code)) from None
    except TrainingInterrupted as exc:
        how = "Stopped by SIGTERM" if exc.exit_code == 143 else "Interrupted"
        if exc.saved_step is not None:
            step, steps = exc.saved_step
            done = f"epoch {exc.completed_epochs} and " if exc.completed_epochs else ""
            saved = f"{done}step {step}/{steps} of epoch {exc.completed_epochs + 1} are saved in {exc.run.last}"
        elif exc.completed_epochs:
            saved = f"epoch {exc.completed_epochs} is saved in {exc.run.last}"
        else:
            saved = f"no epoch had completed, so {exc.run.last} holds the starting point"
        resume = f"{exc.command} --resume {exc.run.name}{_launch().resume_options()}"
        _say(exc, _ui().warn, f"{how}; {saved}. Continue with: {resume}")
        raise typer.Exit(_exit(exc, exc.exit_code)) from None
    except BrokenPipeError:  # the reader of stdout went away (`| head`): not a file error, not a failure
        quiet_stdout_after_broken_pipe()
        raise typer.Exit(EXIT_BROKEN_PIPE) from None
    except KeyboardInterrupt as exc:  # SIGTERM arrives as a KeyboardInterrupt subclass with its own code
        _say(exc, _ui().warn, "Stopped by SIGTERM." if getattr(exc, "exit_code", 130) == 143 else "Interrupted.")
        raise typer.Exit(_exit(exc, getattr(exc, "exit_code", 130))) from None
    except OSError as exc:  # the operating system refused a file operation the library did not word itself
        from cifarnet_cli.fileio import os_error_message

        _say(exc, _ui().error, os_error_message(exc))
        raise typer.Exit(_exit(exc, 1)) from None


def _launch() -> ModuleType:
    """The launcher of several processes (torch-free), imported on first use."""
    from cifarnet_cli import launch

    return launch


def _say(exc: BaseException, show: Any, message: str) -> None:
    """Print an error line; under several processes, rank 0 prints what they share and another rank only an
    error of its own, naming itself."""
    launch = _launch()
    if launch.speaks(exc):
        show(launch.ranked(message))


def _exit(exc: BaseException, code: int) -> int:
    return _launch().exit_code(exc, code) if _launch().in_torchrun() else code


def _print_json(obj: Any) -> None:
    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    sys.stdout.write(json.dumps(clean(obj)) + "\n")
    sys.stdout.flush()


def _complete_arch(incomplete: str) -> list[str]:
    return [a for a in choices.CIFAR_ARCHS if a.startswith(incomplete.lower())]


def _complete_device(incomplete: str) -> list[str]:
    return [d for d in choices.devices_here() if d.startswith(incomplete)]


def _complete_precision(incomplete: str) -> list[str]:
    return [p for p in choices.PRECISIONS if p.startswith(incomplete)]


def _complete_capture(incomplete: str) -> list[str]:
    return [c for c in choices.CAPTURE if c.startswith(incomplete)]


def _complete_schedule(incomplete: str) -> list[str]:
    return [s for s in choices.SCHEDULES if s.startswith(incomplete)]


def _complete_run(incomplete: str) -> list[str]:
    try:
        from cifarnet_cli.runs import list_runs

        return [r.name for r in list_runs() if r.name.startswith(incomplete)]
    except Exception:  # noqa: BLE001 - completion must never crash the shell
        return []


def _complete_asset(incomplete: str) -> list[str]:
    return [a for a in choices.ASSETS if a.startswith(incomplete)]


def _complete_weights(incomplete: str) -> list[str]:
    return [w for w in choices.WEIGHTS if w.lower().startswith(incomplete.lower())]


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"cifarnet {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", "-V", help="Show the version and exit.", callback=_version_callback, is_eager=True),
    ] = False,
) -> None:
    """Train, evaluate, fine-tune, run and export CIFAR-10 classifiers."""


# --------------------------------------------------------------------------------------------------
# train / finetune-resnet50 share their options; each command's help shows its own defaults


def _whole_number(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a whole number") from None


def _number(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a number") from None


def _batch_size(value: str) -> str:
    """A number of images, or ``auto`` (kept as text; _run_training turns it into the config)."""
    if value.strip().lower() == "auto":
        return "auto"
    return str(_whole_number(value))


def _option(kind: type, *decls: str, help: str, **kwargs: Any) -> Any:
    parser = {int: _whole_number, float: _number}.get(kind)
    if parser is not None:
        kwargs["parser"] = parser
    return typer.Option(*decls, help=help, show_default=False, **kwargs)


_T = TrainConfig()
_F = TrainConfig(**FINETUNE_DEFAULTS)
TrainEpochs = Annotated[int | None, _option(int, help=f"Training epochs. \\[default: {_T.epochs}]")]
TrainBatchSize = Annotated[
    str | None,
    _option(
        str,
        "--batch-size",
        "-b",
        help="Images per forward pass (micro-batch), or auto: the largest that fits the GPU's free memory, with "
        f"--accum raised to keep the effective batch. \\[default: {_T.batch_size}]",
        parser=_batch_size,
        metavar="N|auto",
    ),
]
TrainAccum = Annotated[
    int | None,
    _option(
        int,
        help="Micro-batches per optimizer step (exact gradient accumulation). Without --batch-size, the default "
        f"effective batch is kept and split into smaller micro-batches. \\[default: {_T.accum}]",
    ),
]
TrainLr = Annotated[
    float | None,
    _option(
        float, help=f"Peak learning rate. \\[default: {_T.base_lr:g} per {_T.base_batch} images of effective batch]"
    ),
]
TrainWeightDecay = Annotated[
    float | None,
    _option(float, "--weight-decay", help=f"Weight decay on conv/linear weights. \\[default: {_T.weight_decay:g}]"),
]
FinetuneEpochs = Annotated[int | None, _option(int, help=f"Training epochs. \\[default: {_F.epochs}]")]
FinetuneBatchSize = Annotated[
    str | None,
    _option(
        str,
        "--batch-size",
        "-b",
        help="Images per forward pass (micro-batch), or auto: the largest that fits the GPU's free memory, with "
        f"--accum raised to keep the effective batch. \\[default: {_F.batch_size} (smaller where it does not fit the GPU)]",
        parser=_batch_size,
        metavar="N|auto",
    ),
]
FinetuneAccum = Annotated[
    int | None,
    _option(
        int,
        help="Micro-batches per optimizer step (exact gradient accumulation). Without --batch-size, the default "
        f"effective batch is kept and split into smaller micro-batches. \\[default: {_F.accum}]",
    ),
]
FinetuneLr = Annotated[
    float | None,
    _option(
        float,
        help=f"Peak learning rate. \\[default: {_F.base_lr:g} per {_F.base_batch} images of effective batch; "
        f"{FINETUNE_SCRATCH_DEFAULTS['base_lr']:g} with --weights none]",
    ),
]
FinetuneWeightDecay = Annotated[
    float | None,
    _option(float, "--weight-decay", help=f"Weight decay on conv/linear weights. \\[default: {_F.weight_decay:g}]"),
]
TrainWarmup = Annotated[
    float | None,
    _option(float, "--warmup-epochs", help="Linear warm-up epochs. \\[default: 2, at most a fifth of the epochs]"),
]
FinetuneWarmup = Annotated[
    float | None,
    _option(
        float,
        "--warmup-epochs",
        help=f"Linear warm-up epochs. \\[default: {_F.warmup_epochs:g}; with --weights none a fifth of the epochs, "
        "at most 2]",
    ),
]
Momentum = Annotated[float | None, _option(float, help="SGD (Nesterov) momentum. \\[default: 0.9]")]
Schedule = Annotated[
    str | None,
    _option(
        str, help="Learning-rate schedule: cosine or multistep. \\[default: cosine]", autocompletion=_complete_schedule
    ),
]
Milestones = Annotated[
    str | None,
    _option(str, help="Epochs at which multistep multiplies the lr by --gamma, e.g. 20,40. \\[default: 50%,75%]"),
]
Gamma = Annotated[float | None, _option(float, help="Multistep decay factor. \\[default: 0.1]")]
Smoothing = Annotated[float | None, _option(float, "--label-smoothing", help="Label smoothing. \\[default: 0.1]")]
DataDir = Annotated[
    Path | None,
    _option(
        Path,
        "--data-dir",
        help="cifar-10-batches-py folder, cifar-10-python.tar.gz, or an image folder (train/<class>/*). "
        "\\[default: $CIFARNET_DATA or the user data dir]",
    ),
]
ValSplit = Annotated[
    int | None,
    _option(
        int,
        "--val-split",
        help="Training images held out for validation (seeded, stratified); 0 validates on the test split. "
        "\\[default: 10%, at most 5000]",
    ),
]
Device = Annotated[
    str | None,
    _option(
        str,
        help="auto, cpu, cuda, cuda:N, mps; for training also several GPUs: cuda:0,1 or cuda:all (one process "
        "each). \\[default: auto]",
        autocompletion=_complete_device,
    ),
]
PrecisionOpt = Annotated[
    str | None,
    _option(
        str,
        help="auto (by the GPU's compute capability: bf16 from 8.0, fp16 on 5.3-7.5 except 6.1, fp32 elsewhere), "
        "fp32, bf16 or fp16. \\[default: auto]",
        autocompletion=_complete_precision,
    ),
]
InferencePrecision = Annotated[
    str | None,
    _option(
        str,
        "--precision",
        help="fp32, bf16, fp16 or auto. \\[default: on a GPU the precision the run trained in, as its validation "
        "figures were measured; fp32 on the CPU]",
        autocompletion=_complete_precision,
    ),
]
Nproc = Annotated[
    int | None,
    _option(
        int,
        "--nproc",
        help="Processes to train with, one per device (torchrun, DDP): with --device cpu, N CPU processes; with "
        "cuda, the first N GPUs. --device cuda:0,1 or cuda:all choose GPUs instead. \\[default: 1]",
    ),
]
SyncBn = Annotated[
    bool,
    typer.Option(
        "--sync-bn",
        help="With several GPUs, BatchNorm statistics over every process's micro-batch (SyncBatchNorm) instead of "
        "each micro-batch's own.",
    ),
]
Capture = Annotated[
    str | None,
    _option(
        str,
        help="Capture the training step as CUDA graphs: auto (on CUDA), on, off. Same results, less launch "
        "overhead. \\[default: auto]",
        autocompletion=_complete_capture,
    ),
]
RunName = Annotated[
    str | None,
    _option(
        str,
        "--run",
        help="Run name (the folder under runs/; --name works too): 1 to 100 ASCII letters, digits, '.', '_' and '-', "
        "starting with a letter or a digit. "
        "\\[default: <arch>-<date>-<time>]",
    ),
]
# --name is --run by another name; kept out of the help, where Typer would print "--run,--name".
RunNameAlias = Annotated[str | None, typer.Option("--name", hidden=True, show_default=False)]
Resume = Annotated[
    str | None,
    _option(
        str,
        help="Continue a run (name, run folder or last.pt; 'last' = the most recent) with its recorded options.",
        autocompletion=_complete_run,
    ),
]
Seed = Annotated[int | None, _option(int, help="Random seed (data order, augmentation, init, split). \\[default: 0]")]
InitFrom = Annotated[
    str | None,
    typer.Option(
        "--init-from",
        help="Start a new run from another run's weights (a run name, 'last', or a checkpoint file), with a fresh "
        "optimizer and schedule. The architecture must match (train takes the run's by default).",
        show_default=False,
        autocompletion=_complete_run,
    ),
]
FinetuneInitFrom = Annotated[
    str | None,
    typer.Option(
        "--init-from",
        help="Start a new run from another ResNet-50 run's weights (a run name, 'last', or a checkpoint file) "
        "instead of --weights, with a fresh optimizer and schedule.",
        show_default=False,
        autocompletion=_complete_run,
    ),
]
SaveEvery = Annotated[
    int | None, _option(int, "--save-every", help="Also keep epoch-NNN.pt every N epochs. \\[default: 0 = off]")
]
SaveMinutes = Annotated[
    float | None,
    _option(
        float,
        "--save-minutes",
        help="Also write last.pt every N minutes inside an epoch (at an optimizer step), so that a kill loses at "
        f"most N minutes; --resume continues from that step. 0 = at the end of epochs only. \\[default: "
        f"{_T.save_minutes:g}]",
    ),
]
Patience = Annotated[
    int | None,
    _option(
        int, "--patience", help="Stop when validation accuracy has not improved for N epochs. \\[default: 0 = off]"
    ),
]
TensorBoard = Annotated[
    bool,
    typer.Option(
        "--tensorboard",
        help="Log scalars to <run>/tensorboard (needs the tensorboard package; also $CIFARNET_TENSORBOARD=1).",
    ),
]
JsonOut = Annotated[bool, typer.Option("--json", help="Print one JSON object with the results on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output; errors only.")]


def _run_name(run: str | None, name: str | None) -> str | None:
    """--run, or --name (the same option by another name)."""
    if run is not None and name is not None and run != name:
        raise _usage("--run and --name are the same option; give one of them.")
    return run if run is not None else name


def _run_training(
    task: str,
    options: dict[str, Any],
    *,
    run: str | None,
    resume: str | None,
    as_json: bool,
    quiet: bool,
    tensorboard: bool = False,
    nproc: int | None = None,
    ctx: typer.Context | None = None,
) -> None:
    from cifarnet_cli.config import make_config, parse_milestones
    from cifarnet_cli.training import init_defaults, recorded_device, train

    with _user_errors():
        if resume is not None and run is not None:
            raise UsageError("--run names a new run; --resume continues an existing one. Use one of them.")
        if options.get("batch_size") == "auto":
            options["batch_size"], options["batch_size_auto"] = None, True
        elif options.get("batch_size") is not None:
            options["batch_size"] = int(options["batch_size"])
        if resume is None and task == "train" and options.get("init_from") and options.get("arch") is None:
            arch = init_defaults(options["init_from"]).get("arch")
            options["arch"] = arch if arch in choices.CIFAR_ARCHS else None
        if isinstance(options.get("milestones"), str):
            options["milestones"] = parse_milestones(options["milestones"]) or None
        if options.get("data_dir") is not None:
            options["data_dir"] = str(options["data_dir"])
        # The user's own split of the effective batch is kept (or refused) on several processes; the default
        # one is re-cut for them.
        split_given = options.get("batch_size") is not None or options.get("accum") is not None
        device = options.get("device") or (recorded_device(resume) if resume is not None else None)
        plan = _launch().plan(device, nproc)
        if plan is not None:
            assert ctx is not None
            _train_processes(ctx, task, options, plan, resume=resume, quiet=quiet, split_given=split_given)
        main = _launch().worker_rank() in (None, 0)  # under torchrun, rank 0 alone prints and draws
        asked_auto = bool(options.get("batch_size_auto")) and resume is None
        with _ui().TrainView(quiet=quiet or not main, batch_size_auto=asked_auto) as view:
            kwargs: dict[str, Any] = {"tensorboard": tensorboard, "split_given": split_given, "on_event": view}
            if resume is not None:
                result = train(None, resume=resume, overrides=options, **kwargs)
            else:
                result = train(make_config(task, options), run_name=run, **kwargs)
        if not main:
            return
        if result.already_finished and not quiet:
            if result.stopped_early:
                waited = result.epochs - result.best_epoch
                _ui().info(
                    f"Run {result.run} stopped early after epoch {result.epochs}: validation accuracy had not improved "
                    f"for {waited} epoch(s) (--patience); nothing to do. To continue it, resume with --patience "
                    f"{waited + 1} or more (0 = off)."
                )
            else:
                _ui().info(f"Run {result.run} already finished its {result.epochs} epochs; nothing to do.")
        if not quiet:
            _ui().train_summary(result, result.split)
        if as_json:
            _print_json(result.to_json())


def _train_processes(
    ctx: typer.Context,
    task: str,
    options: dict[str, Any],
    plan: Any,
    *,
    resume: str | None,
    quiet: bool,
    split_given: bool,
) -> None:
    """Train with several processes: this command again under torchrun (:mod:`cifarnet_cli.launch`), after
    refusing here what they would refuse (a split of the effective batch they cannot share, --sync-bn on CPUs)."""
    from cifarnet_cli.config import make_config

    if resume is None:
        from cifarnet_cli.ddp import sync_batchnorm_refusal
        from cifarnet_cli.distributed import split_for_world

        config = make_config(task, dict(options))
        if config.sync_bn and plan.device_type != "cuda":
            raise sync_batchnorm_refusal()
        if not (config.batch_size_auto and plan.device_type == "cuda"):
            split_for_world(
                config.batch_size, config.accum, plan.nproc, given=split_given and not config.batch_size_auto
            )
    if not quiet:
        _ui().info(f"Training with {plan.describe()}, started by torchrun.")
    code, message = _launch().run(plan, ["-m", "cifarnet_cli"], arguments=_typed_arguments(ctx, drop={"nproc"}))
    if message:
        _ui().error(message)
    raise typer.Exit(code)


def _typed_arguments(ctx: typer.Context, *, drop: set[str]) -> list[str]:
    """The command and the options typed on its command line (less ``drop``), to run it again."""
    args = [str(ctx.info_name)]
    for param in ctx.command.params:
        name = param.name or ""
        if param.param_type_name != "option" or name in drop:
            continue
        source = ctx.get_parameter_source(name)
        if source is None or source.name != "COMMANDLINE":
            continue
        flag = max(param.opts, key=len)
        value = ctx.params.get(name)
        if getattr(param, "is_flag", False):
            if value:
                args.append(flag)
        elif value is not None:
            args += [flag, str(value)]
    return args


@app.command()
def train(
    ctx: typer.Context,
    arch: Annotated[
        str | None,
        typer.Option(
            help="resnet20, resnet32, resnet44, resnet56 or resnet110. \\[default: resnet20]",
            show_default=False,
            autocompletion=_complete_arch,
        ),
    ] = None,
    epochs: TrainEpochs = None,
    batch_size: TrainBatchSize = None,
    accum: TrainAccum = None,
    lr: TrainLr = None,
    momentum: Momentum = None,
    weight_decay: TrainWeightDecay = None,
    schedule: Schedule = None,
    milestones: Milestones = None,
    gamma: Gamma = None,
    warmup_epochs: TrainWarmup = None,
    label_smoothing: Smoothing = None,
    data_dir: DataDir = None,
    val_split: ValSplit = None,
    device: Device = None,
    nproc: Nproc = None,
    precision: PrecisionOpt = None,
    capture: Capture = None,
    sync_bn: SyncBn = False,
    run: RunName = None,
    name: RunNameAlias = None,
    resume: Resume = None,
    seed: Seed = None,
    init_from: InitFrom = None,
    save_every: SaveEvery = None,
    save_minutes: SaveMinutes = None,
    patience: Patience = None,
    tensorboard: TensorBoard = False,
    as_json: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """Train a CIFAR ResNet from scratch (ResNet-20 by default) with SGD and exact gradient accumulation.

    Example: cifarnet train --arch resnet20 --epochs 30 --batch-size 64 --accum 8
    """
    typed, arch = arch, arch.strip().lower() if arch is not None else None
    if typed is not None and arch is not None and resume is None:
        if arch not in choices.CIFAR_ARCHS:
            hint = " (ResNet-50 trains with `cifarnet finetune-resnet50`)" if arch == "resnet50" else ""
            raise _usage(choices.unknown("--arch", typed, choices.CIFAR_ARCHS, extra=hint))
    options = dict(
        arch=arch,
        epochs=epochs,
        batch_size=batch_size,
        accum=accum,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        schedule=schedule,
        milestones=milestones,
        gamma=gamma,
        warmup_epochs=warmup_epochs,
        label_smoothing=label_smoothing,
        data_dir=data_dir,
        val_split=val_split,
        device=device,
        precision=precision,
        capture=capture,
        sync_bn=sync_bn or None,
        seed=seed,
        init_from=init_from,
        save_every=save_every,
        save_minutes=save_minutes,
        patience=patience,
    )
    run = _run_name(run, name)
    _run_training(
        "train",
        options,
        run=run,
        resume=resume,
        as_json=as_json,
        quiet=quiet,
        tensorboard=tensorboard,
        nproc=nproc,
        ctx=ctx,
    )


@app.command("finetune-resnet50")
def finetune_resnet50(
    ctx: typer.Context,
    weights: Annotated[
        str | None,
        typer.Option(
            help="IMAGENET1K_V1, IMAGENET1K_V2, none (random init) or PATH (torchvision state dict or cifarnet "
            "checkpoint). \\[default: IMAGENET1K_V1]",
            show_default=False,
            autocompletion=_complete_weights,
        ),
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(
            "--image-size",
            help="Side the 32×32 images are resized to on the device. \\[default: 160]",
            show_default=False,
            parser=_whole_number,
        ),
    ] = None,
    freeze_backbone: Annotated[
        bool | None,
        typer.Option("--freeze-backbone", help="Train the new head only (until --unfreeze-at).", show_default=False),
    ] = None,
    unfreeze_at: Annotated[
        int | None,
        typer.Option(
            "--unfreeze-at",
            help="Epoch at which a frozen backbone starts training.",
            show_default=False,
            parser=_whole_number,
        ),
    ] = None,
    backbone_lr_scale: Annotated[
        float | None,
        typer.Option(
            "--backbone-lr-scale",
            help="Learning rate of the pretrained body relative to the head. \\[default: 0.2; 1 with --weights none]",
            show_default=False,
            parser=_number,
        ),
    ] = None,
    epochs: FinetuneEpochs = None,
    batch_size: FinetuneBatchSize = None,
    accum: FinetuneAccum = None,
    lr: FinetuneLr = None,
    momentum: Momentum = None,
    weight_decay: FinetuneWeightDecay = None,
    schedule: Schedule = None,
    milestones: Milestones = None,
    gamma: Gamma = None,
    warmup_epochs: FinetuneWarmup = None,
    label_smoothing: Smoothing = None,
    data_dir: DataDir = None,
    val_split: ValSplit = None,
    device: Device = None,
    nproc: Nproc = None,
    precision: PrecisionOpt = None,
    capture: Capture = None,
    sync_bn: SyncBn = False,
    run: RunName = None,
    name: RunNameAlias = None,
    resume: Resume = None,
    seed: Seed = None,
    init_from: FinetuneInitFrom = None,
    save_every: SaveEvery = None,
    save_minutes: SaveMinutes = None,
    patience: Patience = None,
    tensorboard: TensorBoard = False,
    as_json: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """Fine-tune torchvision's ImageNet ResNet-50 on CIFAR-10 with a new 10-class head.

    Same engine, runs and options as `train`. Example: cifarnet finetune-resnet50 --epochs 3 --freeze-backbone --unfreeze-at 2
    """
    if unfreeze_at is not None and not freeze_backbone and resume is None:
        raise _usage("--unfreeze-at needs --freeze-backbone (the backbone is trained from the start otherwise).")
    if init_from is not None and weights is not None:
        raise _usage("--weights and --init-from both give the starting weights; use one of them.")
    options = dict(
        weights=weights,
        image_size=image_size,
        freeze_backbone=freeze_backbone,
        unfreeze_at=unfreeze_at,
        backbone_lr_scale=backbone_lr_scale,
        epochs=epochs,
        batch_size=batch_size,
        accum=accum,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        schedule=schedule,
        milestones=milestones,
        gamma=gamma,
        warmup_epochs=warmup_epochs,
        label_smoothing=label_smoothing,
        data_dir=data_dir,
        val_split=val_split,
        device=device,
        precision=precision,
        capture=capture,
        sync_bn=sync_bn or None,
        seed=seed,
        init_from=init_from,
        save_every=save_every,
        save_minutes=save_minutes,
        patience=patience,
    )
    run = _run_name(run, name)
    _run_training(
        "finetune-resnet50",
        options,
        run=run,
        resume=resume,
        as_json=as_json,
        quiet=quiet,
        tensorboard=tensorboard,
        nproc=nproc,
        ctx=ctx,
    )


# --------------------------------------------------------------------------------------------------
# download


@app.command()
def download(
    asset: Annotated[str, typer.Argument(help="cifar10, resnet50-v1 or resnet50-v2.", autocompletion=_complete_asset)],
    mirror: Annotated[
        list[str] | None,
        typer.Option(help="Another URL of the file, or a base URL ending in '/' (repeatable; also $CIFARNET_MIRROR)."),
    ] = None,
    ca_bundle: Annotated[
        Path | None, typer.Option("--ca-bundle", help="PEM file of extra CA certificates to trust.")
    ] = None,
    from_file: Annotated[
        Path | None,
        typer.Option("--from-file", help="Use this local copy (verified by SHA-256) instead of the network."),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="Where to put it. \\[default: data dir for cifar10, torch hub cache for weights]",
            show_default=False,
        ),
    ] = None,
    insecure_transport: Annotated[
        bool,
        typer.Option(
            "--insecure-transport",
            help="Do not verify the server's certificate (size and SHA-256 are still enforced).",
        ),
    ] = False,
    timeout: Annotated[
        float, typer.Option(help="Seconds without data before a transfer is abandoned.", parser=_number)
    ] = 30.0,
    quiet: Quiet = False,
) -> None:
    """Download CIFAR-10 or the ImageNet ResNet-50 weights, verified by SHA-256, with SSL-safe fallbacks.

    Example: cifarnet download cifar10 --ca-bundle /etc/ssl/corp-ca.pem
    """
    from cifarnet_cli import download as dl

    with _user_errors():
        spec = dl.get_asset(asset)
        options = dl.DownloadOptions(
            from_file=from_file,
            mirrors=tuple(mirror or ()),
            ca_bundle=ca_bundle,
            insecure_transport=insecure_transport,
            timeout_s=timeout,
        )
        with _ui().DownloadView(quiet=quiet, description=spec.name) as view:
            if spec.kind == "dataset":
                path = dl.fetch_cifar10(
                    data_dir or dl.default_destination(spec),
                    options,
                    notify=view.notify,
                    progress=view.progress,
                )
            else:
                path = dl.fetch(asset, data_dir, options, notify=view.notify, progress=view.progress)
        if not quiet:
            _ui().success(f"{spec.name} is ready at {path}")


# --------------------------------------------------------------------------------------------------
# evaluate / predict

RunArg = Annotated[
    str | None,
    typer.Argument(
        help="Run name, run folder or checkpoint file. \\[default: the most recent run]",
        show_default=False,
        autocompletion=_complete_run,
    ),
]


def _complete_split(incomplete: str) -> list[str]:
    return [s for s in choices.SPLITS if s.startswith(incomplete)]


ModelFile = Annotated[
    Path | None,
    typer.Option(
        "--model",
        "-m",
        help="A model file: an exported ONNX file or TensorRT engine (read with onnxruntime / TensorRT, without "
        "torch; class names come from the file) or a checkpoint.",
        show_default=False,
    ),
]


@app.command()
def evaluate(
    run: RunArg = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="Data or image folder to evaluate on. \\[default: the run's data; with --model, $CIFARNET_DATA or the user data dir]",
            show_default=False,
        ),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(
            help="test, val (the run's validation split), train (the rest of the run's training images) or all "
            "(every image of the data). \\[default: test if the data has one; else val on the run's own data; else all]",
            show_default=False,
            autocompletion=_complete_split,
        ),
    ] = None,
    classes: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated classes to restrict to, e.g. airplane,automobile,bird (aliases such as aeroplane, car work).",
            show_default=False,
        ),
    ] = None,
    tta: Annotated[
        bool, typer.Option("--tta", help="Average the logits of each image and its horizontal flip.")
    ] = False,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            "-b",
            help="Images per forward pass (at least 1). \\[default: 500; ResNet-50: 128]",
            show_default=False,
            parser=_whole_number,
        ),
    ] = None,
    model: ModelFile = None,
    device: Device = None,
    precision: InferencePrecision = None,
    as_json: JsonOut = False,
) -> None:
    """Accuracy, per-class accuracy and confusion matrix of a trained or exported model.

    Example: cifarnet evaluate my-run --split val --tta; cifarnet evaluate --model model.onnx --data-dir photos/
    """
    from cifarnet_cli.evaluation import evaluate_model

    with _user_errors():
        if run is not None and model is not None:
            raise UsageError("Give a run or --model, not both.")
        class_list = [c.strip() for c in classes.split(",") if c.strip()] if classes is not None else None
        with _ui().TrainView(quiet=False) as view:  # renders notices and download progress
            report = evaluate_model(
                run,
                model_file=model,
                data_dir=data_dir,
                split=split,
                classes=class_list,
                tta=tta,
                batch_size=batch_size,
                device_spec=device or "auto",
                precision=precision,
                on_event=view,
            )
        if as_json:
            _print_json(report.to_json())
        else:
            _ui().eval_tables(report)


@app.command()
def predict(
    images: Annotated[list[str], typer.Argument(help="Image files, folders (recursed) or globs.", show_default=False)],
    run: Annotated[
        str | None,
        typer.Option(
            "--run",
            help="Run whose best checkpoint to use. \\[default: the most recent run]",
            show_default=False,
            autocompletion=_complete_run,
        ),
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", help="A checkpoint file to use instead of a run.")
    ] = None,
    model: ModelFile = None,
    top_k: Annotated[
        int, typer.Option("--top-k", "-k", help="Classes to show per image (at least 1).", parser=_whole_number)
    ] = 3,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            "-b",
            help="Images per forward pass (at least 1). \\[default: 500; ResNet-50: 128]",
            show_default=False,
            parser=_whole_number,
        ),
    ] = None,
    device: Device = None,
    precision: InferencePrecision = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help='Print one JSON object on stdout: {"model", "arch", "runtime", "predictions": [{"path", "top": '
            '[{"class", "probability"}]} or {"path", "error"}, ...]}, in input order.',
        ),
    ] = False,
    save_csv: Annotated[
        Path | None,
        typer.Option(
            "--save-csv",
            help="Also write path,class,probability,error for every input (top class; in input order) to this file.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Classify image files (PNG, JPEG, BMP, WebP, ... of any size) with a trained or exported model.

    Prints the model used on stderr. Exit code 1 if any file could not be read.
    Example: cifarnet predict photos/ --top-k 3; cifarnet predict cat.jpg --model model.onnx
    """
    from cifarnet_cli.predict import predict as run_predict
    from cifarnet_cli.predict import write_csv

    with _user_errors():
        if sum(x is not None for x in (run, checkpoint, model)) > 1:
            raise UsageError("Give one of --run, --checkpoint and --model.")
        result = run_predict(
            images,
            ref=run,
            model_file=model if model is not None else checkpoint,
            top_k=top_k,
            device_spec=device or "auto",
            precision=precision,
            batch_size=batch_size,
            save_csv=save_csv,
        )
        _ui().info(f"Model: {result.model} ({result.arch}, {result.runtime})")
        if result.notice:
            _ui().warn(result.notice)
        if save_csv is not None:
            write_csv(result.predictions, save_csv)
        if as_json:
            _print_json(result.to_json())
        else:
            _ui().prediction_table(result.predictions, top_k)
        if save_csv is not None:
            _ui().info(f"Wrote {save_csv}")
        if result.failed:
            _ui().warn(f"{result.failed} of {len(result.predictions)} input(s) could not be classified.")
            raise typer.Exit(1)


# --------------------------------------------------------------------------------------------------
# export / info


def _complete_format(incomplete: str) -> list[str]:
    return [f for f in choices.EXPORT_FORMATS if f.startswith(incomplete)]


def _complete_target(incomplete: str) -> list[str]:
    return [t for t in choices.EXPORT_TARGETS if t.startswith(incomplete)]


@app.command()
def export(
    run: RunArg = None,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="onnx, torchscript, or engine (a TensorRT engine, built where TensorRT is installed).",
            autocompletion=_complete_format,
        ),
    ] = "onnx",
    target: Annotated[
        str | None,
        typer.Option(
            "--for",
            help="jetson-inference: an ONNX file and labels.txt that its imagenet program runs as they are "
            "(input_0 → output_0 probabilities, 1×3×32×32).",
            autocompletion=_complete_target,
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Output file. \\[default: model.onnx / model.ts / model.engine in the run folder; "
            "jetson-inference/model.onnx for --for jetson-inference]",
            show_default=False,
        ),
    ] = None,
    opset: Annotated[
        int | None,
        typer.Option(
            help="ONNX opset; the written file is checked. \\[default: 18; 13 for --for jetson-inference and "
            "--format engine, which older TensorRT (JetPack 4) needs]",
            show_default=False,
            parser=_whole_number,
        ),
    ] = None,
    dynamic_batch: Annotated[
        bool,
        typer.Option("--dynamic-batch/--static", help="Dynamic batch dimension, or a fixed one (--batch, default 1)."),
    ] = True,
    batch: Annotated[
        int | None,
        typer.Option(
            "--batch",
            help="Fixed batch size of a static export (implies --static).",
            show_default=False,
            parser=_whole_number,
        ),
    ] = None,
    batch_range: Annotated[
        str | None,
        typer.Option(
            "--batch-range",
            help="Batch sizes a dynamic TensorRT engine accepts, MIN:OPT:MAX (also used in the trtexec line). "
            "\\[default: 1:32:256]",
            show_default=False,
        ),
    ] = None,
    fp16: Annotated[
        bool | None,
        typer.Option(
            "--fp16/--fp32",
            help="Half-precision arithmetic inside (inputs and outputs stay float32). \\[default: fp32 for ONNX, "
            "fp16 for engines]",
            show_default=False,
        ),
    ] = None,
    verify: Annotated[
        bool | None,
        typer.Option(
            "--verify/--no-verify",
            help="Compare the exported model with PyTorch on a batch of images. \\[default: on when onnxruntime is "
            "installed]",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOut = False,
) -> None:
    """Export a trained model to ONNX, TorchScript or a TensorRT engine; inputs are float RGB in [0, 1], outputs logits.

    Example: cifarnet export my-run --opset 13; cifarnet export my-run --for jetson-inference
    """
    from cifarnet_cli.export import export_model

    with _user_errors():
        result = export_model(
            run,
            fmt=fmt,
            target=target,
            output=output,
            opset=opset,
            dynamic_batch=dynamic_batch,
            batch=batch,
            batch_range=batch_range,
            fp16=fp16,
            verify=verify,
        )
        if not as_json:
            _ui().info(f"Model: {result.model} ({result.arch})")
        if result.notice:
            _ui().warn(result.notice)
        if as_json:
            _print_json(result.to_json())
            return
        what = f"{result.format} (opset {result.opset})" if result.opset else result.format
        _ui().success(f"Exported {what} to {result.path}")
        if result.labels is not None:
            _ui().success(f"Wrote the class names to {result.labels}")
        if result.max_abs_diff is not None:
            _ui().info(
                f"Verified with {result.verified_with}: largest absolute difference in the {result.compared} "
                f"{result.max_abs_diff:.2e} (allowed {result.tolerance:g})"
            )
        elif verify is None:
            _ui().info("Not verified (install onnxruntime: pip install 'cifarnet[export]').")
        if result.imagenet:
            _ui().info(f"Run it with jetson-inference: {result.imagenet}")
        if result.trtexec:
            _ui().info(f"TensorRT engine (build it on the device that will run it, e.g. the Jetson): {result.trtexec}")
        if result.format != "torchscript":
            _ui().info(f"Classify with it: cifarnet predict image.png --model {result.path}")


@app.command()
def bench(
    device: Device = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="Fewer images and precisions: a few seconds on a GPU.")
    ] = False,
    nproc: Annotated[
        int | None,
        _option(
            int,
            "--nproc",
            help="Also train the default recipe with N processes (DDP) and report the scaling over one. "
            "\\[default: every GPU of a machine with several; none otherwise]",
        ),
    ] = None,
    as_json: JsonOut = False,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Also write the JSON result to this file.", show_default=False)
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Measure this machine: ResNet-20 training (eager and CUDA graphs), predict, ResNet-50 fine-tuning.

    Synthetic images in CIFAR's shape, through the same loader, engine and models; about a minute on a GPU.
    Example: cifarnet bench --quick --json
    """
    from cifarnet_cli import fileio
    from cifarnet_cli.benchmark import run_bench

    with _user_errors():
        target = fileio.check_output(output) if output is not None else None  # before a minute's work
        result = run_bench(device or "auto", quick=quick, nproc=nproc, on_event=_ui().BenchView(quiet=quiet))
        if as_json:
            _print_json(result)
        else:
            _ui().bench_tables(result)
        if target is not None:  # after the results are shown, so a failure here loses nothing
            fileio.write_bytes(target, (json.dumps(result, indent=2) + "\n").encode())
            if not quiet:
                _ui().success(f"Wrote {target}")


@app.command()
def info(as_json: JsonOut = False) -> None:
    """Versions, devices (Jetson-aware), usable precisions, directories and downloaded assets."""
    from cifarnet_cli.info import gather

    with _user_errors():
        data = gather()
        if as_json:
            _print_json(data)
        else:
            _ui().info_tables(data)
        for problem in data["problems"]:  # after the tables: devices and versions are still worth seeing
            _ui().error(problem)
        if data["problems"]:
            raise typer.Exit(1)


@app.command()
def doctor(as_json: JsonOut = False) -> None:
    """Diagnose this machine for training: torch and its CUDA, a Jetson's power mode, clocks, memory, swap and
    temperature, the GPUs, the folders and the data. Each line is ok, warning or problem, with the command
    that fixes it; the exit code is 1 when a problem is found.

    Example: cifarnet doctor; cifarnet doctor --json
    """
    from cifarnet_cli.doctor import diagnose

    with _user_errors():
        report = diagnose()
        if as_json:
            _print_json(report.to_json())
        else:
            _ui().doctor_table(report)
        if report.problems:
            raise typer.Exit(1)


# --------------------------------------------------------------------------------------------------
# runs: list, show, compare, rm (torch is never imported: config.json and metrics.jsonl are enough)

runs_app = typer.Typer(
    help="List, inspect, compare and delete runs. `cifarnet runs` alone lists them, newest first.",
    no_args_is_help=False,
)
app.add_typer(runs_app, name="runs")

RunNames = Annotated[
    list[str], typer.Argument(help="Run names ('last' = the most recent).", autocompletion=_complete_run)
]


def _list_runs(as_json: bool) -> None:
    from cifarnet_cli.paths import runs_dir
    from cifarnet_cli.runlist import list_summaries

    summaries = list_summaries()
    if as_json:  # one object, like every other --json (and like `runs compare --json`'s "runs")
        _print_json({"runs_dir": str(runs_dir()), "runs": [s.to_json() for s in summaries]})
    else:
        _ui().runs_table(summaries)


@runs_app.callback(invoke_without_command=True)
def runs_main(
    ctx: typer.Context,
    path: Annotated[
        str | None,
        typer.Option(
            "--path",
            help="Print the folder of run NAME ('last' = the most recent) and exit, for scripts: "
            "cd $(cifarnet runs --path last)",
            metavar="NAME",
            show_default=False,
            autocompletion=_complete_run,
        ),
    ] = None,
    as_json: JsonOut = False,
) -> None:
    """List runs (newest first): epochs, best and final accuracy, speed, device, state. Or print one's folder.

    Example: cifarnet runs; cifarnet runs --path last
    """
    if ctx.invoked_subcommand is not None:
        return
    with _user_errors():
        if path is not None:
            from cifarnet_cli.runs import resolve_run

            folder = str(resolve_run(path).dir)
            if as_json:
                _print_json({"path": folder})
            elif sys.stdout.isatty():  # a person reads it: control characters shown, not acted on
                _ui().out_console.print(_ui().safe(folder), soft_wrap=True)
            else:  # `cd "$(cifarnet runs --path NAME)"` needs the path as it is, byte for byte
                from cifarnet_cli.streams import write_raw_line

                write_raw_line(os.fsencode(folder))
            return
        _list_runs(as_json)


@runs_app.command("list")
def runs_list(as_json: JsonOut = False) -> None:
    """List runs, newest first (the same as `cifarnet runs`)."""
    with _user_errors():
        _list_runs(as_json)


@runs_app.command("show")
def runs_show(
    name: Annotated[str, typer.Argument(help="Run name ('last' = the most recent).", autocompletion=_complete_run)],
    as_json: JsonOut = False,
) -> None:
    """A run's recipe, per-epoch metrics, evaluations, files and, if unfinished, the command that continues it.

    Example: cifarnet runs show last
    """
    from cifarnet_cli.runlist import detail

    with _user_errors():
        d = detail(name)
        if as_json:
            _print_json(d.to_json())
        else:
            _ui().run_detail(d)


@runs_app.command("compare")
def runs_compare(
    names: RunNames,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot", help="Also write their validation curves, overlaid, to this PNG file.", show_default=False
        ),
    ] = None,
    as_json: JsonOut = False,
) -> None:
    """Runs side by side: the recipe options that differ, then best and final accuracy.

    Example: cifarnet runs compare run-a run-b --plot compare.png
    """
    from cifarnet_cli.runlist import compare

    with _user_errors():
        c = compare(names, plot=plot)
        if as_json:
            _print_json(c.to_json())
        else:
            _ui().compare_table(c)


@runs_app.command("rm")
def runs_rm(
    names: RunNames,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete runs (their whole folders), after a confirmation; a run being trained is refused.

    Example: cifarnet runs rm old-run other-run --yes
    """
    from cifarnet_cli.runlist import removable, remove, summarize

    with _user_errors():
        targets = list({r.dir: r for r in (removable(n) for n in names)}.values())
        for run in targets:
            _ui().info(f"{run.name}: {summarize(run).status}, {run.dir}")
        if not yes:
            try:
                confirmed = typer.confirm(f"Delete {len(targets)} run(s)?", default=False, err=True)
            except typer.Abort:  # no answer: stdin closed or at its end, or Ctrl-C at the question
                _ui().warn("No answer, so nothing was deleted; --yes deletes without asking.")
                raise typer.Exit(1) from None
            if not confirmed:
                _ui().warn("Nothing deleted.")
                raise typer.Exit(1)
        for run in targets:
            remove(run)
            _ui().success(f"Deleted {run.name}")


# --------------------------------------------------------------------------------------------------
# shell completion scripts shipped in completions/

COMPLETION_FILES = {"cifarnet.bash": "bash", "_cifarnet": "zsh", "cifarnet.fish": "fish"}


def completion_scripts() -> dict[str, str]:
    """The completion scripts Typer generates for this app, by file name. They call `cifarnet` back for
    each completion, so option values (architectures, devices, run names) come from the installed tool."""
    from typer.completion import get_completion_script

    return {
        name: get_completion_script(prog_name="cifarnet", complete_var="_CIFARNET_COMPLETE", shell=shell).rstrip()
        + "\n"
        for name, shell in COMPLETION_FILES.items()
    }


def main() -> None:
    from cifarnet_cli import streams

    streams.prepare()  # closed or ASCII-only standard streams
    watch = StdoutWatch()  # after prepare: a stdout closed from the start is no pipe whose reader left
    try:
        # A fixed program name: `python -m cifarnet_cli` then reads the same completion variable
        # (_CIFARNET_COMPLETE) and prints the same usage line as the `cifarnet` script.
        launched = _launch().launched_arguments() if len(sys.argv) == 1 else None
        app(prog_name="cifarnet", args=launched)
    except streams.StdoutClosed as exc:  # printed outside a command (--version, --help)
        _ui().error(str(exc))
        sys.exit(exc.exit_code)
    except SystemExit as exc:
        # One rule for every command, --help included: the output's reader went away → 141, not 1.
        if exc.code == 1 and watch.reader_left():
            quiet_stdout_after_broken_pipe()
            raise SystemExit(EXIT_BROKEN_PIPE) from None
        _launch().end_worker(exc.code)  # one process of several: no interpreter finalization (see there)
        raise


if __name__ == "__main__":
    main()
