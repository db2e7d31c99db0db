"""bench/gpu-check.sh's summary: run after every step, it folds what the steps have left so far into OUT.

Reads GPU_CHECK_WORK (steps.tsv: one line per finished step; the JSON the steps wrote) and CIFARNET_HOME (the
training run's metrics, also of an interrupted run), and writes into GPU_CHECK_OUT, each file atomically:
train.json, evaluate.json and summary.json. Needs only the standard library (no torch), so it costs nothing
and cannot fail where cifarnet's own imports would.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

STEPS = ("device", "tests", "bench", "extract", "train", "evaluate", "evaluate_tta")
TEST_RESULT = re.compile(r"^(tests/\S+::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
TEST_STARTED = re.compile(r"^(tests/\S+::\S+)\s*$")


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write(path: Path, data: Any) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(partial, path)


def _number(text: str) -> float | int | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() and "e" not in text and "." not in text else round(value, 3)


def read_steps(work: Path) -> dict[str, dict[str, Any]]:
    """Every step in order: its status (ok, failed, timed-out, skipped, pending), seconds, budget, exit code."""
    steps: dict[str, dict[str, Any]] = {name: {"status": "pending"} for name in STEPS}
    try:
        lines = (work / "steps.tsv").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        name, status, seconds, budget, code, note = (line.split("\t") + [""] * 6)[:6]
        entry: dict[str, Any] = {
            "status": status,
            "seconds": _number(seconds),
            "budget_seconds": _number(budget),
            "exit_code": _number(code),
        }
        if note:
            entry["note"] = note
        steps[name.lower()] = entry
    return steps


def test_results(log: Path) -> dict[str, Any] | None:
    """The CUDA tests' results from check.log (pytest -v prints each as it finishes): counts, the failures, and
    the test that was running if the step was stopped."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    section = re.search(r"^== TESTS .*?$(.*?)(?=^== |\Z)", text, re.M | re.S)
    if section is None:
        return None
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    failures: list[str] = []
    running: str | None = None
    for line in section.group(1).splitlines():
        result = TEST_RESULT.match(line)
        if result:
            name, word = result.groups()
            key = {"PASSED": "passed", "XPASS": "passed", "SKIPPED": "skipped", "XFAIL": "skipped"}.get(word)
            key = key or ("errors" if word == "ERROR" else "failed")
            counts[key] += 1
            if key in ("failed", "errors"):
                failures.append(name)
            running = None
        elif TEST_STARTED.match(line):
            running = line.strip()
    return {**counts, "failures": failures, "running_when_stopped": running}


def fold_train(out: Path, work: Path, steps: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """train.json: train --json's result, the step's wall time, and the metrics of every epoch that finished."""
    if steps["train"]["status"] in ("pending", "skipped"):
        return None
    metrics_file = Path(os.environ.get("CIFARNET_HOME", "")) / "runs" / "gpu-check" / "metrics.jsonl"
    rows = []
    try:
        rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        pass
    train = {
        "status": steps["train"]["status"],
        "wall_seconds": steps["train"]["seconds"],
        "result": _load(work / "train.json"),
        "metrics": rows,
    }
    _write(out / "train.json", train)
    return train


def fold_evaluations(out: Path, work: Path) -> dict[str, Any] | None:
    evaluations = {"val": _load(work / "evaluate.json"), "val_tta": _load(work / "evaluate-tta.json")}
    if all(v is None for v in evaluations.values()):
        return None
    _write(out / "evaluate.json", evaluations)
    return evaluations


def figures(bench: dict[str, Any], train: dict[str, Any] | None, ev: dict[str, Any] | None) -> dict[str, Any]:
    """The headline figures, each None until the step that measures it has succeeded."""
    rows = [r for r in bench.get("train", []) if r.get("batch_size") == 512]
    metrics = (train or {}).get("metrics") or []
    result = (train or {}).get("result") or {}
    val, tta = ((ev or {}).get("val") or {}), ((ev or {}).get("val_tta") or {})
    return {
        "bench_train_batch512": {
            f"{r['precision']} {'graph' if r['capture'] else 'eager'}": r["images_per_second"] for r in rows
        },
        "capture_speedup": bench.get("capture_speedup"),
        "full_epoch_images_per_second": (bench.get("full_epoch") or {}).get("images_per_second"),
        "predict": bench.get("predict"),
        "finetune": {k: (bench.get("finetune") or {}).get(k) for k in ("images_per_second", "peak_memory_bytes")},
        "train_epochs": len(metrics),
        "train_seconds": round(sum(r.get("epoch_seconds", 0) for r in metrics), 1) if metrics else None,
        "train_wall_seconds": (train or {}).get("wall_seconds"),
        "train_images_per_second": result.get("images_per_second"),
        "val_accuracy": val.get("accuracy"),
        "val_accuracy_tta": tta.get("accuracy"),
    }


def targets(bench: dict[str, Any], found: dict[str, Any]) -> dict[str, bool | None]:
    """The project's GPU targets: True, False, or None while not measured."""

    def at_least(value: Any, limit: float) -> bool | None:
        return None if value is None else bool(value >= limit)

    precision = (bench.get("environment") or {}).get("precision_auto")
    speedup = (found["capture_speedup"] or {}).get(f"{precision} batch 512")
    peak = found["finetune"]["peak_memory_bytes"]
    seconds = found["train_seconds"] if found["train_epochs"] == 60 else None
    return {
        "full epoch >= 100,000 images/s (captured)": at_least(found["full_epoch_images_per_second"], 100_000),
        "captured >= 2x eager at batch 512": at_least(speedup, 2.0),
        "60 epochs of training steps <= 45 s": None if seconds is None else seconds <= 45,
        "val accuracy with TTA >= 88.5%": at_least(found["val_accuracy_tta"], 0.885),
        "finetune-resnet50 peak memory < 4 GiB": None if peak is None else peak < 4 * 2**30,
    }


def main() -> int:
    out, work = Path(os.environ["GPU_CHECK_OUT"]), Path(os.environ["GPU_CHECK_WORK"])
    steps = read_steps(work)
    info = _load(work / "info.json") or {}
    bench = _load(out / "bench.json") or {}
    train = fold_train(out, work, steps)
    found = figures(bench, train, fold_evaluations(out, work))
    gpus = [d for d in info.get("devices", []) if d.get("type") == "cuda"]
    summary = {
        "check": "bench/gpu-check.sh",
        "mode": os.environ.get("GPU_CHECK_MODE", "gpu"),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "steps": steps,
        "environment": {
            "gpu": (bench.get("environment") or {}).get("gpu") or (gpus[0].get("name") if gpus else None),
            "devices": info.get("devices"),
            **{k: info.get(k) for k in ("cifarnet", "python", "torch", "torchvision", "cuda_version")},
        },
        "tests": test_results(out / "check.log"),
        "figures": found,
        "targets": targets(bench, found),
    }
    _write(out / "summary.json", summary)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
