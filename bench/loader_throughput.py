"""Input pipeline only: cifarnet's device loader against torchvision's PIL-transform DataLoader.

Same augmentation (pad-4 random crop, horizontal flip, scaling to [0, 1]; torchvision also normalizes) on the
same 50,000 uint8 images, iterating only. Prints one JSON object.

    python bench/loader_throughput.py [--device cpu] [--batch-size 128] [--workers 0 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment  # noqa: E402

from cifarnet_cli.data.classes import CIFAR10_CLASSES  # noqa: E402
from cifarnet_cli.data.loader import DeviceLoader  # noqa: E402
from cifarnet_cli.data.sources import ImageSet  # noqa: E402
from cifarnet_cli.devices import resolve_device, synchronize  # noqa: E402


class _PilSet(Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: transforms.Compose) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 2])
    args = parser.parse_args()
    device = resolve_device(args.device)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, args.images)

    data = ImageSet(images, labels, CIFAR10_CLASSES)
    loader = DeviceLoader(
        data, batch_size=args.batch_size, device=device, train=True, channels_last=device.type == "cuda"
    )
    for _ in loader:  # warm-up epoch
        pass
    synchronize(device)
    start = time.perf_counter()
    n = sum(len(y) for _x, y in loader)
    synchronize(device)
    ours = n / (time.perf_counter() - start)

    tf = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        ]
    )
    baseline = {}
    for workers in args.workers:
        dl = DataLoader(
            _PilSet(images, labels, tf),
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=workers,
            pin_memory=device.type == "cuda",
        )
        start = time.perf_counter()
        n = 0
        for x, _y in dl:
            x = x.to(device, non_blocking=True)
            n += len(x)
        synchronize(device)
        baseline[f"workers_{workers}"] = n / (time.perf_counter() - start)
    best = max(baseline.values())
    print(
        json.dumps(
            {
                "benchmark": "loader_throughput",
                **environment(device),
                "batch_size": args.batch_size,
                "images": args.images,
                "cifarnet_images_per_second": round(ours),
                "torchvision_dataloader_images_per_second": {k: round(v) for k, v in baseline.items()},
                "speedup_vs_best_dataloader": round(ours / best, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
