"""Running exported models: ONNX files with ONNX Runtime and TensorRT engines, for `predict` and `evaluate`.

This module never imports torch: on a Jetson, `predict --model model.onnx` starts in well under a second,
where importing torch alone takes several (bench/predict_cold_start.py measures both). Everything the
exported file needs to know (class names, input size, what its input and output are) is read from the
cifarnet metadata that `cifarnet export` writes: ONNX ``metadata_props``, or ``<engine>.json`` beside a
TensorRT engine.

Preprocessing is the same for every kind of model: :func:`cifarnet_cli.data.images.load_image` gives
uint8 pixels, :func:`to_input` scales them to float [0, 1] N×3×H×W (or applies jetson-inference's
normalization for files exported ``--for jetson-inference``), and :func:`softmax` turns outputs into
probabilities.
"""

from __future__ import annotations

import importlib.util
import json
import re
import reprlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cifarnet_cli import paths
from cifarnet_cli.data.images import IMAGE_SIZE, MAX_INPUT_SIZE, MIN_INPUT_SIZE, valid_input_size
from cifarnet_cli.errors import CifarNetError, UsageError, first_line
from cifarnet_cli.fileio import display

ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")

#: What jetson-inference's `imagenet` applies to every ONNX model's input: pixels scaled to [0, 1], then
#: ImageNet mean/std, planar RGB (c/imageNet.cpp preProcess → cudaTensorNormMeanRGB in c/tensorConvert.cu).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RUNTIME_HINT = "pip install 'cifarnet[export]'"


def inference_batch(arch: str) -> int:
    """Default images per forward pass: small for ResNet-50 (it upsamples inside; Jetson memory)."""
    return 128 if arch == "resnet50" else 500


def is_exported(path: str | Path) -> bool:
    """Whether ``path`` names an exported model (ONNX file or TensorRT engine) rather than a checkpoint."""
    return Path(path).suffix.lower() in ONNX_SUFFIXES + ENGINE_SUFFIXES


