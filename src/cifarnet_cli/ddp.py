"""The training loop over several processes: PyTorch's DistributedDataParallel (DDP), with the same recipe
and the same results as one process.

- Each epoch's micro-batches are those of one process (the same seeded permutation, cut at the same places);
  an accumulation window of K micro-batches gives K / world of them to each process
  (:func:`distributed.plan_epoch`). Every micro-batch's loss is weighted by its size over the images of the
  whole window, as one process weights it, and DDP's gradient all-reduce is made a sum (a communication hook;
  DDP's own averages over the processes), so each optimizer step gets the one-process window's gradient.
- Gradients are all-reduced once per optimizer step: the other passes of a window run under ``no_sync()``.
  Where a window has fewer micro-batches than processes (the epoch's last), the processes past its end make an
  empty pass (no image, zero gradient) so that every process takes part in every all-reduce; torch's ``Join``
  is made for processes that run out of data for good, and would leave their optimizer state behind.
- BatchNorm normalises each micro-batch on its own, as it does in one process. Its running statistics are
  made exactly those of one process (:class:`RunningStats`), so evaluation and checkpoints do not depend on the
  number of processes either; DDP's per-forward broadcast of rank 0's buffers is off. ``--sync-bn`` converts
  BatchNorm to SyncBatchNorm instead (GPUs only): statistics over the micro-batches of all processes at once.
- Evaluation: each process scores a contiguous share of the evaluation images; loss sums, correct counts and
  image counts are summed over the processes, so the figures are those of one process, to the image.
- Stops agree: every optimizer step the processes exchange, through gloo on the CPU, whether one of them was
  asked to stop and whether rank 0 wants a progress report (the running loss, summed over the processes, then
  judged by the divergence guard on every process alike). Running out of GPU memory is not retried with a
  smaller micro-batch (the processes would have to agree in the middle of a step): the run stops, keeping its
  last epoch, and says how to resume.
- CUDA graphs are not used: PyTorch's rules for capturing a whole DDP step (DDP built on a side stream, at
  least 11 eager warm-up iterations, NCCL's asynchronous error handling off) are not implemented here.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cifarnet_cli import distributed
from cifarnet_cli.config import TrainConfig
from cifarnet_cli.data.loader import DeviceLoader
from cifarnet_cli.devices import Precision, autocast, synchronize
from cifarnet_cli.engine import (
    DivergenceGuard,
    EpochColumns,
    EpochPosition,
    EpochStats,
    EvalStats,
    FitResult,
    LossDiverged,
    MidEpochSaver,
    _first_micro_batch,
    _FitLoop,
    _out_of_memory_message,
    backbone_frozen,
    freeze_frozen_batchnorm,
    set_backbone_trainable,
)
from cifarnet_cli.errors import CifarNetError
from cifarnet_cli.events import EpochStarted, EventCallback, StepProgress, TrainingInterrupted
from cifarnet_cli.events import ignore as _ignore
from cifarnet_cli.models import Classifier
from cifarnet_cli.runs import Run
from cifarnet_cli.train_step import TrainStep

CAPTURE_REASON = "CUDA graphs are not captured with several processes (DDP); training eagerly"


# --------------------------------------------------------------------------------------------------
# DistributedDataParallel, summing


def _sum_gradients(state: Any, bucket: Any) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: all-reduce a gradient bucket as a sum (DDP's default divides by the number of
    processes; the per-micro-batch weights already make the sum the window's gradient)."""
    import torch.distributed as dist

    future = dist.all_reduce(bucket.buffer(), group=state, async_op=True).get_future()
    return future.then(lambda done: done.value()[0])


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel (which broadcasts rank 0's weights and buffers to every process)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # BatchNorm statistics are combined exactly at the end of each epoch (RunningStats), not broadcast from
    # rank 0 before every forward pass; torch 2.14 renamed the switch.
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    no_buffer_sync: dict[str, Any] = {"forward_sync_buffers": False} if renamed else {"broadcast_buffers": False}
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync)
    # A lambda: DDP checks the hook's annotations against the classes themselves, which the strings of
    # `from __future__ import annotations` are not.
    ddp.register_comm_hook(None, lambda state, bucket: _sum_gradients(state, bucket))
    return ddp


