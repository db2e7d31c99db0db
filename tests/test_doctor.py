"""`cifarnet doctor` and the board probes it shares with training, on recorded trees of real machines."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from cifarnet_cli import board as boards
from cifarnet_cli import doctor
from cifarnet_cli.cli import app
from cifarnet_cli.doctor import TorchFacts, diagnose

from .board_trees import agx_orin_maxn, cpu_laptop, orin_nano_15w, rtx_desktop, xavier_nx_jp5

runner = CliRunner()

CPU_TORCH = TorchFacts(
    python="3.10.12",
    machine="aarch64",
    torch="2.5.1",
    cuda=None,
    cuda_available=False,
    cpu_threads=6,
    torchvision="0.20.1",
    torchvision_ops=True,
    distributed=True,
)
ORIN = {
    "index": 0,
    "name": "Orin",
    "total_memory_bytes": 64335836 * 1024,
    "compute_capability": "8.7",
    "integrated": True,
    "available_memory_bytes": 58120412 * 1024,
    "precision_auto": "bf16",
    "precision_reason": "compute capability 8.7: native bf16",
}
NVIDIA_TORCH = TorchFacts(
    python="3.10.12",
    machine="aarch64",
    torch="2.3.0a0+40ec155e58.nv24.03",
    cuda="12.2",
    cuda_available=True,
    devices=(ORIN,),
    cpu_threads=12,
    torchvision="0.18.0a0+6043bc2",
    torchvision_ops=True,
    distributed=True,
)
RTX = {
    "index": 0,
    "name": "NVIDIA GeForce RTX 4090",
    "total_memory_bytes": 25393692672,
    "compute_capability": "8.9",
    "integrated": False,
    "free_memory_bytes": 24978014208,
    "precision_auto": "bf16",
    "precision_reason": "compute capability 8.9: native bf16",
}
DESKTOP_TORCH = TorchFacts(
    python="3.12.3",
    machine="x86_64",
    torch="2.6.0+cu124",
    cuda="12.4",
    cuda_available=True,
    devices=(RTX,),
    cpu_threads=16,
    torchvision="0.21.0+cu124",
    torchvision_ops=True,
    distributed=True,
    onnxruntime="1.20.1",
    onnxruntime_providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
)


def _checks(report: doctor.Report) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in report.to_json()["checks"]}


def _not_ok(report: doctor.Report) -> dict[str, str]:
    return {c.name: c.status for c in report.checks if c.status != "ok"}


# --------------------------------------------------------------------------------------------------
# The recorded boards


def test_orin_nano_in_15w_with_a_cpu_only_torch(tmp_path: Path) -> None:
    """The usual pip accident on the usual board: CPU-only torch, 15 W mode while MAXN_SUPER is there, no swap."""
    report = diagnose(orin_nano_15w().build(tmp_path), CPU_TORCH)
    assert _not_ok(report) == {"torch": "problem", "power mode": "warning", "clocks": "warning", "swap": "warning"}
    checks = _checks(report)
    assert "CPU-only" in checks["torch"]["detail"]
    assert checks["torch"]["fix"].endswith("--index-url https://pypi.jetson-ai-lab.io/jp6/cu126")  # JetPack 6.2
    assert checks["board"]["detail"] == (
        "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super, L4T R36.4.3 (JetPack 6)"
    )
    # MAXN_SUPER is mode 2 on this board: `nvpmodel -m 0` would be the 15 W mode it is already in
    assert "15W (mode 0)" in checks["power mode"]["detail"]
    assert checks["power mode"]["fix"] == "sudo nvpmodel -m 2"
    assert checks["clocks"]["fix"] == "sudo jetson_clocks"
    assert "swapon" in checks["swap"]["fix"]
    assert checks["temperature"]["status"] == "ok" and "GPU 48.3 °C" in checks["temperature"]["detail"]
    assert report.problems == 1 and report.training_device == "cpu"
    board = report.to_json()["board"]
    assert board["power_mode"] == {"id": 0, "name": "15W"} and board["power_mode_fastest"]["name"] == "MAXN_SUPER"
    assert board["memory"]["swap_total_bytes"] == 0 and board["jetson_clocks"] is False


def test_agx_orin_at_maxn_throttling(tmp_path: Path) -> None:
    report = diagnose(agx_orin_maxn().build(tmp_path), NVIDIA_TORCH)
    assert _not_ok(report) == {"temperature": "warning"}
    checks = _checks(report)
    assert "throttling" in checks["temperature"]["detail"] and "gpu-thermal 99.5 °C" in checks["temperature"]["detail"]
    assert "tj-thermal" in checks["temperature"]["detail"] and "cpu-thermal" not in checks["temperature"]["detail"]
    assert checks["power mode"]["detail"] == "MAXN (mode 0) (the fastest)"
    assert checks["clocks"]["detail"].startswith("jetson_clocks is on: GPU at 1300 MHz")
    assert checks["swap"]["detail"] == "28.9 GiB of zram (compressed in RAM)"
    assert "compute capability 8.7; --precision auto picks bf16" in checks["cuda:0"]["detail"]
    assert report.problems == 0 and report.training_device == "cuda"


def test_xavier_nx_on_jetpack_5(tmp_path: Path) -> None:
    """JetPack 5 runs exported models, not cifarnet's training; without nvpmodel the status file gives the mode."""
    report = diagnose(xavier_nx_jp5().build(tmp_path), CPU_TORCH)
    checks = _checks(report)
    assert checks["board"]["status"] == "warning" and "L4T R35.4.1 (JetPack 5)" in checks["board"]["detail"]
    assert "trtexec" in checks["board"]["fix"]
    assert checks["power mode"]["fix"] == "sudo nvpmodel -m 8"  # MODE_20W_6CORE, from MODE_15W_6CORE
    assert checks["torch"]["status"] == "problem" and "JetPack 6" in checks["torch"]["fix"]
    assert "GPU 40.0 °C (throttles at 96 °C)" in checks["temperature"]["detail"]
    assert checks["clocks"]["detail"].startswith("jetson_clocks is off: clocks follow the load (GPU at 115 MHz")
    assert "PMIC" not in json.dumps(report.to_json()["board"]["zones"])  # a constant 100 °C, not a reading


