"""One training step — forward, backward, optimizer update — run eagerly or replayed as a CUDA graph.

On a GPU the ResNet-20 step at batch 512 is mostly kernel-launch overhead: 42,000 images/s eager against
111,000 replayed as a CUDA graph on one H200 (the project's reference measurement, with a pipeline of the
same design). A graph replays fixed kernels on fixed
memory, so everything that changes from one step to the next lives in device tensors the graph reads: the
batch (copied into static buffers), each parameter group's learning rate and the accumulation weight. The
gradients keep their storage (a replay adds into them; the update zeroes them), and so do the momentum
buffers.

The same functions run in three modes, which share every line of arithmetic:
- ``eager``: torch.optim.SGD's own update, gradients freed after each step (the CPU/MPS path, and fp16,
  whose gradient scaler reads an overflow flag back to the host every step);
- ``static``: static buffers and the graph-safe update, called directly (what the CPU tests compare with
  eager: the captured path's arithmetic without a GPU);
- ``graph``: ``static`` captured in two CUDA graphs (micro-batch; update), replayed.
A micro-batch whose size differs from the captured one (the last of an epoch) runs eagerly on the same
buffers, so no image is dropped or padded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cifarnet_cli.devices import Precision, autocast

MODES = ("eager", "static", "graph")
WARMUP_STEPS = 3  # eager steps on a side stream before capture: cuDNN autotuning, lazy init (torch docs)


class SGD(torch.optim.SGD):
    """torch.optim.SGD with a second, graph-safe update.

    ``step()`` is torch's (used eagerly and by the gradient scaler). :meth:`update_static` computes the
    same update from each group's learning rate held in a device tensor (torch's foreach SGD turns a tensor
    learning rate into a Python number, a host synchronisation a graph cannot contain) and requires the
    momentum buffers to exist: :meth:`prepare_static` creates them as zeros, which is what torch's lazily
    created buffer amounts to (``buf = μ·0 + g = g`` on the first step, dampening 0). The state dict is
    torch's, so checkpoints do not depend on the mode.
    """

    def __init__(
        self, params: Iterable[Any], *, lr: float, momentum: float, nesterov: bool, weight_decay: float = 0.0
    ) -> None:
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        self.lr_tensors: list[torch.Tensor] = []

    def prepare_static(self) -> None:
        """Zeroed gradients and momentum buffers for every trainable parameter, and one learning-rate
        tensor per group, on the parameters' device."""
        self.lr_tensors = []
        for group in self.param_groups:
            device = group["params"][0].device
            self.lr_tensors.append(torch.zeros((), dtype=torch.float32, device=device))
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                if group["momentum"] and self.state[p].get("momentum_buffer") is None:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        self.load_lrs()

    def load_lrs(self) -> None:
        """Copy each group's current learning rate (set by the scheduler) into its tensor: one small
        kernel per group, no synchronisation; called outside the graph before each replay."""
        for group, lr in zip(self.param_groups, self.lr_tensors, strict=True):
            lr.fill_(float(group["lr"]))

    @torch.no_grad()
    def update_static(self) -> None:
        """``p ← p − lr·d`` with torch's SGD direction ``d`` (weight decay, momentum, Nesterov), then zero
        the gradients. Only in-place and foreach arithmetic on fixed tensors: capturable."""
        for group, lr in zip(self.param_groups, self.lr_tensors, strict=True):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params if p.grad is not None]
            wd, mu = group["weight_decay"], group["momentum"]
            d = torch._foreach_add(grads, params, alpha=wd) if wd else list(grads)
            if mu:
                bufs = [self.state[p]["momentum_buffer"] for p in params]
                torch._foreach_mul_(bufs, mu)
                torch._foreach_add_(bufs, d)
                d = torch._foreach_add(d, bufs, alpha=mu) if group["nesterov"] else bufs
            torch._foreach_sub_(params, torch._foreach_mul(d, lr))
            torch._foreach_zero_(grads)
        # What torch.optim.Optimizer.step records, so the LR scheduler knows an update happened.
        self._opt_called = True


