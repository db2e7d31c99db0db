"""`cifarnet predict`: classify image files in batches with a trained model.

Files go through the same decoding as training and evaluation (:func:`cifarnet_cli.data.images.load_image`:
EXIF orientation, any mode to RGB, shorter side to 32 and a center crop), then through the model: a
checkpoint (with torch) or an exported ONNX file or TensorRT engine (:mod:`cifarnet_cli.runtime`, without
torch). A file that cannot be read is reported in its place and never stops the others.

This module does not import torch: an exported model answers without it.
"""

from __future__ import annotations

import csv
import glob
import io
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cifarnet_cli import fileio
from cifarnet_cli.data.images import ImageDecodeError, decode_workers, load_image
from cifarnet_cli.data.walk import ImageWalk, too_wide
from cifarnet_cli.errors import UsageError
from cifarnet_cli.runtime import ImageClassifier, is_exported, open_exported, softmax

NOT_A_NUMBER = "the model's output is not a number (NaN or infinite) for this image"


@dataclass(frozen=True)
class Prediction:
    path: str
    top: list[tuple[str, float]] | None = None
    error: str | None = None

    def to_json(self) -> dict[str, object]:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        assert self.top is not None
        return {"path": self.path, "top": [{"class": c, "probability": p} for c, p in self.top]}


@dataclass(frozen=True)
class PredictResult:
    predictions: list[Prediction]  # in the order the inputs were given
    model: str  # the checkpoint or exported file that answered
    arch: str
    runtime: str
    notice: str | None = None  # e.g. the checkpoint never completed an epoch

    @property
    def failed(self) -> int:
        return sum(p.error is not None for p in self.predictions)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "arch": self.arch,
            "runtime": self.runtime,
            "predictions": [p.to_json() for p in self.predictions],
        }


def collect_inputs(inputs: Sequence[str]) -> list[Path | Prediction]:
    """Expand files, folders (recursively, image extensions only) and globs, in the order given, with the
    training walk's rules (:class:`~cifarnet_cli.data.walk.ImageWalk`): each real file once, however many
    names or links lead to it; symbolic-link loops ended; FIFOs, sockets and devices never opened. An input
    that names nothing, a file that is not a regular file and a folder that cannot be read become an error
    in their place."""
    walk = ImageWalk()
    items: list[Path | Prediction] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir() and (why := too_wide(path)) is not None:
            items.append(Prediction(item, error=why))
        elif path.is_dir():
            if not walk.visited(path):  # a folder named twice (or inside one named before) adds nothing
                items.extend(_folder_items(walk, path, item))
        elif os.path.lexists(path):
            items.extend(_file_items(walk, [path]))
        elif glob.has_magic(item):
            before = _mark(walk)
            matches = walk.glob(item)
            found = _problems(walk, before) + _file_items(walk, matches, skip_folders=True)
            if not found and all(m.is_dir() for m in matches):  # files already named elsewhere add no row
                items.append(Prediction(item, error="no files match this pattern"))
            items.extend(found)
        else:
            items.append(Prediction(item, error="no such file or folder"))
    return items


def _file_items(walk: ImageWalk, paths: Sequence[Path], *, skip_folders: bool = False) -> list[Path | Prediction]:
    out: list[Path | Prediction] = []
    for path in paths:
        if skip_folders and path.is_dir():  # a pattern that also matches folders: their files are not asked for
            continue
        got = walk.file(path)
        if isinstance(got, str):
            out.append(Prediction(str(path), error=got))
        elif got is not None:  # None: the same file, already taken under another name
            out.append(path)
    return out


def _mark(walk: ImageWalk) -> tuple[int, int]:
    return len(walk.unreadable), len(walk.refused)


def _skipped(walk: ImageWalk, since: tuple[int, int]) -> list[tuple[Path, str]]:
    """What the walk could not read or would not follow since ``since`` (a :func:`_mark`), in path order."""
    return sorted([*walk.unreadable[since[0] :], *walk.refused[since[1] :]], key=lambda item: item[0])


def _problems(walk: ImageWalk, since: tuple[int, int]) -> list[Path | Prediction]:
    return [Prediction(str(where), error=why) for where, why in _skipped(walk, since)]


def _folder_items(walk: ImageWalk, folder: Path, item: str) -> list[Path | Prediction]:
    """The images under ``folder`` and, in path order among them, the entries that cannot be read (a
    folder without permission, a FIFO named like an image, a link out of the data not followed)."""
    before = _mark(walk)
    files = walk.files(folder)
    problems = _skipped(walk, before)
    if not files and not problems:
        return [Prediction(item, error="no image files in this folder")]
    rows: list[tuple[Path, Path | Prediction]] = [(f, f) for f in files]
    rows += [(where, Prediction(str(where), error=why)) for where, why in problems]
    return [entry for _key, entry in sorted(rows, key=lambda r: r[0])]


