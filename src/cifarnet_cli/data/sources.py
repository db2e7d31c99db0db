"""Reading CIFAR-10 from local sources into one uint8 tensor per split.

Accepted (``--data-dir``):
  (a) the official python-format folder ``cifar-10-batches-py`` (or a folder that contains it);
  (b) the official ``cifar-10-python.tar.gz`` (read in place; nothing is extracted);
  (c) an image-folder root with ``train/<class>/*`` and optionally ``test/<class>/*``, or a folder of
      class folders (one split, usable for training or evaluation).
Image folders are decoded once and cached in the user cache dir, keyed by a fingerprint of the files'
names, sizes and modification times.
"""

from __future__ import annotations

import codecs
import hashlib
import importlib
import io
import os
import pickle
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cifarnet_cli import paths
from cifarnet_cli.data.classes import CIFAR10_CLASSES, classes_for_folders, match_classes
from cifarnet_cli.data.images import IMAGE_SIZE, ImageDecodeError, decode_workers, is_image_file, load_image
from cifarnet_cli.errors import CifarNetError

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TARBALL = "cifar-10-python.tar.gz"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
_CACHE_VERSION = 1  # bump when the decoding recipe in images.py changes


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
        """``train`` / ``test``; a single-split folder serves any name."""
        if name in self.splits:
            return self.splits[name]
        if "images" in self.splits:
            return self.splits["images"]
        have = ", ".join(self.splits) or "none"
        raise CifarNetError(f"{self.location} has no {name!r} split (it has: {have}).")

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


