from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cifarnet_cli.cli import app, completion_scripts

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_shipped_completion_files_are_what_the_app_generates() -> None:
    scripts = completion_scripts()
    assert set(scripts) == {"cifarnet.bash", "_cifarnet", "cifarnet.fish"}
    for name, text in scripts.items():
        shipped = ROOT / "completions" / name
        assert shipped.is_file(), f"missing {shipped}; run python scripts/gen_completions.py"
        assert shipped.read_text() == text, f"{shipped} is out of date; run python scripts/gen_completions.py"


def _complete(words: str, cword: int) -> list[str]:
    env = dict(os.environ, _CIFARNET_COMPLETE="complete_bash", COMP_WORDS=words, COMP_CWORD=str(cword))
    proc = subprocess.run([sys.executable, "-m", "cifarnet_cli"], env=env, capture_output=True, text=True, timeout=60)
    return proc.stdout.split()


@pytest.mark.parametrize(
    "words,cword,expected",
    [
        ("cifarnet train --arch resnet1", 3, ["resnet110"]),
        ("cifarnet export --format t", 3, ["torchscript"]),
        ("cifarnet download res", 2, ["resnet50-v1", "resnet50-v2"]),
        ("cifarnet tr", 1, ["train"]),
    ],
)
def test_option_values_complete(words: str, cword: int, expected: list[str]) -> None:
    assert _complete(words, cword) == expected


def test_device_completion_offers_what_exists(tmp_path: Path) -> None:
    """--device completes the devices of this machine, not a fixed list (cuda:1 on a one-GPU box, mps on
    Linux), without importing torch."""
    from cifarnet_cli.choices import devices_here

    gpus = tmp_path / "gpus"
    for bus in ("0000:17:00.0", "0000:65:00.0"):
        (gpus / bus).mkdir(parents=True)
    nothing = tmp_path / "absent"
    linux = {"tegra_release": nothing, "system": "Linux"}
    assert devices_here(nvidia_gpus=gpus, **linux) == ("auto", "cpu", "cuda", "cuda:0", "cuda:1")
    (tmp_path / "nv_tegra_release").write_text("# R36 (release)\n")
    jetson = devices_here(nvidia_gpus=nothing, tegra_release=tmp_path / "nv_tegra_release", system="Linux")
    assert jetson == ("auto", "cpu", "cuda", "cuda:0")
    assert devices_here(nvidia_gpus=nothing, tegra_release=nothing, system="Darwin")[-1] == "mps"
    assert "mps" not in devices_here(nvidia_gpus=nothing, tegra_release=nothing, system="Linux")
    here = _complete("cifarnet train --device c", 3)
    assert here[0] == "cpu" and set(here) <= set(devices_here())


def test_run_names_complete(tmp_path: Path) -> None:
    runs = Path(os.environ["CIFARNET_HOME"]) / "runs"
    for name in ("alpha", "beta"):
        (runs / name).mkdir(parents=True)
        (runs / name / "last.pt").write_bytes(b"")
    assert sorted(_complete("cifarnet evaluate ", 2)) == ["alpha", "beta"]
    assert _complete("cifarnet train --resume al", 3) == ["alpha"]


def test_info_json_names_the_device() -> None:
    result = runner.invoke(app, ["info", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["torch"] and data["python"] and data["default_device"] in ("cpu", "cuda", "mps")
    assert any(d["type"] == data["default_device"] for d in data["devices"])
    assert data["directories"]["runs"].startswith(os.environ["CIFARNET_HOME"])
    assert data["assets"]["cifar10"] is None


def test_info_table(monkeypatch: pytest.MonkeyPatch) -> None:
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0 and "Devices" in result.output and "cifarnet download cifar10" in result.output
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "not available (this torch is a CPU-only build)" in runner.invoke(app, ["info"]).output
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert "not available (CUDA_VISIBLE_DEVICES hides every GPU)" in runner.invoke(app, ["info"]).output


def test_show_completion_prints_the_shipped_script() -> None:
    env = dict(os.environ, SHELL="/bin/bash")
    proc = subprocess.run(
        [sys.executable, "-m", "cifarnet_cli", "--show-completion", "bash"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (ROOT / "completions" / "cifarnet.bash").read_text().strip()


def test_completion_choices_match_the_library() -> None:
    from cifarnet_cli import choices, download
    from cifarnet_cli.models import list_models

    assert set(choices.CIFAR_ARCHS) == set(list_models()) - {"resnet50"}
    assert choices.ASSETS == tuple(download.ASSETS)


def test_help_and_completion_do_not_import_torch() -> None:
    code = "import sys, cifarnet_cli.cli; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False"
