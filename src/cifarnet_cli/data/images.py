"""Decoding any common image file into the 32×32 RGB uint8 pixels every cifarnet model is fed.

One function for training folders, evaluation folders and `predict`, so the same file always gives the
same pixels. The recipe: apply the EXIF orientation; bring every mode to 8-bit RGB (16-bit and float
images are scaled, not clipped; alpha is composited onto white; palettes and CMYK are converted); resize
the shorter side to 32 with an antialiased bicubic filter and center-crop to 32×32, as torchvision's
``Resize`` + ``CenterCrop`` evaluation transform does. A 32×32 RGB image passes through untouched.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from cifarnet_cli.fileio import display

IMAGE_SIZE = 32
#: Input sizes a model may declare (a checkpoint's ``input_size``, an export's ``cifarnet_input_size``).
#: cifarnet writes 32 (ResNet-50 resizes inside its graph); below 8 pixels nothing is left after the CIFAR
#: ResNets' two stride-2 stages, and above 256 one batch of 500 images (predict's default) would already
#: take 390 MB as float32, so a larger figure in a file is damage, not a model.
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 8, 256
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm"})

#: Largest image decoded, in pixels (width × height as the file's header states them, read before any
#: decoding). 64 MP admits every camera and phone photo up to 61 MP (9504×6336); above it, one image costs
#: more than 200 MB to decode (3 bytes a pixel, 4 with alpha, plus a converted copy), and a 388 KB PNG can
#: claim 20000×20000 = 400 MP (1.2 GB). A PNG cannot be decoded at a reduced size, so the header is the
#: only safe place to stop it.
MAX_IMAGE_PIXELS = 64_000_000
#: Largest ratio of an image's long side to its short side. Every image is resized on its shorter side and
#: center-cropped, so the resized copy is ``ratio`` times larger than the crop and the crop keeps 1/ratio of
#: the picture: a 1×200,000 PNG of 857 bytes becomes 32×6.4 million pixels (1.27 GB) to keep 32×32 of them.
#: 64:1 is well beyond the widest photographs (phone panoramas reach about 10:1, a full 360° strip about
#: 12:1), and at 64:1 the crop already shows under 2% of the image; the resized copy then stays under 64
#: times the crop (12 MB at the largest input size a model may declare, 256).
MAX_ASPECT_RATIO = 64
#: Images above this many pixels are decoded one at a time, so that the decoding threads cannot hold
#: several large images in memory at once (8 × 64 MP would be over 1.5 GB; a Jetson shares ~7.4 GB).
_LARGE_PIXELS = 16_000_000
_large_image = threading.Lock()

# load_image checks every image against MAX_IMAGE_PIXELS before decoding and names the file; PIL's own check
# (a warning above its limit, an error above twice it, with neither the file nor a way out) is redundant.
Image.MAX_IMAGE_PIXELS = None


class ImageDecodeError(ValueError):
    """The file is not an image PIL can read (or is truncated, or too large to decode safely). ``reason`` is
    a short plain sentence (for a table cell); ``str()`` is "path: reason"."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"{display(path)}: {reason}")
        self.path = path
        self.reason = reason


def unreadable_reason(exc: BaseException) -> str:
    """Why a file could not be decoded, in words: Pillow's own ("Truncated File Read", "cannot identify
    image file '/long/path'") say little to someone reading a list of files."""
    text = str(exc)
    low = text.lower()
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "a folder, not an image file"
    if "truncated" in low or "image file is truncated" in low:
        return "truncated: the file ends early"
    if "cannot identify image file" in low:
        return "not an image file Pillow can read"
    return f"not a readable image ({text})"


def valid_input_size(value: object) -> bool:
    """Whether ``value`` is an input size a model may declare (a whole number of pixels in range)."""
    return isinstance(value, int) and not isinstance(value, bool) and MIN_INPUT_SIZE <= value <= MAX_INPUT_SIZE


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


def _decode(img: Image.Image, size: int) -> np.ndarray:
    if img.mode != "RGB" or img.size != (size, size):
        img.draft("RGB", (size * 2, size * 2))  # JPEG: let libjpeg decode at a reduced scale
    img = ImageOps.exif_transpose(img)
    img = _resize(_to_rgb(img), size)
    return np.asarray(img, dtype=np.uint8).copy()


def load_image(path: str | os.PathLike[str], size: int = IMAGE_SIZE) -> np.ndarray:
    """Return ``size×size×3`` uint8 RGB pixels of the image at ``path``.

    Raises :class:`ImageDecodeError` for a file that is not a readable image, and for one whose header
    states more than :data:`MAX_IMAGE_PIXELS` pixels (refused before any pixel is decoded)."""
    try:
        with Image.open(path) as img:  # reads the header only
            width, height = img.size
            _check_size(path, width, height)
            if width * height > _LARGE_PIXELS:
                with _large_image:
                    return _decode(img, size)
            return _decode(img, size)
    except ImageDecodeError:
        raise
    except MemoryError:  # one image must never end a command that reads thousands
        raise ImageDecodeError(path, "not enough memory to decode it") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(path, unreadable_reason(exc)) from exc


def _check_size(path: str | os.PathLike[str], width: int, height: int) -> None:
    """Refuse, from the header alone, an image whose decoding (the input) or resizing (the output) would
    take far more memory than a photo: above :data:`MAX_IMAGE_PIXELS`, or beyond :data:`MAX_ASPECT_RATIO`."""
    if width < 1 or height < 1:
        raise ImageDecodeError(path, f"{width}×{height}: an image without pixels")
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageDecodeError(
            path,
            f"{width}×{height} = {width * height / 1e6:.0f} megapixels, above the "
            f"{MAX_IMAGE_PIXELS // 1_000_000} MP limit (a decompression bomb, or a photo to downscale first)",
        )
    long, short = max(width, height), min(width, height)
    if long > MAX_ASPECT_RATIO * short:
        raise ImageDecodeError(
            path,
            f"{width}×{height}: a {long // short}:1 strip, beyond the {MAX_ASPECT_RATIO}:1 limit (the center "
            "crop would keep almost none of it); crop it to the part to classify first",
        )
