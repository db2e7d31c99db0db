"""`cifarnet export`: ONNX and TorchScript files that take float RGB in [0, 1] (N×3×32×32) and return
logits. Normalization (and a ResNet-50's resize) is inside the graph, so a deployment needs no other
preprocessing than the one `predict` documents."""

from __future__ import annotations

import copy
import importlib.util
import inspect
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifarnet_cli import choices
from cifarnet_cli.errors import CifarNetError, UsageError
from cifarnet_cli.inference import LoadedModel, load_model

FORMATS = choices.EXPORT_FORMATS
DEFAULT_OPSET = 18
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
EXPORT_EXTRA_HINT = "pip install 'cifarnet[export]'"


class _Deployable(nn.Module):
    """float32 in, float32 logits out; with fp16 the weights and arithmetic are half precision inside."""

    def __init__(self, model: nn.Module, half: bool) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).half() if half else model  # the caller's fp32 model stays intact
        self.use_half = half

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.use_half:
            return self.model(images.half()).float()
        return self.model(images)


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: str
    max_abs_diff: float | None  # None when not verified
    tolerance: float
    verified_with: str | None
    trtexec: str | None
    notice: str | None = None  # e.g. the checkpoint has no completed epoch (untrained)


def metadata(loaded: LoadedModel, fp16: bool) -> dict[str, str]:
    mean, std = loaded.model.normalization
    return {
        "cifarnet_arch": loaded.arch,
        "cifarnet_classes": json.dumps(list(loaded.classes)),
        "cifarnet_input_size": str(loaded.input_size),
        "cifarnet_input": "float32 RGB in [0, 1], N x 3 x H x W; normalization is inside the graph",
        "cifarnet_mean": json.dumps([round(m, 6) for m in mean]),
        "cifarnet_std": json.dumps([round(s, 6) for s in std]),
        "cifarnet_model_kwargs": json.dumps(loaded.meta.get("model_kwargs", {})),
        "cifarnet_precision": "fp16" if fp16 else "fp32",
    }


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise CifarNetError(f"ONNX export needs the {module} package: {EXPORT_EXTRA_HINT}")


def _export_onnx(
    net: nn.Module, example: torch.Tensor, target: Path, opset: int, dynamic: bool, meta: dict[str, str]
) -> None:
    _need("onnx")
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dynamo_exporter = "dynamo" in inspect.signature(torch.onnx.export).parameters  # torch >= 2.5
            if dynamo_exporter and importlib.util.find_spec("onnxscript") is not None:
                shapes = {"images": {0: torch.export.Dim("batch", min=1, max=65536)}} if dynamic else None
                program = torch.onnx.export(
                    net,
                    (example,),
                    input_names=["images"],
                    output_names=["logits"],
                    opset_version=opset,
                    dynamo=True,
                    dynamic_shapes=shapes,
                    external_data=False,
                    verbose=False,
                )
                assert program is not None
                program.save(str(raw))
            else:  # the TorchScript-based exporter (older torch, as on some Jetson images, or no onnxscript)
                axes = {"images": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None
                extra: dict[str, Any] = {"dynamo": False} if dynamo_exporter else {}
                torch.onnx.export(
                    net,
                    (example,),
                    str(raw),
                    input_names=["images"],
                    output_names=["logits"],
                    opset_version=opset,
                    dynamic_axes=axes,
                    **extra,
                )
        proto = onnx.load(str(raw))
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "cifarnet"
    onnx.checker.check_model(proto)
    _atomic_write(target, proto.SerializeToString())


def _export_torchscript(net: nn.Module, example: torch.Tensor, target: Path, meta: dict[str, str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, example)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".partial", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream but still the
            # format that C++ (libtorch) and older Jetson stacks load
            torch.jit.save(traced, str(tmp_path), _extra_files={"cifarnet.json": json.dumps(meta)})
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def _atomic_write(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".partial", delete=False) as tmp:
        tmp.write(data)
        tmp_path = Path(tmp.name)
    try:
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def run_exported(path: Path, fmt: str, images: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Logits of the exported file on ``images`` (float32 N×3×H×W) and the runtime that produced them."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (out,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
        return torch.from_numpy(out), f"onnxruntime {ort.__version__}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        return module(images), "torch.jit"


def export_model(
    ref: str | None,
    *,
    fmt: str = "onnx",
    output: Path | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    fp16: bool = False,
    verify: bool | None = None,
    verify_images: torch.Tensor | None = None,
) -> ExportResult:
    if fmt not in FORMATS:
        raise UsageError(f"Unknown --format {fmt!r}; choose one of: {', '.join(FORMATS)}.")
    if fmt == "onnx" and not 7 <= opset <= 23:
        raise UsageError(f"--opset {opset}: choose an ONNX opset between 7 and 23 (default {DEFAULT_OPSET}).")
    device = torch.device("cpu")  # export on the CPU: the file is device-independent
    loaded = load_model(ref, device)
    if output is None:
        folder = loaded.run.dir if loaded.run is not None else loaded.path.parent
        output = folder / ("model.onnx" if fmt == "onnx" else "model.ts")
    output = output.expanduser()
    output.parent.mkdir(parents=True, exist_ok=True)
    size = loaded.input_size
    example = torch.rand(2, 3, size, size)
    meta = metadata(loaded, fp16)
    net = _Deployable(loaded.model, half=fp16).eval()
    if fmt == "onnx":
        _export_onnx(net, example, output, opset, dynamic_batch, meta)
    else:
        if fp16:
            raise UsageError("--fp16 is for ONNX (TensorRT); TorchScript exports are fp32.")
        _export_torchscript(net, example, output, meta)

    if verify is None:
        verify = fmt == "torchscript" or importlib.util.find_spec("onnxruntime") is not None
    diff: float | None = None
    runtime: str | None = None
    tolerance = TOLERANCE["fp16" if fp16 else "fp32"]
    if verify:
        if fmt == "onnx":
            _need("onnxruntime")
        images = (
            verify_images
            if verify_images is not None
            else torch.rand(8, 3, size, size, generator=torch.Generator().manual_seed(0))
        )
        if not dynamic_batch:
            images = images[: example.shape[0]]
            if images.shape[0] < example.shape[0]:
                images = torch.cat([images, images])[: example.shape[0]]
        with torch.inference_mode():
            reference = loaded.model(images).float()
        got, runtime = run_exported(output, fmt, images)
        diff = float((got.float() - reference).abs().max())
        if not diff <= tolerance:
            raise CifarNetError(
                f"The exported model differs from the PyTorch model by up to {diff:.3g} (allowed {tolerance:g}); "
                f"the file is at {output} but should not be trusted."
            )
    trtexec = (
        f"trtexec --onnx={output} --saveEngine={output.with_suffix('.engine')} --fp16"
        + (
            f" --minShapes=images:1x3x{size}x{size} --optShapes=images:32x3x{size}x{size} "
            f"--maxShapes=images:256x3x{size}x{size}"
            if dynamic_batch
            else ""
        )
        if fmt == "onnx"
        else None
    )
    return ExportResult(output, fmt, diff, tolerance, runtime, trtexec, loaded.notice)


def read_metadata(path: Path) -> dict[str, Any]:
    """The cifarnet metadata of an exported file (ONNX metadata_props or the TorchScript extra file)."""
    if path.suffix == ".onnx":
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        return {p.key: p.value for p in proto.metadata_props}
    extra = {"cifarnet.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return dict(json.loads(extra["cifarnet.json"]))
