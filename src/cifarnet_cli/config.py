"""Frozen configuration: the defaults are written once, here, with their units and sources."""

from __future__ import annotations

import dataclasses
import math
import reprlib
from dataclasses import asdict, dataclass, fields
from typing import Any

from cifarnet_cli import choices
from cifarnet_cli.errors import UsageError

SCHEDULES = ("cosine", "multistep")

# Upper bounds of the numeric options: far beyond any sensible run, low enough that a typo (an extra zero
# or three) is caught before it allocates memory or runs for a year.
MAX_EPOCHS = 100_000
MAX_BATCH = 1 << 20  # images per micro-batch, and micro-batches per step
MAX_LR = 100.0  # the recipe's peak is 0.4 per 512 images; even a 64k batch scales it to 51.2
MAX_IMAGES = 100_000_000  # --val-split
MAX_IMAGE_SIZE = 1024  # ResNet-50's input side: 224 is ImageNet's; 1024 is 20x its compute already


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; a checkpoint stores ``asdict(config)``.

    The default recipe (ResNet-20) is the project's reference one: SGD with Nesterov momentum, peak lr 0.4
    at an effective batch of 512 after 2 linear warm-up epochs, cosine decay to 0, weight decay on
    conv/linear weights only, label smoothing 0.1, pad-4 crop + flip. 60 epochs gave 87.8% on the JPEG
    CIFAR-10 test split in 58 s on one H200, measured with a pipeline of the same design (cifarnet itself has
    not run on a GPU yet).
    """

    task: str = "train"  # "train" | "finetune-resnet50"
    arch: str = "resnet20"
    epochs: int = 60
    batch_size: int = 512  # images per forward pass (micro-batch)
    accum: int = 1  # micro-batches per optimizer step; effective batch = batch_size * accum
    lr: float | None = None  # peak lr; None = base_lr scaled linearly by effective_batch / base_batch
    base_lr: float = 0.4  # peak lr at an effective batch of base_batch (Goyal et al. 2017, linear scaling)
    base_batch: int = 512
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4  # applied to conv/linear weights, not to BN parameters or biases
    schedule: str = "cosine"
    milestones: tuple[int, ...] = ()  # epochs, for multistep; () = 50% and 75% of the epochs
    gamma: float = 0.1  # multistep decay factor
    warmup_epochs: float | None = None  # linear warm-up; None = 2 epochs, at most a fifth of the run
    label_smoothing: float = 0.1
    data_dir: str | None = None  # None = CIFARNET_DATA or <user data dir>/datasets/cifar10
    val_split: int | None = None  # images held out for validation; None = 10%, at most 5000; 0 = test split
    device: str = "auto"
    precision: str = "auto"
    capture: str = "auto"  # CUDA-graph capture of the training step: auto (on CUDA) | on | off
    # Pick the largest micro-batch <= batch_size that fits, raising accum. None (neither --batch-size nor
    # --accum given): auto on a GPU that shares the system's memory (a Jetson), the recipe's elsewhere.
    batch_size_auto: bool | None = None
    sync_bn: bool = False  # several GPUs: BatchNorm statistics over every process's micro-batch (SyncBatchNorm)
    seed: int = 0
    # Transfer learning (finetune-resnet50)
    image_size: int | None = None  # model input side; None = the architecture's own
    weights: str | None = None  # IMAGENET1K_V1 | IMAGENET1K_V2 | none | PATH
    freeze_backbone: bool = False
    unfreeze_at: int | None = None  # epoch (1-based) at which a frozen backbone starts training
    backbone_lr_scale: float = 1.0  # lr of the pretrained body relative to the head
    # Run bookkeeping (they do not change the training trajectory, so a resume may change them)
    save_every: int = 0  # keep epoch-NNN.pt every N epochs; 0 = only last.pt and best.pt
    # Minutes between saves of last.pt inside an epoch (at an optimizer step); 0 = at the end of epochs only.
    # A kill (a Jetson out of memory: the kernel's) then loses minutes, not a long epoch; a save costs a
    # write of the model and optimizer state (measured with torch.save: ResNet-20 2.1 MiB, ResNet-50 180 MiB).
    save_minutes: float = 10.0
    patience: int = 0  # stop when validation accuracy has not improved for N epochs; 0 = never
    init_from: str | None = None  # the checkpoint a new run took its initial weights from (--init-from)

    @property
    def command(self) -> str:
        """The command that trains (and resumes) this recipe."""
        return "cifarnet finetune-resnet50" if self.task == "finetune-resnet50" else "cifarnet train"

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.accum

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else self.base_lr * self.effective_batch / self.base_batch

    @property
    def warmup(self) -> float:
        return self.warmup_epochs if self.warmup_epochs is not None else min(2.0, self.epochs / 5)

    def resolved_milestones(self) -> tuple[int, ...]:
        if self.milestones:
            return self.milestones
        return (max(1, self.epochs // 2), max(1, self.epochs * 3 // 4))

    def validate(self) -> TrainConfig:
        """Check every numeric option up front (a NaN compares false with everything, so each float is
        first checked to be finite): a bad value is a usage error naming the option and its range."""

        def bad(option: str, value: object, accepted: str) -> UsageError:
            return UsageError(f"--{option} must be {accepted} (got {value}).")

        def integer(option: str, value: int, low: int, high: int) -> None:
            if not low <= value <= high:
                raise UsageError(f"--{option} must be at least {low} and at most {high} (got {value}).")

        def number(option: str, value: float, accepted: str, ok: bool) -> None:
            if not (math.isfinite(value) and ok):
                raise bad(option, value, accepted)

        integer("epochs", self.epochs, 1, MAX_EPOCHS)
        integer("accum", self.accum, 1, MAX_BATCH)
        if self.batch_size == 1:  # BatchNorm cannot normalise a training batch of one image
            raise UsageError("--batch-size must be at least 2: BatchNorm normalises over the images of a micro-batch.")
        integer("batch-size", self.batch_size, 2, MAX_BATCH)
        if self.lr is not None:
            number("lr", self.lr, f"a positive number, at most {MAX_LR:g}", 0 < self.lr <= MAX_LR)
        number("base-lr", self.base_lr, "a positive number", self.base_lr > 0)
        number("momentum", self.momentum, "in [0, 1)", 0 <= self.momentum < 1)
        number("weight-decay", self.weight_decay, "in [0, 1)", 0 <= self.weight_decay < 1)
        if self.capture not in choices.CAPTURE:
            raise UsageError(choices.unknown("--capture", self.capture, choices.CAPTURE))
        if self.schedule not in SCHEDULES:
            raise UsageError(choices.unknown("--schedule", self.schedule, SCHEDULES))
        self._check_milestones()
        number("gamma", self.gamma, "in (0, 1]", 0 < self.gamma <= 1)
        number(
            "warmup-epochs", self.warmup, f"in [0, {self.epochs}), i.e. below --epochs", 0 <= self.warmup < self.epochs
        )
        number("label-smoothing", self.label_smoothing, "in [0, 1)", 0 <= self.label_smoothing < 1)
        if self.val_split is not None:
            integer("val-split", self.val_split, 0, MAX_IMAGES)
        integer("seed", self.seed, 0, 2**32 - 1)
        if self.image_size is not None:
            integer("image-size", self.image_size, 32, MAX_IMAGE_SIZE)
        if self.unfreeze_at is not None:
            integer("unfreeze-at", self.unfreeze_at, 1, self.epochs)
        if self.freeze_backbone and (self.weights or "").lower() == "none":
            raise UsageError(
                "--freeze-backbone keeps the pretrained body fixed, but --weights none leaves it random: give "
                "pretrained --weights (IMAGENET1K_V1, IMAGENET1K_V2 or a file) or drop --freeze-backbone."
            )
        number(
            "backbone-lr-scale",
            self.backbone_lr_scale,
            "a number from 0 to 10",
            0 <= self.backbone_lr_scale <= 10,
        )
        integer("save-every", self.save_every, 0, MAX_EPOCHS)  # 0 = off
        number("save-minutes", self.save_minutes, "a number of minutes, 0 (off) or more", self.save_minutes >= 0)
        integer("patience", self.patience, 0, MAX_EPOCHS)  # 0 = off
        return self

    def _check_milestones(self) -> None:
        """Each milestone an epoch of the run, in increasing order; the message names the value at fault."""
        given = ",".join(map(str, self.milestones))
        outside = [m for m in self.milestones if m < 1 or m > self.epochs]
        if outside:
            raise UsageError(
                f"--milestones {given}: {', '.join(map(str, outside))} is not an epoch of this run; milestones are "
                f"epochs between 1 and {self.epochs} (--epochs)."
            )
        for before, after in zip(self.milestones, self.milestones[1:], strict=False):
            if after <= before:
                raise UsageError(
                    f"--milestones {given}: {before} comes before {after}; give each epoch once, in increasing "
                    f"order ({','.join(map(str, sorted(set(self.milestones))))})."
                )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        if "milestones" in kwargs:
            kwargs["milestones"] = tuple(int(m) for m in kwargs["milestones"])
        return cls(**kwargs)

    @classmethod
    def recorded_problem(cls, data: Any) -> str | None:
        """What makes a recorded config (config.json's ``config``) unusable, in words, or None: a value of the
        wrong type (``"epochs": "many"``, a boolean where a number belongs), a number that is not finite, a
        value :meth:`validate` refuses. Unknown keys (an option of a later version) are ignored and missing
        ones take their defaults, as in :meth:`from_dict`."""
        if not isinstance(data, dict):
            return f"config is {reprlib.repr(data)}, not a JSON object"
        missing = [key for key in _ALWAYS_RECORDED if key not in data]
        if missing:  # every version has written these: the record was cut or edited
            return f"config.{missing[0]} is missing"
        for field in fields(cls):
            if field.name in data and not _has_type(data[field.name], str(field.type)):
                value = reprlib.repr(data[field.name])
                return f"config.{field.name} is {value}, not {_TYPE_WORDS[str(field.type).removesuffix(' | None')]}"
        try:
            config = cls.from_dict(data).validate()
        except UsageError as exc:
            return f"recorded {exc}"
        if config.base_batch < 1:  # no option sets it, so validate() does not check it; peak_lr divides by it
            return f"config.base_batch is {config.base_batch}, not a whole number of at least 1"
        return None

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


#: A field every version of cifarnet has recorded in config.json, which the listing's epoch count rests on
#: (later fields may be missing from older runs, and take their defaults).
_ALWAYS_RECORDED = ("epochs",)

#: The field types of :class:`TrainConfig` in words, for :meth:`TrainConfig.recorded_problem`.
_TYPE_WORDS = {
    "int": "a whole number",
    "float": "a finite number",
    "bool": "true or false",
    "str": "text",
    "tuple[int, ...]": "a list of whole numbers",
}


def _has_type(value: Any, annotation: str) -> bool:
    """Whether a JSON ``value`` is of a TrainConfig field's type (its annotation as written); a boolean is
    no number, and a float must be finite."""
    if value is None:
        return annotation.endswith(" | None")
    kind = annotation.removesuffix(" | None")
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind == "int":
        return isinstance(value, int)
    if kind == "float":
        return isinstance(value, int | float) and math.isfinite(value)
    if kind == "str":
        return isinstance(value, str)
    if kind == "tuple[int, ...]":
        return isinstance(value, list | tuple) and all(_has_type(v, "int") for v in value)
    raise TypeError(f"TrainConfig field type {annotation!r} has no check")  # a new field's type: add it above


def parse_milestones(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise UsageError(f"--milestones {text!r}: expected comma-separated epochs, e.g. 20,40.") from None


#: finetune-resnet50's recipe, as overrides of TrainConfig's. Batch 64 × accumulation 2 keeps the
#: effective batch at 128 while peak training memory stays under 2 GB at 160 px in bf16 (a Jetson Orin
#: Nano has ~7.4 GB shared with the CPU). The new head learns at lr 0.05 per 128 images of effective batch;
#: the pretrained body at a fifth of that, so ImageNet features are adapted rather than overwritten.
FINETUNE_DEFAULTS: dict[str, Any] = {
    "task": "finetune-resnet50",
    "arch": "resnet50",
    "epochs": 5,
    "batch_size": 64,
    "accum": 2,
    "base_lr": 0.05,  # per 128 images of effective batch
    "base_batch": 128,
    "backbone_lr_scale": 0.2,
    "weight_decay": 1e-4,
    "warmup_epochs": 0.5,
    "label_smoothing": 0.1,
    "image_size": 160,
    "weights": "IMAGENET1K_V1",
}


#: finetune-resnet50 --weights none: a random body, trained from scratch. It has no features to protect (the
#: body learns at the head's rate) and the pretrained recipe diverges from random weights. Measured on 270
#: real CIFAR-10 JPEGs (30 held out) at --image-size 32 on a CPU, 3 epochs, training loss per epoch: the
#: pretrained recipe 5.37 then 53 (stopped as diverged); lr 0.01 everywhere 2.70, 7.28; with residual
#: blocks that start as the identity (models/resnet50.py) and a one-epoch warm-up (what the default 5 epochs
#: get), lr 0.05 2.39, 5.39, 7.72, and lr 0.01 2.39, 2.42, 2.36 with the validation loss falling (2.30, 2.28,
#: 2.24; 30% accuracy after 3).
FINETUNE_SCRATCH_DEFAULTS: dict[str, Any] = {
    "base_lr": 0.01,  # per 128 images of effective batch
    "backbone_lr_scale": 1.0,
    "warmup_epochs": None,  # train's rule: a fifth of the epochs, at most 2 (one of the default 5)
}


def make_config(task: str, overrides: dict[str, Any]) -> TrainConfig:
    """A validated config for ``task`` from the options the user actually gave (None = default)."""
    base: dict[str, Any] = dict(FINETUNE_DEFAULTS) if task == "finetune-resnet50" else {}
    given = {k: v for k, v in overrides.items() if v is not None}
    if task == "finetune-resnet50" and str(given.get("weights", "")).lower() == "none":
        base.update(FINETUNE_SCRATCH_DEFAULTS)
    if given.get("batch_size_auto"):
        # --batch-size auto: the recipe's effective batch, in the largest micro-batches that fit.
        if "accum" in given:
            raise UsageError("--batch-size auto chooses --accum itself (it keeps the recipe's effective batch).")
        given["batch_size"] = TrainConfig(**base).effective_batch
        given["accum"] = 1
    elif "batch_size" in given or "accum" in given:
        given["batch_size_auto"] = False  # the user's micro-batch, as given
    elif task == "finetune-resnet50":
        # The default micro-batch (64) shrinks where it does not fit (small GPUs, Jetson); never grows.
        given["batch_size_auto"] = True
    if "accum" in given and "batch_size" not in given:
        # --accum alone keeps the recipe's effective batch and splits it into smaller micro-batches, which
        # is what accumulation is for (memory); --batch-size with --accum sets both explicitly.
        default = TrainConfig(**base)
        given["batch_size"] = max(1, default.effective_batch // given["accum"]) if given["accum"] >= 1 else 1
    base.update(given)
    return TrainConfig(**base).validate()
