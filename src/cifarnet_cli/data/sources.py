"""Reading CIFAR-10 from local sources into one uint8 tensor per split.

Accepted (``--data-dir``):
  (a) the official python-format folder ``cifar-10-batches-py`` (or a folder that contains it);
  (b) the official ``cifar-10-python.tar.gz`` (read in place; nothing is extracted);
  (c) an image-folder root with ``train/<class>/*`` and optionally ``test/<class>/*``, or a folder of
      class folders (one split, usable for training or evaluation).
Image folders are decoded once and cached (data/cache.py), one entry per folder. Every source gets a
fingerprint of its content (labels and pixels), so the same data is recognised wherever it lies.
"""

from __future__ import annotations

import codecs
import hashlib
import importlib
import io
import os
import pickle
import tarfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cifarnet_cli import fileio
from cifarnet_cli.data import cache
from cifarnet_cli.data.classes import CIFAR10_CLASSES, classes_for_folders, match_classes
from cifarnet_cli.data.images import IMAGE_SIZE, ImageDecodeError, decode_workers, is_image_file, load_image
from cifarnet_cli.data.walk import ImageWalk, too_wide
from cifarnet_cli.errors import CifarNetError
from cifarnet_cli.fileio import display

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TARBALL = "cifar-10-python.tar.gz"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
_CACHE_VERSION = cache.CACHE_VERSION


