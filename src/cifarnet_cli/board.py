"""The machine under the run, as its files tell it: a Jetson's model, L4T release, power mode, clocks, memory,
swap and temperatures (procfs, sysfs, /etc and `nvpmodel -q`), and a desktop's NVIDIA driver version.

Every read goes through one :class:`SystemView`: a root folder and a command runner. The real one is ``/``
and :func:`run_command`; tests point it at recorded trees of real boards. No torch here: ``cifarnet doctor``
and the training monitor share this module, and the monitor reads it every few seconds.

Formats, as the boards publish them (jetson-stats reads the same files):

- ``/etc/nv_tegra_release``: ``# R36 (release), REVISION: 4.3, GCID: ..., BOARD: generic, EABI: aarch64, ...``
- ``/proc/device-tree/model``: ``NVIDIA Jetson Orin Nano Developer Kit`` and a NUL byte
- ``nvpmodel -q``: ``NV Power Mode: MAXN`` then the mode's id on its own line (warnings may come first);
  ``/etc/nvpmodel.conf`` names the modes, ``< POWER_MODEL ID=2 NAME=MAXN_SUPER >``, and
  ``/var/lib/nvpmodel/status`` holds the current one, ``pmode:0002``
- ``/sys/class/thermal/thermal_zoneN/{type,temp,trip_point_K_type,trip_point_K_temp}`` in millidegrees; the
  GPU's zone is ``gpu-thermal`` on Orin, ``GPU-therm`` on Xavier, Nano and TX2; the kernel throttles a zone
  at its ``passive`` trip point
- ``/sys/class/devfreq/<gpu>/{cur_freq,min_freq,max_freq}`` in Hz (``17000000.gpu`` on Orin with JetPack 6,
  ``17000000.ga10b`` with JetPack 5, ``17000000.gv11b`` on Xavier, ``57000000.gpu`` on Nano) and its
  ``device/load`` in tenths of a percent; ``jetson_clocks`` pins ``min_freq`` to ``max_freq``
- ``/proc/meminfo`` (kB), ``/proc/swaps`` (KiB; ``/dev/zramN`` devices are swap compressed into RAM)
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CommandRunner = Callable[[Sequence[str]], str | None]

#: `nvpmodel -q` answers at once; a hung tool must not hang `doctor` or a training run.
COMMAND_TIMEOUT_S = 4.0


def run_command(argv: Sequence[str]) -> str | None:
    """A command's standard output, or None when it is missing, fails or hangs."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


@dataclass(frozen=True)
class SystemView:
    """Where the probes read: ``root`` stands for ``/`` and ``run`` runs a command (``nvpmodel -q``)."""

    root: Path = Path("/")
    run: CommandRunner = field(default=run_command)

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    def read(self, absolute: str) -> str | None:
        try:
            return self.path(absolute).read_text(encoding="utf-8", errors="replace")
        except (OSError, ValueError):
            return None

    def read_int(self, absolute: str) -> int | None:
        text = self.read(absolute)
        try:
            return int(text.strip().strip("\x00")) if text is not None else None
        except ValueError:
            return None

    def listdir(self, absolute: str) -> list[str]:
        try:
            return sorted(p.name for p in self.path(absolute).iterdir())
        except OSError:
            return []


LOCAL = SystemView()


# --------------------------------------------------------------------------------------------------
# Release and model


@dataclass(frozen=True)
class Release:
    """The L4T (Jetson Linux) release, e.g. R36.4.3, and the JetPack it belongs to."""

    major: int
    revision: str  # "4.3"

    @property
    def l4t(self) -> str:
        return f"R{self.major}.{self.revision}"

    @property
    def jetpack(self) -> int | None:
        """JetPack's major version: R32 is JetPack 4, R34/R35 are 5, R36 is 6, R38 and later are 7
        (NVIDIA's release notes; jetson-stats keeps the full table)."""
        if self.major >= 38:
            return 7
        return {32: 4, 34: 5, 35: 5, 36: 6}.get(self.major)

    @property
    def minor(self) -> int:
        try:
            return int(self.revision.split(".")[0])
        except ValueError:
            return 0


_RELEASE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)")


def read_release(view: SystemView = LOCAL) -> Release | None:
    text = view.read("/etc/nv_tegra_release")
    match = _RELEASE.search(text or "")
    return Release(int(match.group(1)), match.group(2).rstrip(".")) if match else None


def read_model(view: SystemView = LOCAL) -> str | None:
    text = view.read("/proc/device-tree/model")
    model = (text or "").replace("\x00", "").strip()
    return model or None


def is_jetson(view: SystemView = LOCAL) -> bool:
    return view.path("/etc/nv_tegra_release").exists() or "jetson" in (read_model(view) or "").lower()


# --------------------------------------------------------------------------------------------------
# Power mode


