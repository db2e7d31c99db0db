"""`cifarnet doctor`: what stands between this machine and a good training run, and what to type about it.

Each check is one line, ``ok``, ``warning`` (works, but slower or riskier than it need be) or ``problem``
(something will fail), with the command that fixes it. The facts come from torch (:class:`TorchFacts`, which
tests replace) and from the machine's files through :class:`~cifarnet_cli.board.SystemView` (which tests
point at recorded trees of real boards). ``cifarnet info`` stays the short inventory; this is the diagnosis.
"""

from __future__ import annotations

import importlib.util
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any

from cifarnet_cli import board as boards
from cifarnet_cli.board import Board, SystemView
from cifarnet_cli.errors import CifarNetError, first_line
from cifarnet_cli.fileio import display

OK, WARNING, PROBLEM = "ok", "warning", "problem"

#: Wheel indexes with CUDA builds of torch and torchvision for each JetPack (by L4T release).
#: JetPack 6.1 and 6.2 (R36.4, CUDA 12.6): NVIDIA's Jetson AI Lab index; JetPack 7 (R38, Thor, CUDA 13):
#: PyTorch's own CUDA 13 wheels for ARM, which include Thor's sm_110.
JETSON_INDEX_JP6 = "https://pypi.jetson-ai-lab.io/jp6/cu126"
PYTORCH_INDEX_CU130 = "https://download.pytorch.org/whl/cu130"
PYTORCH_FOR_JETSON = "https://docs.nvidia.com/deeplearning/frameworks/install-pytorch-jetson-platform/index.html"

#: The oldest Linux driver each CUDA major version runs on (CUDA Toolkit release notes, "minor version
#: compatibility"): a torch built for CUDA 12.x needs at least 525.60.13.
MIN_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580"}

#: Below this much swap, an 8 GB board that runs out of memory has the kernel kill the training process
#: with no warning (and no checkpoint of the epoch under way).
SWAP_FILE_LINES = (
    "sudo fallocate -l 8G /swapfile && sudo chmod 600 /swapfile && sudo mkswap /swapfile && sudo swapon /swapfile"
)


@dataclass(frozen=True)
class Check:
    area: str  # torch, board, devices, folders
    name: str
    status: str  # ok | warning | problem
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class TorchFacts:
    """What the Python side says: torch and the packages around it."""

    python: str
    machine: str
    torch: str | None  # None when `import torch` fails (torch_error says why)
    cuda: str | None  # torch.version.cuda: None for a CPU-only build
    cuda_available: bool
    devices: tuple[dict[str, Any], ...] = ()  # info.cuda_devices()
    mps: bool = False
    cpu_threads: int = 1
    torchvision: str | None = None
    torchvision_error: str | None = None  # why `import torchvision` failed
    torchvision_ops: bool = False  # its compiled operators (torchvision::nms) are registered
    distributed: bool = False
    onnxruntime: str | None = None
    onnxruntime_providers: tuple[str, ...] = ()
    tensorrt: str | None = None
    torch_error: str | None = None


@dataclass(frozen=True)
class Report:
    checks: tuple[Check, ...]
    facts: TorchFacts
    board: Board | None = field(default=None)

    @property
    def problems(self) -> int:
        return sum(c.status == PROBLEM for c in self.checks)

    @property
    def warnings(self) -> int:
        return sum(c.status == WARNING for c in self.checks)

    @property
    def training_device(self) -> str:
        """Where ``--device auto`` trains: what the machine offers torch as it is installed."""
        return "cuda" if self.facts.devices else "mps" if self.facts.mps else "cpu"

    def to_json(self) -> dict[str, Any]:
        return {
            "problems": self.problems,
            "warnings": self.warnings,
            "training_device": self.training_device,
            "checks": [asdict(c) for c in self.checks],
            "torch": asdict(self.facts),
            "board": _board_json(self.board),
        }


