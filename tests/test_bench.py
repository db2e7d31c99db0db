"""`cifarnet bench`: the figures a user reads, as JSON and as tables (sizes shrunk so the test is quick)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cifarnet_cli import benchmark
from cifarnet_cli.cli import app
from cifarnet_cli.config import FINETUNE_DEFAULTS, TrainConfig

runner = CliRunner()


@pytest.fixture(autouse=True)
def _small(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(benchmark, "MICRO_BATCHES", (8, 16))
    monkeypatch.setattr(benchmark, "PREDICT_BATCH", 8)
    monkeypatch.setattr(benchmark, "RECIPE", TrainConfig(batch_size=16))
    monkeypatch.setattr(
        benchmark, "FINETUNE_DEFAULTS", {**FINETUNE_DEFAULTS, "image_size": 32, "batch_size": 4, "accum": 2}
    )
    monkeypatch.setattr(
        benchmark.BenchSizes, "for_device", staticmethod(lambda device, quick: benchmark.BenchSizes(64, 1, 1, 3, False))
    )


def test_bench_json_has_every_figure(tmp_path: Path) -> None:
    result = runner.invoke(app, ["bench", "--device", "cpu", "--quick", "--json", "--output", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out == json.loads((tmp_path / "b.json").read_text())
    assert out["environment"]["device"].startswith("cpu") and out["quick"] is True
    assert [(r["batch_size"], r["accum"], r["capture"]) for r in out["train"]] == [(8, 2, False), (16, 1, False)]
    assert all(r["images"] == 64 and r["images_per_second"] > 0 for r in out["train"])
    assert out["predict"]["latency_ms_batch1"] > 0 and out["predict"]["images_per_second_batch256"] > 0
    assert out["finetune"]["arch"] == "resnet50" and out["finetune"]["images_per_second"] > 0
    assert out["full_epoch"] is None and out["capture_speedup"] == {}  # no GPU here


@pytest.mark.parametrize("columns", ["120", "60"])
def test_bench_tables(columns: str) -> None:
    result = runner.invoke(app, ["bench", "--device", "cpu", "--quick"], env={"COLUMNS": columns})
    assert result.exit_code == 0, result.output
    for text in ("ResNet-20 training", "eager", "predict latency", "finetune-resnet50", "[1/4]"):
        assert text in result.output


def test_an_output_that_cannot_be_written_is_refused_before_measuring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    measured: list[int] = []
    monkeypatch.setattr(benchmark, "run_bench", lambda *a, **k: measured.append(1) or {})
    result = runner.invoke(app, ["bench", "--device", "cpu", "--output", str(tmp_path)])
    assert result.exit_code == 1 and "it is a folder; give the path of a file" in result.output and not measured
