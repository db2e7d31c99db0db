"""A seeded, stratified train/validation split that a run can reproduce later (``evaluate --split val``),
and the record of which images it trained on and held out, by identity, so that its validation images can
be found again in changed data (and training images are never counted as held out)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cifarnet_cli.errors import UsageError


def stratified_split(labels_np: np.ndarray, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (train_index, val_index). Each class gives its share of ``n_val`` images (largest
    remainder rounding), chosen by a permutation seeded with ``seed``; both index lists are sorted."""
    labels = torch.from_numpy(np.asarray(labels_np, dtype=np.int64))
    n = int(labels.numel())
    if n_val < 0:
        raise UsageError("--val-split must be 0 or more.")
    if n_val >= n:
        raise UsageError(f"--val-split {n_val} leaves no training images (the data has {n}); use fewer.")
    if n_val == 0:
        return np.arange(n), np.zeros(0, dtype=np.int64)
    gen = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * n_val / n
    take = exact.floor().long()
    remainder = n_val - int(take.sum())
    if remainder:
        order = torch.argsort(exact - take.double(), descending=True, stable=True)
        take[order[:remainder]] += 1
    val_parts = []
    for cls, k in zip(classes.tolist(), take.tolist(), strict=True):
        idx = torch.nonzero(labels == cls).flatten()
        val_parts.append(idx[torch.randperm(idx.numel(), generator=gen)[:k]])
    val = torch.sort(torch.cat(val_parts)).values
    mask = torch.ones(n, dtype=torch.bool)
    mask[val] = False
    return torch.nonzero(mask).flatten().numpy(), val.numpy()


# --------------------------------------------------------------------------------------------------
# Which images a run trained on and held out, by identity


#: The key of a checkpoint's ``meta`` that holds a run's :class:`SplitRecord`.
SPLIT_IDS = "split_ids"


def image_ids(images: np.ndarray) -> np.ndarray:
    """One 64-bit identity per image: blake2b of its decoded 32×32×3 pixels (not its label, not its file).

    Pixels are what the model saw: a file that is renamed, moved, re-saved losslessly or filed under
    another class is still the same image to it, and CIFAR's batch files have no file names at all. Two
    of 50,000 distinct images share an identity with probability about 1e-10 (64 bits). 50,000 images
    take about half a second on one CPU core."""
    pixels = np.ascontiguousarray(images, dtype=np.uint8)
    digests = b"".join(hashlib.blake2b(memoryview(image), digest_size=8).digest() for image in pixels)
    return np.frombuffer(digests, dtype="<i8").astype(np.int64)


@dataclass(frozen=True)
class SplitRecord:
    """The identities of the images a run trained on and of those it held out for validation (sorted,
    distinct). An image whose pixels also occur among the training images is not counted as held out:
    the model has seen it."""

    trained: np.ndarray
    held_out: np.ndarray

    @classmethod
    def of(cls, train_images: np.ndarray, held_out_images: np.ndarray | None) -> SplitRecord:
        trained = np.unique(image_ids(train_images))
        held = np.unique(image_ids(held_out_images)) if held_out_images is not None else np.zeros(0, np.int64)
        return cls(trained, np.setdiff1d(held, trained, assume_unique=True))

    def to_meta(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores (``meta[SPLIT_IDS]``): two int64 tensors, 8 bytes per image, which
        ``torch.load(weights_only=True)`` reads back."""
        return {"trained": torch.from_numpy(self.trained.copy()), "held_out": torch.from_numpy(self.held_out.copy())}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> SplitRecord | None:
        """The record a checkpoint holds; None for checkpoints written before runs recorded it (or with
        a damaged one, which is then treated the same way)."""
        raw = meta.get(SPLIT_IDS)
        if not isinstance(raw, dict):
            return None
        parts = [raw.get("trained"), raw.get("held_out")]
        if not all(isinstance(p, torch.Tensor) and p.ndim == 1 and p.dtype == torch.int64 for p in parts):
            return None
        trained, held = (np.unique(p.numpy()) for p in parts)  # type: ignore[union-attr]
        return cls(trained, np.setdiff1d(held, trained, assume_unique=True))


@dataclass(frozen=True)
class Identified:
    """The images of some data, sorted by what a run did with them."""

    held_out: np.ndarray  # indices of the images the run held out (and never trained on)
    trained: np.ndarray  # indices of the images the run trained on
    new: int  # images it neither trained on nor held out
    held_out_missing: int  # held-out images of the run that are not in the data
    trained_missing: int  # training images of the run that are not in the data


def identify(ids: np.ndarray, record: SplitRecord) -> Identified:
    """Which of the images with identities ``ids`` a run trained on, held out, or never saw."""
    trained = np.isin(ids, record.trained)
    held = np.isin(ids, record.held_out) & ~trained
    return Identified(
        held_out=np.flatnonzero(held),
        trained=np.flatnonzero(trained),
        new=int((~trained & ~held).sum()),
        held_out_missing=int((~np.isin(record.held_out, ids)).sum()),
        trained_missing=int((~np.isin(record.trained, ids)).sum()),
    )
