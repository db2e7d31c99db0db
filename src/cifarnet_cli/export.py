"""`cifarnet export`: ONNX and TorchScript files that take float RGB in [0, 1] (N×3×32×32) and return
logits, TensorRT engines built from them, and ONNX files for jetson-inference's `imagenet` program.

Normalization (and a ResNet-50's resize) is inside the graph, so a deployment needs no other preprocessing
than the one `predict` documents. Every file is checked before success is reported: the ONNX opset that
was asked for, then the outputs against PyTorch's on the same images (``--verify``).
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cifarnet_cli import choices, fileio, runtime
from cifarnet_cli.errors import CifarNetError, UsageError, first_line
from cifarnet_cli.inference import LoadedModel, load_model
from cifarnet_cli.text import printable

FORMATS = choices.EXPORT_FORMATS
TARGETS = choices.EXPORT_TARGETS
DEFAULT_OPSET = 18
#: Opset for files meant for TensorRT on a Jetson: JetPack 4's TensorRT 8.2 (Jetson Nano) reads at most
#: opset 13, and every later TensorRT reads it too.
JETSON_OPSET = 13
#: torch's dynamo exporter writes opset 18 and later; for lower opsets it only "converts down", which
#: fails for these models (an onnxscript traceback, and the file stays at 18). The TorchScript-based
#: exporter writes lower opsets directly.
DYNAMO_MIN_OPSET = 18
OPSET_RANGE = (9, 23)
#: Largest absolute difference from PyTorch that verification accepts: on logits, or on probabilities
#: for jetson-inference files. TensorRT fp16 is looser than ONNX Runtime fp16 (fp16 accumulation in
#: some kernels); that figure is a bound chosen for safety, not one measured on a Jetson.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "engine-fp16": 1e-1}
DEFAULT_BATCH_RANGE = (1, 32, 256)  # TensorRT optimization profile: min, opt, max images
#: Largest fixed batch of a static export: the graph is traced on a batch of that size (the TorchScript
#: exporters run it), so 1024 images of 3×32×32 float32 are 12 MB in, and ResNet-50's activations for them
#: already a few GB.
MAX_STATIC_BATCH = 1024
#: Largest batch a dynamic export declares (the dynamo exporter's batch dimension, TensorRT's profile).
MAX_DYNAMIC_BATCH = 65536
EXPORT_EXTRA_HINT = "pip install 'cifarnet[export]'"
INPUT, OUTPUT = "images", "logits"
JETSON_INPUT, JETSON_OUTPUT = "input_0", "output_0"  # the blob names jetson-inference's docs use


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


class _ForJetsonInference(nn.Module):
    """What jetson-inference's `imagenet` expects of an ONNX classifier: it feeds ``(pixel / 255 - mean) /
    std`` with ImageNet's mean and std (c/imageNet.cpp → cudaTensorNormMeanRGB) and ranks the raw outputs
    as confidences. So the graph first undoes that normalization (giving back the [0, 1] pixels every
    cifarnet model takes; the model then applies its own) and ends in a softmax."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(runtime.IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(runtime.IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, input_0: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(input_0 * self.std + self.mean), dim=1)


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: str
    target: str | None
    opset: int | None
    max_abs_diff: float | None  # None when not verified
    compared: str  # "logits" or "probabilities"
    tolerance: float
    verified_with: str | None
    trtexec: str | None
    labels: Path | None = None
    imagenet: str | None = None  # the jetson-inference command line
    notice: str | None = None  # e.g. the checkpoint has no completed epoch (untrained)
    model: str = ""  # the checkpoint exported (the default is the newest trained run's best.pt)
    arch: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "for": self.target,
            "opset": self.opset,
            "max_abs_diff": self.max_abs_diff,
            "compared": self.compared,
            "tolerance": self.tolerance,
            "verified_with": self.verified_with,
            "trtexec": self.trtexec,
            "labels": str(self.labels) if self.labels else None,
            "imagenet": self.imagenet,
            "notice": self.notice,
            "model": self.model,
            "arch": self.arch,
        }