class ImageClassifier(Protocol):
    """What `predict` and `evaluate` need from any model: a checkpoint, an ONNX file or an engine."""

    path: Path
    arch: str
    classes: tuple[str, ...]
    input_size: int
    default_batch: int
    runtime: str  # what ran it, e.g. "onnxruntime 1.23.2, CPUExecutionProvider"
    notice: str | None  # a caveat to show with its answers (an untrained checkpoint)

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 N×H×W×3 pixels → float32 N×classes scores whose softmax is the class probabilities."""
        ...


def to_input(pixels: np.ndarray, normalization: str = "none") -> np.ndarray:
    """uint8 N×H×W×3 → float32 N×3×H×W in [0, 1]; ``imagenet`` also applies jetson-inference's mean/std."""
    x = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32)
    x *= np.float32(1.0 / 255.0)  # the same multiplier as tensorConvert.cu's (range.y - range.x) / 255
    if normalization == "imagenet":
        mean = np.asarray(IMAGENET_MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(IMAGENET_STD, dtype=np.float32).reshape(1, 3, 1, 1)
        x = (x - mean) / std
    return x


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return np.asarray(e / e.sum(axis=1, keepdims=True), dtype=np.float32)


@dataclass(frozen=True)
class ExportInfo:
    """The cifarnet metadata of an exported file."""

    arch: str
    classes: tuple[str, ...]
    input_size: int
    normalization: str  # "none": the graph takes [0, 1] pixels; "imagenet": jetson-inference's input
    output: str  # "logits" or "probabilities"

    @classmethod
    def from_props(cls, props: dict[str, str], path: Path) -> ExportInfo:
        """The metadata, checked: a file whose metadata cannot describe a working model is refused here,
        saying what is wrong, rather than giving wrong answers later."""
        if "cifarnet_classes" not in props:
            raise CifarNetError(
                f"{display(path)} has no cifarnet metadata (class names, input size); export it with `cifarnet export`."
            )

        def damaged(what: str) -> CifarNetError:
            return CifarNetError(f"{display(path)}: its cifarnet metadata is damaged ({what}); export it again.")

        try:
            classes = json.loads(props["cifarnet_classes"])
        except (ValueError, TypeError) as exc:
            raise damaged(f"cifarnet_classes is not JSON: {exc}") from None
        if (
            not isinstance(classes, list)
            or not classes
            or not all(isinstance(c, str) and c for c in classes)
            or len(set(classes)) != len(classes)
        ):
            raise damaged("cifarnet_classes must be a non-empty list of distinct class names")
        raw_size = props.get("cifarnet_input_size", str(IMAGE_SIZE))
        size = int(raw_size) if isinstance(raw_size, str) and raw_size.strip().isdigit() else None
        if not valid_input_size(size):
            raise damaged(
                f"cifarnet_input_size is {reprlib.repr(raw_size)}, not a whole number of pixels from {MIN_INPUT_SIZE} to "
                f"{MAX_INPUT_SIZE}"
            )
        assert size is not None
        normalization = props.get("cifarnet_input_normalization", "none")
        output = props.get("cifarnet_output", "logits")
        if normalization not in ("none", "imagenet") or output not in ("logits", "probabilities"):
            raise damaged(f"unknown input normalization {reprlib.repr(normalization)} or output {reprlib.repr(output)}")
        return cls(str(props.get("cifarnet_arch", "unknown")), tuple(classes), size, normalization, output)


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of an exported graph, as its runtime describes it: ``dtype`` in numpy's words
    (float32, float16, int64, ...), dimensions as ints, with None for a dynamic one."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]


def _dims(shape: tuple[int | None, ...]) -> str:
    return "×".join("N" if d is None else str(d) for d in shape) or "a scalar"


def check_signature(path: Path, info: ExportInfo, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
    """Refuse a graph that does not take N×3×S×S float32 pixels (S the metadata's input size) and return
    N×C scores (C the number of class names): a mismatch gives tracebacks or, worse, confident answers from
    the wrong class names."""
    where = display(path)
    if len(inputs) != 1 or len(outputs) != 1:
        raise CifarNetError(
            f"{where} has {len(inputs)} input(s) and {len(outputs)} output(s); a cifarnet model has one of each."
        )
    (inp,), (out,) = inputs, outputs
    size, n_classes = info.input_size, len(info.classes)
    wanted = (None, 3, size, size)
    if inp.dtype != "float32":
        raise CifarNetError(f"{where}: its input is {inp.dtype}, not float32 (cifarnet feeds float32 pixels).")
    if len(inp.shape) != 4 or any(
        d is not None and w is not None and d != w for d, w in zip(inp.shape, wanted, strict=True)
    ):
        raise CifarNetError(
            f"{where}: its input is {_dims(inp.shape)}, not N×3×{size}×{size} (channels first, at the input size "
            "its metadata states)."
        )
    if out.dtype != "float32":
        raise CifarNetError(f"{where}: its output is {out.dtype}, not float32 scores, one per class.")
    if len(out.shape) != 2 or out.shape[1] not in (None, n_classes):
        raise CifarNetError(
            f"{where}: its output is {_dims(out.shape)}, not N×{n_classes} (one score for each of the "
            f"{n_classes} class names in its metadata)."
        )


def _batched(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, smallest: int, largest: int | None) -> np.ndarray:
    """Run ``x`` in chunks the model accepts: at most ``largest`` images, padded (with copies of the
    last image) up to ``smallest``; a static export has smallest == largest."""
    outputs = []
    step = largest or max(len(x), 1)
    for start in range(0, len(x), step):
        chunk = x[start : start + step]
        n = len(chunk)
        if n < smallest:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], smallest - n, axis=0)])
        outputs.append(run(chunk)[:n])
    return np.concatenate(outputs).astype(np.float32, copy=False)


class ExportedModel:
    """An ONNX file or TensorRT engine with its cifarnet metadata, behind :class:`ImageClassifier`."""

    def __init__(
        self,
        path: Path,
        info: ExportInfo,
        run: Callable[[np.ndarray], np.ndarray],
        batch_range: tuple[int, int | None],
        runtime: str,
    ) -> None:
        self.path = path
        self.info = info
        self.arch = info.arch
        self.classes = info.classes
        self.input_size = info.input_size
        self.runtime = runtime
        self.notice: str | None = None
        self._run = run
        self.batch_range = batch_range  # what the file accepts; logits() splits and pads to fit
        self.default_batch = inference_batch(info.arch)

    def _checked(self, x: np.ndarray) -> np.ndarray:
        """Run one chunk; outputs of another shape than the signature promised (a dynamic class dimension)
        are refused, never read as scores."""
        out = np.asarray(self._run(x))
        if out.shape != (len(x), len(self.classes)) or out.dtype.kind != "f":
            raise CifarNetError(
                f"{display(self.path)} returned {out.dtype} outputs of shape {out.shape} for {len(x)} images; a "
                f"cifarnet model returns {len(x)}×{len(self.classes)} scores (one per class name)."
            )
        return out

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        out = _batched(self._checked, to_input(pixels, self.info.normalization), *self.batch_range)
        if self.info.output == "probabilities":  # log p: its softmax is p again, and argmax/TTA averages agree
            return np.log(np.maximum(out, np.finfo(np.float32).tiny))
        return out


