"""The captured training step, checked on the CPU: graph_emulation records what a GPU would capture and replays it
as a GPU would, so a run through train() in the captured mode must end exactly where the static mode (the same
arithmetic, uncaptured) ends. Each test here also plants a mistake that a captured step makes silently on a GPU,
to show that the check catches it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from cifarnet_cli import runs, train_step
from cifarnet_cli.config import TrainConfig
from cifarnet_cli.devices import Precision, autocast
from cifarnet_cli.events import EpochStarted, Notice, TrainingInterrupted
from cifarnet_cli.models import get_model
from cifarnet_cli.train_step import SGD, TrainStep
from cifarnet_cli.training import train

from . import graph_emulation
from .graph_emulation import CAPTURING_ERROR, Emulator

CPU = torch.device("cpu")
FP32 = Precision("fp32", None)

# 22 training images: micro-batches 6+6 | 6+4, and after the out-of-memory halving 3+3+3+3 | 3+3+4 (a short
# window whose full micro-batches are replayed with the weight 3/10, then a last micro-batch of another size,
# run eagerly). Two epochs of two optimizer steps: two warm-up steps, then the cosine (rates 0.5, 1, 1, 0.5).
RECIPE: dict[str, Any] = dict(
    epochs=2, batch_size=6, accum=2, val_split=8, warmup_epochs=1, seed=3, device="cpu", capture="auto"
)
HALVED = (3, 4)


@pytest.fixture(autouse=True)
def _no_pictures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cifarnet_cli.report.plot_curves", lambda *a, **k: None)  # not what these tests are about


# -- planted mistakes: what each would look like in train_step.py ----------------------------------------


def _update_with_frozen_lr(self: SGD) -> None:
    """update_static with the learning rate read as a Python number: a graph replays the capture's rate."""
    with torch.no_grad():
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params if p.grad is not None]
            wd, mu = group["weight_decay"], group["momentum"]
            d = torch._foreach_add(grads, params, alpha=wd) if wd else list(grads)
            if mu:
                bufs = [self.state[p]["momentum_buffer"] for p in params]
                torch._foreach_mul_(bufs, mu)
                torch._foreach_add_(bufs, d)
                d = torch._foreach_add(d, bufs, alpha=mu) if group["nesterov"] else bufs
            torch._foreach_add_(params, d, alpha=-float(group["lr"]))
            torch._foreach_zero_(grads)
        self._opt_called = True


def _forward_backward_with_frozen_weight(self: TrainStep, x: torch.Tensor, y: torch.Tensor) -> None:
    """The loss weighted by the accumulation weight as a Python number: a graph replays the capture's weight."""
    with autocast(self.device, self.precision, cache=False):
        logits = self.model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
    (loss * self._weight_value).backward()
    self.loss_sum += loss.detach() * y.shape[0]
    self.correct += (logits.detach().argmax(1) == y).sum()


def _plant(monkeypatch: pytest.MonkeyPatch, plant: str | None) -> None:
    if plant == "frozen lr":
        monkeypatch.setattr(SGD, "update_static", _update_with_frozen_lr)
    elif plant == "frozen accumulation weight":
        monkeypatch.setattr(TrainStep, "_forward_backward", _forward_backward_with_frozen_weight)
    elif plant == ".item() captured":
        original = TrainStep._forward_backward

        def with_item(self: TrainStep, x: torch.Tensor, y: torch.Tensor) -> None:
            original(self, x, y)
            self.last_loss = self.loss_sum.item()  # type: ignore[attr-defined]

        monkeypatch.setattr(TrainStep, "_forward_backward", with_item)
    elif plant == "warm-up not undone":
        monkeypatch.setattr(train_step, "_restore", lambda tensors, values: None)


# -- the runs --------------------------------------------------------------------------------------------


