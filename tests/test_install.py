"""`pip install cifarnet` beside NVIDIA's Jetson wheels keeps them.

NVIDIA's torch and torchvision for JetPack are pre-releases with local tags (torch 2.3.0a0+40ec155e58.nv24.03,
torchvision 0.18.0a0+6043bc2). Under PEP 440 2.3.0a0 sorts below 2.3, so a floor of `torch>=2.3` is not met
by them and pip fetches a torch that is: on an ARM board, a CPU-only wheel, and the GPU is gone. These tests
install cifarnet, built from this checkout's pyproject.toml, into a throwaway virtual environment that holds
metadata-only stand-ins of NVIDIA's wheels, with an index (a local folder, no network) that also offers the
CPU-only final releases pip would otherwise take.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.install

NVIDIA_TORCH = "2.3.0a0+40ec155e58.nv24.03"  # NVIDIA's torch for JetPack 6 (the 24.03 build)
NVIDIA_TORCHVISION = "0.18.0a0+6043bc2"
OLD_NVIDIA_TORCH = "2.2.0a0+81ea7a4"  # NVIDIA's earlier one (the 23.12 build): truly older than the floor
OLD_NVIDIA_TORCHVISION = "0.17.0a0+b2383d4"
STAND_IN_VERSION = "99.0"  # every other dependency: a version each floor accepts


def _wheel(folder: Path, name: str, version: str) -> Path:
    """A wheel with metadata and an empty package: enough for pip to resolve and install it."""
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    files = {
        f"{dist}_stand_in/__init__.py": b"",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: cifarnet-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    target = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(target, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return target


def _cifarnet_wheel(folder: Path, tmp: Path) -> Path:
    """cifarnet's wheel from this checkout's pyproject.toml (its metadata is what is under test), built
    offline with the running interpreter's setuptools, from a copy so the checkout gets no build files."""
    source = tmp / "source"
    (source / "src" / "cifarnet_cli").mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", source)
    shutil.copy(ROOT / "README.md", source)
    (source / "src" / "cifarnet_cli" / "__init__.py").write_text("")
    _pip(sys.executable, "wheel", "--no-deps", "--no-build-isolation", "-w", str(folder), str(source))
    (wheel,) = folder.glob("cifarnet-*.whl")
    return wheel


def _pip(python: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    # pip --python drives another environment with this one's pip: the throwaway one needs none of its own.
    cmd = [sys.executable, "-m", "pip", "--python", python, *args, "--no-index"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _installed(python: str, name: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({name!r}))"
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local package index: cifarnet, stand-ins for its other dependencies, and the CPU-only torch and
    torchvision final releases that PyPI offers."""
    tmp = tmp_path_factory.mktemp("index")
    folder = tmp / "wheels"
    folder.mkdir()
    wheel = _cifarnet_wheel(folder, tmp)
    with zipfile.ZipFile(wheel) as zf:
        (metadata,) = (n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(metadata).decode().splitlines()
    requirements = [Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")]
    for req in requirements:
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra's dependency: not installed by `pip install cifarnet`
        if req.name in ("torch", "torchvision"):
            continue
        assert req.specifier.contains(STAND_IN_VERSION), f"the stand-in {req.name} {STAND_IN_VERSION} misses {req}"
        _wheel(folder, req.name, STAND_IN_VERSION)
    _wheel(folder, "torch", "2.3.0")  # what pip would fetch instead: on an ARM board, a CPU-only build
    _wheel(folder, "torchvision", "0.18.0")
    return folder


def _board(tmp: Path, index: Path, torch: str, torchvision: str) -> str:
    """A virtual environment with NVIDIA's wheels installed first, as the JetPack instructions have it."""
    nvidia = tmp / "nvidia"
    nvidia.mkdir()
    _wheel(nvidia, "torch", torch)
    _wheel(nvidia, "torchvision", torchvision)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp / "venv")], check=True)
    python = str(tmp / "venv" / ("Scripts" if os.name == "nt" else "bin") / "python")
    _pip(python, "install", "--find-links", str(nvidia), f"torch=={torch}", f"torchvision=={torchvision}")
    return python


def test_pip_keeps_nvidias_prerelease_torch_and_torchvision(tmp_path: Path, index: Path) -> None:
    python = _board(tmp_path, index, NVIDIA_TORCH, NVIDIA_TORCHVISION)
    _pip(python, "install", "--find-links", str(index), "cifarnet")
    assert _installed(python, "cifarnet") == "0.1.0"
    assert _installed(python, "torch") == NVIDIA_TORCH
    assert _installed(python, "torchvision") == NVIDIA_TORCHVISION


def test_pip_still_refuses_a_torch_older_than_the_floor(tmp_path: Path, index: Path) -> None:
    offered = tmp_path / "offered"  # cifarnet and its other dependencies, and only an older torch
    offered.mkdir()
    for wheel in index.glob("*.whl"):
        if not wheel.name.startswith(("torch-", "torchvision-")):
            shutil.copy(wheel, offered)
    _wheel(offered, "torch", OLD_NVIDIA_TORCH)
    _wheel(offered, "torchvision", OLD_NVIDIA_TORCHVISION)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    python = str(tmp_path / "venv" / ("Scripts" if os.name == "nt" else "bin") / "python")
    proc = _pip(python, "install", "--dry-run", "--find-links", str(offered), "cifarnet", check=False)
    assert proc.returncode != 0, proc.stdout
    assert "torch" in proc.stderr
