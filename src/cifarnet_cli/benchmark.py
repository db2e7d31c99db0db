"""`cifarnet bench`: what this machine does, measured through cifarnet's own code paths on synthetic data.

- ResNet-20 training images/s at the default recipe (effective batch 512) for the micro-batches a user would
  pick (64, 128, 512 with accumulation 8, 4, 1), in each precision the device computes natively, eager and
  captured as CUDA graphs side by side: the real device-resident loader with its crop and flip, the real
  engine (train_one_epoch), timed after a warm-up (cuDNN autotuning, capture) with the device synchronised.
- On a GPU, one full 50,000-image epoch of the default recipe (what `cifarnet train` does per epoch).
- predict: latency at batch 1 and throughput at batch 256 of a model loaded from a checkpoint.
- finetune-resnet50 at its defaults (160 px, 64 × 2): images/s and peak memory.
No data set is needed: images are random uint8 in CIFAR's shape, which costs the same as real ones.
"""

from __future__ import annotations

import platform
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifarnet_cli import __version__, checkpoint
from cifarnet_cli.config import FINETUNE_DEFAULTS, TrainConfig
from cifarnet_cli.data.classes import CIFAR10_CLASSES
from cifarnet_cli.data.loader import DeviceLoader
from cifarnet_cli.data.sources import ImageSet
from cifarnet_cli.devices import (
    Precision,
    auto_precision,
    autocast,
    compute_capability,
    describe,
    resolve_device,
    resolve_precision,
    synchronize,
)
from cifarnet_cli.engine import build_optimizer, build_scheduler, steps_per_epoch, train_one_epoch
from cifarnet_cli.events import BenchProgress, EventCallback, Notice, ignore
from cifarnet_cli.inference import load_model
from cifarnet_cli.models import get_model
from cifarnet_cli.train_step import TrainStep, choose_mode

RECIPE = TrainConfig()  # the default recipe: effective batch 512
MICRO_BATCHES = (64, 128, 512)
PREDICT_BATCH = 256  # the throughput figure's batch (images_per_second_batch256)
FULL_EPOCH = 50_000


@dataclass(frozen=True)
class BenchSizes:
    train_images: int  # images timed per training configuration
    warmup_windows: int  # optimizer steps before timing (cuDNN autotuning and capture happen there)
    finetune_windows: int  # optimizer steps timed for ResNet-50
    predict_calls: int
    full_epoch: bool

    @staticmethod
    def for_device(device: torch.device, quick: bool) -> BenchSizes:
        if device.type == "cuda":
            return BenchSizes(10_240 if quick else 25_600, 2, 3 if quick else 10, 50 if quick else 200, not quick)
        # ~400 images/s for ResNet-20 and ~8 for ResNet-50 at 160 px on two CPU cores: --quick stays near a minute
        return BenchSizes(1024 if quick else 4096, 1, 1, 10 if quick else 50, False)


def precisions_to_measure(device: torch.device, quick: bool) -> list[Precision]:
    """The precisions the device computes natively: the one --precision auto picks first, then fp32."""
    chosen = resolve_precision("auto", device)
    names = [chosen.name]
    if device.type == "cuda":
        major, _minor = compute_capability(device)
        if major >= 7 and "fp16" not in names:
            names.append("fp16")  # tensor cores run fp16 too
    elif device.type == "cpu" and not quick:
        names.append("bf16")
    if "fp32" not in names:
        names.append("fp32")
    if quick:
        names = names[:1] if device.type != "cuda" else names[:2]
    return [resolve_precision(n, device) for n in names]