def diagnose(view: SystemView | None = None, facts: TorchFacts | None = None) -> Report:
    """Every check, in the order a reader fixes things: torch, the board, the devices, the folders."""
    view = view if view is not None else boards.LOCAL
    facts = facts if facts is not None else torch_facts()
    board = boards.read_board(view)
    checks = [
        *torch_checks(facts, board, view),
        *(board_checks(board) if board is not None else ()),
        *device_checks(facts),
        *(memory_checks(view) if board is None else ()),  # a board's memory has its own lines
        *folder_checks(),
    ]
    return Report(tuple(checks), facts, board)


# --------------------------------------------------------------------------------------------------
# Facts from the Python side


def torch_facts() -> TorchFacts:
    ort_version, providers = _onnxruntime()
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - a broken install fails in many ways; the message is the diagnosis
        return TorchFacts(
            python=platform.python_version(),
            machine=platform.machine(),
            torch=None,
            cuda=None,
            cuda_available=False,
            cpu_threads=os.cpu_count() or 1,
            onnxruntime=ort_version,
            onnxruntime_providers=providers,
            tensorrt=_tensorrt(),
            torch_error=first_line(exc),
        )

    from cifarnet_cli.devices import mps_available
    from cifarnet_cli.info import cuda_devices

    available = torch.cuda.is_available()
    tv_version, tv_error, tv_ops = _torchvision()
    return TorchFacts(
        python=platform.python_version(),
        machine=platform.machine(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cuda_available=available,
        devices=tuple(cuda_devices()) if available else (),
        mps=mps_available(),
        cpu_threads=torch.get_num_threads(),
        torchvision=tv_version,
        torchvision_error=tv_error,
        torchvision_ops=tv_ops,
        distributed=torch.distributed.is_available(),
        onnxruntime=ort_version,
        onnxruntime_providers=providers,
        tensorrt=_tensorrt(),
    )


def _torchvision() -> tuple[str | None, str | None, bool]:
    import torch

    try:
        import torchvision
    except Exception as exc:  # noqa: BLE001 - a broken build fails in many ways; the message is the diagnosis
        return None, first_line(exc), False
    try:
        torch.ops.torchvision.nms  # noqa: B018 - the lookup is the test
        ops = True
    except (AttributeError, RuntimeError):
        ops = False
    return torchvision.__version__, None, ops


def _onnxruntime() -> tuple[str | None, tuple[str, ...]]:
    if importlib.util.find_spec("onnxruntime") is None:
        return None, ()
    try:
        import onnxruntime

        return onnxruntime.__version__, tuple(onnxruntime.get_available_providers())
    except Exception:  # noqa: BLE001 - installed but unusable: reported as not there
        return None, ()


def _tensorrt() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return None
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except Exception:  # noqa: BLE001
        return None


# --------------------------------------------------------------------------------------------------
# torch and the packages around it


def jetson_torch_fix(board: Board) -> str:
    """How to get a CUDA build of torch and torchvision for this board's JetPack."""
    release = board.release
    jetpack = release.jetpack if release else None
    if jetpack == 6 and release is not None and release.minor >= 4:
        return f"pip uninstall -y torch torchvision && pip install torch torchvision --index-url {JETSON_INDEX_JP6}"
    if jetpack is not None and jetpack >= 7:
        return f"pip uninstall -y torch torchvision && pip install torch torchvision --index-url {PYTORCH_INDEX_CU130}"
    if jetpack == 6:
        return (
            f"install NVIDIA's torch for JetPack 6.0 ({PYTORCH_FOR_JETSON}), or upgrade to JetPack 6.2, whose "
            f"wheels are on {JETSON_INDEX_JP6}"
        )
    return f"cifarnet's training needs JetPack 6 or newer (Python 3.10); see {PYTORCH_FOR_JETSON}"


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())