def _stat_fingerprint(files: Sequence[Path], extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def load_cifar_folder(folder: Path) -> DataSource:
    files = [folder / n for n in (*TRAIN_BATCHES, TEST_BATCH) if (folder / n).is_file()]

    def read(name: str) -> bytes | None:
        p = folder / name
        return p.read_bytes() if p.is_file() else None

    splits = _splits_from_batches(read, str(folder))
    return DataSource("cifar-python", folder, CIFAR10_CLASSES, splits, _stat_fingerprint(files))


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
    return DataSource("cifar-tarball", archive, CIFAR10_CLASSES, splits, _stat_fingerprint([archive]))


# --------------------------------------------------------------------------------------------------
# Image folders


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    out = [
        Path(dirpath) / f
        for dirpath, _dirs, files in os.walk(folder, followlinks=True)
        for f in files
        if is_image_file(f) and not f.startswith(".")
    ]
    return sorted(out)


def _has_images(folder: Path) -> bool:
    return any(is_image_file(f) and not f.startswith(".") for _d, _s, files in os.walk(folder) for f in files)


def _is_split_layout(root: Path) -> bool:
    return any((root / s).is_dir() and _class_dirs(root / s) for s in ("train", "test"))


def _decode_many(files: Sequence[Path], progress: Callable[[int, int], None] | None) -> tuple[np.ndarray, list[int]]:
    """Decode files in a thread pool (PIL releases the GIL while decoding); return pixels and the
    indices of files that could not be read."""
    out = np.zeros((len(files), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    bad: list[int] = []

    def work(i: int) -> None:
        try:
            out[i] = load_image(files[i])
        except ImageDecodeError:
            bad.append(i)

    with ThreadPoolExecutor(max_workers=decode_workers()) as pool:
        for done, _ in enumerate(pool.map(work, range(len(files))), start=1):
            if progress is not None and (done % 2048 == 0 or done == len(files)):
                progress(done, len(files))
    return out, sorted(bad)


@dataclass(frozen=True)
class _FolderScan:
    split_files: dict[str, list[tuple[Path, int]]]
    classes: tuple[str, ...]
    warnings: tuple[str, ...]
    fingerprint: str


def _scan_folder(root: Path, classes: Sequence[str] | None) -> _FolderScan:
    split_roots = (
        {s: root / s for s in ("train", "test") if (root / s).is_dir()} if _is_split_layout(root) else {"images": root}
    )
    folder_names = sorted({d.name for r in split_roots.values() for d in _class_dirs(r)})
    if not folder_names:
        raise CifarNetError(f"{root} has no class folders; expected train/<class>/*.png (or <class>/*.jpg) inside it.")
    target = tuple(classes) if classes is not None else classes_for_folders(folder_names)
    mapping, unknown = match_classes(folder_names, target)
    warnings = []
    if unknown:
        warnings.append(
            f"Skipped folders that match no class ({', '.join(unknown)}); classes are: {', '.join(target)}."
        )
    h = hashlib.sha256(f"v{_CACHE_VERSION}\0{root.resolve()}\0{'|'.join(target)}\n".encode())
    split_files: dict[str, list[tuple[Path, int]]] = {}
    for split, sroot in split_roots.items():
        items: list[tuple[Path, int]] = []
        for d in _class_dirs(sroot):
            if d.name not in mapping:
                continue
            for f in _image_files(d):
                st = f.stat()
                h.update(f"{split}\0{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
                items.append((f, mapping[d.name]))
        if items:
            split_files[split] = items
    if not split_files:
        raise CifarNetError(f"{root} has no images in folders named after classes ({', '.join(target)}).")
    return _FolderScan(split_files, target, tuple(warnings), h.hexdigest()[:16])


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_image_folder(
    root: Path,
    *,
    classes: Sequence[str] | None = None,
    use_cache: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> DataSource:
    scan = _scan_folder(root, classes)
    cache_file = paths.cache_dir() / "folders" / f"{scan.fingerprint}.npz"
    splits: dict[str, ImageSet] = {}
    warnings = list(scan.warnings)
    if use_cache and cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as z:
                for split in scan.split_files:
                    splits[split] = ImageSet(
                        z[f"{split}_images"],
                        z[f"{split}_labels"],
                        scan.classes,
                        tuple(str(p) for p in z[f"{split}_paths"]),
                    )
        except (OSError, KeyError, ValueError):
            splits = {}  # a damaged cache is rebuilt below
    if not splits:
        arrays: dict[str, np.ndarray] = {}
        for split, items in scan.split_files.items():
            files = [f for f, _ in items]
            images, bad = _decode_many(files, progress)
            keep = np.setdiff1d(np.arange(len(files)), np.asarray(bad, dtype=np.int64))
            if bad:
                shown = ", ".join(str(files[i]) for i in bad[:3])
                warnings.append(
                    f"Skipped {len(bad)} unreadable image(s) in {split}: {shown}{' ...' if len(bad) > 3 else ''}"
                )
            labels = np.asarray([items[i][1] for i in keep], dtype=np.int64)
            kept_paths = np.asarray([str(files[i]) for i in keep])
            arrays[f"{split}_images"] = images[keep]
            arrays[f"{split}_labels"] = labels
            arrays[f"{split}_paths"] = kept_paths
            splits[split] = ImageSet(
                arrays[f"{split}_images"],
                labels,
                scan.classes,
                tuple(kept_paths.tolist()),
            )
        if use_cache:
            try:
                _write_cache(cache_file, arrays)
            except OSError as exc:
                warnings.append(f"Could not cache decoded images in {cache_file.parent} ({exc}).")
    return DataSource("image-folder", root, scan.classes, splits, scan.fingerprint, tuple(warnings))


# --------------------------------------------------------------------------------------------------


def missing_data_message(path: Path) -> str:
    return (
        f"No CIFAR-10 data at {path}. Get it with `cifarnet download cifar10 --data-dir {path}` (or copy "
        f"{CIFAR_TARBALL} there), or point --data-dir (or CIFARNET_DATA) at a {CIFAR_FOLDER} folder, the .tar.gz archive, "
        "or an image folder with train/<class>/*.png."
    )


def find_source(path: Path) -> tuple[str, Path] | None:
    """Identify what ``path`` holds without reading it all: (kind, location) or None."""
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
