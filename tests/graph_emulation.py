"""A CPU stand-in for CUDA-graph capture, to catch capture mistakes without a GPU.

:func:`install` replaces ``torch.cuda.CUDAGraph``, ``torch.cuda.graph``, streams and devices with the emulation
below and lets cifarnet's training step choose its captured mode on the CPU. What a real capture does, and how
it is emulated:

- Capture records the kernels issued on the capturing stream and executes none of them. Here every aten
  operation issued while capturing (the forward pass, autograd's backward pass, the update) is recorded by a
  TorchDispatchMode and executed, so that the Python code after it sees tensors of the right shapes; at the end
  of the capture every tensor that existed before it is put back as it was, and the tensors the capture
  allocated are filled with NaN (a real graph's memory holds garbage until the first replay).
- Replay runs the recorded kernels on the same memory. Here each recorded operation runs again, in order, on
  the same tensor objects with the same arguments (Python numbers included, frozen as they were at capture),
  and its result is written into the tensor captured as its output, so later operations read it; in-place
  operations write the tensors they wrote at capture.
- Reading a value back to the host while capturing (``.item()``, ``float(t)``, ``bool(t)``, ``nonzero``,
  ``equal``, a copy to another device) is not allowed: it raises CUDA's error, invalidates the capture (whose
  ``capture_end`` then fails as well, as CUDA's does) and is listed in :attr:`Emulator.errors`.
- A kernel runs on the current stream of its tensors' device, so a capture on a stream of another device
  records nothing while the kernels run eagerly (an empty graph, pytorch#87794). Here the CPU, where the
  tensors are, stands for the step's GPU, and the process starts with another current device (``cuda:0``), as
  a run on ``--device cuda:1`` does. Capturing on the default stream is refused, as CUDA refuses it.

Limits: every tensor is on the CPU, so a copy to the host (``.cpu()``) of a CPU tensor cannot be seen, and the
streams do not run concurrently.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from cifarnet_cli import train_step

aten = torch.ops.aten

#: Operations that read a device value back to the host (CUDA refuses them while a stream is capturing).
HOST_SYNC = {
    aten._local_scalar_dense,  # .item(), float(t), int(t), bool(t), .tolist()
    aten.is_nonzero,
    aten.nonzero,
    aten.equal,
    aten.masked_select,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
}
CAPTURING_ERROR = "CUDA error: operation not permitted when stream is capturing"
INVALIDATED_ERROR = "CUDA error: operation failed due to a previous error during capture"


class EmulatedStream:
    def __init__(self, emulator: Emulator, device: torch.device, *, default: bool = False) -> None:
        self.emulator = emulator
        self.device = device
        self.default = default

    def wait_stream(self, other: EmulatedStream) -> None:
        self.emulator.events.append(("wait_stream", self, other))

    def synchronize(self) -> None:
        self.emulator.events.append(("synchronize", self))

    def __repr__(self) -> str:
        return f"<{'default' if self.default else 'side'} stream of {self.device}>"


@dataclass
class _Op:
    func: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outputs: list[torch.Tensor | None]  # where replay writes each result (None: an alias of an input, or not a tensor)


class _Recorder(TorchDispatchMode):
    """Records (and executes) what runs while a graph captures; snapshots each pre-existing storage it sees."""

    def __init__(self, graph: EmulatedGraph, *, recording: bool) -> None:
        super().__init__()
        self.graph = graph
        self.recording = recording
        self.created: set[int] = set()  # storages the capture allocated
        self.snapshots: dict[int, tuple[torch.UntypedStorage, torch.UntypedStorage]] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        emulator = self.graph.emulator
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if not self.recording:
            # The capturing stream belongs to another device: this kernel runs now, outside the graph.
            error = f"kernels ran eagerly, unrecorded, while capturing a stream of {self.graph.stream_device}"
            if error not in emulator.errors:
                emulator.errors.append(error)
            return func(*args, **kwargs)
        reason = _host_sync(func, args, kwargs)
        if reason is not None:
            emulator.errors.append(f"{reason} while capturing ({func})")
            self.graph.invalidated = True
            raise RuntimeError(CAPTURING_ERROR)
        for t in inputs:
            key = _key(t)
            if key not in self.created and key not in self.snapshots and t.untyped_storage().nbytes():
                storage = t.untyped_storage()
                self.snapshots[key] = (storage, _clone_storage(storage))
        out = func(*args, **kwargs)
        input_keys = {_key(t) for t in inputs}
        outputs: list[torch.Tensor | None] = []
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and _key(leaf) not in input_keys:
                self.created.add(_key(leaf))
                outputs.append(leaf)
            else:
                outputs.append(None)
        self.graph.ops.append(_Op(func, args, dict(kwargs), outputs))
        return out

    def undo(self) -> None:
        """What a real capture leaves: pre-existing tensors as they were, the graph's own memory garbage."""
        for storage, copy in reversed(self.snapshots.values()):
            storage.copy_(copy)
        with torch.no_grad():
            for op in self.graph.ops:
                for t in op.outputs:
                    if t is not None and t.is_floating_point():
                        t.detach().fill_(float("nan"))


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _clone_storage(storage: torch.UntypedStorage) -> torch.UntypedStorage:
    copy = torch.UntypedStorage(storage.nbytes(), device=storage.device)
    copy.copy_(storage)
    return copy