@dataclass(frozen=True)
class PowerMode:
    id: int
    name: str

    def rank(self) -> tuple[bool, int, int]:
        """Higher is faster: a MAXN mode (MAXN, MAXN_SUPER) first, then the watts, then the CPU cores in the
        name (Xavier NX's MODE_20W_6CORE), since that is how NVIDIA names its modes."""
        name = self.name.upper()
        watts = re.search(r"(\d+)W", name)
        cores = re.search(r"(\d+)CORE", name)
        return name.startswith("MAXN"), int(watts.group(1)) if watts else 0, int(cores.group(1)) if cores else 0


@dataclass(frozen=True)
class PowerModes:
    current: PowerMode | None
    modes: tuple[PowerMode, ...]  # as /etc/nvpmodel.conf defines them

    @property
    def maximum(self) -> PowerMode | None:
        return max(self.modes, key=PowerMode.rank) if self.modes else None

    @property
    def is_maximum(self) -> bool | None:
        """None when it cannot be told (no mode read, or no modes defined)."""
        if self.current is None or self.maximum is None:
            return None
        return self.current.id == self.maximum.id or self.current.rank() == self.maximum.rank()


_CONF_MODE = re.compile(r"<\s*POWER_MODEL\s+ID\s*=\s*(\d+)\s+NAME\s*=\s*([^\s>]+)")
_QUERY_MODE = re.compile(r"NV Power Mode:\s*(\S+)(?:\s*\n\s*(\d+))?")
_STATUS_MODE = re.compile(r"pmode:\s*(\d+)")


def read_power_modes(view: SystemView = LOCAL) -> PowerModes:
    modes = tuple(PowerMode(int(i), name) for i, name in _CONF_MODE.findall(view.read("/etc/nvpmodel.conf") or ""))
    current = None
    match = _QUERY_MODE.search(view.run(["nvpmodel", "-q"]) or "")
    named = [m for m in modes if match and m.name == match.group(1)]
    if match and (match.group(2) or named):  # the id on the next line; some releases print the name alone
        current = PowerMode(int(match.group(2)) if match.group(2) else named[0].id, match.group(1))
    else:  # no nvpmodel on the PATH (a container): the file it keeps the mode in
        status = _STATUS_MODE.search(view.read("/var/lib/nvpmodel/status") or "")
        if status:
            mode_id = int(status.group(1))
            current = next((m for m in modes if m.id == mode_id), PowerMode(mode_id, str(mode_id)))
    return PowerModes(current, modes)


# --------------------------------------------------------------------------------------------------
# Memory and swap


@dataclass(frozen=True)
class Memory:
    total_bytes: int | None
    available_bytes: int | None  # MemAvailable: what the kernel can hand out without swapping
    swap_total_bytes: int | None
    swap_free_bytes: int | None
    zram_bytes: int  # the part of the swap that is zram (compressed into RAM)