def _synthetic(n: int, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return ImageSet(images, rng.integers(0, 10, n).astype(np.int64), CIFAR10_CLASSES)


def _train_rate(
    arch: str,
    *,
    device: torch.device,
    precision: Precision,
    batch: int,
    accum: int,
    mode: str,
    images: int,
    warmup_images: int,
    model_kwargs: dict[str, Any] | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """images/s of train_one_epoch over ``images`` synthetic images, after a warm-up pass."""
    torch.manual_seed(0)
    channels_last = device.type == "cuda"
    model = get_model(arch, **(model_kwargs or {})).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    config = TrainConfig(**{**(config_overrides or {}), "batch_size": batch, "accum": accum})
    optimizer = build_optimizer(model, config)
    scaler = torch.amp.GradScaler(device.type) if precision.needs_grad_scaler else None
    step = TrainStep(
        model, optimizer, device=device, precision=precision, label_smoothing=0.1, scaler=scaler, mode=mode
    )
    data = _synthetic(images)

    def epoch(n: int) -> Any:
        loader = DeviceLoader(
            ImageSet(data.images[:n], data.labels[:n], data.classes),
            batch_size=batch,
            device=device,
            train=True,
            channels_last=channels_last,
        )
        sizes = loader.batch_sizes()
        scheduler = build_scheduler(optimizer, config, steps_per_epoch(len(sizes), accum))
        return train_one_epoch(
            model,
            loader,
            optimizer,
            batch_sizes=sizes,
            accum=accum,
            scheduler=scheduler,
            scaler=scaler,
            device=device,
            precision=precision,
            label_smoothing=0.1,
            step=step,
        )

    epoch(warmup_images)
    if device.type == "cuda":
        # After the warm-up: cuDNN's autotuning tries algorithms with workspaces far larger than the one it
        # keeps, and max_memory_allocated would report those, not what training holds.
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    stats = epoch(images)
    result: dict[str, Any] = {
        "arch": arch,
        "precision": precision.name,
        "batch_size": batch,
        "accum": accum,
        "capture": step.mode == "graph",
        "images": stats.images,
        "seconds": round(stats.seconds, 4),
        "images_per_second": round(stats.images / stats.seconds, 1),
    }
    if device.type == "cuda":
        result["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return result


def _predict_rates(device: torch.device, calls: int) -> dict[str, Any]:
    """Latency (batch 1) and throughput (batch 256) of ResNet-20 loaded from a checkpoint, as predict runs it:
    uint8 pixels copied to the device, scaled, forward in inference mode, softmax back on the host."""
    model = get_model("resnet20")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.pt"
        meta = {"arch": "resnet20", "model_kwargs": {"num_classes": 10}, "classes": list(CIFAR10_CLASSES)}
        checkpoint.save_atomic(
            {"model": model.state_dict(), "config": TrainConfig().to_dict(), "meta": meta, "epoch": 1}, path
        )
        loaded = load_model(str(path), device)
    precision = resolve_precision("auto", device)
    net = loaded.model.eval()
    rng = np.random.default_rng(0)

    def run(pixels: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).float().div_(255.0)
        with torch.inference_mode(), autocast(device, precision):
            return torch.softmax(net(x).float(), dim=1).cpu().numpy()

    out: dict[str, Any] = {"arch": "resnet20", "precision": precision.name}
    for batch, n in ((1, calls), (PREDICT_BATCH, max(5, calls // 10))):
        pixels = rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
        for _ in range(max(3, n // 10)):
            run(pixels)
        times = []
        for _ in range(n):
            start = time.perf_counter()
            run(pixels)  # .cpu() waits for the device
            times.append(time.perf_counter() - start)
        median = float(np.median(times))
        if batch == 1:
            out["latency_ms_batch1"] = round(1000 * median, 3)
        else:
            out["images_per_second_batch256"] = round(batch / median, 1)
    return out


def run_bench(device_spec: str = "auto", *, quick: bool = False, on_event: EventCallback = ignore) -> dict[str, Any]:
    started = time.perf_counter()
    device = resolve_device(device_spec)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    sizes = BenchSizes.for_device(device, quick)
    precisions = precisions_to_measure(device, quick)
    modes = ["eager", "graph"] if device.type == "cuda" else ["eager"]
    plan: list[tuple[str, dict[str, Any]]] = []
    for precision in precisions:
        for batch in MICRO_BATCHES:
            for mode in modes:
                if mode == "graph" and precision.needs_grad_scaler:
                    continue
                plan.append(
                    (
                        f"ResNet-20 {precision.name} batch {batch} × {RECIPE.effective_batch // batch} {mode}",
                        {
                            "precision": precision,
                            "batch": batch,
                            "accum": RECIPE.effective_batch // batch,
                            "mode": mode,
                        },
                    )
                )
    total = len(plan) + 2 + (1 if sizes.full_epoch else 0)
    index = 0

    def progress(what: str) -> None:
        nonlocal index
        index += 1
        on_event(BenchProgress(what, index, total))

    train = []
    for what, spec in plan:
        progress(what)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the previous configuration's graphs and buffers are gone
        train.append(
            _train_rate(
                "resnet20",
                device=device,
                images=sizes.train_images,
                warmup_images=RECIPE.effective_batch * sizes.warmup_windows,
                **spec,
            )
        )
    speedups = {}
    for precision in precisions:
        for batch in MICRO_BATCHES:
            rows = {r["capture"]: r for r in train if r["precision"] == precision.name and r["batch_size"] == batch}
            if True in rows and False in rows:
                speedups[f"{precision.name} batch {batch}"] = round(
                    rows[True]["images_per_second"] / rows[False]["images_per_second"], 2
                )
    full_epoch = None
    default_precision = resolve_precision("auto", device)
    default_mode = choose_mode("auto", device=device, precision=default_precision, notice=lambda _m: None)
    if sizes.full_epoch:
        progress(f"ResNet-20 default recipe, one {FULL_EPOCH:,}-image epoch")
        full_epoch = _train_rate(
            "resnet20",
            device=device,
            precision=default_precision,
            batch=RECIPE.batch_size,
            accum=RECIPE.accum,
            mode=default_mode,
            images=FULL_EPOCH,
            warmup_images=RECIPE.effective_batch * sizes.warmup_windows,
        )
    progress("predict latency and throughput")
    predict = _predict_rates(device, sizes.predict_calls)
    finetune_config = TrainConfig(**FINETUNE_DEFAULTS)
    progress(
        f"ResNet-50 fine-tuning at {finetune_config.image_size} px, {finetune_config.batch_size} × {finetune_config.accum}"
    )
    if device.type == "cpu":
        on_event(Notice("ResNet-50 at 160 px trains at a few images per second on a CPU: this part takes a while."))
    finetune = _train_rate(
        "resnet50",
        device=device,
        precision=default_precision,  # the same "auto" choice on the same device as the ResNet-20 recipe's
        batch=finetune_config.batch_size,
        accum=finetune_config.accum,
        mode=default_mode,
        images=finetune_config.effective_batch * sizes.finetune_windows,
        warmup_images=finetune_config.batch_size * (1 if device.type == "cpu" else finetune_config.accum * 2),
        model_kwargs={"image_size": finetune_config.image_size},
        config_overrides=FINETUNE_DEFAULTS,
    )
    if device.type != "cuda":
        # No allocator statistics off CUDA: the process's peak resident memory (Linux reports KiB).
        finetune["process_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    synchronize(device)
    env: dict[str, Any] = {
        "device": describe(device),
        "cifarnet": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "precision_auto": auto_precision(device)[0],
    }
    if device.type == "cuda":
        major, minor = compute_capability(device)
        env["gpu"] = torch.cuda.get_device_name(device)
        env["compute_capability"] = f"{major}.{minor}"
    return {
        "benchmark": "cifarnet bench",
        "quick": quick,
        "environment": env,
        "recipe": {"effective_batch": RECIPE.effective_batch, "augmentation": "pad-4 crop + flip on the device"},
        "train": train,
        "capture_speedup": speedups,
        "full_epoch": full_epoch,
        "predict": predict,
        "finetune": finetune,
        "seconds": round(time.perf_counter() - started, 1),
    }
