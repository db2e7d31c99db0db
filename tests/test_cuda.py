"""CUDA paths, run where a GPU is (`pytest -m cuda`, and bench/gpu-check.sh); skipped elsewhere. cuDNN's flags
(benchmark, deterministic) are put back after every test (conftest), since training turns autotuning on.

Tolerances: capture and eager run the same kernels on the same inputs, but cuDNN's backward convolutions
accumulate with atomics (not bit-reproducible), so after a few steps weights agree to rtol 1e-3 / atol 1e-4 at
a learning rate that keeps this small problem out of its chaotic regime (see test_train_step.py).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cifarnet_cli import runs
from cifarnet_cli.autobatch import fit_micro_batch
from cifarnet_cli.benchmark import _train_rate
from cifarnet_cli.cli import app
from cifarnet_cli.config import FINETUNE_DEFAULTS, TrainConfig
from cifarnet_cli.data.classes import CIFAR10_CLASSES
from cifarnet_cli.data.loader import DeviceLoader
from cifarnet_cli.data.sources import ImageSet
from cifarnet_cli.devices import auto_precision, compute_capability, resolve_precision
from cifarnet_cli.engine import build_optimizer, build_scheduler, steps_per_epoch, train_one_epoch
from cifarnet_cli.events import EpochStarted, TrainingInterrupted
from cifarnet_cli.models import get_model
from cifarnet_cli.train_step import TrainStep
from cifarnet_cli.training import train

from .conftest import synthetic_images

pytestmark = pytest.mark.cuda
runner = CliRunner()
GPU = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
GIB = 2**30


def _data(n: int, seed: int = 0) -> ImageSet:
    labels = np.random.default_rng(seed).integers(0, 10, n)
    return ImageSet(synthetic_images(labels, seed), labels.astype(np.int64), CIFAR10_CLASSES)


def _train(
    model: torch.nn.Module, *, precision_name: str, mode: str, batch: int, accum: int, n: int, epochs: int, lr: float
) -> list[float]:
    precision = resolve_precision(precision_name, GPU)
    model.to(GPU).to(memory_format=torch.channels_last)
    config = TrainConfig(batch_size=batch, accum=accum, lr=lr, epochs=epochs, warmup_epochs=0)
    optimizer = build_optimizer(model, config)
    loader = DeviceLoader(_data(n), batch_size=batch, device=GPU, train=True, channels_last=True)
    sizes = loader.batch_sizes()
    scheduler = build_scheduler(optimizer, config, steps_per_epoch(len(sizes), accum))
    scaler = torch.amp.GradScaler("cuda") if precision.needs_grad_scaler else None
    step = TrainStep(model, optimizer, device=GPU, precision=precision, scaler=scaler, mode=mode, label_smoothing=0.1)
    losses = []
    for epoch in range(1, epochs + 1):
        loader.set_epoch(epoch)
        stats = train_one_epoch(
            model,
            loader,
            optimizer,
            batch_sizes=sizes,
            accum=accum,
            scheduler=scheduler,
            scaler=scaler,
            device=GPU,
            precision=precision,
            label_smoothing=0.1,
            step=step,
        )
        losses.append(stats.loss)
    return losses


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_mixed_precision_training_learns(precision: str) -> None:
    if precision == "bf16" and compute_capability(GPU)[0] < 8:
        pytest.skip("no native bf16 on this GPU")
    torch.manual_seed(0)
    losses = _train(
        get_model("resnet20"), precision_name=precision, mode="eager", batch=64, accum=2, n=1024, epochs=3, lr=0.1
    )
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] * 0.8, losses


def test_fp16_grad_scaler_scales_and_steps() -> None:
    torch.manual_seed(0)
    model = get_model("resnet20")
    before = copy.deepcopy(model.state_dict())
    _train(model, precision_name="fp16", mode="eager", batch=32, accum=1, n=128, epochs=1, lr=0.05)
    moved = any(not torch.equal(before[k], v.cpu()) for k, v in model.state_dict().items() if v.is_floating_point())
    assert moved


def test_captured_step_trains_like_eager() -> None:
    # 6 full micro-batches of 64 and a short one of 16, accumulation 2: capture, replay, the eager short batch
    for precision in ("fp32", "bf16") if compute_capability(GPU)[0] >= 8 else ("fp32",):
        torch.manual_seed(0)
        eager = get_model("resnet20")
        graph = copy.deepcopy(eager)
        a = _train(eager, precision_name=precision, mode="eager", batch=64, accum=2, n=400, epochs=2, lr=0.002)
        b = _train(graph, precision_name=precision, mode="graph", batch=64, accum=2, n=400, epochs=2, lr=0.002)
        tol = dict(rtol=1e-3, atol=1e-4) if precision == "fp32" else dict(rtol=2e-2, atol=2e-3)
        for (name, x), y in zip(eager.state_dict().items(), graph.state_dict().values(), strict=True):
            torch.testing.assert_close(x, y, msg=f"{precision} {name}", **tol)
        np.testing.assert_allclose(a, b, rtol=1e-3)


def test_on_device_and_pinned_placement_give_the_same_batches() -> None:
    data = _data(300)
    on = DeviceLoader(data, batch_size=64, device=GPU, train=True, seed=3, on_device=True)
    pinned = DeviceLoader(data, batch_size=64, device=GPU, train=True, seed=3, on_device=False)
    assert on.on_device and not pinned.on_device and pinned.images.is_pinned()
    for (xa, ya), (xb, yb) in zip(on, pinned, strict=True):
        assert xa.device.type == xb.device.type == "cuda"
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# Resume tolerances. Both runs train epochs 1-2 alike only if the GPU computes alike: with cuDNN's deterministic
# algorithms they do, and the comparison is of epoch 3. How far a 1e-7 relative perturbation at the resume point
# drifts over that epoch, measured on the CPU for this run (2 perturbations each): fp32 needs atol 3.3e-5 at rtol
# 1e-3 (max |diff| 3.8e-4); bf16 leaves 830-858 entries outside rtol 1e-3 / atol 1e-4 and needs atol 2.1e-3 at
# rtol 2e-2 (max |diff| 0.019). Perturbed one epoch earlier, both drift far more (fp32 max |diff| 0.14): this
# small problem is chaotic, so without deterministic algorithms no tolerance would hold.
RESUME_TOLERANCE = {"fp32": dict(rtol=1e-3, atol=1e-4), "bf16": dict(rtol=2e-2, atol=5e-3)}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_on_gpu_continues_where_it_stopped(precision: str, image_folder: Callable[..., Path]) -> None:
    if precision == "bf16" and compute_capability(GPU)[0] < 8:
        pytest.skip("no native bf16 on this GPU")
    torch.backends.cudnn.deterministic = True  # put back after the test (conftest)
    data = image_folder(per_class=20)
    base: dict[str, Any] = dict(
        epochs=3,
        batch_size=16,
        accum=2,
        val_split=20,
        data_dir=str(data),
        warmup_epochs=1,
        seed=7,
        device="cuda",
        precision=precision,
    )
    train(TrainConfig(**base), run_name="straight", on_event=lambda e: None)

    def interrupt_in_epoch_3(event: object) -> None:
        if isinstance(event, EpochStarted) and event.epoch == 3:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        train(TrainConfig(**base), run_name="stopped", on_event=interrupt_in_epoch_3)
    train(None, resume="stopped", on_event=lambda e: None)
    straight = torch.load(runs.resolve_run("straight").last, weights_only=True)
    continued = torch.load(runs.resolve_run("stopped").last, weights_only=True)
    assert continued["epoch"] == straight["epoch"] == 3
    for key, value in straight["model"].items():
        torch.testing.assert_close(continued["model"][key], value, msg=key, **RESUME_TOLERANCE[precision])


def test_export_fp16_verifies(image_folder: Callable[..., Path]) -> None:
    pytest.importorskip("onnxruntime")
    data = image_folder(per_class=6)
    trained = runner.invoke(
        app,
        [
            "train",
            "--data-dir",
            str(data),
            "--run",
            "gpu",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--device",
            "cuda",
            "--quiet",
        ],
    )
    assert trained.exit_code == 0, trained.output
    result = runner.invoke(app, ["export", "gpu", "--fp16", "--verify", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["max_abs_diff"] is not None and out["max_abs_diff"] <= out["tolerance"]


def test_finetune_defaults_peak_memory_under_4_gib() -> None:
    config = TrainConfig(**FINETUNE_DEFAULTS)
    precision = resolve_precision("auto", GPU)
    result = _train_rate(
        "resnet50",
        device=GPU,
        precision=precision,
        batch=config.batch_size,
        accum=config.accum,
        mode="eager",
        images=config.effective_batch * 2,
        warmup_images=config.effective_batch,
        model_kwargs={"image_size": config.image_size},
        config_overrides=FINETUNE_DEFAULTS,
    )
    assert result["peak_memory_bytes"] < 4 * GIB, result


def test_precision_auto_matches_this_gpu() -> None:
    major, minor = compute_capability(GPU)
    name, why = auto_precision(GPU)
    assert name == ("bf16" if major >= 8 else "fp16" if (major, minor) not in {(5, 0), (5, 2), (6, 1)} else "fp32")
    assert f"{major}.{minor}" in why
    info = runner.invoke(app, ["info", "--json"])
    assert info.exit_code == 0
    gpu = next(d for d in json.loads(info.stdout)["devices"] if d["type"] == "cuda")
    assert gpu["precision_auto"] == name


def test_batch_size_auto_keeps_the_effective_batch_on_a_small_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    model = get_model("resnet20").to(GPU).to(memory_format=torch.channels_last)
    precision = resolve_precision("auto", GPU)
    roomy = fit_micro_batch(model, device=GPU, precision=precision, effective_batch=512, cap=512)
    assert roomy.batch_size == 512 and roomy.accum == 1  # ResNet-20 at 512 needs well under a GiB
    # pretend only room for ~200 images is free: the micro-batch shrinks, accumulation makes up the rest
    per_image = roomy.bytes_per_image
    monkeypatch.setattr("cifarnet_cli.autobatch.free_memory_bytes", lambda _d: int(per_image * 200 / 0.8))
    tight = fit_micro_batch(model, device=GPU, precision=precision, effective_batch=512, cap=512)
    assert tight.batch_size * tight.accum == 512 and tight.batch_size < 512 and tight.accum > 1
