"""bench/gpu-check.sh, dry-run on the CPU (--cpu-dry-run): every step runs at toy sizes, so that the script's own
mistakes show here, before the one run on a GPU machine. About 20 s on two idle cores (mostly torch imports)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from .conftest import write_image_folder

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = {"summary.json", "check.log", "tests.xml", "bench.json", "train.json", "evaluate.json"}


@pytest.mark.skipif(not shutil.which("timeout") or not shutil.which("bash"), reason="needs bash and GNU timeout")
def test_the_dry_run_writes_each_result_and_goes_on_after_a_failed_and_a_timed_out_step(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "cifar10-jpeg", per_class=10, ext="jpg")
    archive = tmp_path / "cifar10-jpeg-train.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "cifar10-jpeg", arcname="cifar10-jpeg")
    # Two faults: a broken wheel for a package this machine lacks (the device step fails installing it), and an
    # evaluation given one second (it runs out of time).
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "cifarnet_absent_package-1.0-py3-none-any.whl").write_bytes(b"not a wheel")
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "GPU_CHECK_WHEELS": str(wheels),
        "GPU_CHECK_BUDGET_EVALUATE": "1",
    }
    out = tmp_path / "out"
    command = ["bash", str(ROOT / "bench" / "gpu-check.sh"), "--cpu-dry-run", str(out), str(archive)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]  # a step failed, and it says so

    assert {p.name for p in out.iterdir()} == OUTPUTS  # at most 8 files come back from a GPU machine
    summary = json.loads((out / "summary.json").read_text())
    assert {"mode", "steps", "environment", "tests", "figures", "targets"} <= set(summary)
    assert summary["mode"] == "cpu-dry-run"
    steps = summary["steps"]
    assert {name: step["status"] for name, step in steps.items()} == {
        "device": "failed",
        "tests": "ok",
        "bench": "ok",
        "extract": "ok",
        "train": "ok",
        "evaluate": "timed-out",
        "evaluate_tta": "ok",
    }, (out / "check.log").read_text()[-3000:]
    for step in steps.values():
        assert step["seconds"] <= step["budget_seconds"] + 11  # within its budget (and timeout's 10 s of grace)
    log = (out / "check.log").read_text()
    assert "installing what is missing: cifarnet_absent_package-1.0-py3-none-any.whl" in log

    # the CUDA tests were collected and skipped, one line each as they ran, and in the JUnit report
    tests = summary["tests"]
    junit = ET.parse(out / "tests.xml").getroot().iter("testsuite")
    skipped = sum(int(suite.get("skipped", 0)) for suite in junit)
    assert tests["skipped"] == skipped >= 10 and tests["failed"] == tests["errors"] == 0
    assert tests["running_when_stopped"] is None

    bench = json.loads((out / "bench.json").read_text())
    assert bench["train"] and bench["predict"]["latency_ms_batch1"] > 0
    train = json.loads((out / "train.json").read_text())
    assert train["result"]["epochs"] == 2 and [row["epoch"] for row in train["metrics"]] == [1, 2]
    evaluations = json.loads((out / "evaluate.json").read_text())
    assert evaluations["val"] is None and 0 <= evaluations["val_tta"]["accuracy"] <= 1
    figures = summary["figures"]
    assert figures["val_accuracy_tta"] == evaluations["val_tta"]["accuracy"] and figures["train_epochs"] == 2
    assert figures["train_wall_seconds"] == steps["train"]["seconds"]
    assert set(summary["targets"].values()) <= {True, False, None}