def torch_checks(facts: TorchFacts, board: Board | None, view: SystemView) -> list[Check]:
    if facts.torch is None:  # nothing that needs torch can be checked
        return [_torch_check(facts, board, view), _onnxruntime_check(facts, board), _tensorrt_check(facts, board, view)]
    return [
        _torch_check(facts, board, view),
        *([_driver_check(facts, view)] if board is None and facts.cuda is not None else []),
        _torchvision_check(facts, board),
        _distributed_check(facts),
        _onnxruntime_check(facts, board),
        _tensorrt_check(facts, board, view),
    ]


def _broken_torch(facts: TorchFacts, board: Board | None) -> Check:
    error = facts.torch_error or "unknown error"
    if board is not None and "cusparselt" in error.lower():
        fix = f"install cuSPARSELt, which NVIDIA's torch for JetPack needs: the steps are on {PYTORCH_FOR_JETSON}"
    elif board is not None:
        fix = jetson_torch_fix(board)
    else:
        fix = "reinstall torch: the pip line for this machine is on https://pytorch.org/get-started/locally/"
    return Check("torch", "torch", PROBLEM, f"import torch fails: {error}", fix)


def _torch_check(facts: TorchFacts, board: Board | None, view: SystemView) -> Check:
    if facts.torch is None:
        return _broken_torch(facts, board)
    name = f"torch {facts.torch}"
    gpus = len(facts.devices)
    if facts.cuda is None:
        if board is not None:
            return Check(
                "torch",
                "torch",
                PROBLEM,
                f"{name} is a CPU-only build: this Jetson's GPU is not used (pip replaced NVIDIA's wheel?)",
                jetson_torch_fix(board),
            )
        if boards.driver_version(view) is not None:
            return Check(
                "torch",
                "torch",
                WARNING,
                f"{name} is a CPU-only build, and this machine has an NVIDIA driver",
                "a CUDA build: the pip line for your driver is on https://pytorch.org/get-started/locally/",
            )
        return Check("torch", "torch", OK, f"{name}, a CPU-only build; no NVIDIA GPU here: training runs on the CPU")
    if facts.cuda_available:
        return Check("torch", "torch", OK, f"{name}, CUDA {facts.cuda} build, {gpus} GPU{'s' * (gpus != 1)} visible")
    if board is not None:
        return Check(
            "torch",
            "torch",
            PROBLEM,
            f"{name} is built for CUDA {facts.cuda} but cannot use this Jetson's GPU (a wheel for another JetPack?)",
            jetson_torch_fix(board),
        )
    if boards.driver_version(view) is None:
        return Check(
            "torch",
            "torch",
            OK,
            f"{name}, a CUDA {facts.cuda} build; no NVIDIA driver is loaded: CPU-only here, training runs on the CPU",
        )
    return Check(
        "torch",
        "torch",
        PROBLEM,
        f"{name} is built for CUDA {facts.cuda}, but no GPU is usable (see the driver line; CUDA_VISIBLE_DEVICES?)",
        "update the NVIDIA driver, or install the torch build for your driver (https://pytorch.org/get-started/locally/)",
    )


def _driver_check(facts: TorchFacts, view: SystemView) -> Check:
    driver = boards.driver_version(view)
    if driver is None:
        return Check("torch", "NVIDIA driver", OK, "none loaded")
    major = _version_tuple(facts.cuda or "")[:1]
    needed = MIN_DRIVER.get(major[0]) if major else None
    if needed is not None and _version_tuple(driver) < _version_tuple(needed):
        return Check(
            "torch",
            "NVIDIA driver",
            PROBLEM,
            f"{driver} is older than torch's CUDA {facts.cuda} needs ({needed} or newer)",
            "update the NVIDIA driver, or install a torch built for an older CUDA (https://pytorch.org/get-started/locally/)",
        )
    return Check("torch", "NVIDIA driver", OK, f"{driver}, new enough for CUDA {facts.cuda}")