def _out_of_memory_at(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    """The first invocation runs out of memory at the ``call``-th static micro-batch (in the captured mode: the
    second step of the capture's warm-up), so the engine halves the micro-batch."""
    original = TrainStep._static_micro
    calls: list[int] = []

    def static_micro(self: TrainStep) -> None:
        calls.append(1)
        if len(calls) == call:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        original(self)

    monkeypatch.setattr(TrainStep, "_static_micro", static_micro)


def _final_state(name: str) -> dict[str, torch.Tensor]:
    last = torch.load(runs.resolve_run(name).last, weights_only=True)
    assert last["epoch"] == RECIPE["epochs"] and (last["config"]["batch_size"], last["config"]["accum"]) == HALVED
    state = dict(last["model"])
    for index, entry in last["optimizer"]["state"].items():
        state[f"momentum {index}"] = entry["momentum_buffer"]
    return state


_static_reference: dict[str, dict[str, torch.Tensor]] = {}


def _static_run(data: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """The static mode straight through (out of memory at its first micro-batch too), computed once."""
    if "state" not in _static_reference:
        with monkeypatch.context() as patch:
            patch.setattr("cifarnet_cli.training.choose_mode", lambda *a, **k: "static")
            _out_of_memory_at(patch, 1)
            train(TrainConfig(**RECIPE, data_dir=str(data)), run_name="static", on_event=lambda e: None)
        _static_reference["state"] = _final_state("static")
    return _static_reference["state"]


def _captured_run(data: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, torch.Tensor], Emulator, list[str]]:
    """The captured mode, emulated: out of memory in the first capture's warm-up, Ctrl-C at the start of the last
    epoch, then a resume (which captures again)."""
    emulator = graph_emulation.install(monkeypatch)
    said: list[str] = []

    def interrupt_last_epoch(event: object) -> None:
        if isinstance(event, Notice):
            said.append(event.message)
        if isinstance(event, EpochStarted) and event.epoch == RECIPE["epochs"]:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        _out_of_memory_at(patch, 2)
        with pytest.raises(TrainingInterrupted):
            train(TrainConfig(**RECIPE, data_dir=str(data)), run_name="captured", on_event=interrupt_last_epoch)
    train(None, resume="captured", on_event=lambda e: said.append(e.message) if isinstance(e, Notice) else None)
    return _final_state("captured"), emulator, said


def _check_captured_like_static(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = _static_run(data, monkeypatch)
    state, emulator, said = _captured_run(data, monkeypatch)
    assert graph_emulation.capture_errors(emulator, lambda: said) == []
    assert emulator.captures == 4 and emulator.replays > 0  # micro-batch and update, in each invocation
    assert any("Out of GPU memory at micro-batch 6" in m for m in said)
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize(
    "plant", [None, "frozen lr", "frozen accumulation weight", ".item() captured", "warm-up not undone"]
)
def test_captured_training_ends_where_the_static_mode_ends(
    plant: str | None, image_folder: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # accumulation, a short last micro-batch, warm-up and cosine, an out-of-memory halving, Ctrl-C and resume
    data = image_folder(per_class=3)
    _static_run(data, monkeypatch)  # before any mistake is planted
    _plant(monkeypatch, plant)
    if plant is None:
        _check_captured_like_static(data, monkeypatch)
    else:
        with pytest.raises(AssertionError):
            _check_captured_like_static(data, monkeypatch)


# -- failures while capturing ----------------------------------------------------------------------------


def _step(monkeypatch: pytest.MonkeyPatch) -> tuple[TrainStep, Emulator, list[str]]:
    emulator = graph_emulation.install(monkeypatch)
    torch.manual_seed(0)
    model = get_model("resnet20")
    optimizer = SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    said: list[str] = []
    step = TrainStep(model, optimizer, device=CPU, precision=FP32, mode="graph", notice=said.append)
    return step, emulator, said


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)


def _weights(step: TrainStep) -> list[torch.Tensor]:
    return [t.clone() for t in step.model.state_dict().values()]


@pytest.mark.parametrize("where", ["in the captured code", "in capture_end"])
def test_a_failed_capture_says_its_cause_and_leaves_the_stream_as_it_was(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    step, emulator, said = _step(monkeypatch)
    if where == "in capture_end":
        emulator.fail_capture_end = RuntimeError("CUDA error: capture refused by the driver (injected)")
        cause = "capture refused by the driver (injected)"
    else:
        _plant(monkeypatch, ".item() captured")
        cause = CAPTURING_ERROR  # the cause; capture_end then fails with "...previous error during capture"
    before = _weights(step)
    step.micro(*_batch(), 1.0)
    assert step.mode == "eager" and len(said) == 1 and cause in said[0], said
    assert emulator.current_device == torch.device("cuda", 0)  # the process's, as before
    for device in (CPU, emulator.current_device):  # the step's device (the CPU here) and the current one
        assert emulator.current_stream(device) is emulator.default_stream(device)
    assert emulator.capturing is None
    # the warm-up was undone: the one micro-batch after the failure is all that touched the weights
    step.optimizer.zero_grad(set_to_none=True)
    for a, b in zip(before, step.model.state_dict().values(), strict=True):
        if a.is_floating_point() and a.ndim > 1:  # parameters (BatchNorm statistics moved with the micro-batch)
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_out_of_memory_while_warming_up_waits_for_the_side_stream_before_restoring(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    step, emulator, _said = _step(monkeypatch)
    _out_of_memory_at(monkeypatch, 3)  # the third warm-up step, after two have trained
    original = train_step._restore

    def restore(tensors: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        emulator.events.append(("restore",))
        original(tensors, values)

    monkeypatch.setattr(train_step, "_restore", restore)
    before = _weights(step)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        step.micro(*_batch(), 1.0)
    restored = emulator.events.index(("restore",))
    waited = [e for e in emulator.events[:restored] if e[0] == "synchronize" and not getattr(e[1], "default", True)]
    assert waited, emulator.events  # the side stream, synchronised before the restore
    for a, b in zip(before, step.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_step_is_captured_on_its_own_device_not_the_current_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # The process's current device is cuda:0 and the step's tensors are elsewhere (--device cuda:1): kernels
    # issued while capturing on a stream of cuda:0 would run eagerly and leave an empty graph.
    step, emulator, said = _step(monkeypatch)
    for _ in range(2):
        step.micro(*_batch(), 1.0)
        step.update()
    assert step.mode == "graph" and said == [] and emulator.errors == []
    assert step._graphs is not None and all(graph.ops for graph in step._graphs)  # type: ignore[attr-defined]
    assert emulator.replays == 4  # both micro-batches (the first right after its capture) and both updates
