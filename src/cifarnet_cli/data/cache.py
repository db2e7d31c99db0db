"""The decoded-image cache: an image folder is decoded once, and later runs read its pixels back in a second.

One entry per folder (and class list), ``<cache dir>/decoded/<key>.npz``, replaced atomically when the
folder changes, so the cache holds one copy per folder instead of one per change. An entry records the
scan key it was built for (the files' relative names, sizes and modification times: cheap to recompute,
so a stale entry is recognised without reading its pixels), the data's content fingerprint, the warnings
of its decoding (unreadable files are named again on every run), and a SHA-256 of everything it holds.
The digest is checked on every read (0.1 s for CIFAR-10's 150 MB of pixels, measured): a truncated,
bit-flipped or empty file (what a crash or a full disk leaves) is reported in one line and rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cifarnet_cli import fileio, paths

CACHE_VERSION = 2  # bump when the decoding recipe in images.py or this format changes
FOLDER = "decoded"
LEGACY_FOLDERS = ("folders",)  # version 1: one file per change of the folder, never evicted
#: Entries kept; the least recently used go first. One entry of CIFAR-10's 50,000 images is 150 MB.
MAX_ENTRIES = 16


@dataclass(frozen=True)
class CachedSplit:
    images: np.ndarray  # uint8 N×32×32×3
    labels: np.ndarray  # int64 N
    paths: tuple[str, ...]


@dataclass(frozen=True)
class CacheEntry:
    scan_key: str
    fingerprint: str
    splits: dict[str, CachedSplit]
    warnings: tuple[str, ...]


def folder() -> Path:
    return paths.cache_dir() / FOLDER


def entry_path(root: Path, classes: Sequence[str]) -> Path:
    """The one cache file of ``root`` read with ``classes`` (by absolute, resolved location)."""
    h = hashlib.sha256(f"v{CACHE_VERSION}\0{'|'.join(classes)}\0".encode())
    h.update(os.fsencode(root.resolve()))
    return folder() / f"{h.hexdigest()[:20]}.npz"


def _digest(meta: dict[str, object], arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"\0{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.data)  # the array's buffer, no copy
    return h.hexdigest()


def _arrays(entry: CacheEntry) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, split in entry.splits.items():
        out[f"{name}_images"] = split.images
        out[f"{name}_labels"] = split.labels
        # bytes, not str: any name the file system allows, including ones that are not valid UTF-8
        encoded = [os.fsencode(p) for p in split.paths]
        out[f"{name}_paths"] = np.asarray(encoded, dtype=f"S{max((len(b) for b in encoded), default=1)}")
    return out


def read(path: Path, scan_key: str) -> tuple[CacheEntry | None, str | None]:
    """``(entry, None)`` on a hit, ``(None, None)`` when there is no entry for this state of the folder,
    ``(None, reason)`` when the file is damaged (the caller rebuilds it)."""
    try:
        if not path.is_file():
            return None, None
    except OSError as exc:
        return None, fileio.problem(exc, path)
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            if meta.get("version") != CACHE_VERSION or meta.get("scan_key") != scan_key:
                return None, None  # the folder changed since: rebuilt quietly
            arrays = {name: z[name] for name in z.files if name != "meta"}
        stored = meta.pop("digest")
        if _digest(meta, arrays) != stored:
            return None, "its SHA-256 does not match"
        splits = {
            name: CachedSplit(
                arrays[f"{name}_images"],
                arrays[f"{name}_labels"],
                tuple(os.fsdecode(bytes(p)) for p in arrays[f"{name}_paths"]),
            )
            for name in meta["splits"]
        }
        entry = CacheEntry(scan_key, str(meta["fingerprint"]), splits, tuple(meta["warnings"]))
    except Exception as exc:  # noqa: BLE001 - anything a damaged file raises (BadZipFile, EOFError, bad CRC ...)
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
        return None, f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    with contextlib.suppress(OSError):
        os.utime(path)  # most recently used: evicted last
    return entry, None


def write(path: Path, entry: CacheEntry) -> None:
    """Store ``entry`` atomically; raises CifarNetError (naming the file and the problem) on failure."""
    arrays = _arrays(entry)
    meta: dict[str, object] = {
        "version": CACHE_VERSION,
        "scan_key": entry.scan_key,
        "fingerprint": entry.fingerprint,
        "splits": list(entry.splits),
        "warnings": list(entry.warnings),
    }
    meta["digest"] = _digest(meta, arrays)
    blob = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with fileio.atomic_writer(path) as fh:
        np.savez(fh, meta=blob, **arrays)  # type: ignore[arg-type]
    _tidy(path.parent)


def _tidy(where: Path) -> None:
    """Drop what the cache no longer needs: leftovers of killed writers, version-1 entries, and the least
    recently used entries beyond MAX_ENTRIES."""
    fileio.remove_partials(where)
    for legacy in LEGACY_FOLDERS:
        shutil.rmtree(where.parent / legacy, ignore_errors=True)
    try:
        entries = sorted(where.glob("*.npz"), key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return
    for old in entries[MAX_ENTRIES:]:
        with contextlib.suppress(OSError):
            old.unlink()
