"""Cold start of `cifarnet predict` on one image: a ResNet-20 checkpoint (torch) against its exported ONNX
file (onnxruntime, no torch), with `python -c "import torch"` as the baseline, all in one run.

Each command is a fresh process measured by GNU time (`/usr/bin/time -v`: wall clock and peak resident
memory), interleaved over --repeats rounds after one warm-up round (so the page cache is warm for all three);
the figures are medians (and the median of each round's checkpoint/import-torch ratio, which is steadier
on a busy machine). Prints one JSON object with the ratios the deployment issue sets as targets:
ONNX one-image cold start <= 1.0 s and <= 300 MB, checkpoint <= 1.2x `import torch`.

    python bench/predict_cold_start.py [--repeats 7] [--image PATH]

Needs GNU time (Debian/Ubuntu: apt-get install time) and onnxruntime (pip install 'cifarnet[export]').
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment  # noqa: E402

from cifarnet_cli.data.classes import CIFAR10_CLASSES  # noqa: E402
from cifarnet_cli.export import export_model  # noqa: E402
from cifarnet_cli.models import get_model  # noqa: E402

GNU_TIME = Path("/usr/bin/time")
SHARED_IMAGE = Path(__file__).resolve().parents[2] / "shared/datasets/cifar10-jpeg/train/cat"


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, peak resident MB) of one run of ``cmd``, from GNU time's report."""
    proc = subprocess.run([str(GNU_TIME), "-v", *cmd], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    assert wall is not None and rss is not None, proc.stderr[-2000:]
    hours, minutes, seconds = int(wall.group(1) or 0), int(wall.group(2)), float(wall.group(3))
    return hours * 3600 + minutes * 60 + seconds, int(rss.group(1)) / 1024


def imports_torch(cmd: list[str], env: dict[str, str]) -> bool:
    proc = subprocess.run([sys.executable, "-X", "importtime", *cmd[1:]], env=env, capture_output=True, text=True)
    return any(line.rsplit("|", 1)[-1].strip().split(".")[0] == "torch" for line in proc.stderr.splitlines())


def summary(samples: list[tuple[float, float]]) -> dict[str, object]:
    walls, rss = [w for w, _ in samples], [r for _, r in samples]
    return {
        "wall_s_median": round(statistics.median(walls), 3),
        "wall_s_min": round(min(walls), 3),
        "wall_s_all": [round(w, 3) for w in walls],
        "max_rss_mb_median": round(statistics.median(rss), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--image", type=Path, default=None, help="[default: a real CIFAR-10 JPEG from ../shared]")
    args = parser.parse_args()
    if not GNU_TIME.exists():
        raise SystemExit("This benchmark needs GNU time at /usr/bin/time (Debian/Ubuntu: apt-get install time).")

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        image = args.image
        if image is None:
            real = sorted(SHARED_IMAGE.glob("*.jpg"))[:1] if SHARED_IMAGE.is_dir() else []
            image = real[0] if real else tmp / "image.png"
            if not real:
                rng = np.random.default_rng(0)
                Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)).save(image)
        ckpt = tmp / "best.pt"
        meta = {"arch": "resnet20", "model_kwargs": {"num_classes": 10}, "classes": list(CIFAR10_CLASSES)}
        torch.save(
            {"model": get_model("resnet20").state_dict(), "config": {}, "meta": {**meta, "input_size": 32}}, ckpt
        )
        onnx_file = export_model(str(ckpt), output=tmp / "model.onnx").path

        env = {**os.environ, "CIFARNET_HOME": str(tmp / "home"), "CIFARNET_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
        commands = {
            "import_torch": [sys.executable, "-c", "import torch"],
            "predict_checkpoint": [
                sys.executable,
                "-m",
                "cifarnet_cli",
                "predict",
                str(image),
                "--checkpoint",
                str(ckpt),
            ],
            "predict_onnx": [sys.executable, "-m", "cifarnet_cli", "predict", str(image), "--model", str(onnx_file)],
        }
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
        for round_ in range(args.repeats + 1):
            for name, cmd in commands.items():
                result = timed(cmd, env)
                if round_ > 0:  # round 0 warms the page cache
                    samples[name].append(result)
        onnx_imports_torch = imports_torch(commands["predict_onnx"], env)

    stats = {name: summary(s) for name, s in samples.items()}
    torch_s = statistics.median(w for w, _ in samples["import_torch"])
    ckpt_s = statistics.median(w for w, _ in samples["predict_checkpoint"])
    onnx_s = statistics.median(w for w, _ in samples["predict_onnx"])
    onnx_mb = statistics.median(r for _, r in samples["predict_onnx"])
    # Each round runs the three commands back to back, so a round's ratio sees the same background load.
    paired = statistics.median(
        c / t for (c, _), (t, _) in zip(samples["predict_checkpoint"], samples["import_torch"], strict=True)
    )
    import onnxruntime

    print(
        json.dumps(
            {
                "benchmark": "predict_cold_start",
                **environment(torch.device("cpu")),
                "onnxruntime": onnxruntime.__version__,
                "cpus": os.cpu_count(),
                "load_average": [round(x, 2) for x in os.getloadavg()],
                "image": str(image),
                "model": "resnet20 (random weights)",
                "repeats": args.repeats,
                **stats,
                "predict_onnx_imports_torch": onnx_imports_torch,
                "ratio_checkpoint_to_import_torch": round(ckpt_s / torch_s, 3),
                "ratio_checkpoint_to_import_torch_per_round_median": round(paired, 3),
                "ratio_onnx_to_checkpoint": round(onnx_s / ckpt_s, 3),
                "targets_met": {
                    "onnx_wall_le_1s": onnx_s <= 1.0,
                    "onnx_rss_le_300mb": onnx_mb <= 300,
                    "checkpoint_le_1.2x_import_torch": ckpt_s <= 1.2 * torch_s,
                    "checkpoint_le_1.2x_import_torch_per_round": paired <= 1.2,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