class TrainStep:
    """Micro-batches and optimizer updates for one model, in one of :data:`MODES`.

    ``micro(x, y, weight)`` adds ``weight ×`` the gradient of the micro-batch's mean loss to the
    gradients (the weight is the micro-batch's share of its accumulation window, so a window's summed
    gradient is the gradient of its mean loss) and its loss and correct predictions to running totals on
    the device; ``update()`` applies and clears the gradients. Neither reads anything back to the host.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        device: torch.device,
        precision: Precision,
        label_smoothing: float = 0.0,
        scaler: torch.amp.GradScaler | None = None,
        mode: str = "eager",
        notice: Callable[[str], None] = lambda _message: None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if mode != "eager" and (scaler is not None or not isinstance(optimizer, SGD)):
            raise ValueError("static and graph modes need cifarnet's SGD and no gradient scaler")
        if mode == "graph" and not capturable(device):
            raise ValueError("graph mode needs a CUDA device")
        self.model = model
        self.optimizer = optimizer
        self.device = device
        self.precision = precision
        self.label_smoothing = label_smoothing
        self.scaler = scaler
        self.mode = mode
        self.notice = notice
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self._weight = torch.ones((), device=device)
        self._weight_value = 1.0
        self._static_x: torch.Tensor | None = None
        self._static_y: torch.Tensor | None = None
        self._graphs: tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph] | None = None
        self._trainable: tuple[bool, ...] = ()  # which parameters trained when the buffers were made

    # -- the arithmetic, shared by every mode ----------------------------------------------------------

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast(self.device, self.precision, cache=False):
            logits = self.model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        weighted = loss * self._weight
        if self.scaler is not None:
            self.scaler.scale(weighted).backward()
        else:
            weighted.backward()
        self.loss_sum += loss.detach() * y.shape[0]
        self.correct += (logits.detach().argmax(1) == y).sum()

    def _static_micro(self) -> None:
        assert self._static_x is not None and self._static_y is not None
        self._forward_backward(self._static_x, self._static_y)

    # -- public API --------------------------------------------------------------------------------------

    def reset_totals(self) -> None:
        self.loss_sum.zero_()
        self.correct.zero_()

    def micro(self, x: torch.Tensor, y: torch.Tensor, weight: float) -> None:
        if weight != self._weight_value:  # changes only in an epoch's last window
            self._weight.fill_(weight)
            self._weight_value = weight
        if self.mode == "eager":
            self._forward_backward(x, y)
            return
        self._prepare(x, y)
        assert self._static_x is not None and self._static_y is not None
        if x.shape != self._static_x.shape:
            self._forward_backward(x, y)  # a short last micro-batch: eagerly, into the same gradients
            return
        self._static_x.copy_(x)
        self._static_y.copy_(y)
        if self._graphs is not None:
            self._graphs[0].replay()
        else:
            self._static_micro()

    def update(self) -> None:
        if self.mode == "eager":
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return
        assert isinstance(self.optimizer, SGD)
        self.optimizer.load_lrs()
        if self._graphs is not None:
            self._graphs[1].replay()
        else:
            self.optimizer.update_static()

    # -- static buffers and capture ------------------------------------------------------------------

    def _prepare(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Build the static buffers — and capture the graphs — for the shape of the first micro-batch,
        and again when the set of trainable parameters changes (--unfreeze-at)."""
        trainable = tuple(p.requires_grad for p in self.model.parameters())
        if self._static_x is not None and trainable == self._trainable:
            return
        assert isinstance(self.optimizer, SGD)
        self._graphs = None
        for p in self.model.parameters():  # frozen parameters keep no gradient
            if not p.requires_grad:
                p.grad = None
        self.optimizer.prepare_static()
        self._static_x = x.detach().clone()
        self._static_y = y.detach().clone()
        self._trainable = trainable
        if self.mode == "graph":
            self._graphs = self._capture()
            if self._graphs is None:
                self.mode = "eager"

    def _capture(self) -> tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph] | None:
        """Warm up on a side stream, capture the micro-batch and the update, then put back every tensor
        the warm-up changed, so capturing leaves the training exactly where it was. A capture that fails
        (an operation CUDA graphs do not allow, an old driver) is reported in one line and the step runs
        eagerly; running out of memory is left to the caller, which retries with smaller micro-batches.

        Everything happens under the step's device and on one stream of it: torch.cuda.graph's own capture
        stream is made on the *current* device, so a step on ``--device cuda:1`` would record an empty graph
        while its kernels ran eagerly on cuda:1 (pytorch#87794)."""
        assert isinstance(self.optimizer, SGD)
        state = _mutable_state(self.model, self.optimizer) + [self.loss_sum, self.correct]
        saved = [t.detach().clone() for t in state]
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream(self.device)
            try:
                graphs = self._warm_up_and_record(side)
            except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is one too
                side.synchronize()  # warm-up kernels still queued there must not overwrite what is restored
                _restore(state, saved)
                if isinstance(exc, torch.cuda.OutOfMemoryError):
                    raise
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                self.notice(f"Could not capture the training step as a CUDA graph ({first[:160]}); training eagerly.")
                return None
            _restore(state, saved)
        return graphs

    def _warm_up_and_record(self, side: torch.cuda.Stream) -> tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph]:
        """Eager steps on ``side`` (cuDNN autotuning, lazy initialisation: torch's CUDA-graph notes), then the
        micro-batch and the update captured on it, the update into the micro-batch's memory pool."""
        assert isinstance(self.optimizer, SGD)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._static_micro()
                self.optimizer.update_static()
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # as torch.cuda.graph does: the warm-up's cached blocks become the graph's to use
        micro, update = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        _capture_into(micro, side, self._static_micro)
        _capture_into(update, side, self.optimizer.update_static, pool=micro.pool())
        return micro, update


