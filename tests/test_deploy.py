"""Deployment: predict/evaluate from exported models (without torch), jetson-inference files, TensorRT engines,
export options (opset, static batch) and export failures."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cifarnet_cli import export as export_mod
from cifarnet_cli.cli import app
from cifarnet_cli.data.classes import CIFAR10_CLASSES

from .conftest import real_subset, train_quick, write_image_folder

runner = CliRunner()
needs_ort = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")
needs_trt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="TensorRT not installed")
no_trt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(image folder with train/ and test/, best.pt of one quick run), shared by this module's tests."""
    root = tmp_path_factory.mktemp("deploy")
    with pytest.MonkeyPatch.context() as mp:
        for var, sub in (("CIFARNET_HOME", "home"), ("CIFARNET_CACHE", "cache"), ("CIFARNET_DATA", "none")):
            mp.setenv(var, str(root / sub))
        mp.setenv("CIFARNET_OFFLINE", "1")
        data = write_image_folder(root / "data", per_class=8, splits=("train", "test"))
        train_quick(data, "dep")
    yield data, root / "home" / "runs" / "dep" / "best.pt"


@pytest.fixture(scope="module")
def onnx_file(trained: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime not installed")
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    result = runner.invoke(app, ["export", str(trained[1]), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return out


def _probabilities(args: list[str]) -> tuple[dict[str, dict[str, float]], dict[str, object]]:
    result = runner.invoke(app, ["predict", *args, "--json", "-k", "10"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    return {p["path"]: {t["class"]: t["probability"] for t in p["top"]} for p in out["predictions"]}, out


def _importtime(args: list[str]) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run the real CLI in a fresh interpreter; return it and the top-level packages it imported."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "cifarnet_cli", *args], capture_output=True, text=True, timeout=300
    )
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    return proc, imported


# --------------------------------------------------------------------------------------------------
# predict / evaluate from an exported model


@needs_ort
def test_predict_onnx_gives_the_checkpoints_probabilities(trained: tuple[Path, Path], onnx_file: Path) -> None:
    data, ckpt = trained
    files = [str(p) for p in sorted((data / "test").rglob("*.png"))]
    from_ckpt, out_ckpt = _probabilities([*files, "--checkpoint", str(ckpt)])
    from_onnx, out_onnx = _probabilities([*files, "--model", str(onnx_file)])
    assert list(from_onnx) == files == list(from_ckpt)
    for path in files:
        a, b = from_ckpt[path], from_onnx[path]
        assert max(a, key=a.get) == max(b, key=b.get)  # type: ignore[arg-type]
        assert max(abs(a[c] - b[c]) for c in CIFAR10_CLASSES) <= 1e-4
    assert out_ckpt["model"] == str(ckpt) and str(out_ckpt["runtime"]).startswith("torch")
    assert Path(str(out_onnx["model"])) == onnx_file and "CPUExecutionProvider" in str(out_onnx["runtime"])


@needs_ort
def test_predict_onnx_gives_the_checkpoints_top_class_on_real_images(
    shared_data: Path, trained: tuple[Path, Path], onnx_file: Path, tmp_path: Path
) -> None:
    files = [str(p) for p in sorted(real_subset(tmp_path / "real", per_class=5).rglob("*.jpg"))]
    from_ckpt, _ = _probabilities([*files, "--checkpoint", str(trained[1])])
    from_onnx, _ = _probabilities([*files, "--model", str(onnx_file)])
    for path in files:
        a, b = from_ckpt[path], from_onnx[path]
        assert max(a, key=a.get) == max(b, key=b.get)  # type: ignore[arg-type]
        assert max(abs(a[c] - b[c]) for c in CIFAR10_CLASSES) <= 1e-4


@needs_ort
def test_predict_onnx_runs_without_torch(trained: tuple[Path, Path], onnx_file: Path) -> None:
    image = sorted((trained[0] / "test" / "cat").glob("*.png"))[0]
    proc, imported = _importtime(["predict", str(image), "--model", str(onnx_file), "--json"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "onnxruntime" in imported and "torch" not in imported and "torchvision" not in imported
    assert json.loads(proc.stdout)["predictions"][0]["path"] == str(image)
    assert f"Model: {onnx_file}" in proc.stderr  # says which model answered, and with what


def test_checkpoint_predict_leaves_torchvision_alone(trained: tuple[Path, Path]) -> None:
    image = sorted((trained[0] / "test" / "dog").glob("*.png"))[0]
    proc, imported = _importtime(["predict", str(image), "--checkpoint", str(trained[1]), "--json"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch" in imported and "torchvision" not in imported  # a ResNet-20 needs no torchvision


def test_one_image_runs_on_one_cpu_thread(trained: tuple[Path, Path]) -> None:
    import torch

    from cifarnet_cli.inference import ONE_THREAD_BATCH, open_checkpoint

    model = open_checkpoint(str(trained[1]), "cpu")
    seen: list[int] = []
    model.model.register_forward_pre_hook(lambda _m, _a: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    model.logits(np.zeros((1, 32, 32, 3), np.uint8))
    model.logits(np.zeros((ONE_THREAD_BATCH + 1, 32, 32, 3), np.uint8))
    assert seen == [1, before] and torch.get_num_threads() == before


@needs_ort
def test_evaluate_onnx_matches_the_checkpoint(trained: tuple[Path, Path], onnx_file: Path) -> None:
    data, ckpt = trained
    common = ["--data-dir", str(data), "--tta", "--json"]
    by_ckpt = runner.invoke(app, ["evaluate", str(ckpt), *common])
    by_onnx = runner.invoke(app, ["evaluate", "--model", str(onnx_file), *common])
    assert by_ckpt.exit_code == 0 and by_onnx.exit_code == 0, by_onnx.output
    a, b = json.loads(by_ckpt.stdout), json.loads(by_onnx.stdout)
    assert (a["split"], a["n"], a["confusion"]) == (b["split"], b["n"], b["confusion"]) and a["n"] == 80
    assert b["checkpoint"] == str(onnx_file)
    val = runner.invoke(app, ["evaluate", "--model", str(onnx_file), "--data-dir", str(data), "--split", "val"])
    assert val.exit_code == 2 and "validation split" in val.output
    # a folder of class folders (no test split): refused in the words the checkpoint path uses
    flat = data / "train"
    test = runner.invoke(app, ["evaluate", "--model", str(onnx_file), "--data-dir", str(flat), "--split", "test"])
    assert test.exit_code == 1 and "has no test split; choose one of: train, all" in " ".join(test.output.split())


# --------------------------------------------------------------------------------------------------
# jetson-inference


def imagenet_preprocess(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """What jetson-inference's `imagenet` feeds an ONNX classifier (c/imageNet.cpp preProcess →
    cudaTensorNormMeanRGB, c/tensorConvert.cu gpuTensorNormMean): nearest-neighbour sampling at
    ``int(x * in_w / out_w)`` (no crop, no antialiasing), ``pixel * (1 - 0) / 255 + 0``, minus the ImageNet
    mean, divided by the ImageNet std, planar RGB, batch 1."""
    in_h, in_w = rgb.shape[:2]
    xs = (np.arange(width, dtype=np.float32) * np.float32(in_w / width)).astype(np.int64)
    ys = (np.arange(height, dtype=np.float32) * np.float32(in_h / height)).astype(np.int64)
    px = rgb[ys][:, xs].astype(np.float32)
    multiplier = np.float32((1.0 - 0.0) / 255.0)
    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32)
    return ((px * multiplier + np.float32(0.0) - mean) / std).transpose(2, 0, 1)[None].copy()


def _check_jetson_inference_export(ckpt: Path, images: list[Path], out_dir: Path) -> None:
    import onnxruntime as ort

    result = runner.invoke(
        app, ["export", str(ckpt), "--for", "jetson-inference", "-o", str(out_dir / "m.onnx"), "--json"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["opset"] == 13 and out["compared"] == "probabilities" and out["max_abs_diff"] <= 1e-4
    assert "--input_blob=input_0 --output_blob=output_0" in out["imagenet"]
    assert (out_dir / "labels.txt").read_text().splitlines() == list(CIFAR10_CLASSES)
    session = ort.InferenceSession(str(out_dir / "m.onnx"), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.shape, outp.name, outp.shape) == ("input_0", [1, 3, 32, 32], "output_0", [1, 10])

    expected, _ = _probabilities([*map(str, images), "--checkpoint", str(ckpt)])
    for image in images:
        rgb = np.asarray(Image.open(image).convert("RGB"))
        (probs,) = session.run(None, {"input_0": imagenet_preprocess(rgb, 32, 32)})
        assert abs(float(probs.sum()) - 1) <= 1e-5  # imagenet ranks these raw outputs as confidences
        want = np.array([expected[str(image)][c] for c in CIFAR10_CLASSES])
        assert np.abs(probs[0] - want).max() <= 1e-5, image


@needs_ort
def test_jetson_inference_export_reproduces_predict_on_real_images(
    shared_data: Path, trained: tuple[Path, Path], tmp_path: Path
) -> None:
    real = real_subset(tmp_path / "real", per_class=3)
    _check_jetson_inference_export(trained[1], sorted(real.rglob("*.jpg")), tmp_path / "ji")


@needs_ort
def test_jetson_inference_export_reproduces_predict_on_synthetic_images(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    rng = np.random.default_rng(3)
    images = []
    for i in range(12):
        images.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images[-1])
    images += sorted((trained[0] / "test" / "ship").glob("*.png"))
    _check_jetson_inference_export(trained[1], images, tmp_path / "ji")


# --------------------------------------------------------------------------------------------------
# export options


def test_opset_13_is_written_without_a_traceback(trained: tuple[Path, Path], tmp_path: Path) -> None:
    import onnx

    target = tmp_path / "m13.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "cifarnet_cli", "export", str(trained[1]), "--opset", "13", "-o", str(target), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and json.loads(proc.stdout)["opset"] == 13
    assert export_mod.onnx_opset(onnx.load(str(target))) == 13
    result = runner.invoke(app, ["export", str(trained[1]), "--opset", "17", "-o", str(tmp_path / "m17.onnx")])
    assert result.exit_code == 0, result.output
    assert export_mod.onnx_opset(onnx.load(str(tmp_path / "m17.onnx"))) == 17


def test_an_opset_the_exporter_did_not_write_is_refused(
    trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = export_mod._onnx_proto
    monkeypatch.setattr(export_mod, "_onnx_proto", lambda net, ex, opset, *a: real(net, ex, 18, *a))
    result = runner.invoke(app, ["export", str(trained[1]), "--opset", "13", "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1 and "opset-18" in result.output and "opset 13" in result.output
    assert not (tmp_path / "m.onnx").exists()


@needs_ort
def test_static_batch_and_dynamic_batch(trained: tuple[Path, Path], tmp_path: Path) -> None:
    import onnx

    def batch_dim(name: str, *args: str) -> int | str:
        result = runner.invoke(app, ["export", str(trained[1]), *args, "-o", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        dim = onnx.load(str(tmp_path / name)).graph.input[0].type.tensor_type.shape.dim[0]
        return dim.dim_value or dim.dim_param

    assert batch_dim("s1.onnx", "--static", "--batch", "1") == 1
    assert batch_dim("s4.onnx", "--batch", "4") == 4
    assert batch_dim("static.onnx", "--static") == 1
    assert isinstance(batch_dim("dynamic.onnx"), str)
    files = [str(p) for p in sorted((trained[0] / "test" / "cat").glob("*.png"))[:5]]  # 5: one full batch of 4 + 1
    fixed, _ = _probabilities([*files, "--model", str(tmp_path / "s4.onnx")])
    dynamic, _ = _probabilities([*files, "--model", str(tmp_path / "dynamic.onnx")])
    assert fixed.keys() == dynamic.keys()
    for f in files:
        assert max(abs(fixed[f][c] - dynamic[f][c]) for c in CIFAR10_CLASSES) <= 1e-5
    assert runner.invoke(app, ["export", str(trained[1]), "--batch", "0"]).exit_code == 2
    assert runner.invoke(app, ["export", str(trained[1]), "--static", "--batch-range", "1:4"]).exit_code == 2


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_to_a_full_disk(
    trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    target = tmp_path / "out" / f"model.{fmt}"
    target.parent.mkdir()
    target.write_bytes(b"the previous export")
    real_fdopen = os.fdopen

    class Full:
        """A file that takes the first 1000 bytes, then reports a full disk."""

        def __init__(self, fd: int, mode: str) -> None:
            self.fh = real_fdopen(fd, mode)

        def __enter__(self) -> Full:
            return self

        def __exit__(self, *exc: object) -> None:
            self.fh.close()

        def __getattr__(self, name: str) -> object:  # flush, fileno, close: the real file's
            return getattr(self.fh, name)

        def write(self, data: bytes) -> int:
            self.fh.write(data[:1000])
            self.fh.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fdopen", Full)
    result = runner.invoke(app, ["export", str(trained[1]), "--format", fmt, "-o", str(target), "--no-verify"])
    assert result.exit_code == 1, result.output
    message = " ".join(result.output.split())
    assert str(target) in message and "no space left" in message.lower() and "Traceback" not in message
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no *.partial left behind
    assert target.read_bytes() == b"the previous export"


# --------------------------------------------------------------------------------------------------
# TensorRT


def test_a_trtexec_engine_finds_its_class_names_in_its_onnx_file(onnx_file: Path, tmp_path: Path) -> None:
    from cifarnet_cli import runtime
    from cifarnet_cli.errors import CifarNetError

    engine = tmp_path / "model.engine"  # what `trtexec --onnx=model.onnx --saveEngine=model.engine` leaves
    engine.write_bytes(b"engine bytes")
    (tmp_path / "model.onnx").write_bytes(onnx_file.read_bytes())
    assert json.loads(runtime.engine_metadata(engine)["cifarnet_classes"]) == list(CIFAR10_CLASSES)
    (tmp_path / "model.onnx").unlink()
    with pytest.raises(CifarNetError, match="without its class names"):
        runtime.engine_metadata(engine)


@no_trt
def test_engine_without_tensorrt_says_so_in_one_line(trained: tuple[Path, Path], tmp_path: Path) -> None:
    result = runner.invoke(app, ["export", str(trained[1]), "--format", "engine", "-o", str(tmp_path / "m.engine")])
    assert result.exit_code == 1 and "TensorRT" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "m.engine").exists()
    (tmp_path / "m.engine").write_bytes(b"not an engine")
    image = sorted((trained[0] / "test" / "cat").glob("*.png"))[0]
    run = runner.invoke(app, ["predict", str(image), "--model", str(tmp_path / "m.engine")])
    assert run.exit_code == 1 and "TensorRT" in run.output and len(run.output.strip().splitlines()) == 1


@needs_trt
def test_engine_gives_the_checkpoints_classes(trained: tuple[Path, Path], tmp_path: Path) -> None:
    engine = tmp_path / "m.engine"
    result = runner.invoke(
        app, ["export", str(trained[1]), "--format", "engine", "--batch-range", "1:8:16", "-o", str(engine), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["max_abs_diff"] <= 0.1
    files = [str(p) for p in sorted((trained[0] / "test").rglob("*.png"))]
    from_ckpt, _ = _probabilities([*files, "--checkpoint", str(trained[1])])
    from_engine, out = _probabilities([*files, "--model", str(engine)])
    assert "TensorRT" in str(out["runtime"])
    agree = sum(max(from_ckpt[f], key=from_ckpt[f].get) == max(from_engine[f], key=from_engine[f].get) for f in files)  # type: ignore[arg-type]
    assert agree >= len(files) - 1  # fp16: a near-tie may flip


def test_precision_is_for_checkpoints_not_exported_files(onnx_file: Path, tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (10, 200, 10)).save(image)
    for command in (["predict", str(image)], ["evaluate"]):
        result = runner.invoke(app, [*command, "--model", str(onnx_file), "--precision", "bf16"])
        assert result.exit_code == 2 and "--precision is for checkpoints" in result.output
