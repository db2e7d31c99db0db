"""Training on real CIFAR-10 JPEGs (../shared/datasets); skipped where that folder is absent."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from cifarnet_cli.cli import app

from .conftest import real_subset

runner = CliRunner()


def test_resnet20_learns_real_images_well_above_chance(shared_data: Path, tmp_path: Path) -> None:
    data = real_subset(tmp_path / "real", per_class=300)  # 3,000 images: 2,500 to train, 500 held out
    result = runner.invoke(
        app,
        [
            "train",
            "--arch",
            "resnet20",
            "--data-dir",
            str(data),
            "--epochs",
            "4",
            "--batch-size",
            "64",
            "--accum",
            "2",
            "--val-split",
            "500",
            "--warmup-epochs",
            "1",
            "--run",
            "real",
            "--json",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["final_accuracy"] > 0.30  # chance is 0.10
    evaluated = json.loads(runner.invoke(app, ["evaluate", "real", "--split", "val", "--json"]).stdout)
    assert evaluated["n"] == 500 and abs(evaluated["accuracy"] - out["best_accuracy"]) < 1e-9