def _host_sync(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    if func.overloadpacket in HOST_SYNC:
        return "a read-back to the host"
    if func.overloadpacket is aten._to_copy and kwargs.get("device") is not None and args:
        if torch.device(kwargs["device"]) != args[0].device:
            return "a copy to another device"
    if func.overloadpacket is aten.copy_ and len(args) >= 2 and args[0].device != args[1].device:
        return "a copy between devices"
    return None


class EmulatedGraph:
    """torch.cuda.CUDAGraph: capture_begin/capture_end, replay, pool."""

    def __init__(self, emulator: Emulator) -> None:
        self.emulator = emulator
        self.ops: list[_Op] = []
        self.replays = 0
        self.invalidated = False
        self.stream_device: torch.device | None = None
        self._recorder: _Recorder | None = None

    def capture_begin(self, pool: Any = None, capture_error_mode: str = "global") -> None:
        emulator = self.emulator
        stream = emulator.current_stream()
        if stream.default:
            raise RuntimeError("CUDA graphs must be captured on a non-default stream.")
        if emulator.capturing is not None:
            raise RuntimeError("a capture is already under way")
        self.stream_device = stream.device
        emulator.capturing = self
        emulator.captures += 1
        self._recorder = _Recorder(self, recording=stream.device == emulator.tensor_device)
        self._recorder.__enter__()

    def capture_end(self) -> None:
        assert self._recorder is not None, "capture_end without capture_begin"
        recorder, self._recorder = self._recorder, None
        recorder.__exit__(None, None, None)
        self.emulator.capturing = None
        recorder.undo()
        if self.emulator.fail_capture_end is not None:
            error, self.emulator.fail_capture_end = self.emulator.fail_capture_end, None
            raise error
        if self.invalidated:
            raise RuntimeError(INVALIDATED_ERROR)

    def replay(self) -> None:
        if self.emulator.capturing is not None:
            raise RuntimeError(CAPTURING_ERROR)
        if self.invalidated:
            raise RuntimeError("replay of a graph whose capture failed")
        self.replays += 1
        self.emulator.replays += 1
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            for op in self.ops:
                result = op.func(*op.args, **op.kwargs)
                for target, value in zip(op.outputs, tree_leaves(result), strict=True):
                    if target is not None:
                        target.detach().copy_(value)

    def pool(self) -> tuple[str, int]:
        return ("pool", id(self))


@dataclass
class Emulator:
    """The emulated CUDA state: current device and streams, captures, replays and the mistakes seen."""

    tensor_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    current_device: torch.device = field(default_factory=lambda: torch.device("cuda", 0))
    errors: list[str] = field(default_factory=list)
    events: list[tuple[Any, ...]] = field(default_factory=list)
    captures: int = 0
    replays: int = 0
    capturing: EmulatedGraph | None = None
    fail_capture_end: BaseException | None = None  # raised by the next capture_end (a driver's failure)
    _streams: dict[str, EmulatedStream] = field(default_factory=dict)
    _defaults: dict[str, EmulatedStream] = field(default_factory=dict)
    _capture_stream: EmulatedStream | None = None  # torch.cuda.graph's, made once on first use

    def default_stream(self, device: torch.device | None = None) -> EmulatedStream:
        device = self._device(device)
        return self._defaults.setdefault(str(device), EmulatedStream(self, device, default=True))

    def current_stream(self, device: torch.device | None = None) -> EmulatedStream:
        device = self._device(device)
        return self._streams.get(str(device)) or self.default_stream(device)

    def _device(self, device: Any) -> torch.device:
        if device is None:
            return self.current_device
        if isinstance(device, int):
            return torch.device("cuda", device)
        return torch.device(device)

    # -- what replaces torch.cuda's names ---------------------------------------------------------------

    def stream_class(self, device: Any = None, priority: int = 0, **_kwargs: Any) -> EmulatedStream:
        return EmulatedStream(self, self._device(device))

    @contextlib.contextmanager
    def device(self, device: Any) -> Iterator[None]:
        previous, self.current_device = self.current_device, self._device(device)
        try:
            yield
        finally:
            self.current_device = previous

    @contextlib.contextmanager
    def stream(self, stream: EmulatedStream | None) -> Iterator[None]:
        """torch.cuda.stream: the stream's device becomes current with it, and both are put back on exit."""
        if stream is None:
            yield
            return
        previous_device = self.current_device
        previous = self._streams.get(str(stream.device))
        self.current_device = stream.device
        self._streams[str(stream.device)] = stream
        try:
            yield
        finally:
            if previous is None:
                self._streams.pop(str(stream.device), None)
            else:
                self._streams[str(stream.device)] = previous
            self.current_device = previous_device

    def graph(self, cuda_graph: EmulatedGraph, pool: Any = None, stream: EmulatedStream | None = None) -> Any:
        """torch.cuda.graph, with its order of operations: on exit, capture_end before the stream goes back."""
        emulator = self

        class _GraphContext:
            def __enter__(self) -> None:
                if stream is None and emulator._capture_stream is None:
                    emulator._capture_stream = emulator.stream_class()
                self.stream_ctx = emulator.stream(stream or emulator._capture_stream)
                self.stream_ctx.__enter__()
                cuda_graph.capture_begin(pool=pool)

            def __exit__(self, *exc: object) -> None:
                cuda_graph.capture_end()
                self.stream_ctx.__exit__(*exc)

        return _GraphContext()

    def synchronize(self, device: Any = None) -> None:
        self.events.append(("synchronize", self._device(device)))


def install(monkeypatch: pytest.MonkeyPatch, emulator: Emulator | None = None) -> Emulator:
    """Emulate CUDA graphs on the CPU for the rest of the test: cifarnet's step captures on the CPU."""
    emulator = emulator or Emulator()
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "CUDAGraph", lambda *a, **k: EmulatedGraph(emulator))
    monkeypatch.setattr(cuda, "graph", emulator.graph)
    monkeypatch.setattr(cuda, "Stream", emulator.stream_class)
    monkeypatch.setattr(cuda, "current_stream", emulator.current_stream)
    monkeypatch.setattr(cuda, "default_stream", emulator.default_stream)
    monkeypatch.setattr(cuda, "stream", emulator.stream)
    monkeypatch.setattr(cuda, "device", emulator.device)
    monkeypatch.setattr(cuda, "synchronize", emulator.synchronize)
    monkeypatch.setattr(cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(train_step, "capturable", lambda device: True)
    return emulator


def capture_errors(emulator: Emulator, notices: Callable[[], list[str]] | None = None) -> list[str]:
    """Everything that says the captured step is not what a GPU would run: the emulator's errors and any
    'Could not capture' notice."""
    said = [m for m in (notices() if notices else []) if "Could not capture" in m]
    return emulator.errors + said