def _decoded(files: Sequence[Path], batch_size: int, size: int) -> Iterator[list[tuple[Path, np.ndarray | str]]]:
    """Decode files in a thread pool, yielding batches of (path, pixels or error message)."""

    def decode(path: Path) -> np.ndarray | str:
        try:
            return load_image(path, size)
        except ImageDecodeError as exc:
            return exc.reason

    with ThreadPoolExecutor(max_workers=decode_workers()) as pool:
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            yield list(zip(chunk, pool.map(decode, chunk), strict=True))


def predict_files(
    model: ImageClassifier, files: Sequence[Path], *, top_k: int = 3, batch_size: int | None = None
) -> list[Prediction]:
    """One prediction per file, in the order of ``files``."""
    batch_size = batch_size or model.default_batch
    k = min(top_k, len(model.classes))
    out: list[Prediction] = []
    for batch in _decoded(files, batch_size, model.input_size):
        good = [(p, px) for p, px in batch if not isinstance(px, str)]
        results: dict[Path, Prediction] = {p: Prediction(str(p), error=px) for p, px in batch if isinstance(px, str)}
        if good:
            probs = softmax(model.logits(np.stack([px for _p, px in good])))  # N×H×W×3 uint8 in
            best = np.argsort(-probs, axis=1, kind="stable")[:, :k]
            for (p, _px), row, idx in zip(good, probs, best, strict=True):
                if not np.isfinite(row).all():  # a model (or a precision) that overflows: no answer, not a guess
                    results[p] = Prediction(str(p), error=NOT_A_NUMBER)
                    continue
                results[p] = Prediction(str(p), top=[(model.classes[i], float(row[i])) for i in idx.tolist()])
        out.extend(results[p] for p, _ in batch)
    return out


def open_model(
    ref: str | None, model_file: Path | None, device_spec: str = "auto", precision: str | None = None
) -> ImageClassifier:
    """An exported file (.onnx, .engine) without torch; a run or checkpoint with torch (in ``precision``,
    by default the one the run trained in on a GPU)."""
    if model_file is not None and is_exported(model_file):
        if precision is not None:
            raise UsageError(
                f"--precision is for checkpoints; {model_file.name} runs in the precision it was exported in "
                "(export --fp16 for half precision)."
            )
        return open_exported(model_file, device_spec)
    if model_file is not None and model_file.suffix.lower() in (".ts", ".torchscript"):
        raise UsageError(
            f"{model_file} is a TorchScript export (for libtorch and C++); give predict its checkpoint or ONNX file."
        )
    from cifarnet_cli.inference import open_checkpoint  # torch: only for checkpoints

    return open_checkpoint(str(model_file) if model_file is not None else ref, device_spec, precision)


def check_options(top_k: int, batch_size: int | None) -> None:
    if top_k < 1:
        raise UsageError(f"--top-k {top_k}: give a number of classes of at least 1.")
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: give a number of images of at least 1.")


def predict(
    inputs: Sequence[str],
    *,
    ref: str | None = None,
    model_file: Path | None = None,
    top_k: int = 3,
    device_spec: str = "auto",
    precision: str | None = None,
    batch_size: int | None = None,
    save_csv: Path | None = None,
) -> PredictResult:
    """Classify ``inputs`` (files, folders, globs) with the run or checkpoint ``ref`` (None: the most
    recent run) or the model file ``model_file``. ``save_csv``, where :func:`write_csv` will write the
    answers, is checked before any work: it may not be one of the inputs or the model."""
    check_options(top_k, batch_size)
    if not inputs:
        raise UsageError("Give at least one image file, folder or glob.")
    model = open_model(ref, model_file, device_spec, precision)
    items = collect_inputs(inputs)
    files = [i for i in items if isinstance(i, Path)]
    if save_csv is not None:
        fileio.check_output(save_csv, [*files, model.path], option="--save-csv")
    by_file = dict(zip(files, predict_files(model, files, top_k=top_k, batch_size=batch_size), strict=True))
    predictions = [by_file[i] if isinstance(i, Path) else i for i in items]
    return PredictResult(predictions, str(model.path), model.arch, model.runtime, model.notice)


def write_csv(predictions: Sequence[Prediction], target: Path) -> None:
    """``path,class,probability,error``: one row per input, in input order (errors have no class). Fields
    holding a comma, a quote or a line break are quoted (RFC 4180), so every file name reads back whole.
    Written atomically: a failure leaves the previous file."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(["path", "class", "probability", "error"])
    for p in predictions:
        if p.top:
            writer.writerow([p.path, p.top[0][0], f"{p.top[0][1]:.6f}", ""])
        else:
            writer.writerow([p.path, "", "", p.error or ""])
    fileio.write_bytes(target.expanduser(), buffer.getvalue().encode("utf-8", errors="surrogateescape"))
