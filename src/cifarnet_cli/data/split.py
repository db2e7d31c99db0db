"""A seeded, stratified train/validation split that a run can reproduce later (``evaluate --split val``),
and the record of which images it trained on and held out, by identity, so that its validation images can
be found again in changed data (and training images are never counted as held out)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
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
    distinct), and of those its starting weights had already trained on (``inherited``: a run started with
    --init-from inherits its source's ``seen``). An image whose pixels also occur among the images its
    weights have seen is not counted as held out: the model has seen it."""

    trained: np.ndarray
    held_out: np.ndarray
    inherited: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def seen(self) -> np.ndarray:
        """Every image the weights have trained on: this run's and, through --init-from, its sources'."""
        return np.union1d(self.trained, self.inherited) if self.inherited.size else self.trained

    @classmethod
    def of(
        cls, train_images: np.ndarray, held_out_images: np.ndarray | None, inherited: np.ndarray | None = None
    ) -> SplitRecord:
        trained = np.unique(image_ids(train_images))
        held = np.unique(image_ids(held_out_images)) if held_out_images is not None else np.zeros(0, np.int64)
        return cls._made(trained, held, inherited)

    @classmethod
    def _made(cls, trained: np.ndarray, held: np.ndarray, inherited: np.ndarray | None) -> SplitRecord:
        # ``inherited`` is kept whole (not less this run's own): a resume draws the same split from it again.
        inherited = np.unique(inherited) if inherited is not None else np.zeros(0, np.int64)
        seen = np.union1d(trained, inherited)
        return cls(trained, np.setdiff1d(held, seen, assume_unique=True), inherited)

    def to_meta(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores (``meta[SPLIT_IDS]``): int64 tensors, 8 bytes per image, which
        ``torch.load(weights_only=True)`` reads back."""
        out = {"trained": torch.from_numpy(self.trained.copy()), "held_out": torch.from_numpy(self.held_out.copy())}
        if self.inherited.size:
            out["inherited"] = torch.from_numpy(self.inherited.copy())
        return out

    @classmethod
    def from_meta(cls, meta: Any) -> SplitRecord | None:
        """The record a checkpoint's ``meta`` holds; None for checkpoints written before runs recorded it (or
        with a damaged one or meta, which is then treated the same way)."""
        raw = meta.get(SPLIT_IDS) if isinstance(meta, dict) else None
        if not isinstance(raw, dict):
            return None
        parts = [raw.get("trained"), raw.get("held_out"), raw.get("inherited", torch.zeros(0, dtype=torch.int64))]
        if not all(isinstance(p, torch.Tensor) and p.ndim == 1 and p.dtype == torch.int64 for p in parts):
            return None
        trained, held, inherited = (np.unique(p.numpy()) for p in parts)
        return cls._made(trained, held, inherited)


def unseen_mask(images: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Which of ``images`` are not among the identities ``seen`` (True: new to the weights)."""
    return ~np.isin(image_ids(images), seen)


def seen_count(images: np.ndarray, seen: np.ndarray) -> int:
    """How many of ``images`` are among the identities ``seen`` (images the weights trained on)."""
    return int(np.isin(image_ids(images), seen).sum())


def split_unseen(labels_np: np.ndarray, unseen: np.ndarray, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`stratified_split` whose ``n_val`` held-out images are drawn from the ``unseen`` ones only (a
    boolean mask): images the starting weights trained on (--init-from) always train, so that validation
    measures images new to the model. The caller checks that ``n_val`` fits (at most ``unseen.sum()``)."""
    candidates = np.flatnonzero(unseen)
    if n_val > candidates.size:
        raise ValueError(f"{n_val} held-out images asked of {candidates.size} unseen ones")
    if n_val == candidates.size:
        val = candidates
    elif n_val == 0:
        val = np.zeros(0, dtype=np.int64)
    else:
        _, picked = stratified_split(np.asarray(labels_np)[candidates], n_val, seed)
        val = candidates[picked]
    n = len(labels_np)
    return np.setdiff1d(np.arange(n), val), np.sort(val)


@dataclass(frozen=True)
class Identified:
    """The images of some data, sorted by what a run did with them."""

    held_out: np.ndarray  # indices of the images the run held out (and never trained on)
    trained: np.ndarray  # indices of the images the run trained on
    new: int  # images it neither trained on nor held out
    held_out_missing: int  # held-out images of the run that are not in the data
    trained_missing: int  # training images of the run that are not in the data


def identify(ids: np.ndarray, record: SplitRecord) -> Identified:
    """Which of the images with identities ``ids`` a run's weights trained on (``seen``: also through
    --init-from), held out, or never saw."""
    seen = record.seen
    trained = np.isin(ids, seen)
    held = np.isin(ids, record.held_out) & ~trained
    return Identified(
        held_out=np.flatnonzero(held),
        trained=np.flatnonzero(trained),
        new=int((~trained & ~held).sum()),
        held_out_missing=int((~np.isin(record.held_out, ids)).sum()),
        trained_missing=int((~np.isin(seen, ids)).sum()),
    )
