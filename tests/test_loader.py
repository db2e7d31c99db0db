from __future__ import annotations

import numpy as np
import torch

from cifarnet_cli.data.classes import CIFAR10_CLASSES
from cifarnet_cli.data.loader import DeviceLoader
from cifarnet_cli.data.sources import ImageSet

CPU = torch.device("cpu")


def _dataset(n: int = 64) -> ImageSet:
    images = torch.randint(1, 256, (n, 32, 32, 3), dtype=torch.uint8).numpy()  # no zeros: padding is detectable
    return ImageSet(images, np.arange(n) % 10, CIFAR10_CLASSES)


def test_eval_loader_returns_images_unchanged_in_order() -> None:
    data = _dataset(50)
    loader = DeviceLoader(data, batch_size=16, device=CPU, train=False)
    xs, ys = zip(*loader, strict=True)
    assert [len(y) for y in ys] == [16, 16, 16, 2] == loader.batch_sizes() and len(loader) == 4
    x = torch.cat(xs)
    assert x.dtype == torch.float32 and x.shape == (50, 3, 32, 32)
    assert torch.equal((x * 255).round().to(torch.uint8), torch.from_numpy(data.images).permute(0, 3, 1, 2))
    assert torch.equal(torch.cat(ys), torch.from_numpy(data.labels))


def test_train_loader_visits_every_image_once_per_epoch() -> None:
    data = _dataset(50)
    loader = DeviceLoader(data, batch_size=16, device=CPU, train=True, seed=1)
    labels = torch.cat([y for _x, y in loader])
    assert sorted(labels.tolist()) == sorted(data.labels.tolist())


def test_crop_and_flip_statistics() -> None:
    data = _dataset(8000)  # ~100 images keep both offsets at 4 (1/81): enough to tell flips apart
    loader = DeviceLoader(data, batch_size=2000, device=CPU, train=True, seed=0)
    x = torch.cat([b for b, _y in loader])
    zero_rows = (x.sum(dim=(1, 3)) == 0).sum(1)  # padded rows per image
    zero_cols = (x.sum(dim=(1, 2)) == 0).sum(1)
    # shifts are uniform in [-4, 4]: 1/9 of images keep all rows, the padding never exceeds 4 pixels
    assert zero_rows.max() <= 4 and zero_cols.max() <= 4
    assert 0.07 < (zero_rows == 0).float().mean() < 0.16
    assert 0.3 < (zero_rows > 0).float().mean() * (zero_cols > 0).float().mean() < 0.9
    # flips: compare an un-shifted image with its source
    order = torch.randperm(8000, generator=torch.Generator().manual_seed(0 * 100_003 + 0))
    src = torch.from_numpy(data.images)[order].permute(0, 3, 1, 2).float() / 255
    unshifted = (zero_rows == 0) & (zero_cols == 0)
    same = (x[unshifted] == src[unshifted]).flatten(1).all(1)
    flipped = (x[unshifted] == src[unshifted].flip(3)).flatten(1).all(1)
    assert bool((same | flipped).all())
    assert 0.3 < same.float().mean() < 0.7


def test_same_seed_and_epoch_give_the_same_batches() -> None:
    data = _dataset(64)
    a = DeviceLoader(data, batch_size=32, device=CPU, train=True, seed=5)
    b = DeviceLoader(data, batch_size=32, device=CPU, train=True, seed=5)
    a.set_epoch(3)
    b.set_epoch(3)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    b.set_epoch(4)
    assert not torch.equal(next(iter(a))[0], next(iter(b))[0])


def test_channels_last_output() -> None:
    loader = DeviceLoader(_dataset(8), batch_size=8, device=CPU, train=True, channels_last=True)
    x, _ = next(iter(loader))
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_a_last_training_batch_of_one_image_joins_the_one_before() -> None:
    # 33 images in batches of 16: 16 + 17 for training (BatchNorm cannot train on one image), 16 + 16 + 1 to evaluate
    train = DeviceLoader(_dataset(33), batch_size=16, device=CPU, train=True)
    assert train.batch_sizes() == [16, 17] == [len(y) for _x, y in train] and len(train) == 2
    assert sorted(torch.cat([y for _x, y in train]).tolist()) == sorted((np.arange(33) % 10).tolist())
    evaluation = DeviceLoader(_dataset(33), batch_size=16, device=CPU, train=False)
    assert evaluation.batch_sizes() == [16, 16, 1] == [len(y) for _x, y in evaluation]
    assert DeviceLoader(_dataset(34), batch_size=16, device=CPU, train=True).batch_sizes() == [16, 16, 2]
