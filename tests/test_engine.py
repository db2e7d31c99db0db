from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from cifarnet_cli.config import TrainConfig
from cifarnet_cli.devices import Precision
from cifarnet_cli.engine import (
    DivergenceGuard,
    LossDiverged,
    build_optimizer,
    build_scheduler,
    lr_factor,
    set_backbone_trainable,
    steps_per_epoch,
    train_one_epoch,
    window_sizes,
)
from cifarnet_cli.models import get_model
from cifarnet_cli.models._base import Classifier

CPU = torch.device("cpu")
FP32 = Precision("fp32", None)


class TinyNet(Classifier):
    """No batch norm: a batch's gradient is then exactly the mean of its examples' gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean((2, 3))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)

    def get_classifier(self) -> nn.Linear:
        return self.fc


def _batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def _train(
    model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], accum: int, momentum: float = 0.9
) -> int:
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=momentum, weight_decay=1e-3)
    stats = train_one_epoch(
        model,
        batches,
        opt,
        batch_sizes=[len(y) for _x, y in batches],
        accum=accum,
        device=CPU,
        precision=FP32,
        label_smoothing=0.1,
    )
    return stats.optimizer_steps


def test_accumulation_equals_one_big_batch() -> None:
    torch.manual_seed(0)
    x, y = torch.rand(64, 3, 8, 8), torch.randint(0, 10, (64,))
    big, small = TinyNet(), TinyNet()
    small.load_state_dict(big.state_dict())
    assert _train(big, _batches(x, y, 32), accum=1) == 2
    assert _train(small, _batches(x, y, 4), accum=8) == 2  # 8 micro-batches of 4 per step
    for a, b in zip(big.parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_partial_final_window_is_stepped_with_its_own_scaling() -> None:
    torch.manual_seed(1)
    x, y = torch.rand(44, 3, 8, 8), torch.randint(0, 10, (44,))
    # 44 images, micro-batches of 8 (last one 4), accum 4 → windows of 32 and 12 images
    assert window_sizes([8, 8, 8, 8, 8, 4], 4) == [32, 12]
    reference, accumulated = TinyNet(), TinyNet()
    accumulated.load_state_dict(reference.state_dict())
    assert _train(reference, [(x[:32], y[:32]), (x[32:], y[32:])], accum=1) == 2
    assert _train(accumulated, _batches(x, y, 8), accum=4) == 2
    for a, b in zip(reference.parameters(), accumulated.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_scaled_loss_is_not_the_naive_division() -> None:
    """Guard against a regression to loss / accum: with an uneven last window that would differ."""
    torch.manual_seed(2)
    x, y = torch.rand(20, 3, 8, 8), torch.randint(0, 10, (20,))
    ref, acc = TinyNet(), TinyNet()
    acc.load_state_dict(ref.state_dict())
    _train(ref, [(x, y)], accum=1, momentum=0.0)
    _train(acc, _batches(x, y, 8), accum=3, momentum=0.0)  # 8 + 8 + 4 in one window
    for a, b in zip(ref.parameters(), acc.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_schedule_counts_optimizer_steps() -> None:
    config = TrainConfig(epochs=4, batch_size=10, accum=3, warmup_epochs=1, lr=0.4)
    micro = 10  # 100 images / 10 per micro-batch
    epoch_steps = steps_per_epoch(micro, config.accum)
    assert epoch_steps == 4  # 3 + 3 + 3 + 1 micro-batches
    model = TinyNet()
    opt = build_optimizer(model, config)
    sched = build_scheduler(opt, config, epoch_steps)
    lrs = []
    for _ in range(config.epochs * epoch_steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1)  # warm-up: 1/4 of the peak after the first of 4 steps
    assert lrs[3] == pytest.approx(0.4)  # peak at the end of warm-up
    assert lrs[-1] < 0.02 and all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))


def test_multistep_milestones_in_epochs() -> None:
    config = TrainConfig(epochs=6, schedule="multistep", milestones=(2, 4), gamma=0.1, warmup_epochs=0)
    factors = [lr_factor(s, total_steps=60, warmup_steps=0, config=config, epoch_steps=10) for s in range(60)]
    assert factors[19] == 1.0 and factors[20] == pytest.approx(0.1) and factors[40] == pytest.approx(0.01)


def test_cosine_reaches_zero() -> None:
    config = TrainConfig(epochs=2, warmup_epochs=0)
    assert lr_factor(0, total_steps=20, warmup_steps=0, config=config, epoch_steps=10) == 1.0
    assert lr_factor(20, total_steps=20, warmup_steps=0, config=config, epoch_steps=10) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(10, total_steps=20, warmup_steps=0, config=config, epoch_steps=10) == pytest.approx(0.5)


def test_default_lr_scales_with_the_effective_batch() -> None:
    assert TrainConfig().peak_lr == pytest.approx(0.4)
    assert TrainConfig(batch_size=16, accum=8).peak_lr == pytest.approx(0.1)
    assert TrainConfig(lr=0.05).peak_lr == 0.05


def test_weight_decay_skips_norm_and_bias_and_head_gets_full_lr() -> None:
    model = get_model("resnet20")
    opt = build_optimizer(model, TrainConfig(lr=1.0, backbone_lr_scale=0.1, weight_decay=5e-4))
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert by_param[id(model.fc.weight)]["lr"] == 1.0 and by_param[id(model.fc.weight)]["weight_decay"] == 5e-4
    assert by_param[id(model.fc.bias)]["weight_decay"] == 0.0
    assert by_param[id(model.stem[0].weight)]["lr"] == pytest.approx(0.1)
    assert by_param[id(model.stem[1].weight)]["weight_decay"] == 0.0  # BN scale
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_frozen_backbone_gets_no_gradient_and_keeps_bn_statistics() -> None:
    model = get_model("resnet20")
    set_backbone_trainable(model, False)
    before = copy.deepcopy(model.state_dict())
    opt = build_optimizer(model, TrainConfig(lr=0.1))
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    train_one_epoch(model, [(x, y)], opt, batch_sizes=[8], accum=1, device=CPU, precision=FP32)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}
    set_backbone_trainable(model, True)
    train_one_epoch(model, [(x, y)], opt, batch_sizes=[8], accum=1, device=CPU, precision=FP32)
    assert not torch.equal(model.stem[0].weight, before["stem.0.weight"])
    assert not torch.equal(model.stem[1].running_mean, before["stem.1.running_mean"])


def test_config_validation_messages() -> None:
    from cifarnet_cli.errors import UsageError

    with pytest.raises(UsageError, match="--accum must be at least 1"):
        TrainConfig(accum=0).validate()
    with pytest.raises(UsageError, match="schedule"):
        TrainConfig(schedule="linear").validate()
    with pytest.raises(UsageError, match="milestones"):
        TrainConfig(epochs=10, schedule="multistep", milestones=(5, 20)).validate()
    assert math.isclose(TrainConfig(batch_size=16, accum=8).effective_batch, 128)


def test_accum_alone_keeps_the_effective_batch() -> None:
    from cifarnet_cli.config import make_config

    config = make_config("train", {"accum": 8})
    assert (config.batch_size, config.accum, config.effective_batch) == (64, 8, 512)
    explicit = make_config("train", {"accum": 8, "batch_size": 16})
    assert explicit.effective_batch == 128 and explicit.peak_lr == pytest.approx(0.1)
    finetune = make_config("finetune-resnet50", {"accum": 8})
    assert finetune.effective_batch == 128 and finetune.batch_size == 16


def test_default_warmup_fits_short_runs() -> None:
    assert TrainConfig(epochs=60).warmup == 2.0
    assert TrainConfig(epochs=1).validate().warmup == pytest.approx(0.2)
    with pytest.raises(Exception, match="--warmup-epochs"):
        TrainConfig(epochs=2, warmup_epochs=2).validate()


def test_finetune_lr_scales_with_its_effective_batch() -> None:
    from cifarnet_cli.config import make_config

    assert make_config("finetune-resnet50", {}).peak_lr == pytest.approx(0.05)
    assert make_config("finetune-resnet50", {"batch_size": 32}).peak_lr == pytest.approx(0.025)  # 32 × 2 = 64
    assert make_config("finetune-resnet50", {"lr": 0.01}).peak_lr == 0.01


def test_step_progress_reports_the_rate_the_step_used() -> None:
    """The bars and TensorBoard's step/lr show the rate each step trained with, as metrics.jsonl's lr does
    for the epoch's last step (not the next step's rate, which is 0 after the cosine's last step)."""
    from cifarnet_cli.engine import scheduled_lrs
    from cifarnet_cli.events import StepProgress

    config = TrainConfig(epochs=1, batch_size=10, accum=1, warmup_epochs=0, lr=0.4)
    torch.manual_seed(0)
    x, y = torch.randn(40, 3, 8, 8), torch.randint(0, 10, (40,))
    model = TinyNet()
    opt = build_optimizer(model, config)
    sched = build_scheduler(opt, config, 4)
    seen: list[StepProgress] = []
    train_one_epoch(
        model,
        _batches(x, y, 10),
        opt,
        batch_sizes=[10] * 4,
        accum=1,
        scheduler=sched,
        device=CPU,
        precision=FP32,
        on_event=lambda e: seen.append(e) if isinstance(e, StepProgress) else None,
        report_every_s=0.0,
    )
    lrs = scheduled_lrs(config, 4)
    assert [e.lr for e in seen] == pytest.approx(lrs)
    assert seen[-1].lr > 0


def _epoch_with_guard(model: nn.Module, lr: float, guard: DivergenceGuard) -> None:
    torch.manual_seed(1)
    x, y = torch.rand(64, 3, 32, 32), torch.randint(0, 10, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    train_one_epoch(
        model, _batches(x, y, 8), opt, batch_sizes=[8] * 8, accum=1, device=CPU, precision=FP32, guard=guard
    )


def test_divergence_is_judged_from_where_the_loss_started() -> None:
    # Weights that start far from a uniform guess (loss ~100, like another run's weights on new classes),
    # trained at a tiny rate: nothing explodes, so nothing stops — the loss is the starting weights' own.
    torch.manual_seed(0)
    model = TinyNet()
    with torch.no_grad():
        model.fc.weight.mul_(2000.0)
    guard = DivergenceGuard(10)
    _epoch_with_guard(model, 1e-9, guard)
    assert guard.start is not None and guard.start > guard.floor  # it did start above the fixed limit
    # The same weights at a rate that blows them up are stopped, naming where the loss started.
    guard = DivergenceGuard(10)
    with pytest.raises(LossDiverged) as err:
        _epoch_with_guard(model, 1e4, guard)
    assert err.value.start == guard.start and err.value.loss > guard.limit