# --------------------------------------------------------------------------------------------------
# ONNX Runtime


def _device_index(device: str) -> tuple[str, int]:
    spec = (device or "auto").strip().lower()
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if match:
        return "cuda", int(match.group(1) or 0)
    if spec in ("auto", "cpu"):
        return spec, 0
    raise UsageError(f"--device {device!r}: an exported model runs on auto, cpu, cuda or cuda:N.")


def onnx_providers(device: str, available: list[str]) -> list[Any]:
    """TensorRT, then CUDA, then the CPU, as far as this onnxruntime build has them (Jetson builds of
    onnxruntime-gpu have all three); ``--device cpu`` keeps to the CPU."""
    kind, index = _device_index(device)
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    gpu: list[Any] = []
    if "TensorrtExecutionProvider" in available:
        # Building the TensorRT engine takes minutes on a Jetson: keep it between runs.
        cache = paths.cache_dir() / "tensorrt"
        options = {"device_id": index, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache)}
        gpu.append(("TensorrtExecutionProvider", options))
    if "CUDAExecutionProvider" in available:
        gpu.append(("CUDAExecutionProvider", {"device_id": index}))
    if kind == "cuda" and not gpu:
        raise CifarNetError(
            f"--device {device}: this onnxruntime has no CUDA or TensorRT provider (it has "
            f"{', '.join(available)}); install onnxruntime-gpu, or use --device cpu."
        )
    return [*gpu, "CPUExecutionProvider"]


def _onnx_specs(args: list[Any]) -> list[TensorSpec]:
    """onnxruntime's NodeArgs (type 'tensor(float)', shape [int | str | None]) as :class:`TensorSpec`."""
    specs = []
    for arg in args:
        kind = str(arg.type)
        dtype = kind[len("tensor(") : -1] if kind.startswith("tensor(") else kind
        dtype = {"float": "float32", "double": "float64"}.get(dtype, dtype)
        shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in (arg.shape or []))
        specs.append(TensorSpec(str(arg.name), dtype, shape))
    return specs