def _torchvision_check(facts: TorchFacts, board: Board | None) -> Check:
    same_place = "from the same place as torch" + (" (NVIDIA's index for this JetPack)" if board else "")
    if facts.torchvision is None:
        why = facts.torchvision_error or "not installed"
        return Check(
            "torch", "torchvision", PROBLEM, f"cannot be imported: {why}", f"install the torchvision {same_place}"
        )
    if not facts.torchvision_ops:
        return Check(
            "torch",
            "torchvision",
            PROBLEM,
            f"torchvision {facts.torchvision} lacks its compiled operators (torchvision::nms): built for another torch",
            f"pip uninstall -y torchvision, then install the torchvision built for torch {facts.torch} {same_place}",
        )
    return Check("torch", "torchvision", OK, f"torchvision {facts.torchvision}, compiled operators present")


def _distributed_check(facts: TorchFacts) -> Check:
    if facts.distributed:
        return Check("torch", "torch.distributed", OK, "available")
    if len(facts.devices) > 1:
        return Check(
            "torch",
            "torch.distributed",
            WARNING,
            f"not built into this torch: training on {len(facts.devices)} GPUs at once needs it",
            "a torch build with distributed support (the wheels on pytorch.org have it)",
        )
    return Check("torch", "torch.distributed", OK, "not built in (only training on several GPUs at once needs it)")