def test_desktop_with_an_rtx_card(tmp_path: Path) -> None:
    report = diagnose(rtx_desktop().build(tmp_path), DESKTOP_TORCH)
    assert _not_ok(report) == {}
    checks = _checks(report)
    assert checks["NVIDIA driver"]["detail"] == "550.54.14, new enough for CUDA 12.4"
    assert checks["cuda:0"]["detail"].startswith("NVIDIA GeForce RTX 4090, 23.6 GiB, 23.3 GiB free")
    assert "compute capability 8.9; --precision auto picks bf16" in checks["cuda:0"]["detail"]
    assert checks["onnxruntime"]["detail"] == "onnxruntime 1.20.1 (providers: CUDA, CPU)"
    assert report.to_json()["board"] is None and "power mode" not in checks


def test_desktop_driver_too_old_for_torchs_cuda(tmp_path: Path) -> None:
    facts = TorchFacts(**{**DESKTOP_TORCH.__dict__, "cuda_available": False, "devices": ()})
    report = diagnose(rtx_desktop(driver="470.223.02").build(tmp_path), facts)
    checks = _checks(report)
    assert checks["NVIDIA driver"]["status"] == "problem"
    assert checks["NVIDIA driver"]["detail"] == "470.223.02 is older than torch's CUDA 12.4 needs (525.60.13 or newer)"
    assert checks["torch"]["status"] == "problem"