def read_meminfo(view: SystemView = LOCAL) -> dict[str, int]:
    """/proc/meminfo's fields in bytes."""
    out: dict[str, int] = {}
    for line in (view.read("/proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return out


def read_memory(view: SystemView = LOCAL) -> Memory:
    info = read_meminfo(view)
    zram = 0
    for line in (view.read("/proc/swaps") or "").splitlines()[1:]:  # Filename Type Size Used Priority
        parts = line.split()
        if len(parts) >= 3 and parts[2].isdigit() and Path(parts[0]).name.startswith("zram"):
            zram += int(parts[2]) * 1024
    return Memory(info.get("MemTotal"), info.get("MemAvailable"), info.get("SwapTotal"), info.get("SwapFree"), zram)


# --------------------------------------------------------------------------------------------------
# Temperatures and throttling


@dataclass(frozen=True)
class Zone:
    name: str  # the zone's type: gpu-thermal, GPU-therm, tj-thermal ...
    temp_c: float
    throttle_c: float | None  # the lowest passive trip point: where the kernel starts slowing clocks down

    @property
    def throttling(self) -> bool:
        return self.throttle_c is not None and self.temp_c >= self.throttle_c

    @property
    def is_gpu(self) -> bool:
        return "gpu" in self.name.lower()


def read_zones(view: SystemView = LOCAL) -> list[Zone]:
    zones = []
    for entry in view.listdir("/sys/class/thermal"):
        if not entry.startswith("thermal_zone"):
            continue
        base = f"/sys/class/thermal/{entry}"
        name = (view.read(f"{base}/type") or "").strip()
        temp = view.read_int(f"{base}/temp")
        # PMIC-Die reports a constant 100 °C on the TX family; offline sensors report -256 °C or less.
        if not name or temp is None or temp <= -40000 or "pmic" in name.lower():
            continue
        passive = []
        for trip in view.listdir(base):
            match = re.fullmatch(r"trip_point_(\d+)_type", trip)
            if match and (view.read(f"{base}/{trip}") or "").strip() == "passive":
                at = view.read_int(f"{base}/trip_point_{match.group(1)}_temp")
                if at is not None and at > 0:
                    passive.append(at)
        zones.append(Zone(name, temp / 1000, min(passive) / 1000 if passive else None))
    return zones


# --------------------------------------------------------------------------------------------------
# GPU clock and load (devfreq)

_GPU_DEVFREQ_NAMES = {"gpu", "ga10b", "gv11b", "gp10b", "gb10b"}


@dataclass(frozen=True)
class GpuClock:
    name: str  # the devfreq entry: 17000000.gpu
    cur_hz: int | None
    min_hz: int | None
    max_hz: int | None  # the ceiling now: lowered by the power mode and by thermal throttling
    top_hz: int | None  # the highest frequency the GPU has at all (available_frequencies)
    load: float | None  # 0..1

    @property
    def pinned(self) -> bool:
        """jetson_clocks sets the GPU's floor to its ceiling."""
        return self.min_hz is not None and self.min_hz == self.max_hz


def _is_gpu_devfreq(view: SystemView, entry: str) -> bool:
    node = (view.read(f"/sys/class/devfreq/{entry}/device/of_node/name") or "").replace("\x00", "").strip()
    return node in _GPU_DEVFREQ_NAMES or entry.rsplit(".", 1)[-1] in _GPU_DEVFREQ_NAMES or entry.startswith("gpu-gpc")


def read_gpu_clock(view: SystemView = LOCAL) -> GpuClock | None:
    for entry in view.listdir("/sys/class/devfreq"):
        if not _is_gpu_devfreq(view, entry):
            continue
        base = f"/sys/class/devfreq/{entry}"
        steps = [int(f) for f in (view.read(f"{base}/available_frequencies") or "").split() if f.isdigit()]
        load = view.read_int(f"{base}/device/load")
        return GpuClock(
            entry,
            view.read_int(f"{base}/cur_freq"),
            view.read_int(f"{base}/min_freq"),
            view.read_int(f"{base}/max_freq"),
            max(steps) if steps else None,
            load / 1000 if load is not None else None,
        )
    return None


def cpus_pinned(view: SystemView = LOCAL) -> bool | None:
    """Whether every online CPU's frequency floor equals its ceiling (jetson_clocks); None when unreadable."""
    seen = False
    for entry in view.listdir("/sys/devices/system/cpu"):
        if not re.fullmatch(r"cpu\d+", entry):
            continue
        base = f"/sys/devices/system/cpu/{entry}"
        if (view.read(f"{base}/online") or "1").strip() == "0":
            continue
        low, high = view.read_int(f"{base}/cpufreq/scaling_min_freq"), view.read_int(f"{base}/cpufreq/scaling_max_freq")
        if low is None or high is None:
            continue
        seen = True
        if low != high:
            return False
    return True if seen else None


# --------------------------------------------------------------------------------------------------
# A Jetson as a whole, and a sample for the training monitor


@dataclass(frozen=True)
class Board:
    model: str
    release: Release | None
    power: PowerModes
    clocks_pinned: bool | None  # jetson_clocks: GPU (and CPU) frequencies held at their maximum
    memory: Memory
    zones: tuple[Zone, ...]
    gpu_clock: GpuClock | None

    @property
    def gpu_zone(self) -> Zone | None:
        return next((z for z in self.zones if z.is_gpu), None)

    @property
    def throttling(self) -> tuple[Zone, ...]:
        return tuple(z for z in self.zones if z.throttling)


def read_board(view: SystemView = LOCAL) -> Board | None:
    """The Jetson this runs on, or None elsewhere."""
    if not is_jetson(view):
        return None
    clock = read_gpu_clock(view)
    cpus = cpus_pinned(view)
    pinned = None if clock is None else clock.pinned and cpus is not False
    return Board(
        model=read_model(view) or "NVIDIA Jetson",
        release=read_release(view),
        power=read_power_modes(view),
        clocks_pinned=pinned,
        memory=read_memory(view),
        zones=tuple(read_zones(view)),
        gpu_clock=clock,
    )


@dataclass(frozen=True)
class GpuSample:
    """What the training monitor records: the GPU's temperature and clock, and whether anything throttles."""

    temp_c: float | None
    clock_hz: int | None
    max_clock_hz: int | None
    throttling: tuple[str, ...]  # names of the zones at or above their throttling point


def sample_gpu(view: SystemView = LOCAL) -> GpuSample:
    zones = read_zones(view)
    gpu = next((z for z in zones if z.is_gpu), None)
    clock = read_gpu_clock(view)
    return GpuSample(
        gpu.temp_c if gpu else None,
        clock.cur_hz if clock else None,
        clock.max_hz if clock else None,
        tuple(z.name for z in zones if z.throttling),
    )


# --------------------------------------------------------------------------------------------------
# A desktop's NVIDIA driver

_DRIVER = re.compile(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d+\.\d+(?:\.\d+)?)")


def driver_version(view: SystemView = LOCAL) -> str | None:
    """The loaded NVIDIA kernel driver's version (550.54.14), or None when none is loaded."""
    version = (view.read("/sys/module/nvidia/version") or "").strip()
    if version:
        return version
    match = _DRIVER.search(view.read("/proc/driver/nvidia/version") or "")
    return match.group(1) if match else None