def open_onnx(path: Path, device: str = "auto") -> ExportedModel:
    if importlib.util.find_spec("onnxruntime") is None:
        raise CifarNetError(f"Running {path.name} needs onnxruntime: {RUNTIME_HINT} (onnxruntime-gpu for CUDA).")
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # errors only: no per-node provider-placement warnings
    providers = onnx_providers(device, ort.get_available_providers())
    if providers[0] != "CPUExecutionProvider":
        cache = paths.cache_dir() / "tensorrt"
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass  # the TensorRT provider then builds its engine each time
    try:
        session = ort.InferenceSession(str(path), providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own (unexported) exception types
        raise CifarNetError(f"{path} is not an ONNX model onnxruntime can run ({first_line(exc)}).") from None
    info = ExportInfo.from_props(dict(session.get_modelmeta().custom_metadata_map), path)
    check_signature(path, info, _onnx_specs(session.get_inputs()), _onnx_specs(session.get_outputs()))
    (inp,) = session.get_inputs()
    batch = inp.shape[0]
    batch_range: tuple[int, int | None] = (batch, batch) if isinstance(batch, int) and batch > 0 else (1, None)

    def run(x: np.ndarray) -> np.ndarray:
        (out,) = session.run(None, {inp.name: x})
        return np.asarray(out)

    ran = session.get_providers()[0]
    return ExportedModel(path, info, run, batch_range, f"onnxruntime {ort.__version__}, {ran}")


# --------------------------------------------------------------------------------------------------
# TensorRT


def tensorrt_missing() -> str | None:
    """Why TensorRT cannot run here, or None when its Python module is importable."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT's Python module (tensorrt) is not installed here"
    return None


def engine_metadata_path(engine: Path) -> Path:
    return engine.with_name(engine.name + ".json")


def engine_metadata(engine: Path) -> dict[str, str]:
    """``<engine>.json`` (written by `cifarnet export --format engine`), else the metadata of the ONNX file
    of the same name that trtexec built the engine from."""
    meta_file = engine_metadata_path(engine)
    onnx_file = engine.with_suffix(".onnx")
    try:
        if meta_file.is_file():
            return dict(json.loads(meta_file.read_text()))
        if onnx_file.is_file() and importlib.util.find_spec("onnx") is not None:
            import onnx

            return {p.key: p.value for p in onnx.load(str(onnx_file), load_external_data=False).metadata_props}
    except Exception as exc:  # noqa: BLE001 - unreadable JSON or ONNX (protobuf's DecodeError) alike
        raise CifarNetError(f"Cannot read the metadata of {engine} ({first_line(exc)}).") from None
    raise CifarNetError(
        f"{engine} comes without its class names: keep {meta_file.name} (from `cifarnet export --format engine`) or "
        f"the ONNX file it was built from ({onnx_file.name}) beside it."
    )


def open_engine(path: Path, device: str = "auto") -> ExportedModel:
    """A TensorRT engine built by `cifarnet export --format engine`, or by trtexec from a cifarnet ONNX file
    kept beside it under the same name (model.onnx → model.engine)."""
    missing = tensorrt_missing()
    if missing:
        raise CifarNetError(
            f"{path.name} is a TensorRT engine, and {missing}; run the ONNX file instead (--model model.onnx)."
        )
    kind, index = _device_index(device)
    if kind == "cpu":
        raise UsageError("--device cpu: a TensorRT engine runs on the GPU; use the ONNX file for the CPU.")
    props = engine_metadata(path)
    info = ExportInfo.from_props(props, path)

    import tensorrt as trt
    import torch  # device buffers: torch is installed wherever cifarnet is, and keeps this path short

    if not torch.cuda.is_available():
        raise CifarNetError(f"Running {path.name} needs a CUDA GPU, and torch sees none here.")
    logger = trt.Logger(trt.Logger.ERROR)
    engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise CifarNetError(
            f"TensorRT {trt.__version__} cannot load {path} (an engine only runs on the TensorRT version and "
            "GPU that built it); build it again here with `cifarnet export --format engine`."
        )
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def spec(name: str) -> TensorSpec:
        dtype = str(engine.get_tensor_dtype(name)).rsplit(".", 1)[-1].lower()  # DataType.FLOAT → float
        dtype = {"float": "float32", "half": "float16", "int32": "int32", "int64": "int64"}.get(dtype, dtype)
        shape = tuple(int(d) if int(d) >= 0 else None for d in engine.get_tensor_shape(name))
        return TensorSpec(name, dtype, shape)

    check_signature(path, info, [spec(n) for n in inputs], [spec(n) for n in outputs])
    inp, out = inputs[0], outputs[0]
    fixed = int(engine.get_tensor_shape(inp)[0])
    if fixed > 0:
        batch_range: tuple[int, int | None] = (fixed, fixed)
    else:
        low, _opt, high = engine.get_tensor_profile_shape(inp, 0)
        batch_range = (int(low[0]), int(high[0]))
    context = engine.create_execution_context()
    gpu = torch.device("cuda", index)

    def run(x: np.ndarray) -> np.ndarray:
        source = torch.from_numpy(x).to(gpu)
        context.set_input_shape(inp, tuple(source.shape))
        result = torch.empty(tuple(context.get_tensor_shape(out)), dtype=torch.float32, device=gpu)
        context.set_tensor_address(inp, source.data_ptr())
        context.set_tensor_address(out, result.data_ptr())
        stream = torch.cuda.current_stream(gpu)
        if not context.execute_async_v3(stream.cuda_stream):
            raise CifarNetError(f"TensorRT failed to run {path}.")
        stream.synchronize()
        return result.cpu().numpy()

    return ExportedModel(path, info, run, batch_range, f"TensorRT {trt.__version__} on cuda:{index}")


def open_exported(path: Path, device: str = "auto") -> ExportedModel:
    path = path.expanduser()
    if not path.is_file():
        raise CifarNetError(f"No model file at {path}.")
    if path.suffix.lower() in ENGINE_SUFFIXES:
        return open_engine(path, device)
    return open_onnx(path, device)