def metadata(loaded: LoadedModel, fp16: bool, *, jetson: bool = False) -> dict[str, str]:
    mean, std = loaded.model.normalization
    size = loaded.input_size
    return {
        "cifarnet_arch": loaded.arch,
        "cifarnet_classes": json.dumps(list(loaded.classes)),
        "cifarnet_input_size": str(size),
        "cifarnet_input": (
            f"float32 RGB, 1 x 3 x {size} x {size}, (pixel / 255 - ImageNet mean) / ImageNet std, as "
            "jetson-inference's imagenet feeds it"
            if jetson
            else "float32 RGB in [0, 1], N x 3 x H x W; normalization is inside the graph"
        ),
        "cifarnet_input_normalization": "imagenet" if jetson else "none",
        "cifarnet_output": "probabilities" if jetson else "logits",
        "cifarnet_mean": json.dumps([round(m, 6) for m in mean]),
        "cifarnet_std": json.dumps([round(s, 6) for s in std]),
        "cifarnet_model_kwargs": json.dumps(loaded.meta.get("model_kwargs", {})),
        "cifarnet_precision": "fp16" if fp16 else "fp32",
    }


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise CifarNetError(f"ONNX export needs the {module} package: {EXPORT_EXTRA_HINT}")


def onnx_opset(proto: Any) -> int | None:
    """The default-domain (ai.onnx) opset a model declares."""
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _onnx_proto(net: nn.Module, example: torch.Tensor, opset: int, dynamic: bool, names: tuple[str, str]) -> Any:
    """The exported graph, in memory (nothing half-written on disk if export fails)."""
    _need("onnx")
    import onnx

    dynamo_exporter = "dynamo" in inspect.signature(torch.onnx.export).parameters  # torch >= 2.5
    use_dynamo = dynamo_exporter and opset >= DYNAMO_MIN_OPSET and importlib.util.find_spec("onnxscript") is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if use_dynamo:
                shapes = ({0: torch.export.Dim("batch", min=1, max=65536)},) if dynamic else None
                program = torch.onnx.export(
                    net,
                    (example,),
                    input_names=[names[0]],
                    output_names=[names[1]],
                    opset_version=opset,
                    dynamo=True,
                    dynamic_shapes=shapes,
                    external_data=False,
                    verbose=False,
                )
                assert program is not None
                return program.model_proto
            # The TorchScript-based exporter (below opset 18; older torch, as on some Jetson images; no onnxscript).
            axes = {names[0]: {0: "batch"}, names[1]: {0: "batch"}} if dynamic else None
            extra: dict[str, Any] = {"dynamo": False} if dynamo_exporter else {}
            buffer = io.BytesIO()
            torch.onnx.export(
                net,
                (example,),
                buffer,  # type: ignore[arg-type]  # a file-like object is documented and works
                input_names=[names[0]],
                output_names=[names[1]],
                opset_version=opset,
                dynamic_axes=axes,
                **extra,
            )
            return onnx.load_from_string(buffer.getvalue())
        except Exception as exc:  # noqa: BLE001 - the exporters raise many types; the user needs one line
            raise CifarNetError(
                f"torch {torch.__version__} could not export this model at opset {opset} ({first_line(exc, 200)}); "
                f"try --opset {JETSON_OPSET} or --opset {DEFAULT_OPSET}."
            ) from None


def _finish_onnx(proto: Any, opset: int, meta: dict[str, str]) -> bytes:
    """Check the opset the exporter actually wrote, add the metadata, validate, serialize."""
    import onnx

    written = onnx_opset(proto)
    if written != opset:
        raise CifarNetError(
            f"torch {torch.__version__} wrote an opset-{written} graph when opset {opset} was asked for; nothing was "
            f"saved. Choose --opset {JETSON_OPSET} (TorchScript-based exporter) or {DEFAULT_OPSET} and above."
        )
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "cifarnet"
    onnx.checker.check_model(proto)
    return bytes(proto.SerializeToString())


