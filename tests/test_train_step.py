"""The training step: the graph-safe update and static buffers (what a captured CUDA graph replays) must
train exactly like torch's eager SGD. On the CPU the static mode runs the captured path's arithmetic
without the graph; the graph itself is compared with eager in test_cuda.py."""

from __future__ import annotations

import copy

import pytest
import torch

from cifarnet_cli.config import TrainConfig
from cifarnet_cli.devices import Precision
from cifarnet_cli.engine import build_optimizer, build_scheduler, steps_per_epoch, train_one_epoch
from cifarnet_cli.models import get_model
from cifarnet_cli.train_step import SGD, TrainStep, choose_mode

from .test_engine import TinyNet

CPU = torch.device("cpu")
FP32 = Precision("fp32", None)


def _params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [
        torch.nn.Parameter(torch.randn(4, 3)),
        torch.nn.Parameter(torch.randn(5)),
        torch.nn.Parameter(torch.randn(2, 2)),
    ]


@pytest.mark.parametrize("nesterov,momentum", [(True, 0.9), (False, 0.9), (False, 0.0)])
def test_static_update_equals_torch_sgd(nesterov: bool, momentum: float) -> None:
    ours_p, ref_p = _params(), _params()

    def groups(ps: list[torch.nn.Parameter]) -> list[dict[str, object]]:
        # two groups: weight decay on one, a different learning rate on the other
        return [
            {"params": ps[:2], "weight_decay": 5e-4, "lr": 0.3},
            {"params": ps[2:], "weight_decay": 0.0, "lr": 0.1},
        ]

    ours = SGD(groups(ours_p), lr=0.3, momentum=momentum, nesterov=nesterov)
    ref = torch.optim.SGD(groups(ref_p), lr=0.3, momentum=momentum, nesterov=nesterov)
    ours.prepare_static()
    for step in range(4):
        grads = [torch.randn_like(p) for p in ours_p]
        for p, q, g in zip(ours_p, ref_p, grads, strict=True):
            p.grad.copy_(g)  # static mode: gradients keep their storage
            q.grad = g.clone()
        for group_o, group_r in zip(ours.param_groups, ref.param_groups, strict=True):
            group_o["lr"] = group_r["lr"] = group_r["lr"] * (0.5 if step == 2 else 1.0)  # a schedule
        ours.load_lrs()
        ours.update_static()
        ref.step()
        for p, q in zip(ours_p, ref_p, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
            assert torch.count_nonzero(p.grad) == 0  # the update zeroes the gradients it used
    if momentum:  # same state dict either way: checkpoints do not depend on the mode
        for p, q in zip(ours_p, ref_p, strict=True):
            torch.testing.assert_close(ours.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])


def _train(model: torch.nn.Module, mode: str, sizes: list[int], accum: int, epochs: int, lr: float) -> None:
    """``epochs`` epochs through train_one_epoch in ``mode``, with warm-up and cosine."""
    config = TrainConfig(batch_size=sizes[0], accum=accum, lr=lr, warmup_epochs=0.5, epochs=epochs)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch(len(sizes), accum))
    step = TrainStep(model, optimizer, device=CPU, precision=FP32, label_smoothing=0.1, mode=mode)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.rand(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)) for n in sizes]
    for epoch in range(1, epochs + 1):
        stats = train_one_epoch(
            model,
            data,
            optimizer,
            batch_sizes=sizes,
            accum=accum,
            scheduler=scheduler,
            device=CPU,
            precision=FP32,
            epoch=epoch,
            step=step,
        )
        assert stats.images == sum(sizes) and stats.optimizer_steps == steps_per_epoch(len(sizes), accum)


def test_static_mode_trains_like_eager_with_accumulation_and_a_short_last_batch() -> None:
    # 8+8+8+8 | 8+5 images per window: the short last micro-batch runs eagerly on the static buffers and its
    # window is weighted by 13 images; weight decay, Nesterov momentum, warm-up and cosine all take part.
    sizes, accum = [8, 8, 8, 8, 8, 5], 4
    torch.manual_seed(0)
    eager = TinyNet()
    static = copy.deepcopy(eager)
    _train(eager, "eager", sizes, accum, epochs=3, lr=0.5)
    _train(static, "static", sizes, accum, epochs=3, lr=0.5)
    moved = max(
        float((a - b).abs().max())
        for a, b in zip(eager.state_dict().values(), TinyNet().state_dict().values(), strict=True)
    )
    assert moved > 0.01  # the runs trained
    for a, b in zip(eager.parameters(), static.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_static_mode_updates_batchnorm_like_eager() -> None:
    # One window of 8 + 5 images through ResNet-20: parameters and BatchNorm statistics after one update.
    # (Compared over one step: this small random problem is chaotic, a 3e-8 perturbation grows to 5e-4 in a step.)
    torch.manual_seed(0)
    eager = get_model("resnet20")
    static = copy.deepcopy(eager)
    _train(eager, "eager", [8, 5], 2, epochs=1, lr=0.2)
    _train(static, "static", [8, 5], 2, epochs=1, lr=0.2)
    for (name, a), b in zip(eager.state_dict().items(), static.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_static_mode_rebuilds_its_buffers_when_the_trainable_set_changes() -> None:
    torch.manual_seed(0)
    model = get_model("resnet20")
    reference = copy.deepcopy(model)
    config = TrainConfig(batch_size=8, lr=0.1)
    steps = {}
    for name, m in (("static", model), ("eager", reference)):
        optimizer = build_optimizer(m, config)
        steps[name] = (TrainStep(m, optimizer, device=CPU, precision=FP32, mode=name), m)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for frozen in (True, False):  # head only, then everything (--freeze-backbone --unfreeze-at)
        for step, m in steps.values():
            for p in m.parameters():
                p.requires_grad_(not frozen or p is m.fc.weight or p is m.fc.bias)
            m.train()
            step.micro(x, y, 1.0)
            step.update()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_capture_falls_back_to_eager_off_cuda_with_one_line() -> None:
    said: list[str] = []
    assert choose_mode("on", device=CPU, precision=FP32, notice=said.append) == "eager"
    assert len(said) == 1 and "CUDA graphs need a CUDA device" in said[0]
    said.clear()
    assert choose_mode("auto", device=CPU, precision=FP32, notice=said.append) == "eager"
    assert choose_mode("off", device=CPU, precision=FP32, notice=said.append) == "eager"
    assert said == []  # auto and off say nothing


def test_fp16_is_never_captured(monkeypatch: pytest.MonkeyPatch) -> None:
    said: list[str] = []
    fp16 = Precision("fp16", torch.float16)
    assert choose_mode("on", device=torch.device("cuda", 0), precision=fp16, notice=said.append) == "eager"
    assert "gradient scaler" in said[0]
    bf16 = Precision("bf16", torch.bfloat16)
    assert choose_mode("auto", device=torch.device("cuda", 0), precision=bf16, notice=said.append) == "graph"