def test_cpu_laptop(tmp_path: Path) -> None:
    report = diagnose(cpu_laptop().build(tmp_path), CPU_TORCH)
    assert _not_ok(report) == {}
    checks = _checks(report)
    assert "CPU-only" in checks["torch"]["detail"] and "NVIDIA driver" not in checks
    assert checks["memory"]["detail"] == "15.4 GiB RAM, 9.4 GiB available"


@pytest.mark.parametrize(
    "tree,facts,exit_code,not_ok",
    [
        (
            orin_nano_15w,
            CPU_TORCH,
            1,
            {"torch": "problem", "power mode": "warning", "clocks": "warning", "swap": "warning"},
        ),
        (agx_orin_maxn, NVIDIA_TORCH, 0, {"temperature": "warning"}),
        (
            xavier_nx_jp5,
            CPU_TORCH,
            1,
            {"torch": "problem", "board": "warning", "power mode": "warning", "clocks": "warning"},
        ),
        (rtx_desktop, DESKTOP_TORCH, 0, {}),
        (cpu_laptop, CPU_TORCH, 0, {}),
    ],
)
def test_doctor_json_on_each_recorded_machine(
    tree: Any,
    facts: TorchFacts,
    exit_code: int,
    not_ok: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The command itself, reading the recorded tree where it would read `/`, with that machine's torch."""
    monkeypatch.setattr(boards, "LOCAL", tree().build(tmp_path))
    monkeypatch.setattr(doctor, "torch_facts", lambda: facts)
    result = runner.invoke(app, ["doctor", "--json"])
    assert result.exit_code == exit_code, result.output
    data = json.loads(result.stdout)
    assert {c["name"]: c["status"] for c in data["checks"] if c["status"] != "ok"} == not_ok
    assert data["problems"] == list(not_ok.values()).count("problem")


# --------------------------------------------------------------------------------------------------
# Broken builds


def test_torchvision_without_its_compiled_operators(tmp_path: Path) -> None:
    facts = TorchFacts(**{**NVIDIA_TORCH.__dict__, "torchvision_ops": False})
    report = diagnose(agx_orin_maxn().build(tmp_path), facts)
    check = _checks(report)["torchvision"]
    assert check["status"] == "problem" and "torchvision::nms" in check["detail"]
    assert "NVIDIA's index" in check["fix"]


def test_jetpacks_tensorrt_hidden_from_a_plain_venv(tmp_path: Path) -> None:
    view = agx_orin_maxn().build(tmp_path)
    for folder in ("python3", "python3.10", "python3.11", "python3.12"):
        (tmp_path / "usr" / "lib" / folder / "dist-packages" / "tensorrt").mkdir(parents=True)
    check = _checks(diagnose(view, NVIDIA_TORCH))["TensorRT"]
    assert check["status"] == "warning" and "--system-site-packages" in check["fix"]


def test_cuda_torch_that_cannot_see_the_jetsons_gpu(tmp_path: Path) -> None:
    facts = TorchFacts(**{**NVIDIA_TORCH.__dict__, "cuda_available": False, "devices": ()})
    check = _checks(diagnose(agx_orin_maxn().build(tmp_path), facts))["torch"]
    assert check["status"] == "problem" and "PyTorch for Jetson" not in check["fix"]
    assert "JetPack 6.0" in check["fix"]  # R36.3: NVIDIA's own page, or JetPack 6.2 and its index


def test_a_torch_that_cannot_be_imported_is_diagnosed_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NVIDIA's torch for JetPack 6 needs cuSPARSELt; without it `import torch` fails, and doctor says so."""
    error = "libcusparseLt.so.0: cannot open shared object file: No such file or directory"
    facts = TorchFacts(
        python="3.10.12", machine="aarch64", torch=None, cuda=None, cuda_available=False, torch_error=error
    )
    report = diagnose(orin_nano_15w().build(tmp_path), facts)
    check = _checks(report)["torch"]
    assert (check["status"], check["detail"]) == ("problem", f"import torch fails: {error}")
    assert "cuSPARSELt" in check["fix"] and "torchvision" not in _checks(report)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    broken = doctor.torch_facts()
    assert broken.torch is None and "torch" in (broken.torch_error or "")


# --------------------------------------------------------------------------------------------------
# The probes themselves


def test_power_mode_falls_back_to_the_status_file_and_names_an_unknown_mode(tmp_path: Path) -> None:
    (tmp_path / "var" / "lib" / "nvpmodel").mkdir(parents=True)
    (tmp_path / "var" / "lib" / "nvpmodel" / "status").write_text("pmode:0009 fmode:quiet\n")
    power = boards.read_power_modes(boards.SystemView(tmp_path, lambda argv: None))
    assert power.current == boards.PowerMode(9, "9") and power.is_maximum is None


def test_sample_gpu_reads_temperature_clock_and_throttling(tmp_path: Path) -> None:
    sample = boards.sample_gpu(agx_orin_maxn().build(tmp_path))
    assert sample == boards.GpuSample(99.5, 1300500000, 1300500000, ("gpu-thermal", "tj-thermal"))
    assert boards.sample_gpu(cpu_laptop().build(tmp_path / "laptop")) == boards.GpuSample(None, None, None, ())


def test_driver_version_from_the_proc_file_alone(tmp_path: Path) -> None:
    (tmp_path / "proc" / "driver" / "nvidia").mkdir(parents=True)
    (tmp_path / "proc" / "driver" / "nvidia" / "version").write_text(
        "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  560.35.03  Release Build  (dvs-builder@U16)\n"
    )
    assert boards.driver_version(boards.SystemView(tmp_path)) == "560.35.03"


# --------------------------------------------------------------------------------------------------
# The command


def test_doctor_json_on_this_machine_says_cpu_only_and_the_folders_are_fine() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = runner.invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    checks = {c["name"]: c for c in data["checks"]}
    assert "CPU-only" in checks["torch"]["detail"] and data["training_device"] == "cpu"
    folders = [c for c in data["checks"] if c["area"] == "folders"]
    assert [c["name"] for c in folders] == ["home folder", "runs folder", "datasets folder", "cache folder", "data"]
    assert all(c["status"] == "ok" for c in folders) and data["problems"] == 0


def test_doctor_exits_1_on_a_problem_and_shows_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "not-a-folder"
    home.write_text("")
    monkeypatch.setenv("CIFARNET_HOME", str(home))
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 1
    assert "problem" in result.output and "CIFARNET_HOME" in result.output
    as_json = runner.invoke(app, ["doctor", "--json"])
    assert as_json.exit_code == 1
    checks = {c["name"]: c for c in json.loads(as_json.stdout)["checks"]}
    assert checks["home folder"]["detail"] == f"{home}: {home} is a file, not a folder"
    assert checks["runs folder"]["detail"] == f"{home / 'runs'}: inside the home folder (above)"


def test_text_from_the_machine_is_shown_as_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Folder names come from the environment and board names from files: no Rich markup gets through."""
    from rich.console import Console

    from cifarnet_cli import ui

    monkeypatch.setenv("CIFARNET_HOME", str(tmp_path / "[bold red]x[/]"))
    tree = orin_nano_15w()
    tree.files["/proc/device-tree/model"] = b"NVIDIA Jetson [blink]Orin[/blink]\x00"
    out = io.StringIO()
    ui.doctor_table(diagnose(tree.build(tmp_path / "board"), CPU_TORCH), console=Console(file=out, width=400))
    assert "[bold red]x[/]/runs" in out.getvalue() and "NVIDIA Jetson [blink]Orin[/blink], L4T" in out.getvalue()


def test_nvpmodel_naming_the_mode_without_its_number(tmp_path: Path) -> None:
    tree = agx_orin_maxn()
    tree.commands[("nvpmodel", "-q")] = "NV Power Mode: MODE_30W\n"
    power = boards.read_power_modes(tree.build(tmp_path))
    assert power.current == boards.PowerMode(2, "MODE_30W") and power.is_maximum is False