def _capture_into(
    graph: torch.cuda.CUDAGraph, stream: torch.cuda.Stream, fn: Callable[[], None], **kwargs: Any
) -> None:
    """Record ``fn`` into ``graph`` on ``stream`` (``kwargs``: ``pool``). torch.cuda.graph does this too, but on
    failure it leaves the capture stream current when ``capture_end`` raises, and when ``fn`` fails it raises
    capture_end's consequent error ("operation failed due to a previous error during capture") in place of
    the cause. Here the previous stream is current again whatever fails, and the first error is the one raised."""
    with torch.cuda.stream(stream):
        graph.capture_begin(**kwargs)
        try:
            fn()
        except BaseException:
            with contextlib.suppress(RuntimeError):
                graph.capture_end()  # ends the capture mode; its error is a consequence of the one raised
            raise
        graph.capture_end()


def _restore(tensors: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for tensor, value in zip(tensors, values, strict=True):
            tensor.copy_(value)


def _mutable_state(model: nn.Module, optimizer: SGD) -> list[torch.Tensor]:
    """Every tensor a training step writes: parameters, gradients, buffers (BatchNorm statistics),
    momentum buffers."""
    tensors = [p.data for p in model.parameters()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += list(model.buffers())
    for state in optimizer.state.values():
        buf = state.get("momentum_buffer")
        if buf is not None:
            tensors.append(buf)
    return tensors


def capturable(device: torch.device) -> bool:
    """Whether a step on ``device`` can be captured as CUDA graphs (tests replace this to emulate capture on
    the CPU)."""
    return device.type == "cuda"


def choose_mode(capture: str, *, device: torch.device, precision: Precision, notice: Callable[[str], None]) -> str:
    """The mode ``--capture auto|on|off`` gives on this device. ``auto`` captures on CUDA where it can;
    ``on`` says why when it cannot (one line) and trains eagerly."""
    if capture == "off":
        return "eager"
    why = None
    if not capturable(device):
        why = f"CUDA graphs need a CUDA device; training eagerly on {device.type}"
    elif precision.needs_grad_scaler:
        why = "fp16's gradient scaler checks for overflow on the host every step; training eagerly"
    if why is None:
        return "graph"
    if capture == "on":
        notice(f"--capture on: {why}.")
    return "eager"
