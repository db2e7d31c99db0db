"""`cifarnet predict`: classify image files in batches with a trained model.

Files go through the same decoding as training and evaluation (:func:`cifarnet_cli.data.images.load_image`:
EXIF orientation, any mode to RGB, shorter side to 32 and a center crop), then through the model in eval
mode under ``torch.inference_mode()``. A file that cannot be read is reported and never stops the others.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cifarnet_cli.data.images import ImageDecodeError, decode_workers, is_image_file, load_image
from cifarnet_cli.devices import autocast, resolve_device, resolve_precision
from cifarnet_cli.errors import UsageError
from cifarnet_cli.inference import LoadedModel, load_model


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


def collect_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[Prediction]]:
    """Expand files, folders (recursively, image extensions only) and globs; missing inputs become errors."""
    files: list[Path] = []
    errors: list[Prediction] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(
                Path(d) / f
                for d, _dirs, names in os.walk(path)
                for f in names
                if is_image_file(f) and not f.startswith(".")
            )
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif glob.has_magic(item):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(item), recursive=True))
            matched_files = [m for m in matches if m.is_file()]
            if not matched_files:
                errors.append(Prediction(item, error="no files match this pattern"))
            files.extend(matched_files)
        else:
            errors.append(Prediction(item, error="no such file or folder"))
    unique = list(dict.fromkeys(files))  # a file named twice (or matched by two globs) is predicted once
    return unique, errors


def _decoded(files: Sequence[Path], batch_size: int) -> Iterator[list[tuple[Path, np.ndarray | str]]]:
    """Decode files in a thread pool, yielding batches of (path, pixels or error message)."""

    def decode(path: Path) -> np.ndarray | str:
        try:
            return load_image(path)
        except ImageDecodeError as exc:
            return str(exc.__cause__ or exc)

    with ThreadPoolExecutor(max_workers=decode_workers()) as pool:
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            yield list(zip(chunk, pool.map(decode, chunk), strict=True))


def predict_files(
    loaded: LoadedModel,
    files: Sequence[Path],
    *,
    device: torch.device,
    top_k: int = 3,
    batch_size: int | None = None,
) -> list[Prediction]:
    batch_size = batch_size or loaded.inference_batch
    k = min(top_k, len(loaded.classes))
    precision = resolve_precision("auto", device)
    out: list[Prediction] = []
    model = loaded.model.eval()
    for batch in _decoded(files, batch_size):
        good = [(p, px) for p, px in batch if not isinstance(px, str)]
        results: dict[Path, Prediction] = {p: Prediction(str(p), error=px) for p, px in batch if isinstance(px, str)}
        if good:
            pixels = torch.from_numpy(np.stack([px for _p, px in good]))  # N×32×32×3 uint8
            x = pixels.to(device).permute(0, 3, 1, 2).float().div_(255.0)
            with torch.inference_mode(), autocast(device, precision):
                probs = torch.softmax(model(x).float(), dim=1).cpu()
            values, indices = probs.topk(k, dim=1)
            for (p, _px), vals, idx in zip(good, values.tolist(), indices.tolist(), strict=True):
                results[p] = Prediction(
                    str(p), top=[(loaded.classes[i], float(v)) for v, i in zip(vals, idx, strict=True)]
                )
        out.extend(results[p] for p, _ in batch)
    return out


def predict(
    inputs: Sequence[str],
    *,
    ref: str | None,
    top_k: int = 3,
    device_spec: str = "auto",
    batch_size: int | None = None,
) -> tuple[list[Prediction], LoadedModel]:
    if top_k < 1:
        raise UsageError("--top-k must be at least 1.")
    if not inputs:
        raise UsageError("Give at least one image file, folder or glob.")
    device = resolve_device(device_spec)
    loaded = load_model(ref, device)
    files, errors = collect_inputs(inputs)
    return errors + predict_files(loaded, files, device=device, top_k=top_k, batch_size=batch_size), loaded
