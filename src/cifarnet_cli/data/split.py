"""A seeded, stratified train/validation split that a run can reproduce later (``evaluate --split val``)."""

from __future__ import annotations

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
