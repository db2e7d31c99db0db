"""The command-line interface. The only module that imports Typer: each command turns its options
into a config, calls one library function and renders the result."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import typer

from cifarnet_cli import __version__, choices
from cifarnet_cli.errors import CifarNetError, UsageError

app = typer.Typer(
    name="cifarnet",
    help="Train, evaluate, fine-tune, run and export CIFAR-10 classifiers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


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
        _ui().error(str(exc))
        raise typer.Exit(exc.exit_code) from None
    except TrainingInterrupted as exc:
        how = "Stopped by SIGTERM" if exc.exit_code == 143 else "Interrupted"
        if exc.completed_epochs:
            saved = f"epoch {exc.completed_epochs} is saved in {exc.run.last}"
        else:
            saved = f"no epoch had completed, so {exc.run.last} holds the starting point"
        _ui().warn(f"{how}; {saved}. Continue with: cifarnet train --resume {exc.run.name}")
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt as exc:  # SIGTERM arrives as a KeyboardInterrupt subclass with its own code
        _ui().warn("Stopped by SIGTERM." if getattr(exc, "exit_code", 130) == 143 else "Interrupted.")
        raise typer.Exit(getattr(exc, "exit_code", 130)) from None


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
    return [a for a in choices.CIFAR_ARCHS if a.startswith(incomplete)]


def _complete_device(incomplete: str) -> list[str]:
    return [d for d in choices.DEVICES if d.startswith(incomplete)]


def _complete_precision(incomplete: str) -> list[str]:
    return [p for p in choices.PRECISIONS if p.startswith(incomplete)]


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
# train / finetune-resnet50 share their options

Epochs = Annotated[int | None, typer.Option(help="Training epochs. \\[default: 60; finetune: 5]", show_default=False)]
BatchSize = Annotated[
    int | None,
    typer.Option(
        "--batch-size",
        "-b",
        help="Images per forward pass (micro-batch). \\[default: 512; finetune: 64]",
        show_default=False,
    ),
]
Accum = Annotated[
    int | None,
    typer.Option(
        help="Micro-batches per optimizer step (exact gradient accumulation). Without --batch-size, the default "
        "effective batch is kept and split into smaller micro-batches. \\[default: 1; finetune: 2]",
        show_default=False,
    ),
]
Lr = Annotated[
    float | None,
    typer.Option(
        help="Peak learning rate. \\[default: 0.4 per 512 images of effective batch; finetune: 0.05 per 128]",
        show_default=False,
    ),
]
Momentum = Annotated[float | None, typer.Option(help="SGD (Nesterov) momentum. \\[default: 0.9]", show_default=False)]
WeightDecay = Annotated[
    float | None,
    typer.Option(
        "--weight-decay",
        help="Weight decay on conv/linear weights. \\[default: 5e-4; finetune: 1e-4]",
        show_default=False,
    ),
]
Schedule = Annotated[
    str | None,
    typer.Option(
        help="Learning-rate schedule: cosine or multistep. \\[default: cosine]",
        show_default=False,
        autocompletion=_complete_schedule,
    ),
]
Milestones = Annotated[
    str | None,
    typer.Option(
        help="Epochs at which multistep multiplies the lr by --gamma, e.g. 20,40. \\[default: 50%,75%]",
        show_default=False,
    ),
]
Gamma = Annotated[float | None, typer.Option(help="Multistep decay factor. \\[default: 0.1]", show_default=False)]
Warmup = Annotated[
    float | None,
    typer.Option(
        "--warmup-epochs",
        help="Linear warm-up epochs. \\[default: 2, at most a fifth of the epochs; finetune: 0.5]",
        show_default=False,
    ),
]
Smoothing = Annotated[
    float | None,
    typer.Option("--label-smoothing", help="Label smoothing. \\[default: 0.1]", show_default=False),
]
DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="cifar-10-batches-py folder, cifar-10-python.tar.gz, or an image folder (train/<class>/*). "
        "[default: $CIFARNET_DATA or the user data dir]",
        show_default=False,
    ),
]
ValSplit = Annotated[
    int | None,
    typer.Option(
        "--val-split",
        help="Training images held out for validation (seeded, stratified); 0 validates on the test split. "
        "[default: 10%, at most 5000]",
        show_default=False,
    ),
]
Device = Annotated[
    str | None,
    typer.Option(
        help="auto, cpu, cuda, cuda:N or mps. \\[default: auto]",
        show_default=False,
        autocompletion=_complete_device,
    ),
]
PrecisionOpt = Annotated[
    str | None,
    typer.Option(
        help="auto (bf16 on recent CUDA GPUs, fp16 on older ones, fp32 elsewhere), fp32, bf16 or fp16. \\[default: auto]",
        show_default=False,
        autocompletion=_complete_precision,
    ),
]
RunName = Annotated[
    str | None, typer.Option("--run", help="Run name. \\[default: <arch>-<date>-<time>]", show_default=False)
]
Resume = Annotated[
    str | None,
    typer.Option(
        help="Continue a run (name, run folder or last.pt; 'last' = the most recent) with its recorded options.",
        show_default=False,
        autocompletion=_complete_run,
    ),
]
Seed = Annotated[
    int | None,
    typer.Option(help="Random seed (data order, augmentation, init, split). \\[default: 0]", show_default=False),
]
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
SaveEvery = Annotated[
    int | None,
    typer.Option(
        "--save-every", help="Also keep epoch-NNN.pt every N epochs. \\[default: 0 = off]", show_default=False
    ),
]
Patience = Annotated[
    int | None,
    typer.Option(
        "--patience",
        help="Stop when validation accuracy has not improved for N epochs. \\[default: 0 = off]",
        show_default=False,
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


def _run_training(
    task: str,
    options: dict[str, Any],
    *,
    run: str | None,
    resume: str | None,
    as_json: bool,
    quiet: bool,
    tensorboard: bool = False,
) -> None:
    from cifarnet_cli.config import make_config, parse_milestones
    from cifarnet_cli.training import init_defaults, train

    with _user_errors():
        if resume is not None and run is not None:
            raise UsageError("--run names a new run; --resume continues an existing one. Use one of them.")
        if resume is None and task == "train" and options.get("init_from") and options.get("arch") is None:
            arch = init_defaults(options["init_from"]).get("arch")
            options["arch"] = arch if arch in choices.CIFAR_ARCHS else None
        if isinstance(options.get("milestones"), str):
            options["milestones"] = parse_milestones(options["milestones"]) or None
        if options.get("data_dir") is not None:
            options["data_dir"] = str(options["data_dir"])
        with _ui().TrainView(quiet=quiet) as view:
            if resume is not None:
                result = train(None, resume=resume, overrides=options, tensorboard=tensorboard, on_event=view)
            else:
                result = train(make_config(task, options), run_name=run, tensorboard=tensorboard, on_event=view)
        if result.already_finished and not quiet:
            if result.stopped_early:
                _ui().info(f"Run {result.run} stopped early after epoch {result.epochs} (--patience); nothing to do.")
            else:
                _ui().info(f"Run {result.run} already finished its {result.epochs} epochs; nothing to do.")
        if not quiet:
            _ui().train_summary(result, view.started.eval_split if view.started else None)
        if as_json:
            _print_json(result.to_json())


@app.command()
def train(
    arch: Annotated[
        str | None,
        typer.Option(
            help="resnet20, resnet32, resnet44, resnet56 or resnet110. \\[default: resnet20]",
            show_default=False,
            autocompletion=_complete_arch,
        ),
    ] = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    accum: Accum = None,
    lr: Lr = None,
    momentum: Momentum = None,
    weight_decay: WeightDecay = None,
    schedule: Schedule = None,
    milestones: Milestones = None,
    gamma: Gamma = None,
    warmup_epochs: Warmup = None,
    label_smoothing: Smoothing = None,
    data_dir: DataDir = None,
    val_split: ValSplit = None,
    device: Device = None,
    precision: PrecisionOpt = None,
    run: RunName = None,
    resume: Resume = None,
    seed: Seed = None,
    init_from: InitFrom = None,
    save_every: SaveEvery = None,
    patience: Patience = None,
    tensorboard: TensorBoard = False,
    as_json: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """Train a CIFAR ResNet from scratch (ResNet-20 by default) with SGD and exact gradient accumulation.

    Example: cifarnet train --arch resnet20 --epochs 30 --batch-size 64 --accum 8
    """
    if arch is not None and resume is None:
        if arch not in choices.CIFAR_ARCHS:
            hint = " (ResNet-50 trains with `cifarnet finetune-resnet50`)" if arch == "resnet50" else ""
            raise _usage(f"Unknown --arch {arch!r}; choose one of: {', '.join(choices.CIFAR_ARCHS)}{hint}.")
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
        seed=seed,
        init_from=init_from,
        save_every=save_every,
        patience=patience,
    )
    _run_training("train", options, run=run, resume=resume, as_json=as_json, quiet=quiet, tensorboard=tensorboard)


@app.command("finetune-resnet50")
def finetune_resnet50(
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
        ),
    ] = None,
    freeze_backbone: Annotated[
        bool | None,
        typer.Option("--freeze-backbone", help="Train the new head only (until --unfreeze-at).", show_default=False),
    ] = None,
    unfreeze_at: Annotated[
        int | None,
        typer.Option("--unfreeze-at", help="Epoch at which a frozen backbone starts training.", show_default=False),
    ] = None,
    backbone_lr_scale: Annotated[
        float | None,
        typer.Option(
            "--backbone-lr-scale",
            help="Learning rate of the pretrained body relative to the head. \\[default: 0.2]",
            show_default=False,
        ),
    ] = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    accum: Accum = None,
    lr: Lr = None,
    momentum: Momentum = None,
    weight_decay: WeightDecay = None,
    schedule: Schedule = None,
    milestones: Milestones = None,
    gamma: Gamma = None,
    warmup_epochs: Warmup = None,
    label_smoothing: Smoothing = None,
    data_dir: DataDir = None,
    val_split: ValSplit = None,
    device: Device = None,
    precision: PrecisionOpt = None,
    run: RunName = None,
    resume: Resume = None,
    seed: Seed = None,
    init_from: InitFrom = None,
    save_every: SaveEvery = None,
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
        seed=seed,
        init_from=init_from,
        save_every=save_every,
        patience=patience,
    )
    _run_training(
        "finetune-resnet50", options, run=run, resume=resume, as_json=as_json, quiet=quiet, tensorboard=tensorboard
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
    timeout: Annotated[float, typer.Option(help="Seconds without data before a transfer is abandoned.")] = 30.0,
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
        help="Run name, run folder or checkpoint file. [default: the most recent run]",
        show_default=False,
        autocompletion=_complete_run,
    ),
]


def _complete_split(incomplete: str) -> list[str]:
    return [s for s in choices.SPLITS if s.startswith(incomplete)]


@app.command()
def evaluate(
    run: RunArg = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="Data or image folder to evaluate on. \\[default: the run's data]",
            show_default=False,
        ),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(
            help="test, val (the run's validation split) or train. \\[default: test if the data has one]",
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
            "--batch-size", "-b", help="Images per forward pass. \\[default: 500; ResNet-50: 128]", show_default=False
        ),
    ] = None,
    device: Device = None,
    as_json: JsonOut = False,
) -> None:
    """Accuracy, per-class accuracy and confusion matrix of a trained model.

    Example: cifarnet evaluate my-run --split val --tta
    """
    from cifarnet_cli.evaluation import evaluate_model

    with _user_errors():
        class_list = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
        with _ui().TrainView(quiet=False) as view:  # renders notices and download progress
            report = evaluate_model(
                run,
                data_dir=data_dir,
                split=split,
                classes=class_list,
                tta=tta,
                batch_size=batch_size,
                device_spec=device or "auto",
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
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Classes to show per image.")] = 3,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size", "-b", help="Images per forward pass. \\[default: 500; ResNet-50: 128]", show_default=False
        ),
    ] = None,
    device: Device = None,
    as_json: JsonOut = False,
) -> None:
    """Classify image files (PNG, JPEG, BMP, WebP, ... of any size) with a trained model.

    Exit code 1 if any file could not be read. Example: cifarnet predict photos/ --top-k 3
    """
    from cifarnet_cli.predict import predict as run_predict

    with _user_errors():
        if run is not None and checkpoint is not None:
            raise UsageError("Give --run or --checkpoint, not both.")
        predictions, _loaded = run_predict(
            images,
            ref=str(checkpoint) if checkpoint is not None else run,
            top_k=top_k,
            device_spec=device or "auto",
            batch_size=batch_size,
        )
        if as_json:
            _print_json([p.to_json() for p in predictions])
        else:
            _ui().prediction_table(predictions, top_k)
        failed = sum(p.error is not None for p in predictions)
        if failed:
            _ui().warn(f"{failed} of {len(predictions)} file(s) could not be classified.")
            raise typer.Exit(1)


# --------------------------------------------------------------------------------------------------
# export / info


def _complete_format(incomplete: str) -> list[str]:
    return [f for f in choices.EXPORT_FORMATS if f.startswith(incomplete)]


@app.command()
def export(
    run: RunArg = None,
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="onnx or torchscript.", autocompletion=_complete_format)
    ] = "onnx",
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Output file. \\[default: model.onnx / model.ts in the run folder]",
            show_default=False,
        ),
    ] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 18,
    dynamic_batch: Annotated[
        bool, typer.Option("--dynamic-batch/--static", help="Dynamic batch dimension, or a fixed batch of 2.")
    ] = True,
    fp16: Annotated[
        bool,
        typer.Option("--fp16", help="Half-precision weights and arithmetic (ONNX; inputs and outputs stay float32)."),
    ] = False,
    verify: Annotated[
        bool | None,
        typer.Option(
            "--verify/--no-verify",
            help="Compare the exported model with PyTorch on one batch. \\[default: on when onnxruntime is installed]",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOut = False,
) -> None:
    """Export a trained model to ONNX or TorchScript; inputs are float RGB in [0, 1], outputs logits.

    Example: cifarnet export my-run --format onnx --fp16
    """
    from cifarnet_cli.export import export_model

    with _user_errors():
        result = export_model(
            run, fmt=fmt, output=output, opset=opset, dynamic_batch=dynamic_batch, fp16=fp16, verify=verify
        )
        if as_json:
            _print_json(
                {
                    "path": str(result.path),
                    "format": result.format,
                    "max_abs_diff": result.max_abs_diff,
                    "tolerance": result.tolerance,
                    "verified_with": result.verified_with,
                    "trtexec": result.trtexec,
                }
            )
            return
        _ui().success(f"Exported {result.format} to {result.path}")
        if result.max_abs_diff is not None:
            _ui().info(
                f"Verified with {result.verified_with}: largest absolute logit difference {result.max_abs_diff:.2e} (allowed {result.tolerance:g})"
            )
        else:
            _ui().info("Not verified (install onnxruntime: pip install 'cifarnet[export]').")
        if result.trtexec:
            _ui().info(f"TensorRT engine on a Jetson: {result.trtexec}")


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
    from cifarnet_cli.runlist import list_summaries

    summaries = list_summaries()
    if as_json:
        _print_json([s.to_json() for s in summaries])
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
            else:
                typer.echo(folder)
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
            except typer.Abort:
                confirmed = False
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
    # A fixed program name: `python -m cifarnet_cli` then reads the same completion variable
    # (_CIFARNET_COMPLETE) and prints the same usage line as the `cifarnet` script.
    app(prog_name="cifarnet")


if __name__ == "__main__":
    main()
