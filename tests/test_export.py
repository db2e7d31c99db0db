from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cifarnet_cli import export as export_mod
from cifarnet_cli.cli import app
from cifarnet_cli.data.images import load_image
from cifarnet_cli.export import read_metadata

from .conftest import copy_run, train_once

runner = CliRunner()


@pytest.fixture(scope="module")
def _trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return train_once(tmp_path_factory, "x", per_class=6, splits=("train", "test"))


@pytest.fixture
def run(_trained: tuple[Path, Path]) -> Path:
    """The data of run "x" (one quick epoch), the run copied into this test's home."""
    copy_run(_trained[1])
    return _trained[0]


def _real_batch(data: Path) -> tuple[list[Path], torch.Tensor]:
    files = sorted((data / "test").rglob("*.png"))[:12]
    x = torch.from_numpy(np.stack([load_image(f) for f in files])).permute(0, 3, 1, 2).float() / 255
    return files, x


needs_ort = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")


@needs_ort
def test_onnx_matches_predict(run: Path) -> None:
    import onnxruntime as ort

    result = runner.invoke(app, ["export", "x", "--format", "onnx", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["max_abs_diff"] <= 1e-4 and "trtexec --onnx=" in out["trtexec"] and "--fp16" in out["trtexec"]
    path = Path(out["path"])
    assert path.name == "model.onnx" and path.parent.name == "x"
    meta = read_metadata(path)
    assert json.loads(meta["cifarnet_classes"])[0] == "airplane" and meta["cifarnet_arch"] == "resnet20"
    assert meta["cifarnet_input_size"] == "32" and len(json.loads(meta["cifarnet_mean"])) == 3

    files, x = _real_batch(run)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": x.numpy()})
    probs = torch.softmax(torch.from_numpy(logits), 1)
    predicted = json.loads(runner.invoke(app, ["predict", *map(str, files), "--json", "-k", "10"]).stdout)[
        "predictions"
    ]
    classes = json.loads(meta["cifarnet_classes"])
    for row, p in zip(probs, predicted, strict=True):
        expected = {t["class"]: t["probability"] for t in p["top"]}
        for i, name in enumerate(classes):
            assert abs(float(row[i]) - expected[name]) <= 1e-4


@needs_ort
def test_onnx_static_batch_and_fp16(run: Path, tmp_path: Path) -> None:
    static = runner.invoke(app, ["export", "x", "--static", "-o", str(tmp_path / "s.onnx"), "--json"])
    assert static.exit_code == 0, static.output
    half = runner.invoke(app, ["export", "x", "--fp16", "-o", str(tmp_path / "h.onnx"), "--json"])
    assert half.exit_code == 0, half.output
    out = json.loads(half.stdout)
    assert out["tolerance"] == 1e-2 and out["max_abs_diff"] <= 1e-2
    assert read_metadata(tmp_path / "h.onnx")["cifarnet_precision"] == "fp16"
    assert out["model"].endswith("/x/best.pt") and out["arch"] == "resnet20"
    # with no run named, export says which checkpoint it took, as predict does
    default = runner.invoke(app, ["export", "-o", str(tmp_path / "d.onnx")])
    assert default.exit_code == 0 and "Model: " in default.stderr and "/x/best.pt (resnet20)" in default.stderr


def test_torchscript_matches(run: Path) -> None:
    result = runner.invoke(app, ["export", "x", "--format", "torchscript", "--json"])
    assert result.exit_code == 0, result.output
    path = Path(json.loads(result.stdout)["path"])
    assert path.name == "model.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream in newer torch
        module = torch.jit.load(str(path))
    _files, x = _real_batch(run)
    from cifarnet_cli.inference import load_model

    reference = load_model("x", torch.device("cpu")).model
    with torch.no_grad():
        torch.testing.assert_close(module(x), reference(x), atol=1e-5, rtol=0)
    assert read_metadata(path)["cifarnet_arch"] == "resnet20"


def test_missing_export_extra_is_explained(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        export_mod.importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a)
    )
    result = runner.invoke(app, ["export", "x"])
    assert result.exit_code == 1 and "pip install 'cifarnet[export]'" in result.output


def test_bad_format_and_opset(run: Path) -> None:
    assert runner.invoke(app, ["export", "x", "--format", "tflite"]).exit_code == 2
    assert runner.invoke(app, ["export", "x", "--opset", "3"]).exit_code == 2
    # options TorchScript has no use for are refused, not silently ignored
    for option, value in (("--opset", "13"), ("--batch-range", "1:8:16")):
        result = runner.invoke(app, ["export", "x", "--format", "torchscript", option, value])
        assert result.exit_code == 2 and f"{option} is for ONNX and TensorRT" in result.output
