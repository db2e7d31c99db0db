"""Recorded file trees of real machines, for the probes in cifarnet_cli.board to read instead of `/`.

Each tree holds the files the probes read, in the formats the boards publish them (quoted by NVIDIA's L4T
documentation, jetson-stats and users' logs of their boards): /etc/nv_tegra_release, the device-tree model
(with its trailing NUL), /etc/nvpmodel.conf and /var/lib/nvpmodel/status, the output of `nvpmodel -q`,
/proc/meminfo and /proc/swaps, and sysfs as the kernel lays it out, /sys/class entries being links into
/sys/devices. Readings (temperatures, free memory, clocks) are one moment's; the trip points are set where
a test needs the board to throttle or not.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cifarnet_cli.board import SystemView


@dataclass(frozen=True)
class Tree:
    files: dict[str, str | bytes]
    links: dict[str, str] = field(default_factory=dict)  # path -> its target, relative as in sysfs
    commands: dict[tuple[str, ...], str] = field(default_factory=dict)  # argv -> standard output

    def build(self, root: Path) -> SystemView:
        for path, text in self.files.items():
            target = root / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(text, bytes):
                target.write_bytes(text)
            else:
                target.write_text(text)
        for path, dest in self.links.items():
            link = root / path.lstrip("/")
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(dest, link)
        commands = dict(self.commands)

        def run(argv: Sequence[str]) -> str | None:
            return commands.get(tuple(argv))  # anything not recorded is "not installed"

        return SystemView(root, run)


def _meminfo(total_kb: int, available_kb: int, swap_kb: int, swap_free_kb: int) -> str:
    return (
        f"MemTotal:       {total_kb:>8} kB\n"
        f"MemFree:        {available_kb // 2:>8} kB\n"
        f"MemAvailable:   {available_kb:>8} kB\n"
        "Buffers:           28784 kB\n"
        "Cached:          1873492 kB\n"
        "SwapCached:            0 kB\n"
        f"SwapTotal:      {swap_kb:>8} kB\n"
        f"SwapFree:       {swap_free_kb:>8} kB\n"
        "CmaTotal:         262144 kB\n"
        "CmaFree:          253952 kB\n"
    )


def _swaps(*lines: str) -> str:
    return "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n" + "".join(f"{line}\n" for line in lines)


def _zone(index: int, name: str, millideg: int, passive: int | None, critical: int) -> dict[str, str]:
    base = f"/sys/devices/virtual/thermal/thermal_zone{index}"
    files = {f"{base}/type": f"{name}\n", f"{base}/temp": f"{millideg}\n", f"{base}/mode": "enabled\n"}
    trips = ([("passive", passive)] if passive is not None else []) + [("critical", critical)]
    for k, (kind, at) in enumerate(trips):
        files[f"{base}/trip_point_{k}_type"] = f"{kind}\n"
        files[f"{base}/trip_point_{k}_temp"] = f"{at}\n"
    return files


def _zones(*zones: tuple[str, int, int | None, int]) -> tuple[dict[str, str], dict[str, str]]:
    files: dict[str, str] = {}
    links = {}
    for i, (name, temp, passive, critical) in enumerate(zones):
        files.update(_zone(i, name, temp, passive, critical))
        links[f"/sys/class/thermal/thermal_zone{i}"] = f"../../devices/virtual/thermal/thermal_zone{i}"
    return files, links


def _gpu(device: str, name: str, *, cur: int, low: int, high: int, steps: Sequence[int], load: int):
    """A devfreq GPU: /sys/class/devfreq/<name> links to <device>/devfreq/<name>, whose `device` links back."""
    freq = f"{device}/devfreq/{name}"
    files: dict[str, str | bytes] = {
        f"{freq}/cur_freq": f"{cur}\n",
        f"{freq}/min_freq": f"{low}\n",
        f"{freq}/max_freq": f"{high}\n",
        f"{freq}/available_frequencies": " ".join(map(str, steps)) + "\n",
        f"{freq}/governor": "nvhost_podgov\n",
        f"{device}/load": f"{load}\n",
        f"{device}/of_node/name": name.split(".")[1].encode() + b"\x00",  # device-tree strings end in NUL
    }
    links = {f"/sys/class/devfreq/{name}": "../.." + freq.removeprefix("/sys"), f"{freq}/device": "../.."}
    return files, links


def _cpus(count: int, *, low: int, high: int) -> dict[str, str]:
    files = {}
    for i in range(count):
        base = f"/sys/devices/system/cpu/cpu{i}"
        files[f"{base}/online"] = "1\n"
        files[f"{base}/cpufreq/scaling_min_freq"] = f"{low}\n"
        files[f"{base}/cpufreq/scaling_max_freq"] = f"{high}\n"
    return files


def _tree(*parts: tuple[dict, dict], files: dict, commands: dict) -> Tree:
    all_files: dict[str, str | bytes] = dict(files)
    links: dict[str, str] = {}
    for f, lk in parts:
        all_files.update(f)
        links.update(lk)
    return Tree(all_files, links, commands)


ORIN_THERMAL = ("cpu-thermal", "gpu-thermal", "cv0-thermal", "cv1-thermal", "cv2-thermal", "soc0-thermal", "tj-thermal")


def orin_nano_15w() -> Tree:
    """Orin Nano 8 GB dev kit on JetPack 6.2 (L4T R36.4.3), left in its 15 W mode while MAXN_SUPER (mode 2)
    is there, swap turned off, jetson_clocks off, cool."""
    nv_release = (
        "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 01:49:37 "
        "UTC 2025\n# KERNEL_VARIANT: oot\nTARGET_USERSPACE_LIB_DIR=nvidia\n"
        "TARGET_USERSPACE_LIB_DIR_PATH=usr/lib/aarch64-linux-gnu/nvidia\n"
    )
    conf = (
        "< PARAM TYPE=FILE NAME=CPU_ONLINE >\nCORE_0 /sys/devices/system/cpu/cpu0/online\n\n"
        "< POWER_MODEL ID=0 NAME=15W >\nCPU_ONLINE CORE_0 1\nGPU MAX_FREQ 612000000\n\n"
        "< POWER_MODEL ID=1 NAME=25W >\nCPU_ONLINE CORE_0 1\nGPU MAX_FREQ 918000000\n\n"
        "< POWER_MODEL ID=2 NAME=MAXN_SUPER >\nCPU_ONLINE CORE_0 1\nGPU MAX_FREQ -1\n\n"
        "< POWER_MODEL ID=3 NAME=7W >\nCPU_ONLINE CORE_0 1\nGPU MAX_FREQ 408000000\n\n"
        "< PM_CONFIG DEFAULT=2 >\n"
    )
    steps = [306000000, 408000000, 510000000, 612000000, 714000000, 816000000, 918000000, 1020000000]
    return _tree(
        _zones(*((n, 47800 + 500 * i, 99000, 104500) for i, n in enumerate(ORIN_THERMAL))),
        _gpu(
            "/sys/devices/platform/bus@0/17000000.gpu",
            "17000000.gpu",
            cur=306000000,
            low=306000000,
            high=612000000,
            steps=steps,
            load=0,
        ),
        files={
            "/etc/nv_tegra_release": nv_release,
            "/proc/device-tree/model": b"NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super\x00",
            "/etc/nvpmodel.conf": conf,
            "/var/lib/nvpmodel/status": "pmode:0000 fmode:quiet\n",
            "/proc/meminfo": _meminfo(7802844, 5891232, 0, 0),
            "/proc/swaps": _swaps(),
            **_cpus(6, low=729600, high=1497600),
        },
        commands={("nvpmodel", "-q"): "NV Power Mode: 15W\n0\n"},
    )


def agx_orin_maxn() -> Tree:
    """AGX Orin 64 GB dev kit on JetPack 6.0 (L4T R36.3.0) at MAXN with jetson_clocks on, zram swap as
    JetPack sets it up, and hot: the GPU above its throttling point."""
    nv_release = (
        "# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic, EABI: aarch64, DATE: Fri Jul 19 23:24:25 "
        "UTC 2024\n# KERNEL_VARIANT: oot\nTARGET_USERSPACE_LIB_DIR=nvidia\n"
        "TARGET_USERSPACE_LIB_DIR_PATH=usr/lib/aarch64-linux-gnu/nvidia\n"
    )
    conf = (
        "< POWER_MODEL ID=0 NAME=MAXN >\nGPU MAX_FREQ -1\n\n"
        "< POWER_MODEL ID=1 NAME=MODE_15W >\nGPU MAX_FREQ 420750000\n\n"
        "< POWER_MODEL ID=2 NAME=MODE_30W >\nGPU MAX_FREQ 624750000\n\n"
        "< POWER_MODEL ID=3 NAME=MODE_50W >\nGPU MAX_FREQ 828750000\n\n"
        "< PM_CONFIG DEFAULT=2 >\n"
    )
    top = 1300500000
    zram = [f"/dev/zram{i}                              partition\t2526240\t\t0\t\t5" for i in range(12)]
    return _tree(
        _zones(
            ("cpu-thermal", 93500, 99000, 104500),
            ("gpu-thermal", 99500, 99000, 104500),
            ("cv0-thermal", 90100, 99000, 104500),
            ("soc0-thermal", 92300, 99000, 104500),
            ("tj-thermal", 99500, 99000, 104500),
        ),
        _gpu(
            "/sys/devices/platform/bus@0/17000000.gpu",
            "17000000.gpu",
            cur=top,
            low=top,
            high=top,
            steps=[306000000, 624750000, 828750000, top],
            load=998,
        ),
        files={
            "/etc/nv_tegra_release": nv_release,
            "/proc/device-tree/model": b"NVIDIA Jetson AGX Orin Developer Kit\x00",
            "/etc/nvpmodel.conf": conf,
            "/var/lib/nvpmodel/status": "pmode:0000 fmode:cool\n",
            "/proc/meminfo": _meminfo(64335836, 58120412, 30314880, 30314880),
            "/proc/swaps": _swaps(*zram),
            **_cpus(12, low=2201600, high=2201600),
        },
        commands={("nvpmodel", "-q"): "NVPM WARN: fan mode is not set!\nNV Power Mode: MAXN\n0\n"},
    )


def xavier_nx_jp5() -> Tree:
    """Xavier NX dev kit on JetPack 5.1.2 (L4T R35.4.1), its default MODE_15W_6CORE (MODE_20W_6CORE is the
    fastest), zram swap, Volta's devfreq node 17000000.gv11b, and the -therm zone names of the Xavier family.
    No nvpmodel on the PATH here: the mode comes from its status file."""
    conf = (
        "< POWER_MODEL ID=0 NAME=MODE_15W_2CORE >\n< POWER_MODEL ID=1 NAME=MODE_15W_4CORE >\n"
        "< POWER_MODEL ID=2 NAME=MODE_15W_6CORE >\n< POWER_MODEL ID=3 NAME=MODE_10W_2CORE >\n"
        "< POWER_MODEL ID=4 NAME=MODE_10W_4CORE >\n< POWER_MODEL ID=5 NAME=MODE_10W_DESKTOP >\n"
        "< POWER_MODEL ID=6 NAME=MODE_20W_2CORE >\n< POWER_MODEL ID=7 NAME=MODE_20W_4CORE >\n"
        "< POWER_MODEL ID=8 NAME=MODE_20W_6CORE >\n< PM_CONFIG DEFAULT=2 >\n"
    )
    zram = [f"/dev/zram{i}                              partition\t634928\t\t0\t\t5" for i in range(6)]
    return _tree(
        _zones(
            ("CPU-therm", 41500, 96000, 101000),
            ("GPU-therm", 40000, 96000, 101000),
            ("AUX-therm", 40500, 96000, 101000),
            ("AO-therm", 42000, None, 101000),
            ("PMIC-Die", 100000, None, 120000),
            ("thermal-fan-est", 40700, None, 101000),
        ),
        _gpu(
            "/sys/devices/17000000.gv11b",
            "17000000.gv11b",
            cur=114750000,
            low=114750000,
            high=1109250000,
            steps=[114750000, 522750000, 1109250000],
            load=0,
        ),
        files={
            "/etc/nv_tegra_release": "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, "
            "DATE: Tue Aug  1 19:57:35 UTC 2023\n",
            "/proc/device-tree/model": b"NVIDIA Jetson Xavier NX Developer Kit\x00",
            "/etc/nvpmodel.conf": conf,
            "/var/lib/nvpmodel/status": "pmode:0002 fmode:quiet\n",
            "/proc/meminfo": _meminfo(7999592, 6119384, 3809568, 3809568),
            "/proc/swaps": _swaps(*zram),
            **_cpus(6, low=1190400, high=1907200),
        },
        commands={},
    )


def rtx_desktop(driver: str = "550.54.14") -> Tree:
    """An x86 desktop with an RTX card and NVIDIA's driver loaded; not a Jetson."""
    return Tree(
        {
            "/sys/module/nvidia/version": f"{driver}\n",
            "/proc/driver/nvidia/version": f"NVRM version: NVIDIA UNIX x86_64 Kernel Module  {driver}  Thu Feb 22 "
            "01:44:30 UTC 2024\nGCC version:  gcc version 12.3.0 (Ubuntu 12.3.0-1ubuntu1~22.04)\n",
            "/proc/meminfo": _meminfo(65711116, 60111340, 2097148, 2097148),
            "/proc/swaps": _swaps("/swap.img                               file\t\t2097148\t\t0\t\t-2"),
        }
    )


def cpu_laptop() -> Tree:
    """A laptop without an NVIDIA GPU."""
    return Tree(
        {
            "/proc/meminfo": _meminfo(16176412, 9846544, 2097148, 2097148),
            "/proc/swaps": _swaps("/swapfile                               file\t\t2097148\t\t0\t\t-2"),
        }
    )