def sync_batchnorm_refusal() -> CifarNetError:
    return CifarNetError("--sync-bn needs GPUs: torch runs SyncBatchNorm on CUDA only. Drop --sync-bn on CPUs.")


def sync_batchnorm(model: Classifier, device: torch.device) -> Classifier:
    """--sync-bn: BatchNorm layers become SyncBatchNorm (the same parameters and state-dict keys)."""
    if device.type != "cuda":
        raise distributed.mark_agreed(sync_batchnorm_refusal())
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


# --------------------------------------------------------------------------------------------------
# BatchNorm's running statistics


class RunningStats:
    """The running statistics one process would have after the epoch, assembled from several.

    One process updates each BatchNorm layer once per micro-batch i of N: r ← (1 − m)·r + m·s_i, so after the
    epoch r = (1 − m)^N·r_0 + Σ_i m·(1 − m)^(N − i)·s_i, a sum over micro-batches. Each process keeps its own
    terms of it: its buffers start at r_0 on rank 0 and at 0 elsewhere, decay by (1 − m) for every micro-batch
    another process runs (by its global index), and take BatchNorm's own update for its own; the sum over the
    processes at the end of the epoch is the one-process value (num_batches_tracked: the sum of the counts).
    Layers that do not update (frozen, in eval mode), SyncBatchNorm and cumulative averages (momentum None)
    are left alone."""

    def __init__(self, model: nn.Module, world: distributed.World, *, start: int = 0) -> None:
        self.layers = [
            m
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and not isinstance(m, nn.SyncBatchNorm)
            and m.training
            and m.track_running_stats
            and m.running_mean is not None
            and m.momentum is not None
        ]
        self.position = start  # global micro-batches accounted for (an epoch resumed in its middle: not 0)
        self.counts = [m.num_batches_tracked.clone() for m in self.layers if m.num_batches_tracked is not None]
        if not world.is_main:
            with torch.no_grad():
                for m in self.layers:
                    self._mean(m).zero_()
                    self._var(m).zero_()

    @staticmethod
    def _mean(m: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
        assert m.running_mean is not None
        return m.running_mean

    @staticmethod
    def _var(m: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
        assert m.running_var is not None
        return m.running_var

    def _decay(self, steps: int) -> None:
        if steps <= 0:
            return
        with torch.no_grad():
            for m in self.layers:
                factor = (1.0 - float(m.momentum or 0.0)) ** steps
                self._mean(m).mul_(factor)
                self._var(m).mul_(factor)

    def before(self, index: int) -> None:
        """This process is about to run global micro-batch ``index``."""
        self._decay(index - self.position)
        self.position = index + 1

    def _buffers(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        stats = [t for m in self.layers for t in (self._mean(m), self._var(m))]
        tracked = [m.num_batches_tracked for m in self.layers if m.num_batches_tracked is not None]
        return stats, tracked

    def _summed(self, micro_batches: int) -> list[torch.Tensor]:
        """The one-process statistics after ``micro_batches`` (a collective), this process's terms untouched."""
        stats, tracked = self._buffers()
        steps = max(0, micro_batches - self.position)
        factors = [(1.0 - float(m.momentum or 0.0)) ** steps for m in self.layers for _ in range(2)]
        deltas = [t - start for t, start in zip(tracked, self.counts, strict=True)]
        summed = distributed.all_reduce_sum([t * f for t, f in zip(stats, factors, strict=True)] + deltas)
        counts = [start + delta for start, delta in zip(self.counts, summed[len(stats) :], strict=True)]
        return summed[: len(stats)] + counts

    def _load(self, values: list[torch.Tensor]) -> None:
        stats, tracked = self._buffers()
        with torch.no_grad():
            for t, value in zip(stats + tracked, values, strict=True):
                t.copy_(value.to(t.dtype))

    def finish(self, micro_batches: int) -> None:
        """After the epoch's ``micro_batches``: every process holds the one-process statistics."""
        if self.layers:
            self._load(self._summed(micro_batches))

    @contextlib.contextmanager
    def assembled(self, micro_batches: int) -> Iterator[None]:
        """Within the block the model holds the one-process statistics after ``micro_batches`` (a save in the
        middle of an epoch); this process's own terms come back after it. A collective."""
        if not self.layers:
            yield
            return
        stats, tracked = self._buffers()
        own = [t.detach().clone() for t in stats + tracked]
        self._load(self._summed(micro_batches))
        try:
            yield
        finally:
            self._load(own)


def _idle_pass(ddp: nn.Module, model: nn.Module, shape: torch.Size, device: torch.device, precision: Precision) -> None:
    """A forward and backward pass of no image: zero gradients, so that this process joins the window's
    all-reduce (and SyncBatchNorm's collectives) without changing the result. Buffers are put back."""
    saved = [b.detach().clone() for b in model.buffers()]
    x = torch.empty((0, *shape), device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, precision):
        out = ddp(x)
    (out.float().sum() * 0.0).backward()
    with torch.no_grad():
        for buffer, value in zip(model.buffers(), saved, strict=True):
            buffer.copy_(value)


# --------------------------------------------------------------------------------------------------
# One epoch, and evaluation


def train_one_epoch_ddp(
    ddp: nn.Module,
    step: TrainStep,
    loader: DeviceLoader,
    optimizer: torch.optim.Optimizer,
    *,
    windows: list[distributed.Window],
    batch_sizes: list[int],
    accum: int,
    world: distributed.World,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    device: torch.device,
    precision: Precision,
    epoch: int = 1,
    on_event: EventCallback = _ignore,
    report_every_s: float = 0.5,
    guard: DivergenceGuard | None = None,
    resume_at: EpochPosition | None = None,
    saver: MidEpochSaver | None = None,
) -> EpochStats:
    """One epoch of this process's share of ``loader`` (set with :meth:`DeviceLoader.set_shard` from
    ``windows``), with exact accumulation over the processes. After each optimizer step the processes
    exchange a stop request and rank 0's wish for a progress report (also taken after the first step, for
    ``guard``'s starting loss, and after the last); a report sums the running loss and accuracy over them.
    The figures returned are those of the whole epoch, over every process. ``resume_at`` continues the epoch
    from a save in its middle; ``saver`` (asked on rank 0, the answer exchanged with the rest) saves at an
    optimizer step, with the one-process BatchNorm statistics and the totals over every process."""
    model: nn.Module = getattr(ddp, "module", ddp)
    model.train()
    freeze_frozen_batchnorm(model)
    shape = loader.images.shape[1:]
    step.reset_totals()
    total_steps = len(windows)
    seen = done = first = 0
    loss = accuracy = float("nan")
    start = last_report = time.perf_counter()
    if resume_at is not None:
        first = _first_micro_batch(resume_at, batch_sizes, accum)
        seen, done, start = resume_at.images, resume_at.steps, start - resume_at.seconds
        if world.is_main:  # the epoch's totals so far are over every process: rank 0 carries them
            step.loss_sum.fill_(resume_at.loss_sum)
            step.correct.fill_(resume_at.correct)
    running = RunningStats(model, world, start=first)
    batches = loader.iter_from(first)
    for window in windows[done:]:
        for p in range(window.passes):
            with contextlib.nullcontext() if p == window.passes - 1 else ddp.no_sync():  # type: ignore[operator]
                if p < len(window.indices):
                    running.before(window.indices[p])
                    x, y = next(batches)
                    step.micro(x, y, y.shape[0] / window.images)
                else:
                    _idle_pass(ddp, model, shape, device, precision)
        lr = optimizer.param_groups[-1]["lr"]
        step.update()
        if scheduler is not None:
            scheduler.step()
        done += 1
        seen += window.images
        now = time.perf_counter()
        wanted = world.is_main and now - last_report >= report_every_s
        starting = guard is not None and guard.start is None
        save_due = saver is not None and world.is_main and done < total_steps and saver.due()
        stop, report, save = distributed.exchange(
            [distributed.stops().requested(), int(wanted or starting or done == total_steps), int(save_due)]
        )
        if stop:
            raise distributed.AgreedStop(stop)
        if not (report or save):
            continue
        loss_sum, correct = distributed.all_reduce_sum([step.loss_sum, step.correct])
        if save and saver is not None:
            position = EpochPosition(epoch, done, seen, float(loss_sum), int(correct), time.perf_counter() - start)
            with running.assembled(done * accum):
                saver.save(position)
        if not report:
            continue
        last_report = now
        loss, accuracy = float(loss_sum) / seen, float(correct) / seen
        if guard is not None:
            if guard.start is None:
                guard.start = loss
            guard.check(loss, epoch)
        on_event(
            StepProgress(
                epoch=epoch,
                step=done,
                steps=total_steps,
                images=seen,
                loss=loss,
                accuracy=accuracy,
                lr=lr,
                images_per_second=seen / max(time.perf_counter() - start, 1e-9),
            )
        )
    running.finish(len(batch_sizes))
    synchronize(device)
    return EpochStats(loss, accuracy, seen, time.perf_counter() - start, done)


def evaluate_shared(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    precision: Precision,
) -> EvalStats:
    """Loss and accuracy over every process's share of the evaluation images (sums reduced, never padded)."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    n = 0
    with torch.inference_mode():
        for x, y in loader:
            with autocast(device, precision):
                logits = model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
            n += int(y.shape[0])
    total_loss, total_correct, total_n = distributed.all_reduce_sum(
        [loss_sum.clone(), correct.clone(), torch.tensor(n, dtype=torch.float64, device=device)]
    )
    images = int(total_n)
    if images == 0:
        return EvalStats(float("nan"), float("nan"), 0)
    return EvalStats(float(total_loss) / images, float(total_correct) / images, images)


# --------------------------------------------------------------------------------------------------
# fit


class FollowerRun(Run):
    """The run as a process other than rank 0 sees it: named, never written (rank 0 alone writes the run's
    files, and on another node the folder is not there at all)."""

    def write_config(self, data: dict[str, Any]) -> None:
        pass

    def update_config(self, config: dict[str, Any]) -> None:
        pass

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        pass

    def append_metrics(self, row: dict[str, Any]) -> None:
        pass

    def read_metrics(self) -> list[dict[str, Any]]:
        return []


def _trainable(model: nn.Module) -> tuple[bool, ...]:
    return tuple(p.requires_grad for p in model.parameters())


class DistributedFitLoop(_FitLoop):
    """:class:`engine._FitLoop`'s phases over several processes: the model trains through DDP, each epoch on
    this process's share, evaluation on its share of the images, and only rank 0 writes checkpoints."""

    def __init__(self, model: Classifier, config: TrainConfig, *, world: distributed.World, **kwargs: Any) -> None:
        self.world = world
        self.ddp: nn.Module | None = None
        self.trainable: tuple[bool, ...] = ()
        super().__init__(model, config, **kwargs)
        self.start_state = None  # no smaller-micro-batch retry: the processes would have to agree mid-step

    def _save_start(self) -> None:
        if self.world.is_main:
            super()._save_start()

    def _make_step(self) -> TrainStep:
        self.ddp = None
        gc.collect()  # a DDP built before (other trainable parameters) releases its gradient hooks
        self.ddp = wrap(self.model, self.device)
        self.trainable = _trainable(self.model)
        return TrainStep(
            self.ddp,
            self.optimizer,
            device=self.device,
            precision=self.precision,
            label_smoothing=self.config.label_smoothing,
            scaler=self.scaler,
            mode="eager",
            notice=self._notice,
        )

    def snapshot(self, kind: str, position: EpochPosition | None = None) -> dict[str, Any]:
        ckpt = super().snapshot(kind, position)
        ckpt["world_size"] = self.world.size
        return ckpt

    def save_position(self, position: EpochPosition) -> None:
        if self.world.is_main:
            super().save_position(position)
        else:
            self.saved_position = position

    def fit(self) -> FitResult:
        try:
            return super().fit()
        except TrainingInterrupted as exc:
            if isinstance(exc.__context__, distributed.AgreedStop):
                distributed.mark_agreed(exc)
            raise

    def _train_epoch(self, epoch: int) -> EpochStats:
        config, world = self.config, self.world
        if config.freeze_backbone:
            set_backbone_trainable(self.model, not backbone_frozen(config, epoch))
            if _trainable(self.model) != self.trainable:  # DDP reduces the parameters that trained when built
                del self.step
                self.step = self._make_step()
        self.on_event(EpochStarted(epoch, config.epochs, self.epoch_steps, len(self.batch_sizes)))
        self.train_loader.set_epoch(epoch)
        windows = distributed.plan_epoch(self.batch_sizes, config.accum, world.size, world.rank)
        self.train_loader.set_shard(tuple(i for w in windows for i in w.indices))
        assert self.ddp is not None
        resume_at = self.position if self.position is not None and self.position.epoch == epoch else None
        try:
            stats = train_one_epoch_ddp(
                self.ddp,
                self.step,
                self.train_loader,
                self.optimizer,
                windows=windows,
                batch_sizes=self.batch_sizes,
                accum=config.accum,
                world=world,
                scheduler=self.scheduler,
                device=self.device,
                precision=self.precision,
                epoch=epoch,
                on_event=self.on_event,
                guard=self.guard,
                resume_at=resume_at,
                saver=self.saver,
            )
            self.position = None
            return stats
        except torch.cuda.OutOfMemoryError:
            message = _out_of_memory_message(self.config, self.run, self.saved_epoch)
            raise CifarNetError(
                f"{message} (With several processes the micro-batch is not halved automatically.)"
            ) from None
        except LossDiverged as exc:
            raise distributed.mark_agreed(self._diverged(exc.loss, "training")) from None

    def _retry_smaller(self) -> None:  # pragma: no cover - _train_epoch above never retries
        raise CifarNetError(_out_of_memory_message(self.config, self.run, self.saved_epoch))

    def _evaluate_epoch(self) -> EvalStats | None:
        if self.eval_loader is None:
            return None
        ev = evaluate_shared(self.model, self.eval_loader, device=self.device, precision=self.precision)
        if ev.n and not torch.isfinite(torch.tensor(ev.loss)):
            raise distributed.mark_agreed(self._diverged(ev.loss, "validation"))
        return ev

    def _save_epoch(self, epoch: int, metrics: dict[str, Any], is_best: bool) -> None:
        if self.world.is_main:
            super()._save_epoch(epoch, metrics, is_best)
        else:
            self.saved_epoch = epoch


def fit(
    model: Classifier,
    config: TrainConfig,
    *,
    world: distributed.World,
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
    """:func:`engine.fit` over ``world``'s processes (the step runs eagerly; ``step_mode`` is ignored).
    ``eval_loader`` holds this process's share of the evaluation images (:func:`distributed.shard_bounds`)."""
    del step_mode
    loop = DistributedFitLoop(
        model,
        config,
        world=world,
        train_loader=train_loader,
        eval_loader=eval_loader,
        device=device,
        precision=precision,
        run=run,
        meta=meta,
        resume_from=resume_from,
        on_event=on_event,
        step_mode="eager",
    )
    loop.columns = columns
    return loop.fit()
