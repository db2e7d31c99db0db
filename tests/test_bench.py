"""`cifarnet bench`: the figures a user reads, as JSON and as tables (sizes shrunk so the test is quick)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cifarnet_cli import benchmark
from cifarnet_cli.cli import app
from cifarnet_cli.config import FINETUNE_DEFAULTS, TrainConfig

from .conftest import isolate

runner = CliRunner()


def _shrink(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(benchmark, "MICRO_BATCHES", (8, 16))
    monkeypatch.setattr(benchmark, "PREDICT_BATCH", 8)
    monkeypatch.setattr(benchmark, "RECIPE", TrainConfig(batch_size=16))
    monkeypatch.setattr(
        benchmark, "FINETUNE_DEFAULTS", {**FINETUNE_DEFAULTS, "image_size": 32, "batch_size": 4, "accum": 2}
    )
    monkeypatch.setattr(
        benchmark.BenchSizes, "for_device", staticmethod(lambda device, quick: benchmark.BenchSizes(64, 1, 1, 3, False))
    )


@pytest.fixture(autouse=True)
def _small(monkeypatch: pytest.MonkeyPatch) -> None:
    _shrink(monkeypatch)


@dataclass(frozen=True)
class Measured:
    """One real `bench --quick --json --output` run: what it printed, wrote, and the progress events it sent."""

    stdout: str
    written: str
    result: dict[str, Any]
    events: list[Any]


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> Measured:
    """The measurement runs once (it trains ResNet-20 and ResNet-50 on the CPU); the tables replay it."""
    real = benchmark.run_bench
    seen: list[Any] = []
    results: list[dict[str, Any]] = []

    def recording(device_spec: str, *, on_event: Any, **kwargs: Any) -> dict[str, Any]:
        def both(event: Any) -> None:
            seen.append(event)
            on_event(event)

        results.append(real(device_spec, on_event=both, **kwargs))
        return results[-1]

    out = tmp_path_factory.mktemp("bench") / "b.json"
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, tmp_path_factory.mktemp("home"))  # a module fixture comes before the per-test isolation
        _shrink(mp)
        mp.setattr(benchmark, "run_bench", recording)
        result = runner.invoke(app, ["bench", "--device", "cpu", "--quick", "--json", "--output", str(out)])
    assert result.exit_code == 0, result.output
    return Measured(result.stdout, out.read_text(), results[0], seen)


def test_bench_json_has_every_figure(measured: Measured) -> None:
    out = json.loads(measured.stdout)
    assert out == json.loads(measured.written)
    assert out["environment"]["device"].startswith("cpu") and out["quick"] is True
    assert [(r["batch_size"], r["accum"], r["capture"]) for r in out["train"]] == [(8, 2, False), (16, 1, False)]
    assert all(r["images"] == 64 and r["images_per_second"] > 0 for r in out["train"])
    assert out["predict"]["latency_ms_batch1"] > 0 and out["predict"]["images_per_second_batch256"] > 0
    assert out["finetune"]["arch"] == "resnet50" and out["finetune"]["images_per_second"] > 0
    assert out["full_epoch"] is None and out["capture_speedup"] == {}  # no GPU here


@pytest.mark.parametrize("columns", ["120", "60"])
def test_bench_tables(columns: str, measured: Measured, monkeypatch: pytest.MonkeyPatch) -> None:
    def replay(device_spec: str, *, on_event: Any, **kwargs: Any) -> dict[str, Any]:
        for event in measured.events:
            on_event(event)
        return measured.result

    from cifarnet_cli import ui

    monkeypatch.setattr(benchmark, "run_bench", replay)
    width = int(columns)
    monkeypatch.setattr(ui, "out_console", ui._Console(width=width, force_terminal=True))
    result = runner.invoke(app, ["bench", "--device", "cpu", "--quick"])
    assert result.exit_code == 0, result.output
    for text in ("ResNet-20 training", "eager", "predict latency", "finetune-resnet50", "[1/4]"):
        assert text in result.output
    plain = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout)
    assert max(len(line) for line in plain.splitlines()) <= width  # the tables fit the terminal


def test_an_output_that_cannot_be_written_is_refused_before_measuring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    measured: list[int] = []
    monkeypatch.setattr(benchmark, "run_bench", lambda *a, **k: measured.append(1) or {})
    result = runner.invoke(app, ["bench", "--device", "cpu", "--output", str(tmp_path)])
    assert result.exit_code == 1 and "it is a folder; give the path of a file" in result.output and not measured