def _onnxruntime_check(facts: TorchFacts, board: Board | None) -> Check:
    if facts.onnxruntime is None:
        return Check(
            "torch",
            "onnxruntime",
            OK,
            "not installed (predict --model model.onnx and export's verification use it: pip install 'cifarnet[export]')",
        )
    providers = ", ".join(p.removesuffix("ExecutionProvider") for p in facts.onnxruntime_providers) or "none"
    gpu = any(p in facts.onnxruntime_providers for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider"))
    if not gpu and (board is not None or facts.cuda_available):
        index = f" --index-url {JETSON_INDEX_JP6}" if board and board.release and board.release.jetpack == 6 else ""
        return Check(
            "torch",
            "onnxruntime",
            WARNING,
            f"onnxruntime {facts.onnxruntime} runs exported models on the CPU only (providers: {providers})",
            f"pip uninstall -y onnxruntime && pip install onnxruntime-gpu{index}",
        )
    return Check("torch", "onnxruntime", OK, f"onnxruntime {facts.onnxruntime} (providers: {providers})")


def _system_tensorrt(view: SystemView) -> bool:
    """JetPack installs TensorRT's Python module for the system Python, which a plain venv does not see."""
    return any(
        view.path(f"/usr/lib/{folder}/dist-packages/tensorrt").is_dir()
        for folder in ("python3", f"python3.{platform.python_version_tuple()[1]}")
    )


def _tensorrt_check(facts: TorchFacts, board: Board | None, view: SystemView) -> Check:
    if facts.tensorrt is not None:
        return Check("torch", "TensorRT", OK, f"TensorRT {facts.tensorrt}")
    if board is not None and _system_tensorrt(view):
        return Check(
            "torch",
            "TensorRT",
            WARNING,
            "JetPack's TensorRT is installed for the system Python, which this environment does not see",
            "create the virtual environment with: python3 -m venv --system-site-packages ...",
        )
    return Check("torch", "TensorRT", OK, "not installed (only export --format engine needs it; trtexec works without)")


# --------------------------------------------------------------------------------------------------
# The board


def board_checks(board: Board) -> list[Check]:
    return [
        _release_check(board),
        _power_check(board),
        _clocks_check(board),
        *_board_memory_checks(board),
        _thermal_check(board),
    ]


def _release_check(board: Board) -> Check:
    release = board.release
    if release is None:
        return Check("board", "board", OK, f"{board.model}; no L4T release in /etc/nv_tegra_release")
    jetpack = f"JetPack {release.jetpack}" if release.jetpack else "JetPack unknown"
    detail = f"{board.model}, L4T {release.l4t} ({jetpack})"
    if release.jetpack is not None and release.jetpack < 6:
        return Check(
            "board",
            "board",
            WARNING,
            f"{detail}: NVIDIA's torch for it needs Python {'3.8' if release.jetpack == 5 else '3.6'}; "
            "cifarnet trains on JetPack 6 or newer",
            f"run exported models there (trtexec, jetson-inference), or flash JetPack 6; see {PYTORCH_FOR_JETSON}",
        )
    return Check("board", "board", OK, detail)


def _power_check(board: Board) -> Check:
    power = board.power
    current, best = power.current, power.maximum
    if current is None:
        return Check(
            "board",
            "power mode",
            WARNING,
            "unknown: nvpmodel -q gave no answer",
            "sudo nvpmodel -q (is nvpmodel installed?)",
        )
    if power.is_maximum is False and best is not None:
        return Check(
            "board",
            "power mode",
            WARNING,
            f"{current.name} (mode {current.id}), not the fastest: {best.name} (mode {best.id}) trains faster",
            f"sudo nvpmodel -m {best.id}",
        )
    fastest = " (the fastest)" if power.is_maximum else ""
    return Check("board", "power mode", OK, f"{current.name} (mode {current.id}){fastest}")


def _mhz(hz: int | None) -> str:
    return "?" if hz is None else f"{hz / 1e6:.0f} MHz"


def _clocks_check(board: Board) -> Check:
    clock = board.gpu_clock
    if clock is None:
        return Check("board", "clocks", OK, "the GPU's frequency could not be read")
    now = f"GPU at {_mhz(clock.cur_hz)} (range {_mhz(clock.min_hz)} to {_mhz(clock.max_hz)})"
    if clock.load is not None:
        now += f", {clock.load:.0%} busy"
    if board.clocks_pinned:
        return Check("board", "clocks", OK, f"jetson_clocks is on: {now}")
    return Check(
        "board",
        "clocks",
        WARNING,
        f"jetson_clocks is off: clocks follow the load ({now}), so short steps run below the top speed",
        "sudo jetson_clocks",
    )


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GiB"


def _board_memory_checks(board: Board) -> list[Check]:
    mem = board.memory
    checks = [_memory_check(mem, shared=True)]
    swap = mem.swap_total_bytes or 0
    if swap == 0:
        checks.append(
            Check(
                "board",
                "swap",
                WARNING,
                "off: when memory runs out the kernel kills training at once, without a word",
                SWAP_FILE_LINES,
            )
        )
    elif mem.zram_bytes >= swap:
        checks.append(Check("board", "swap", OK, f"{_gib(swap)} of zram (compressed in RAM)"))
    else:
        checks.append(Check("board", "swap", OK, f"{_gib(swap)}, of which {_gib(mem.zram_bytes)} zram"))
    return checks


def _memory_check(mem: boards.Memory, *, shared: bool) -> Check:
    area = "board" if shared else "devices"
    if mem.total_bytes is None:
        return Check(area, "memory", OK, "unknown (no /proc/meminfo)")
    detail = f"{_gib(mem.total_bytes)} RAM, {_gib(mem.available_bytes)} available"
    if shared:
        detail += " (shared by the CPU and the GPU)"
    if shared and mem.available_bytes is not None and mem.available_bytes < mem.total_bytes / 2:
        return Check(
            area,
            "memory",
            WARNING,
            f"{detail}: other programs hold more than half of it, and training gets what is left",
            "close other programs; the desktop too for long runs: sudo systemctl isolate multi-user.target",
        )
    return Check(area, "memory", OK, detail)


def _thermal_check(board: Board) -> Check:
    gpu = board.gpu_zone
    hot = board.throttling
    now = f"GPU {gpu.temp_c:.1f} °C" if gpu is not None else "no GPU temperature sensor"
    if gpu is not None and gpu.throttle_c is not None:
        now += f" (throttles at {gpu.throttle_c:.0f} °C)"
    if hot:
        zones = ", ".join(f"{z.name} {z.temp_c:.1f} °C (throttles at {z.throttle_c:.0f} °C)" for z in hot)
        return Check(
            "board",
            "temperature",
            WARNING,
            f"throttling: {zones}; clocks are being lowered",
            "more cooling: sudo jetson_clocks --fan runs the fan at full speed; give the board air",
        )
    return Check("board", "temperature", OK, now)


# --------------------------------------------------------------------------------------------------
# Devices, memory elsewhere, folders


def device_checks(facts: TorchFacts) -> list[Check]:
    out = []
    for dev in facts.devices:
        memory = f"{dev['total_memory_bytes'] / 2**30:.1f} GiB"
        if dev.get("available_memory_bytes") is not None:
            memory += f" shared, {dev['available_memory_bytes'] / 2**30:.1f} GiB available"
        elif dev.get("free_memory_bytes") is not None:
            memory += f", {dev['free_memory_bytes'] / 2**30:.1f} GiB free"
        reason = dev.get("precision_reason", "")
        detail = (
            f"{dev['name']}, {memory}, compute capability {dev['compute_capability']}; "
            f"--precision auto picks {dev['precision_auto']}" + (f" ({reason.split(': ', 1)[-1]})" if reason else "")
        )
        out.append(Check("devices", f"cuda:{dev['index']}", OK, detail))
    out.append(
        Check("devices", "cpu", OK, f"{facts.machine}, {facts.cpu_threads} threads, Python {facts.python}; fp32")
    )
    return out


def memory_checks(view: SystemView) -> list[Check]:
    mem = boards.read_memory(view)
    return [] if mem.total_bytes is None else [_memory_check(mem, shared=False)]


def folder_checks() -> list[Check]:
    from cifarnet_cli import paths
    from cifarnet_cli.data.sources import find_source

    out = []
    for f in paths.folder_status():
        if f.problem is None:
            out.append(Check("folders", f"{f.what} folder", OK, f"{display(f.path)}, writable"))
        elif f.inside is not None:  # the outer folder's line says why and what to do
            out.append(
                Check(
                    "folders", f"{f.what} folder", PROBLEM, f"{display(f.path)}: inside the {f.inside} folder (above)"
                )
            )
        else:
            out.append(
                Check(
                    "folders",
                    f"{f.what} folder",
                    PROBLEM,
                    f"{display(f.path)}: {f.problem}",
                    "point CIFARNET_HOME (or CIFARNET_DATA / CIFARNET_CACHE) at a folder you can write to",
                )
            )
    data = paths.default_data_dir()
    try:
        found = find_source(data)
    except CifarNetError as exc:
        return [*out, Check("folders", "data", PROBLEM, str(exc), "fix the folder, or set --data-dir / CIFARNET_DATA")]
    if found is None:
        out.append(
            Check(
                "folders",
                "data",
                OK,
                f"none yet at {display(data)}: train downloads CIFAR-10 there (170 MB), "
                "or cifarnet download cifar10 now; --data-dir or CIFARNET_DATA point elsewhere",
            )
        )
    else:
        out.append(Check("folders", "data", OK, f"{found[0]} at {display(found[1])}: train reads it"))
    return out


def _board_json(board: Board | None) -> dict[str, Any] | None:
    if board is None:
        return None
    power = board.power
    return {
        "model": board.model,
        "l4t": board.release.l4t if board.release else None,
        "jetpack": board.release.jetpack if board.release else None,
        "power_mode": asdict(power.current) if power.current else None,
        "power_mode_fastest": asdict(power.maximum) if power.maximum else None,
        "jetson_clocks": board.clocks_pinned,
        "memory": asdict(board.memory),
        "zones": [{**asdict(z), "throttling": z.throttling} for z in board.zones],
        "gpu_clock": asdict(board.gpu_clock) if board.gpu_clock else None,
    }
