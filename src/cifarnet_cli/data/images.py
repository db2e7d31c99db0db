"""Decoding any common image file into the 32×32 RGB uint8 pixels every cifarnet model is fed.

One function for training folders, evaluation folders and `predict`, so the same file always gives the
same pixels. The recipe: apply the EXIF orientation; bring every mode to 8-bit RGB (16-bit and float
images are scaled, not clipped; alpha is composited onto white; palettes and CMYK are converted); resize
the shorter side to 32 with an antialiased bicubic filter and center-crop to 32×32, as torchvision's
``Resize`` + ``CenterCrop`` evaluation transform does. A 32×32 RGB image passes through untouched.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SIZE = 32
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm"})

# Refuse decompression bombs early but allow large photos (PIL's default warns at ~89 MP).
Image.MAX_IMAGE_PIXELS = 200_000_000


class ImageDecodeError(ValueError):
    """The file is not an image PIL can read (or is truncated)."""


def decode_workers() -> int:
    """Threads for decoding many files: PIL releases the GIL while decoding, so twice the cores helps."""
    return min(8, (os.cpu_count() or 1) * 2)


def is_image_file(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if mode == "I" and arr.max() <= 255:
            hi = 255.0
        arr8 = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8).convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return img.convert("RGB")
    return img


def _resize(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    # reducing_gap makes large downscales fast (a box pre-reduction) while staying antialiased.
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def load_image(path: str | os.PathLike[str], size: int = IMAGE_SIZE) -> np.ndarray:
    """Return ``size×size×3`` uint8 RGB pixels of the image at ``path``."""
    try:
        with Image.open(path) as img:
            if img.mode != "RGB" or img.size != (size, size):
                img.draft("RGB", (size * 2, size * 2))  # JPEG: let libjpeg decode at a reduced scale
            img = ImageOps.exif_transpose(img)
            img = _resize(_to_rgb(img), size)
            return np.asarray(img, dtype=np.uint8).copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"{path}: not a readable image ({exc})") from exc
