"""Device and precision choice. GPUs that are not here are mocked by their compute capability."""

from __future__ import annotations

import pytest
import torch

from cifarnet_cli.devices import auto_precision, resolve_device, resolve_precision
from cifarnet_cli.errors import CifarNetError, UsageError

# (compute capability, what --precision auto must pick); examples of each generation in the comment
GENERATIONS = [
    ((9, 0), "bf16"),  # H100, H200
    ((8, 9), "bf16"),  # RTX 4090, L4
    ((8, 7), "bf16"),  # Jetson Orin
    ((8, 6), "bf16"),  # RTX 3090, A10
    ((8, 0), "bf16"),  # A100
    ((7, 5), "fp16"),  # T4, RTX 2080 (bf16 only emulated)
    ((7, 2), "fp16"),  # Jetson Xavier
    ((7, 0), "fp16"),  # V100
    ((6, 2), "fp16"),  # Jetson TX2: fp16 at twice the fp32 rate
    ((6, 1), "fp32"),  # GTX 1080, P4: fp16 at 1/64 of the fp32 rate
    ((6, 0), "fp16"),  # P100
    ((5, 3), "fp16"),  # Jetson Nano / TX1: fp16 at twice the fp32 rate
    ((5, 2), "fp32"),  # GTX 980, Titan X (Maxwell): no fp16 arithmetic
    ((3, 7), "fp32"),  # K80
]


def _mock_gpus(monkeypatch: pytest.MonkeyPatch, capabilities: dict[int, tuple[int, int]]) -> None:
    def capability(device: torch.device | int | None = None) -> tuple[int, int]:
        index = device.index if isinstance(device, torch.device) else device
        return capabilities[index or 0]

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    # What makes torch's own check unusable: it says yes where bf16 is only emulated.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


@pytest.mark.parametrize("capability,expected", GENERATIONS)
def test_auto_precision_by_compute_capability(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], expected: str
) -> None:
    _mock_gpus(monkeypatch, {0: capability})
    device = torch.device("cuda", 0)
    precision = resolve_precision("auto", device)
    assert precision.name == expected
    assert precision.needs_grad_scaler == (expected == "fp16")
    assert f"{capability[0]}.{capability[1]}" in auto_precision(device)[1]


def test_the_chosen_gpu_is_judged_not_gpu_0(monkeypatch: pytest.MonkeyPatch) -> None:
    _mock_gpus(monkeypatch, {0: (9, 0), 1: (7, 5)})
    assert resolve_precision("auto", torch.device("cuda", 1)).name == "fp16"
    assert resolve_precision("auto", torch.device("cuda", 0)).name == "bf16"


def test_explicit_bf16_on_a_gpu_that_only_emulates_it_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _mock_gpus(monkeypatch, {0: (7, 5)})
    with pytest.raises(CifarNetError, match=r"compute capability 7.5\) has no native bf16"):
        resolve_precision("bf16", torch.device("cuda", 0))
    assert resolve_precision("fp16", torch.device("cuda", 0)).name == "fp16"


def test_cpu_precisions() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu).name == "fp32"
    assert resolve_precision("bf16", cpu).dtype is torch.bfloat16
    with pytest.raises(CifarNetError, match="fp16 is not supported on the CPU"):
        resolve_precision("fp16", cpu)
    with pytest.raises(UsageError, match="Choose one of"):
        resolve_precision("fp8", cpu)


def test_device_names() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UsageError, match="Unknown --device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(CifarNetError, match="CUDA is not available"):
            resolve_device("cuda:1")


def test_evaluate_and_predict_default_to_the_runs_precision_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from cifarnet_cli.inference import inference_precision

    _mock_gpus(monkeypatch, {0: (8, 0), 1: (7, 5)})
    bf16_run = SimpleNamespace(meta={"precision": "bf16"})
    fp32_run = SimpleNamespace(meta={"precision": "fp32"})
    assert inference_precision(fp32_run, torch.device("cuda", 0)).name == "fp32"  # as it validated, not auto (bf16)
    assert inference_precision(bf16_run, torch.device("cuda", 0)).name == "bf16"
    assert inference_precision(bf16_run, torch.device("cuda", 1)).name == "fp16"  # no native bf16 there: auto
    assert inference_precision(fp32_run, torch.device("cuda", 0), "bf16").name == "bf16"  # --precision wins
    assert inference_precision(bf16_run, torch.device("cpu")).name == "fp32"  # the CPU: fp32 unless asked
    assert inference_precision(SimpleNamespace(meta={}), torch.device("cuda", 0)).name == "bf16"  # older runs: auto
