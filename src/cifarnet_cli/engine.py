"""The training loop: one epoch function, one evaluate function, and ``fit`` that ties them to
checkpoints. It reports through a callback of events, so it runs the same in tests, notebooks and the CLI.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from cifarnet_cli import checkpoint, interrupts
from cifarnet_cli.config import TrainConfig
from cifarnet_cli.data.loader import DeviceLoader
from cifarnet_cli.devices import Precision, autocast, synchronize
from cifarnet_cli.errors import CifarNetError
from cifarnet_cli.events import (
    CheckpointSaved,
    EpochEnded,
    EpochStarted,
    EventCallback,
    Notice,
    StepProgress,
    TrainingInterrupted,
)
from cifarnet_cli.events import ignore as _ignore
from cifarnet_cli.models import Classifier
from cifarnet_cli.runs import Run
from cifarnet_cli.train_step import SGD, TrainStep

# --------------------------------------------------------------------------------------------------
# Optimizer and schedule


def _is_decayed(name: str, param: nn.Parameter) -> bool:
    # Weight decay on conv/linear weights only; BN scales/shifts and biases are left alone.
    return param.ndim > 1 and not name.endswith(".bias")


def build_optimizer(model: Classifier, config: TrainConfig) -> SGD:
    """SGD with (Nesterov) momentum; the classifier head gets the peak lr, the body that times
    ``backbone_lr_scale`` (1.0 when training from scratch)."""
    head_ids = {id(p) for p in model.get_classifier().parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        groups.setdefault((id(param) in head_ids, _is_decayed(name, param)), []).append(param)
    lr = config.peak_lr
    param_groups = [
        {
            "params": params,
            "lr": lr if is_head else lr * config.backbone_lr_scale,
            "weight_decay": config.weight_decay if decayed else 0.0,
        }
        for (is_head, decayed), params in sorted(groups.items())
    ]
    return SGD(param_groups, lr=lr, momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0)


def steps_per_epoch(micro_batches: int, accum: int) -> int:
    return -(-micro_batches // accum)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, config: TrainConfig, epoch_steps: int) -> float:
    """Multiplier of the peak lr after ``step`` optimizer steps (the schedule counts optimizer steps,
    not micro-batches): linear warm-up, then cosine to 0 or step decay at the milestones."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if config.schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    passed = sum(step >= m * epoch_steps for m in config.resolved_milestones())
    return float(config.gamma**passed)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, epoch_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    total = config.epochs * epoch_steps
    warmup = round(config.warmup * epoch_steps)

    def factor(step: int) -> float:
        return lr_factor(step, total_steps=total, warmup_steps=warmup, config=config, epoch_steps=epoch_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def scheduled_lrs(config: TrainConfig, epoch_steps: int) -> list[float]:
    """The head's learning rate at each optimizer step of the whole run, as build_scheduler sets it:
    the schedule depends only on the config and the steps per epoch, so metrics and curves.png can
    report the rates the steps actually used without sampling the optimizer."""
    total = config.epochs * epoch_steps
    warmup = round(config.warmup * epoch_steps)
    return [
        config.peak_lr * lr_factor(s, total_steps=total, warmup_steps=warmup, config=config, epoch_steps=epoch_steps)
        for s in range(total)
    ]


# --------------------------------------------------------------------------------------------------
# One epoch, and evaluation


def window_sizes(batch_sizes: list[int], accum: int) -> list[int]:
    """Images per accumulation window; the last window may hold fewer micro-batches (it is stepped,
    never dropped)."""
    return [sum(batch_sizes[i : i + accum]) for i in range(0, len(batch_sizes), accum)]


@dataclass(frozen=True)
class EpochStats:
    loss: float
    accuracy: float
    images: int
    seconds: float
    optimizer_steps: int


class LossDiverged(Exception):
    """The training loss became non-finite or exploded (see :class:`DivergenceGuard`)."""

    def __init__(self, epoch: int, loss: float, start: float | None) -> None:
        super().__init__(f"training loss {loss} in epoch {epoch}")
        self.epoch = epoch
        self.loss = loss
        self.start = start  # the loss of the first step of this invocation, when it was read


class TrainingDiverged(CifarNetError):
    """A run stopped because its loss diverged. ``discard``: a new run that had not completed an epoch (it
    holds nothing worth keeping, so its folder goes and the same command can be run again)."""

    def __init__(self, message: str, *, discard: bool) -> None:
        super().__init__(message)
        self.discard = discard


def divergence_limit(num_classes: int) -> float:
    """A mean training loss above this is divergence, not learning: ten times the loss of a uniform guess
    (ln C: 2.30 for ten classes), and at least 10. A run that diverged (e.g. loss 5184 seen with a
    random frozen ResNet-50 body) never comes back; stopping keeps the last good epoch."""
    return max(10.0, 10.0 * math.log(max(num_classes, 2)))


class DivergenceGuard:
    """Judges the running training loss: not finite, or above both :func:`divergence_limit` and four times
    the loss the run started from, is divergence. The start is read once, after the first optimizer step of
    an invocation (its loss is that of the weights before any update), so weights that start high (another
    run's, a pretrained body on new classes) are judged by where they started, not by a uniform guess."""

    FACTOR = 4.0

    def __init__(self, num_classes: int) -> None:
        self.floor = divergence_limit(num_classes)
        self.start: float | None = None

    @property
    def limit(self) -> float:
        return self.floor if self.start is None else max(self.floor, self.FACTOR * self.start)

    def check(self, loss: float, epoch: int) -> None:
        if not math.isfinite(loss) or loss > self.limit:
            raise LossDiverged(epoch, loss, self.start)


@dataclass(frozen=True)
class EpochPosition:
    """Where a save in the middle of an epoch left it: after ``steps`` optimizer steps, ``images`` images (whole
    accumulation windows), and the epoch's running totals, so that a resume continues from that exact step."""

    epoch: int
    steps: int
    images: int
    loss_sum: float  # the sum of the micro-batches' losses times their sizes (float32 on the device: exact here)
    correct: int
    seconds: float  # the epoch's training time so far


class EpochColumns(Protocol):
    """Adds columns to each epoch's metrics row (a Jetson's GPU temperature and clock: cifarnet_cli.monitor)."""

    def epoch_columns(self) -> dict[str, Any]: ...


class MidEpochSaver(Protocol):
    """Asked at every optimizer step but an epoch's last whether a save is due, and handed the position."""

    def due(self) -> bool: ...

    def save(self, position: EpochPosition) -> None: ...


def _first_micro_batch(position: EpochPosition, batch_sizes: list[int], accum: int) -> int:
    """The micro-batch a resumed epoch starts at: the one after ``position.images`` images, which must end an
    accumulation window (it does when the effective batch is the one the position was saved with)."""
    ends = [0, *itertools.accumulate(batch_sizes)]  # images before each micro-batch
    done = ends.index(position.images) if position.images in ends else -1
    if done < 0 or done % accum or done // accum != position.steps:
        raise CifarNetError(
            f"The checkpoint was saved at step {position.steps} of epoch {position.epoch}, which does not fall "
            f"between this run's optimizer steps ({accum} micro-batches of {batch_sizes[0]}); it may be damaged."
        )
    return done


def _batches_from(
    loader: DeviceLoader | Iterable[tuple[torch.Tensor, torch.Tensor]], first: int
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    if first == 0:
        return loader
    if isinstance(loader, DeviceLoader):
        return loader.iter_from(first)  # the batches before it are not even built
    return itertools.islice(loader, first, None)


def train_one_epoch(
    model: nn.Module,
    loader: DeviceLoader | Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    batch_sizes: list[int],
    accum: int,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    device: torch.device,
    precision: Precision,
    label_smoothing: float = 0.0,
    epoch: int = 1,
    on_event: EventCallback = _ignore,
    report_every_s: float = 0.5,
    step: TrainStep | None = None,
    guard: DivergenceGuard | None = None,
    resume_at: EpochPosition | None = None,
    saver: MidEpochSaver | None = None,
) -> EpochStats:
    """One pass over ``loader`` with exact gradient accumulation.

    Each micro-batch's mean loss is weighted by (its size / images in its window), so the summed
    gradient of a window equals the gradient of the mean loss over all of the window's images: K
    micro-batches of size b give the update of one batch of K·b, including a short final window.
    ``step`` runs the arithmetic (eager, or a captured CUDA graph; built eagerly when not given). The host
    reads the running loss back at most every ``report_every_s`` seconds (and once after an invocation's first
    update, for ``guard``'s starting loss), which is also when ``guard`` may stop the epoch with
    :class:`LossDiverged`. ``resume_at`` continues an epoch from a save in its middle (its batches are the
    epoch's, so the rest of the epoch is what it would have been); ``saver`` may save at any optimizer step but
    the epoch's last.
    """
    if step is None:
        step = TrainStep(
            model, optimizer, device=device, precision=precision, label_smoothing=label_smoothing, scaler=scaler
        )
    model.train()
    freeze_frozen_batchnorm(model)
    windows = window_sizes(batch_sizes, accum)
    n_micro = len(batch_sizes)
    total_steps = len(windows)
    step.reset_totals()
    seen = done = first = 0
    start = last_report = time.perf_counter()
    if resume_at is not None:
        first = _first_micro_batch(resume_at, batch_sizes, accum)
        seen, done, start = resume_at.images, resume_at.steps, start - resume_at.seconds
        step.loss_sum.fill_(resume_at.loss_sum)
        step.correct.fill_(resume_at.correct)
    for i, (x, y) in enumerate(_batches_from(loader, first), start=first):
        step.micro(x, y, y.shape[0] / windows[i // accum])
        seen += y.shape[0]
        if (i + 1) % accum == 0 or i + 1 == n_micro:
            lr = optimizer.param_groups[-1]["lr"]  # the rate of this update (the scheduler then sets the next)
            step.update()
            if scheduler is not None:
                scheduler.step()
            done += 1
            if guard is not None and guard.start is None:  # one read-back per invocation
                guard.start = float(step.loss_sum) / seen
                guard.check(guard.start, epoch)
            now = time.perf_counter()
            if now - last_report >= report_every_s or done == total_steps:
                last_report = now
                loss = float(step.loss_sum) / seen  # the one read-back, at most every report_every_s
                if guard is not None:
                    guard.check(loss, epoch)
                on_event(
                    StepProgress(
                        epoch=epoch,
                        step=done,
                        steps=total_steps,
                        images=seen,
                        loss=loss,
                        accuracy=float(step.correct) / seen,
                        lr=lr,
                        images_per_second=seen / max(time.perf_counter() - start, 1e-9),
                    )
                )
            if saver is not None and i + 1 < n_micro and saver.due():
                totals = float(step.loss_sum), int(step.correct)  # a read-back, only when a save is due
                saver.save(EpochPosition(epoch, done, seen, *totals, time.perf_counter() - start))
    synchronize(device)
    seconds = time.perf_counter() - start
    return EpochStats(float(step.loss_sum) / max(seen, 1), float(step.correct) / max(seen, 1), seen, seconds, done)


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    precision: Precision,
    tta: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits (on the CPU) and labels for every batch; ``tta`` averages the logits of each
    image and its horizontal flip."""
    model.eval()
    all_logits, all_labels = [], []
    for x, y in loader:
        with autocast(device, precision):
            logits = model(x).float()
            if tta:
                logits = (logits + model(torch.flip(x, dims=(3,))).float()) / 2
        all_logits.append(logits.cpu())
        all_labels.append(y.cpu())
    if not all_logits:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(all_logits), torch.cat(all_labels)


@dataclass(frozen=True)
class EvalStats:
    loss: float
    accuracy: float
    n: int


def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    precision: Precision,
    tta: bool = False,
) -> EvalStats:
    logits, labels = predict_logits(model, loader, device=device, precision=precision, tta=tta)
    if labels.numel() == 0:
        return EvalStats(float("nan"), float("nan"), 0)
    loss = F.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(1) == labels).double().mean().item()
    return EvalStats(loss, accuracy, int(labels.numel()))


# --------------------------------------------------------------------------------------------------
# Backbone freezing (transfer learning)


def backbone_frozen(config: TrainConfig, epoch: int) -> bool:
    """Whether the body trains in ``epoch`` (1-based): frozen until --unfreeze-at, if given."""
    return config.freeze_backbone and (config.unfreeze_at is None or epoch < config.unfreeze_at)


def set_backbone_trainable(model: Classifier, trainable: bool) -> None:
    head = {id(p) for p in model.get_classifier().parameters()}
    for p in model.parameters():
        if id(p) not in head:
            p.requires_grad_(trainable)


def freeze_frozen_batchnorm(model: nn.Module) -> None:
    """A frozen body also keeps its BatchNorm statistics: put BN layers whose parameters are frozen into
    eval mode after ``model.train()``."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and not m.weight.requires_grad:
            m.eval()


# --------------------------------------------------------------------------------------------------
# fit: epochs, evaluation, checkpoints


@dataclass
class FitState:
    """What a resumed run restores besides the model: written into every last.pt."""

    epoch: int = 0  # completed epochs
    best_accuracy: float = -1.0
    best_epoch: int = 0
    train_images: int = 0
    train_seconds: float = 0.0
    stopped_early: int = 0  # the epoch after which --patience stopped the run; 0 = it did not


@dataclass(frozen=True)
class FitResult:
    config: TrainConfig  # as trained: the micro-batch may have been halved after running out of memory
    epochs: int
    best_accuracy: float
    final_accuracy: float
    images_per_second: float
    best_epoch: int
    stopped_early: int = 0


def rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "python" in state:
        random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def fit(
    model: Classifier,
    config: TrainConfig,
    *,
    train_loader: DeviceLoader,
    eval_loader: DeviceLoader | None,
    device: torch.device,
    precision: Precision,
    run: Run,
    meta: dict[str, Any],
    resume_from: dict[str, Any] | None = None,
    on_event: EventCallback = _ignore,
    step_mode: str = "eager",
    columns: EpochColumns | None = None,
) -> FitResult:
    """Train for ``config.epochs`` epochs, evaluating and checkpointing after each.

    ``meta`` (classes, data fingerprint, model kwargs, ...) is stored in every checkpoint so that
    evaluate/predict/export can rebuild the model from the file alone. ``step_mode`` is how the training
    step runs (train_step.MODES: eager, or captured as CUDA graphs); ``columns`` adds to each epoch's
    metrics row.
    """
    loop = _FitLoop(
        model,
        config,
        train_loader=train_loader,
        eval_loader=eval_loader,
        device=device,
        precision=precision,
        run=run,
        meta=meta,
        resume_from=resume_from,
        on_event=on_event,
        step_mode=step_mode,
    )
    loop.columns = columns
    return loop.fit()


class _FitLoop:
    """The phases of :func:`fit`: restore or start (``__init__``), then per epoch train (with the
    out-of-memory retry of the first epoch), evaluate, record and save, until the last epoch or a stop."""

    def __init__(
        self,
        model: Classifier,
        config: TrainConfig,
        *,
        train_loader: DeviceLoader,
        eval_loader: DeviceLoader | None,
        device: torch.device,
        precision: Precision,
        run: Run,
        meta: dict[str, Any],
        resume_from: dict[str, Any] | None,
        on_event: EventCallback,
        step_mode: str,
    ) -> None:
        self.model = model
        self.config = config
        self.train_loader = train_loader
        self.eval_loader = eval_loader
        self.device = device
        self.precision = precision
        self.run = run
        self.meta = meta
        self.resumed = resume_from is not None
        self.on_event = on_event
        self.step_mode = step_mode
        self.columns: EpochColumns | None = None
        self.optimizer = build_optimizer(model, config)
        self.batch_sizes = train_loader.batch_sizes()
        self.epoch_steps = steps_per_epoch(len(self.batch_sizes), config.accum)
        self.scheduler = build_scheduler(self.optimizer, config, self.epoch_steps)
        self.scaler = torch.amp.GradScaler(device.type) if precision.needs_grad_scaler else None
        self.state = FitState()
        self.history = self._restore(resume_from)
        self.position = _saved_position(resume_from, self.state.epoch)  # a save in the middle of the next epoch
        self.lrs = scheduled_lrs(config, self.epoch_steps)
        if resume_from is None:
            self._save_start()
        self.step = self._make_step()
        self.num_classes = model.get_classifier().out_features
        self.guard = DivergenceGuard(self.num_classes)
        self.saved_epoch = self.state.epoch  # completed epochs that last.pt holds
        self.saved_position = self.position  # and how far into the next one, when saved in its middle
        self.saver = _TimedSaver(self, config.save_minutes) if config.save_minutes else None
        # Until this invocation's first epoch has trained, running out of GPU memory is answered by halving the
        # micro-batch (same effective batch) and training the epoch again (from where this invocation began it,
        # also a save in its middle: the accumulation windows cover the same images); this copy puts back what
        # the failed attempt touched. Its first evaluation halves the evaluation batch instead (_evaluate_epoch).
        self.start_state: dict[str, Any] | None = _cpu_copy(
            {
                "model": model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            }
        )
        self.evaluated = False  # whether this invocation has completed an evaluation

    # -- start -------------------------------------------------------------------------------------------

    def _restore(self, resume_from: dict[str, Any] | None) -> list[dict[str, Any]]:
        """Put back a resumed run's model, optimizer, schedule, scaler, counters and random state (or seed
        a new one), and return the metrics rows so far, which metrics.jsonl is rewritten from."""
        if resume_from is not None:
            self.model.load_state_dict(resume_from["model"])
            self.optimizer.load_state_dict(resume_from["optimizer"])
            self.scheduler.load_state_dict(resume_from["scheduler"])
            if self.scaler is not None and resume_from.get("scaler"):
                self.scaler.load_state_dict(resume_from["scaler"])
            known = {f.name for f in dataclasses.fields(FitState)}
            self.state = FitState(**{k: v for k, v in resume_from["fit_state"].items() if k in known})
            set_rng_state(resume_from.get("rng", {}), self.device)
        else:
            torch.manual_seed(self.config.seed)
            random.seed(self.config.seed)
        # The checkpoint is the truth: its rows replace metrics.jsonl, which may lack the last epoch (a kill
        # between saving last.pt and appending the row) or hold rows of an epoch that never reached last.pt.
        # Checkpoints from before rows were stored in them keep the file's rows up to their epoch.
        if resume_from is not None and "history" in resume_from:
            history = [dict(row) for row in resume_from["history"]]
        else:
            history = [row for row in self.run.read_metrics() if row["epoch"] <= self.state.epoch]
        self.run.write_metrics(history)
        return history

    def _save_start(self) -> None:
        """A new run's last.pt at epoch 0: a resume point from the start."""
        with interrupts.deferred():
            checkpoint.save_atomic(self.snapshot("last"), self.run.last)

    def _make_step(self) -> TrainStep:
        return TrainStep(
            self.model,
            self.optimizer,
            device=self.device,
            precision=self.precision,
            label_smoothing=self.config.label_smoothing,
            scaler=self.scaler,
            mode=self.step_mode,
            notice=self._notice,
        )

    def _notice(self, message: str) -> None:
        self.on_event(Notice(message))

    def snapshot(self, kind: str, position: EpochPosition | None = None) -> dict[str, Any]:
        """A checkpoint of the current state: ``last`` (resumable; at ``position`` inside the next epoch when
        given), ``best`` or ``epoch`` (model only)."""
        ckpt: dict[str, Any] = {
            "version": checkpoint.CHECKPOINT_VERSION,
            "kind": kind,
            "model": self.model.state_dict(),
            "config": self.config.to_dict(),
            "meta": self.meta,
            "epoch": self.state.epoch,
            "fit_state": vars(self.state).copy(),
        }
        if kind == "last":
            ckpt["optimizer"] = self.optimizer.state_dict()
            ckpt["scheduler"] = self.scheduler.state_dict()
            ckpt["scaler"] = self.scaler.state_dict() if self.scaler is not None else {}
            ckpt["rng"] = rng_state(self.device)
            ckpt["history"] = [dict(row) for row in self.history]  # metrics.jsonl is rebuilt from it on resume
            if position is not None:
                ckpt["position"] = dataclasses.asdict(position)
        elif self.history:
            ckpt["metrics"] = dict(self.history[-1])
        return ckpt

    # -- the loop ------------------------------------------------------------------------------------------

    def fit(self) -> FitResult:
        final_accuracy = float("nan")
        try:
            for epoch in range(self.state.epoch + 1, self.config.epochs + 1):
                stats = self._train_epoch(epoch)
                ev = self._evaluate_epoch()
                final_accuracy = ev.accuracy if ev is not None else float("nan")
                metrics, is_best = self._record_epoch(epoch, stats, ev)
                self._save_epoch(epoch, metrics, is_best)
                self.on_event(EpochEnded(metrics, is_best))
                if self.state.stopped_early:
                    self._notice(self._early_stop_message(epoch))
                    break
        except KeyboardInterrupt as exc:
            saved = self.saved_position
            raise TrainingInterrupted(
                self.run,
                self.saved_epoch,
                exit_code=getattr(exc, "exit_code", 130),
                command=self.config.command,
                saved_step=(saved.steps, self.epoch_steps) if saved is not None else None,
            ) from None
        except torch.cuda.OutOfMemoryError:  # a later epoch or evaluation (the first ones retry below)
            raise CifarNetError(_out_of_memory_message(self.config, self.run, self.saved_epoch)) from None
        state = self.state
        return FitResult(
            config=self.config,
            epochs=state.epoch,
            best_accuracy=state.best_accuracy,
            final_accuracy=final_accuracy,
            images_per_second=state.train_images / max(state.train_seconds, 1e-9),
            best_epoch=state.best_epoch,
            stopped_early=state.stopped_early,
        )

    def _train_epoch(self, epoch: int) -> EpochStats:
        """One epoch of training; out of GPU memory in this invocation's first epoch (its first steps, where the
        step is captured, or its end, where a short last micro-batch runs eagerly beside the graph's memory)
        halves the micro-batch and trains the epoch again (same effective batch), later it stops the run."""
        config = self.config
        if config.freeze_backbone:
            set_backbone_trainable(self.model, not backbone_frozen(config, epoch))
        self.on_event(EpochStarted(epoch, config.epochs, self.epoch_steps, len(self.batch_sizes)))
        self.train_loader.set_epoch(epoch)
        while True:
            try:
                stats = train_one_epoch(
                    self.model,
                    self.train_loader,
                    self.optimizer,
                    batch_sizes=self.batch_sizes,
                    accum=self.config.accum,
                    scheduler=self.scheduler,
                    scaler=self.scaler,
                    device=self.device,
                    precision=self.precision,
                    label_smoothing=self.config.label_smoothing,
                    epoch=epoch,
                    on_event=self.on_event,
                    step=self.step,
                    guard=self.guard,
                    resume_at=self.position if self.position is not None and self.position.epoch == epoch else None,
                    saver=self.saver,
                )
                self.start_state = None  # past the first epoch: no more retries, the copy can go
                self.position = None
                return stats
            except torch.cuda.OutOfMemoryError:
                self._retry_smaller()
            except LossDiverged as exc:
                raise self._diverged(exc.loss, "training") from None

    def _retry_smaller(self) -> None:
        """After running out of memory in the first epoch: put the model, optimizer, schedule and scaler back
        as the epoch found them, halve the micro-batch and double the accumulation; a stop when that is not
        possible or too late. The epoch's batches depend only on the seed and the epoch, so the epoch trained
        again is the one a run started at the smaller micro-batch trains."""
        smaller = _smaller_micro_batch(self.config, self.train_loader.num_examples)
        if self.start_state is None or smaller is None:
            raise CifarNetError(_out_of_memory_message(self.config, self.run, self.saved_epoch)) from None
        del self.step
        self.model.load_state_dict(self.start_state["model"])
        self.optimizer.load_state_dict(self.start_state["optimizer"])
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.load_state_dict(self.start_state["scheduler"])
        if self.scaler is not None and self.start_state["scaler"]:
            self.scaler.load_state_dict(self.start_state["scaler"])
        self.guard.start = None  # read again from the epoch's first step
        torch.cuda.empty_cache()
        old = self.config
        self.config = smaller
        self.train_loader.set_batch_size(smaller.batch_size)
        if self.eval_loader is not None:
            self.eval_loader.set_batch_size(smaller.batch_size * 2)
        self.batch_sizes = self.train_loader.batch_sizes()
        self.step = self._make_step()
        self.run.update_config(smaller.to_dict())
        self._notice(
            f"Out of GPU memory at micro-batch {old.batch_size}: continuing with --batch-size "
            f"{smaller.batch_size} --accum {smaller.accum} (the same effective batch, {smaller.effective_batch})."
        )

    def _evaluate_epoch(self) -> EvalStats | None:
        """Validation; out of GPU memory in this invocation's first evaluation (beside the captured graph's
        memory) halves the evaluation batch and evaluates again, which gives the same figures; later it
        stops the run."""
        if self.eval_loader is None:
            return None
        while True:
            try:
                ev = evaluate(self.model, self.eval_loader, device=self.device, precision=self.precision)
                break
            except torch.cuda.OutOfMemoryError:
                batch = self.eval_loader.batch_size
                if self.evaluated or batch < 2:
                    raise
                torch.cuda.empty_cache()
                self.eval_loader.set_batch_size(batch // 2)
                self._notice(
                    f"Out of GPU memory evaluating {batch} images at a time: evaluating {batch // 2} at a time."
                )
        self.evaluated = True
        if not math.isfinite(ev.loss):
            raise self._diverged(ev.loss, "validation")
        return ev

    def _record_epoch(self, epoch: int, stats: EpochStats, ev: EvalStats | None) -> tuple[dict[str, Any], bool]:
        """Update the run's counters (best epoch, early stop) and return the epoch's metrics row."""
        state, config = self.state, self.config
        state.epoch = epoch
        state.train_images += stats.images
        state.train_seconds += stats.seconds
        is_best = ev is not None and ev.accuracy > state.best_accuracy
        if is_best and ev is not None:
            state.best_accuracy = ev.accuracy
            state.best_epoch = epoch
        if config.patience and epoch < config.epochs and epoch - state.best_epoch >= config.patience:
            state.stopped_early = epoch
        first_step = (epoch - 1) * self.epoch_steps
        last = len(self.lrs) - 1
        metrics = {
            "epoch": epoch,
            "train_loss": round(stats.loss, 6),
            "train_accuracy": round(stats.accuracy, 6),
            "val_loss": round(ev.loss, 6) if ev is not None else None,
            "val_accuracy": round(ev.accuracy, 6) if ev is not None else None,
            "lr_first": self.lrs[min(first_step, last)],  # the rates of the epoch's first and last steps
            "lr": self.lrs[min(first_step + self.epoch_steps - 1, last)],
            "images_per_second": round(stats.images / max(stats.seconds, 1e-9), 1),
            "epoch_seconds": round(stats.seconds, 3),
        }
        if self.columns is not None:
            metrics.update(self.columns.epoch_columns())
        self.history.append(metrics)
        return metrics, is_best

    def _save_epoch(self, epoch: int, metrics: dict[str, Any], is_best: bool) -> None:
        """The epoch's files are written as one unit (a Ctrl-C or SIGTERM waits for them): best.pt, then
        last.pt, which holds the metrics rows, then metrics.jsonl/.csv. A kill -9 in between is mended on
        resume, from last.pt."""
        run = self.run
        with interrupts.deferred():
            if is_best or self.eval_loader is None:
                checkpoint.save_atomic(self.snapshot("best"), run.best)
            if self.config.save_every and epoch % self.config.save_every == 0:
                checkpoint.save_atomic(self.snapshot("epoch"), run.epoch_checkpoint(epoch))
            checkpoint.save_atomic(self.snapshot("last"), run.last)
            self.saved_epoch, self.saved_position = epoch, None
            run.append_metrics(metrics)
        if self.saver is not None:
            self.saver.restart()

    def save_position(self, position: EpochPosition) -> None:
        """last.pt in the middle of an epoch, at an optimizer step (``--save-minutes``): a kill then loses
        minutes, not the epoch. best.pt and the metrics are an epoch's and wait for its end."""
        with interrupts.deferred():
            checkpoint.save_atomic(self.snapshot("last", position), self.run.last)
            self.saved_position = position
        self.on_event(CheckpointSaved(position.epoch, position.steps, self.epoch_steps, str(self.run.last)))

    # -- stops ---------------------------------------------------------------------------------------------

    def _early_stop_message(self, epoch: int) -> str:
        state = self.state
        evaluated = "validation" if self.meta.get("eval_split", "val") == "val" else "test"  # --val-split 0
        return (
            f"Stopped early after epoch {epoch}: {evaluated} accuracy has not improved for "
            f"{epoch - state.best_epoch} epoch(s) (--patience {self.config.patience}); the best is epoch "
            f"{state.best_epoch} ({100 * state.best_accuracy:.2f}%)."
        )

    def _diverged(self, loss: float, which: str) -> TrainingDiverged:
        # A new run with no completed epoch keeps nothing (its folder goes); otherwise the last good epoch stays.
        discard = not self.resumed and self.saved_epoch == 0
        return _diverged(
            loss,
            self.guard.start,
            which,
            self.num_classes,
            self.config,
            self.precision,
            self.run,
            self.saved_epoch,
            discard=discard,
        )


class _TimedSaver:
    """Asks for a save in the middle of an epoch every ``minutes`` of training (epoch-end saves restart it)."""

    def __init__(self, loop: _FitLoop, minutes: float) -> None:
        self.loop = loop
        self.every_s = 60.0 * minutes
        self.last = time.monotonic()

    def restart(self) -> None:
        self.last = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.every_s

    def save(self, position: EpochPosition) -> None:
        self.loop.save_position(position)
        self.restart()


def _saved_position(resume_from: dict[str, Any] | None, completed: int) -> EpochPosition | None:
    """The mid-epoch position a last.pt holds, if it was saved in the epoch after its completed ones."""
    saved = (resume_from or {}).get("position")
    if not saved or int(saved.get("epoch", -1)) != completed + 1:
        return None
    known = {f.name for f in dataclasses.fields(EpochPosition)}
    return EpochPosition(**{k: v for k, v in saved.items() if k in known})


def _cpu_copy(obj: Any) -> Any:
    """A copy of a (nested) state dict with every tensor cloned to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


def _smaller_micro_batch(config: TrainConfig, num_examples: int) -> TrainConfig | None:
    """Half the micro-batch and twice the accumulation: the same effective batch, so the same recipe and
    schedule. None when the micro-batch cannot be halved evenly or would drop below two images."""
    if config.batch_size % 2 or config.batch_size < 4:
        return None
    smaller = config.replace(batch_size=config.batch_size // 2, accum=config.accum * 2)
    if steps_per_epoch(-(-num_examples // smaller.batch_size), smaller.accum) != steps_per_epoch(
        -(-num_examples // config.batch_size), config.accum
    ):
        return None
    return smaller


def _saved_words(run: Run, saved_epoch: int, last: str) -> str:
    """What is on disk after a stop, as the Ctrl-C message words it."""
    if saved_epoch:
        return f"epoch {saved_epoch} is the {last} ({run.last})"
    return f"no epoch had completed, so {run.last} holds the starting point"


def _out_of_memory_message(config: TrainConfig, run: Run, saved_epoch: int) -> str:
    saved = _saved_words(run, saved_epoch, "last one saved")
    if config.batch_size >= 4:  # half of it is still a micro-batch BatchNorm accepts (at least 2)
        hint = (
            f"Continue with smaller micro-batches (the same effective batch): {config.command} --resume "
            f"{run.name} --batch-size {config.batch_size // 2} --accum {config.accum * 2}, or start a new run "
            "with --batch-size auto."
        )
    else:
        hint = "Free GPU memory (other processes) and resume."
    return f"The GPU ran out of memory at micro-batch {config.batch_size}; {saved}. {hint}"


def _diverged(
    loss: float,
    start: float | None,
    which: str,
    num_classes: int,
    config: TrainConfig,
    precision: Precision,
    run: Run,
    saved_epoch: int,
    *,
    discard: bool,
) -> TrainingDiverged:
    hints = [f"a lower --lr (now {config.peak_lr:g})"]
    if precision.dtype is not None:
        hints.append("--precision fp32")
    began = f"it started at {start:.3g}; " if start is not None and math.isfinite(start) else ""
    if discard:
        kept = "no epoch had completed, so nothing is kept (the run folder is removed). Run it again with"
    else:
        kept = f"{_saved_words(run, saved_epoch, 'last good one')}. Start a new run (or --init-from {run.name}) with"
    return TrainingDiverged(
        f"Training diverged: the {which} loss is {loss:.4g} ({began}a uniform guess scores "
        f"{math.log(num_classes):.2f}). Stopped; {kept} {' or '.join(hints)}.",
        discard=discard,
    )