@dataclass(frozen=True)
class ImageSet:
    """One split: ``images`` is uint8 N×32×32×3 (HWC, as CIFAR stores it), ``labels`` int64 N.

    numpy, not torch: reading data (and running an exported model on it) does not need torch; the
    training loader wraps the arrays without a copy."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    paths: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: np.ndarray) -> ImageSet:
        index = np.asarray(index, dtype=np.int64)
        sub_paths = tuple(self.paths[i] for i in index.tolist()) if self.paths is not None else None
        return ImageSet(self.images[index], self.labels[index], self.classes, sub_paths)


@dataclass(frozen=True)
class DataSource:
    kind: str  # "cifar-python" | "cifar-tarball" | "image-folder"
    location: Path
    classes: tuple[str, ...]
    splits: dict[str, ImageSet]
    fingerprint: str
    warnings: tuple[str, ...] = field(default=())

    def split(self, name: str) -> ImageSet:
        """``train`` / ``test``. A folder of class folders has one split ("images"): it is the training pool
        (``train``), never a test split."""
        if name in self.splits:
            return self.splits[name]
        if name == "train" and "images" in self.splits:
            return self.splits["images"]
        have = ", ".join(self.splits) or "none"
        raise CifarNetError(f"{display(self.location)} has no {name!r} split (it has: {have}).")

    def everything(self) -> ImageSet:
        """Every image of every split, in split order (train, then test)."""
        parts = [self.splits[name] for name in sorted(self.splits, key=lambda n: (n == "test", n))]
        if len(parts) == 1:
            return parts[0]
        with_paths = all(p.paths is not None for p in parts)
        return ImageSet(
            np.concatenate([p.images for p in parts]),
            np.concatenate([p.labels for p in parts]),
            self.classes,
            tuple(x for p in parts for x in (p.paths or ())) if with_paths else None,
        )

    @property
    def train(self) -> ImageSet:
        return self.split("train")

    @property
    def has_test(self) -> bool:
        return "test" in self.splits


# --------------------------------------------------------------------------------------------------
# Official python format


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batch files without running arbitrary code: only numpy array reconstruction
    is allowed (a pickle from an untrusted download could otherwise execute anything)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # protocol-2 pickles written by Python 3 store bytes through it
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")
        if name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module == "_codecs":
            return codecs.encode
        # Resolve through numpy itself so both numpy 1.x ("numpy.core") and 2.x ("numpy._core") work.
        return getattr(
            importlib.import_module(
                module.replace("numpy.core", "numpy._core", 1) if np.__version__ >= "2" else module
            ),
            name,
        )


def _unpickle(data: bytes, what: str) -> dict[str, Any]:
    try:
        raw = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - any failure means a corrupt or foreign file
        raise CifarNetError(f"{what} is not a CIFAR-10 batch file ({exc}); re-download the data set.") from exc
    if not isinstance(raw, dict):
        raise CifarNetError(f"{what} is not a CIFAR-10 batch file; re-download the data set.")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _batch_to_tensors(batch: dict[str, Any], what: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE)
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except (KeyError, ValueError) as exc:
        raise CifarNetError(f"{what} is not a CIFAR-10 batch file ({exc}); re-download the data set.") from exc
    if len(labels) != len(data) or (len(labels) and (labels.min() < 0 or labels.max() > 9)):
        raise CifarNetError(f"{what} has inconsistent labels; re-download the data set.")
    return data.transpose(0, 2, 3, 1), labels  # CHW planes → HWC


def _splits_from_batches(read: Callable[[str], bytes | None], where: str) -> dict[str, ImageSet]:
    splits: dict[str, ImageSet] = {}
    parts = []
    for name in TRAIN_BATCHES:
        data = read(name)
        if data is None:
            raise CifarNetError(f"{where} is missing {name}; re-download the data set (cifarnet download cifar10).")
        parts.append(_batch_to_tensors(_unpickle(data, f"{where}/{name}"), f"{where}/{name}"))
    splits["train"] = ImageSet(
        np.ascontiguousarray(np.concatenate([p[0] for p in parts])),
        np.concatenate([p[1] for p in parts]),
        CIFAR10_CLASSES,
    )
    test = read(TEST_BATCH)
    if test is not None:
        x, y = _batch_to_tensors(_unpickle(test, f"{where}/{TEST_BATCH}"), f"{where}/{TEST_BATCH}")
        splits["test"] = ImageSet(np.ascontiguousarray(x), y, CIFAR10_CLASSES)
    return splits


def load_cifar_folder(folder: Path) -> DataSource:
    def read(name: str) -> bytes | None:
        p = folder / name
        return p.read_bytes() if p.is_file() else None

    try:
        splits = _splits_from_batches(read, str(folder))
    except OSError as exc:
        raise fileio.os_error(exc, None, "read") from exc
    return DataSource("cifar-python", folder, CIFAR10_CLASSES, splits, content_fingerprint(CIFAR10_CLASSES, splits))


def load_cifar_tarball(archive: Path) -> DataSource:
    wanted = {f"{CIFAR_FOLDER}/{n}" for n in (*TRAIN_BATCHES, TEST_BATCH)}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                # Read regular files with exactly the expected names; nothing is written to disk.
                if member.name in wanted and member.isfile():
                    fh = tar.extractfile(member)
                    if fh is not None:
                        found[member.name.rsplit("/", 1)[1]] = fh.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise CifarNetError(
            f"{archive} is not a readable CIFAR-10 archive ({exc}); re-download it (cifarnet download cifar10)."
        ) from exc
    splits = _splits_from_batches(found.get, str(archive))
    return DataSource("cifar-tarball", archive, CIFAR10_CLASSES, splits, content_fingerprint(CIFAR10_CLASSES, splits))


# --------------------------------------------------------------------------------------------------
# Image folders


def _class_dirs(root: Path) -> list[Path]:
    try:
        return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise fileio.os_error(exc, root, "read") from exc


def _has_images(folder: Path) -> bool:
    return any(is_image_file(f) and not f.startswith(".") for _d, _s, files in os.walk(folder) for f in files)


def _is_split_layout(root: Path) -> bool:
    return any((root / s).is_dir() and _class_dirs(root / s) for s in ("train", "test"))


def _decode_many(files: Sequence[Path], progress: Callable[[int, int], None] | None) -> tuple[np.ndarray, list[str]]:
    """Decode files in a thread pool (PIL releases the GIL while decoding); return pixels and, per file,
    why it could not be used ("" when it decoded)."""
    out = np.zeros((len(files), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    why = [""] * len(files)

    def work(i: int) -> None:
        try:
            out[i] = load_image(files[i])
        except ImageDecodeError as exc:
            why[i] = str(exc)

    with ThreadPoolExecutor(max_workers=decode_workers()) as pool:
        for done, _ in enumerate(pool.map(work, range(len(files))), start=1):
            if progress is not None and (done % 2048 == 0 or done == len(files)):
                progress(done, len(files))
    return out, why


def content_fingerprint(classes: Sequence[str], splits: dict[str, ImageSet]) -> str:
    """Identifies the data by what it holds (class names, labels and pixels of each split), not by where it
    lies: a copy of a folder, or the archive and its extracted folder, are recognised as the same data."""
    h = hashlib.sha256(("cifarnet-data-v1\0" + "|".join(classes)).encode())
    for name in sorted(splits):
        part = splits[name]
        h.update(f"\0{name}\0{len(part)}\0".encode())
        h.update(np.ascontiguousarray(part.labels, dtype="<i8").data)
        h.update(np.ascontiguousarray(part.images, dtype=np.uint8).data)
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class _FolderScan:
    split_files: dict[str, list[tuple[Path, int]]]
    classes: tuple[str, ...]
    warnings: tuple[str, ...]
    key: str  # names, sizes and modification times: whether a cache entry is still current


def _scan_folder(root: Path, classes: Sequence[str] | None) -> _FolderScan:
    split_roots = (
        {s: root / s for s in ("train", "test") if (root / s).is_dir()} if _is_split_layout(root) else {"images": root}
    )
    class_dirs = {split: _class_dirs(sroot) for split, sroot in split_roots.items()}
    folder_names = sorted({d.name for dirs in class_dirs.values() for d in dirs})
    if not folder_names:
        raise CifarNetError(
            f"{display(root)} has no class folders; expected train/<class>/*.png (or <class>/*.jpg) inside it."
        )
    target = tuple(classes) if classes is not None else classes_for_folders(folder_names)
    mapping, unknown = match_classes(folder_names, target)
    warnings = []
    if unknown:
        warnings.append(
            f"Skipped folders that match no class ({', '.join(map(display, unknown))}); classes are: "
            f"{', '.join(target)}."
        )
    # Links inside a class folder never lead into the data set's own folders: each image keeps its class.
    walk = ImageWalk(reserved=[root, *split_roots.values(), *(d for dirs in class_dirs.values() for d in dirs)])
    h = hashlib.sha256(f"v{_CACHE_VERSION}\0{'|'.join(target)}\n".encode())
    split_files: dict[str, list[tuple[Path, int]]] = {}
    for split, dirs in class_dirs.items():
        items: list[tuple[Path, int]] = []
        for d in dirs:
            if d.name not in mapping:
                continue
            label = mapping[d.name]
            for f, st in walk.entries(d):
                h.update(os.fsencode(f"{split}\0{f.relative_to(root)}\0{label}\0"))
                h.update(f"{st.st_size}\0{st.st_mtime_ns}\n".encode())
                items.append((f, label))
        if items:
            split_files[split] = items
    warnings.extend(walk.warnings(root))
    if not split_files:
        raise CifarNetError(f"{display(root)} has no images in folders named after classes ({', '.join(target)}).")
    return _FolderScan(split_files, target, tuple(warnings), h.hexdigest())


def load_image_folder(
    root: Path,
    *,
    classes: Sequence[str] | None = None,
    use_cache: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> DataSource:
    wide = too_wide(root)
    if wide is not None:
        raise CifarNetError(f"Cannot read images from {display(root)}: {wide}.")
    scan = _scan_folder(root, classes)
    warnings = list(scan.warnings)
    entry_file = cache.entry_path(root, scan.classes)
    if use_cache:
        hit, damage = cache.read(entry_file, scan.key)
        if damage is not None:
            warnings.append(f"The decoded-image cache {display(entry_file)} is damaged ({damage}); rebuilding it.")
        if hit is not None and set(hit.splits) == set(scan.split_files):
            splits = {
                name: ImageSet(part.images, part.labels, scan.classes, part.paths) for name, part in hit.splits.items()
            }
            return DataSource("image-folder", root, scan.classes, splits, hit.fingerprint, (*warnings, *hit.warnings))
    splits = {}
    decode_warnings: list[str] = []
    for split, items in scan.split_files.items():
        files = [f for f, _ in items]
        images, why = _decode_many(files, progress)
        bad = [i for i, w in enumerate(why) if w]
        keep = np.asarray([i for i, w in enumerate(why) if not w], dtype=np.int64)
        if bad:
            shown = "; ".join(why[i] for i in bad[:3])
            where = "" if split == "images" else f" in {split}/"
            decode_warnings.append(
                f"Skipped {len(bad)} unreadable image(s){where}: {shown}{' ...' if len(bad) > 3 else ''}"
            )
        labels = np.asarray([items[i][1] for i in keep.tolist()], dtype=np.int64)
        splits[split] = ImageSet(images[keep], labels, scan.classes, tuple(str(files[i]) for i in keep.tolist()))
    fingerprint = content_fingerprint(scan.classes, splits)
    if use_cache:
        entry = cache.CacheEntry(
            scan.key,
            fingerprint,
            {n: cache.CachedSplit(s.images, s.labels, s.paths or ()) for n, s in splits.items()},
            tuple(decode_warnings),
        )
        try:
            cache.write(entry_file, entry)
        except CifarNetError as exc:
            warnings.append(f"Decoded images are not cached: {exc}")
    return DataSource("image-folder", root, scan.classes, splits, fingerprint, (*warnings, *decode_warnings))


# --------------------------------------------------------------------------------------------------


def missing_data_message(path: Path) -> str:
    return (
        f"No CIFAR-10 data at {path}. Get it with `cifarnet download cifar10 --data-dir {path}` (or copy "
        f"{CIFAR_TARBALL} there), or point --data-dir (or CIFARNET_DATA) at a {CIFAR_FOLDER} folder, the .tar.gz archive, "
        "or an image folder with train/<class>/*.png."
    )


def find_source(path: Path) -> tuple[str, Path] | None:
    """Identify what ``path`` holds without reading it all: (kind, location) or None."""
    try:
        return _find_source(path)
    except OSError as exc:  # a folder on the way that cannot be read (permissions, a failing disk)
        raise fileio.os_error(exc, path, "read") from exc


def _find_source(path: Path) -> tuple[str, Path] | None:
    if path.is_file():
        return ("cifar-tarball", path) if path.name.endswith((".tar.gz", ".tgz", ".tar")) else None
    if not path.is_dir():
        return None
    if (path / "data_batch_1").is_file():
        return "cifar-python", path
    if (path / CIFAR_FOLDER / "data_batch_1").is_file():
        return "cifar-python", path / CIFAR_FOLDER
    if (path / CIFAR_TARBALL).is_file():
        return "cifar-tarball", path / CIFAR_TARBALL
    if _is_split_layout(path) or any(_has_images(d) for d in _class_dirs(path)):
        return "image-folder", path
    return None


def load_source(
    path: Path,
    *,
    classes: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DataSource:
    """Load whatever CIFAR-10 source ``path`` holds, or fail with instructions."""
    path = path.expanduser()
    found = find_source(path)
    if found is None:
        if path.is_file():
            raise CifarNetError(
                f"{path} is not a CIFAR-10 archive; pass {CIFAR_TARBALL}, a {CIFAR_FOLDER} folder or an image folder."
            )
        raise CifarNetError(missing_data_message(path))
    kind, location = found
    if kind == "cifar-python":
        return load_cifar_folder(location)
    if kind == "cifar-tarball":
        return load_cifar_tarball(location)
    return load_image_folder(location, classes=classes, progress=progress)
