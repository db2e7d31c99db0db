"""What drawing curves.png costs a training run: matplotlib's import (once), one drawing at the start, middle
and end of the default 60-epoch recipe (88 optimizer steps per epoch on CIFAR-10), and what the training
thread feels when the drawing runs beside it in the background (CurvesWriter): the time it spends handing
an epoch over, and how much slower a Python-bound loop (a GPU training step's launches) runs meanwhile.
Prints one JSON object.

    python bench/plot_curves.py [--epochs 60] [--steps 88] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import environment  # noqa: E402

from cifarnet_cli import report, runs  # noqa: E402
from cifarnet_cli.config import TrainConfig  # noqa: E402
from cifarnet_cli.engine import scheduled_lrs  # noqa: E402
from cifarnet_cli.events import EpochEnded, EpochStarted  # noqa: E402


def _rows(n: int) -> list[dict[str, float]]:
    return [
        {"epoch": e, "train_loss": 2 / e, "train_accuracy": 1 - 1 / (e + 1), "val_loss": 2.2 / e,
         "val_accuracy": 1 - 1.2 / (e + 1), "lr_first": 0.4, "lr": 0.3, "images_per_second": 1e5, "epoch_seconds": 1.0}
        for e in range(1, n + 1)
    ]  # fmt: skip


def _busy_loop(n: int) -> float:
    start = time.perf_counter()
    x = 0
    for i in range(n):
        x += i % 7
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--steps", type=int, default=88, help="optimizer steps per epoch (CIFAR-10 at batch 512)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    start = time.perf_counter()
    import matplotlib.figure  # noqa: F401

    import_s = time.perf_counter() - start
    lrs = scheduled_lrs(TrainConfig(epochs=args.epochs), args.steps)
    out: dict[str, object] = {"environment": environment(torch.device("cpu")), "matplotlib_import_s": import_s}
    with tempfile.TemporaryDirectory() as tmp:
        draw: dict[str, float] = {}
        cpu: dict[str, float] = {}
        for done in (1, args.epochs // 2, args.epochs):
            times, cpu_times = [], []
            for _ in range(args.repeats):
                t, c = time.perf_counter(), time.process_time()
                report.plot_curves(_rows(done), Path(tmp) / "c.png", title="bench", epochs=args.epochs,
                                   step_lrs=lrs, steps_per_epoch=args.steps)  # fmt: skip
                times.append(time.perf_counter() - t)
                cpu_times.append(time.process_time() - c)
            draw[f"after_epoch_{done}"] = statistics.median(times)
            cpu[f"after_epoch_{done}"] = statistics.median(cpu_times)
        out["draw_s_median"] = draw
        out["draw_cpu_s_median"] = cpu  # CPU time of this process: what the drawing costs on a machine of its own

        run = runs.Run("bench", Path(tmp) / "bench")
        run.dir.mkdir()
        run.write_metrics(_rows(args.epochs // 2))
        alone = statistics.median(_busy_loop(2_000_000) for _ in range(3))
        writer = report.CurvesWriter(
            run, epochs=args.epochs, lr_schedule=lambda s: scheduled_lrs(TrainConfig(epochs=args.epochs), s)
        )
        writer(EpochStarted(1, args.epochs, args.steps, args.steps))
        handover = []
        beside = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            writer(EpochEnded(_rows(1)[0], False))
            handover.append(time.perf_counter() - t)
            beside.append(_busy_loop(2_000_000))
            writer.close()
            writer._closing = False  # reuse the writer for the next repeat
            writer._thread = None
        out["epoch_handover_s_median"] = statistics.median(handover)
        out["python_loop_s_alone"] = alone
        out["python_loop_s_while_drawing"] = statistics.median(beside)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