def _torchscript_bytes(net: nn.Module, example: torch.Tensor, meta: dict[str, str]) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream but still the format that C++
        # (libtorch) and older Jetson stacks load
        traced = torch.jit.trace(net, example)
        # Serialized in memory: torch.jit.save writing to a full disk aborts the process in C++ (exit 134).
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={"cifarnet.json": json.dumps(meta)})
    return buffer.getvalue()


def _build_engine(onnx_bytes: bytes, fp16: bool, batch_range: tuple[int, int, int] | None, size: int) -> bytes:
    """A serialized TensorRT engine for this GPU and TensorRT version (it runs nowhere else)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    # TensorRT 8 needs explicit-batch networks for ONNX; in TensorRT 10 the flag is gone (always explicit).
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CifarNetError(f"TensorRT {trt.__version__} could not read the ONNX graph ({errors[:300]}).")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if batch_range is not None:
        low, opt, high = ((n, 3, size, size) for n in batch_range)
        profile = builder.create_optimization_profile()
        profile.set_shape(INPUT, low, opt, high)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CifarNetError(f"TensorRT {trt.__version__} could not build an engine for this model on this GPU.")
    return bytes(serialized)


def parse_batch_range(spec: str) -> tuple[int, int, int]:
    """``N`` (fixed), ``MIN:MAX`` (optimized for MAX) or ``MIN:OPT:MAX``."""
    try:
        values = [int(v) for v in spec.split(":")]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 3
    elif len(values) == 2:
        values = [values[0], values[1], values[1]]
    if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2] <= MAX_DYNAMIC_BATCH:
        raise UsageError(
            f"--batch-range {spec!r}: give MIN:OPT:MAX (or MIN:MAX, or N) with 1 <= MIN <= OPT <= MAX <= "
            f"{MAX_DYNAMIC_BATCH}, e.g. 1:32:256."
        )
    return values[0], values[1], values[2]


def trtexec_command(onnx_path: Path, size: int, batch_range: tuple[int, int, int] | None) -> str:
    engine = onnx_path.with_suffix(".engine")
    line = f"trtexec --onnx={onnx_path} --saveEngine={engine} --fp16"
    if batch_range is not None:
        low, opt, high = batch_range
        line += (
            f" --minShapes={INPUT}:{low}x3x{size}x{size} --optShapes={INPUT}:{opt}x3x{size}x{size}"
            f" --maxShapes={INPUT}:{high}x3x{size}x{size}"
        )
    return line


def imagenet_command(onnx_path: Path, labels: Path) -> str:
    return (
        f"imagenet --model={onnx_path} --labels={labels} --input_blob={JETSON_INPUT} "
        f"--output_blob={JETSON_OUTPUT} image.jpg"
    )


def _verify_pixels(size: int) -> np.ndarray:
    """Eight fixed uint8 images (random pixels, seed 0) for comparing an export with PyTorch."""
    return np.random.default_rng(0).integers(0, 256, (8, size, size, 3), dtype=np.uint8)


def _torchscript_logits(path: Path, x: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        return module(x)


def _check_output_name(output: Path, fmt: str) -> None:
    """An ONNX file or engine named like a checkpoint would be taken for one (and `cifarnet predict` would
    be told to load it as one)."""
    if fmt != "torchscript" and output.suffix.lower() in (".pt", ".pth"):
        suffix = {"onnx": ".onnx", "engine": ".engine"}[fmt]
        raise UsageError(
            f"--output {fileio.display(output)}: .pt and .pth name checkpoints; name the {fmt} file *{suffix}."
        )


def _check_line_names(classes: tuple[str, ...]) -> None:
    """labels.txt holds one class name per line: a name with a line break (or another control character)
    would shift every name after it to the wrong output."""
    bad = [c for c in classes if printable(c) != c or not c.strip()]
    if bad:
        raise CifarNetError(
            f"Class name '{printable(bad[0])}' cannot be written to labels.txt (one name per line): it holds a line "
            "break or another control character, or is blank. Export without --for jetson-inference, or rename "
            "the class folder and train again."
        )


def export_model(
    ref: str | None,
    *,
    fmt: str = "onnx",
    target: str | None = None,
    output: Path | None = None,
    opset: int | None = None,
    dynamic_batch: bool = True,
    batch: int | None = None,
    batch_range: str | None = None,
    fp16: bool | None = None,
    verify: bool | None = None,
    verify_pixels: np.ndarray | None = None,
) -> ExportResult:
    """Export the run or checkpoint ``ref``. ``batch`` fixes the batch size (a static export); ``fp16``
    defaults to off for ONNX and on for TensorRT engines. ``verify_pixels`` (uint8 N×H×W×3) replaces the
    random verification images."""
    if fmt not in FORMATS:
        raise UsageError(choices.unknown("--format", fmt, FORMATS))
    if target is not None and target not in TARGETS:
        raise UsageError(choices.unknown("--for", target, TARGETS))
    jetson = target == "jetson-inference"
    if jetson and fmt != "onnx":
        raise UsageError("--for jetson-inference writes an ONNX file (imagenet builds its own engine); drop --format.")
    if opset is not None and not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        raise UsageError(
            f"--opset {opset}: choose an ONNX opset between {OPSET_RANGE[0]} and {OPSET_RANGE[1]} "
            f"(default {DEFAULT_OPSET}; {JETSON_OPSET} for older TensorRT)."
        )
    if batch is not None and not 1 <= batch <= MAX_STATIC_BATCH:
        raise UsageError(f"--batch {batch}: give a batch size from 1 to {MAX_STATIC_BATCH}.")
    if fmt == "torchscript" and fp16:
        raise UsageError("--fp16 is for ONNX and TensorRT; TorchScript exports are fp32.")
    if fmt == "torchscript" and (opset is not None or batch_range is not None):
        option = "--opset" if opset is not None else "--batch-range"
        raise UsageError(f"{option} is for ONNX and TensorRT; a TorchScript export has no use for it.")
    static = jetson or batch is not None or not dynamic_batch
    if jetson and batch not in (None, 1):
        raise UsageError("--for jetson-inference: imagenet feeds one image at a time, so the batch is 1.")
    fixed_batch = batch or 1
    profile = None if static else (parse_batch_range(batch_range) if batch_range else DEFAULT_BATCH_RANGE)
    if batch_range is not None and static:
        raise UsageError("--batch-range is for a dynamic batch; a static export has the one batch size of --batch.")
    if fmt == "engine":
        missing = runtime.tensorrt_missing()
        if missing:
            raise CifarNetError(
                f"--format engine builds with TensorRT, and {missing}: run it on the Jetson (JetPack ships TensorRT), "
                "or export ONNX here and build the engine there with trtexec."
            )
    opset = opset if opset is not None else (JETSON_OPSET if jetson or fmt == "engine" else DEFAULT_OPSET)
    half = bool(fp16) if fp16 is not None else fmt == "engine"

    if output is not None:
        _check_output_name(output, fmt)
    device = torch.device("cpu")  # export on the CPU: the file is device-independent
    loaded = load_model(ref, device)
    within = None  # a default output goes into the run folder, which must still exist then (runs rm)
    if output is None:
        within = loaded.run.dir if loaded.run is not None else loaded.path.parent
        name = {"onnx": "model.onnx", "torchscript": "model.ts", "engine": "model.engine"}[fmt]
        output = within / "jetson-inference" / name if jetson else within / name
    output = output.expanduser()
    outputs = [output] + ([output.with_name("labels.txt")] if jetson else [])
    outputs += [runtime.engine_metadata_path(output)] if fmt == "engine" else []
    for path in outputs:
        fileio.check_output(path, [loaded.path], option="--output")
    if jetson:
        _check_line_names(loaded.classes)
    size = loaded.input_size
    example = torch.rand(fixed_batch if static else 2, 3, size, size)
    meta = metadata(loaded, half, jetson=jetson)
    labels: Path | None = None

    def write_bytes(path: Path, data: bytes) -> None:
        fileio.write_bytes(path, data, within=within)

    if fmt == "torchscript":
        write_bytes(output, _torchscript_bytes(_Deployable(loaded.model, half=False).eval(), example, meta))
    else:
        # An engine is built from an fp32 graph: TensorRT picks fp16 kernels itself with its FP16 flag.
        net: nn.Module = _Deployable(loaded.model, half=half and fmt == "onnx").eval()
        names = (INPUT, OUTPUT)
        if jetson:
            net, names = _ForJetsonInference(net).eval(), (JETSON_INPUT, JETSON_OUTPUT)
        onnx_bytes = _finish_onnx(_onnx_proto(net, example, opset, not static, names), opset, meta)
        if fmt == "engine":
            engine = _build_engine(onnx_bytes, half, profile, size)
            write_bytes(output, engine)
            sidecar = {
                **meta,
                "cifarnet_engine_batch": json.dumps([fixed_batch] * 3 if static else list(profile or ())),
            }
            write_bytes(runtime.engine_metadata_path(output), (json.dumps(sidecar, indent=2) + "\n").encode())
        else:
            write_bytes(output, onnx_bytes)
        if jetson:
            labels = output.with_name("labels.txt")
            write_bytes(labels, "".join(f"{c}\n" for c in loaded.classes).encode())

    if verify is None:
        verify = fmt != "onnx" or importlib.util.find_spec("onnxruntime") is not None
    diff: float | None = None
    verified_with: str | None = None
    compared = "probabilities" if jetson else "logits"
    tolerance = TOLERANCE[("engine-fp16" if fmt == "engine" else "fp16") if half else "fp32"]
    if verify:
        pixels = verify_pixels if verify_pixels is not None else _verify_pixels(size)
        x = torch.from_numpy(runtime.to_input(pixels))
        with torch.inference_mode():
            reference = loaded.model(x).float()
        if fmt == "torchscript":
            got = _torchscript_logits(output, x).float()
            verified_with = "torch.jit"
        else:
            if fmt == "onnx":
                _need("onnxruntime")
            exported = runtime.open_exported(output, "cpu" if fmt == "onnx" else "cuda")
            got = torch.from_numpy(exported.logits(pixels))
            verified_with = exported.runtime
        if jetson:
            got, reference = torch.softmax(got, 1), torch.softmax(reference, 1)
        diff = float((got - reference).abs().max())
        if not diff <= tolerance:
            raise CifarNetError(
                f"The exported model differs from the PyTorch model by up to {diff:.3g} in its {compared} (allowed "
                f"{tolerance:g}); the file is at {output} but should not be trusted."
            )
    trtexec = trtexec_command(output, size, profile) if fmt == "onnx" and not jetson else None
    imagenet = imagenet_command(output, labels) if labels is not None else None
    return ExportResult(
        output,
        fmt,
        target,
        None if fmt == "torchscript" else opset,
        diff,
        compared,
        tolerance,
        verified_with,
        trtexec,
        labels,
        imagenet,
        loaded.notice,
        model=str(loaded.path),
        arch=loaded.arch,
    )


def read_metadata(path: Path) -> dict[str, Any]:
    """The cifarnet metadata of an exported file (ONNX metadata_props, the TorchScript extra file, or the
    JSON file beside a TensorRT engine)."""
    if path.suffix == ".onnx":
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        return {p.key: p.value for p in proto.metadata_props}
    if path.suffix in runtime.ENGINE_SUFFIXES:
        return runtime.engine_metadata(path)
    extra = {"cifarnet.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return dict(json.loads(extra["cifarnet.json"]))
