"""ResNet-20 training throughput: cifarnet's engine (device-resident data, whole-batch augmentation, mixed
precision and channels_last where they help) against the blog's loop (torchvision PIL transforms + DataLoader,
batch 16 with accumulation 8, fp32). Same model, same number of images. Prints one JSON object.

    python bench/train_throughput.py [--device auto] [--images 4096] [--batch-size 512]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment  # noqa: E402
from loader_throughput import _PilSet  # noqa: E402
from torchvision import transforms  # noqa: E402

from cifarnet_cli.config import TrainConfig  # noqa: E402
from cifarnet_cli.data.classes import CIFAR10_CLASSES  # noqa: E402
from cifarnet_cli.data.loader import DeviceLoader  # noqa: E402
from cifarnet_cli.data.sources import ImageSet  # noqa: E402
from cifarnet_cli.devices import resolve_device, resolve_precision, synchronize  # noqa: E402
from cifarnet_cli.engine import build_optimizer, train_one_epoch  # noqa: E402
from cifarnet_cli.models import get_model  # noqa: E402


def cifarnet_epoch(
    images: np.ndarray, labels: np.ndarray, device: torch.device, batch: int, accum: int, precision_spec: str
) -> float:
    precision = resolve_precision(precision_spec, device)
    cl = device.type == "cuda"
    model = get_model("resnet20").to(device)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    data = ImageSet(images, labels, CIFAR10_CLASSES)
    loader = DeviceLoader(data, batch_size=batch, device=device, train=True, channels_last=cl)
    opt = build_optimizer(model, TrainConfig(batch_size=batch, accum=accum))
    scaler = torch.amp.GradScaler(device.type) if precision.needs_grad_scaler else None
    kwargs = dict(batch_sizes=loader.batch_sizes(), accum=accum, scaler=scaler, device=device, precision=precision)
    train_one_epoch(model, loader, opt, **kwargs)  # warm-up (cuDNN autotuning, allocator)
    stats = train_one_epoch(model, loader, opt, **kwargs)
    return stats.images / stats.seconds


def blog_epoch(images: np.ndarray, labels: np.ndarray, device: torch.device, workers: int) -> float:
    model = get_model("resnet20").to(device)
    tf = transforms.Compose(
        [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor()]
    )
    dl = DataLoader(_PilSet(images, labels, tf), batch_size=16, shuffle=True, num_workers=workers)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    accum = 8
    model.train()
    synchronize(device)
    start = time.perf_counter()
    n = 0
    for i, (x, y) in enumerate(dl):
        x, y = x.to(device), y.to(device)
        (F.cross_entropy(model(x), y) / accum).backward()
        if (i + 1) % accum == 0:
            opt.step()
            opt.zero_grad()
        n += len(y)
    synchronize(device)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    device = resolve_device(args.device)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, args.images)
    ours = cifarnet_epoch(images, labels, device, args.batch_size, args.accum, args.precision)
    ours_blog_batch = cifarnet_epoch(images, labels, device, 16, 8, args.precision)
    blog = blog_epoch(images, labels, device, args.workers)
    print(
        json.dumps(
            {
                "benchmark": "train_throughput",
                **environment(device),
                "model": "resnet20",
                "images_timed": args.images,
                "precision": resolve_precision(args.precision, device).name,
                "cifarnet": {"batch_size": args.batch_size, "accum": args.accum, "images_per_second": round(ours)},
                "cifarnet_at_blog_batch": {"batch_size": 16, "accum": 8, "images_per_second": round(ours_blog_batch)},
                "blog_loop": {
                    "batch_size": 16,
                    "accum": 8,
                    "workers": args.workers,
                    "precision": "fp32",
                    "images_per_second": round(blog),
                },
                "speedup": round(ours / blog, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
