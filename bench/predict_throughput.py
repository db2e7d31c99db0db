"""`predict` throughput on image files: decode + resize + batched inference, images per second.

Writes N image files (real JPEGs from --source when given, else synthetic PNGs of mixed sizes), saves a
ResNet-20 checkpoint and its ONNX export, and times cifarnet's predict on them with each (torch, then
onnxruntime when installed). Prints one JSON object.

    python bench/predict_throughput.py [--files 1000] [--source ../shared/datasets/cifar10-jpeg/train]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment  # noqa: E402

from cifarnet_cli.data.classes import CIFAR10_CLASSES  # noqa: E402
from cifarnet_cli.devices import resolve_device  # noqa: E402
from cifarnet_cli.inference import open_checkpoint  # noqa: E402
from cifarnet_cli.models import get_model  # noqa: E402
from cifarnet_cli.predict import collect_inputs, predict_files  # noqa: E402
from cifarnet_cli.runtime import ImageClassifier, open_exported  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--source", type=Path, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        if args.source is not None:
            sources = sorted(p for p in args.source.rglob("*.jpg"))[:: max(1, 50_000 // args.files)][: args.files]
            for i, src in enumerate(sources):
                shutil.copyfile(src, folder / f"{i:05d}.jpg")
            kind = "real 32x32 JPEG"
        else:
            rng = np.random.default_rng(0)
            for i in range(args.files):
                side = (32, 64, 256)[i % 3]
                Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
            kind = "synthetic PNG, 32/64/256 px"
        ckpt = Path(tmp) / "model.pt"
        model = get_model("resnet20")
        meta = {
            "arch": "resnet20",
            "model_kwargs": {"num_classes": 10},
            "classes": list(CIFAR10_CLASSES),
            "input_size": 32,
        }
        torch.save({"model": model.state_dict(), "config": {}, "meta": meta}, ckpt)
        files = [f for f in collect_inputs([str(folder)]) if isinstance(f, Path)]
        models: dict[str, ImageClassifier] = {"checkpoint": open_checkpoint(str(ckpt), args.device)}
        if importlib.util.find_spec("onnxruntime") is not None:
            from cifarnet_cli.export import export_model

            onnx_file = export_model(str(ckpt), output=Path(tmp) / "model.onnx").path
            models["onnx"] = open_exported(onnx_file, args.device)
        os.sync()
        results = {}
        for name, model in models.items():
            predict_files(model, files[:64])  # warm-up
            start = time.perf_counter()
            out = predict_files(model, files, batch_size=args.batch_size)
            seconds = time.perf_counter() - start
            results[name] = {
                "runtime": model.runtime,
                "seconds": round(seconds, 3),
                "images_per_second": round(len(out) / seconds),
            }
    print(
        json.dumps(
            {
                "benchmark": "predict_throughput",
                **environment(device),
                "files": len(out),
                "kind": kind,
                "batch_size": args.batch_size,
                **results,
            }
        )
    )


if __name__ == "__main__":
    main()
