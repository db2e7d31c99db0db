"""`--batch-size auto`: where the memory probe measures, and what the budget holds. The probes themselves need a
GPU (test_cuda.py); here they are replaced by memory models with the faults a GPU's figures have."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from cifarnet_cli import autobatch
from cifarnet_cli.autobatch import choose_micro_batch, fit_micro_batch, measure_eval, measure_line
from cifarnet_cli.devices import Precision
from cifarnet_cli.models import get_model

MIB = 2**20
GIB = 2**30


def _memory(
    fixed: int, per_image: int, *, jitter: int = 0, fits: int = 10**6, calls: list[int] | None = None
) -> Callable[[int], int]:
    """peak(batch) of a step: ``fixed + batch × per_image``, give or take ``jitter`` (cuDNN's workspaces differ
    from one batch size to the next), out of memory above ``fits`` images."""

    def peak(batch: int) -> int:
        if calls is not None:
            calls.append(batch)
        if batch > fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (model)")
        return fixed + batch * per_image + (jitter if batch % 16 == 0 else -jitter)

    return peak


def test_the_probe_measures_at_sizes_whose_difference_shows() -> None:
    # ResNet-20-like: 1.2 MiB per image, ±5 MiB of workspace: 8 and 16 images would read 2.45 MiB per image
    calls: list[int] = []
    line = measure_line(_memory(600 * MIB, int(1.2 * MIB), jitter=5 * MIB, calls=calls), cap=512, budget=60 * GIB)
    assert calls == [2, 8, 32, 128] and (line.small, line.large) == (32, 128)
    assert abs(line.per_image - 1.2 * MIB) < 0.1 * 1.2 * MIB


def test_the_probe_never_asks_for_more_than_the_cap() -> None:
    calls: list[int] = []
    line = measure_line(_memory(GIB, 30 * MIB, calls=calls), cap=64, budget=60 * GIB)  # finetune-resnet50's 64
    assert max(calls) == 64 and line.large == 64
    calls.clear()
    measure_line(_memory(GIB, 30 * MIB, calls=calls), cap=3, budget=60 * GIB)
    assert calls == [2, 3]


def test_a_probe_that_would_not_fit_is_not_tried_and_one_that_does_not_fit_falls_back() -> None:
    # ResNet-50 at 224 px on a small board: ~50 MiB per image, 4 GiB to use. The first pair (2, 8) says 128
    # images would not fit (6.6 GiB), so 128 is never asked for; 64 is (3.6 GiB), and runs out of memory anyway.
    calls: list[int] = []
    peak = _memory(400 * MIB, 50 * MIB, fits=40, calls=calls)
    line = measure_line(peak, cap=512, budget=4 * GIB)
    assert 128 not in calls and calls == [2, 8, 16, 64, 8, 32]
    assert (line.small, line.large) == (8, 32) and line.per_image == 50 * MIB
    with pytest.raises(torch.cuda.OutOfMemoryError):
        measure_line(_memory(GIB, GIB, fits=1), cap=512, budget=3 * GIB)
    assert measure_eval(_memory(0, 2 * MIB, fits=100), 256, fallback=7) == 2 * MIB  # halved from 256 to 128 to 64


def test_the_budget_holds_the_graph_evaluation_and_data() -> None:
    eager = choose_micro_batch(512, 512, per_image=10 * MIB, fixed=300 * MIB, budget=4 * GIB)
    assert eager.batch_size == 256  # 300 + 10 b <= 4096 MiB: b <= 379
    full = choose_micro_batch(
        512, 512, per_image=10 * MIB, fixed=300 * MIB, budget=4 * GIB, captured=True, eval_per_image=2 * MIB,
        data_bytes=150 * MIB,
    )  # fmt: skip
    assert (full.batch_size, full.accum) == (128, 4)  # 300 + 150 + (2·10 + 2·2) b <= 4096 MiB: b <= 151
    text = full.describe()
    assert (
        "twice (the captured step's graph" in text and "2.0 MiB per image evaluating" in text and "GiB of data" in text
    )


def test_fit_on_an_integrated_gpu_budgets_what_comes_on_top_of_one_eager_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A Jetson-like board with 4 GiB to use, ResNet-20-like figures scaled up: what the probe measures (one eager
    # step) is only part of what a captured run holds.
    monkeypatch.setattr(autobatch, "is_integrated", lambda device: True)
    monkeypatch.setattr(autobatch, "_budget_bytes", lambda device: 4 * GIB)
    monkeypatch.setattr(autobatch, "_peak_bytes", lambda model, device, precision, b: 300 * MIB + b * 10 * MIB)
    monkeypatch.setattr(autobatch, "_eval_peak_bytes", lambda model, device, precision, b: b * 2 * MIB)
    data = autobatch.data_bytes_on_device([120 * MIB, 30 * MIB], torch.device("cuda", 0))
    assert data == 150 * MIB  # on a shared-memory board, wherever the loader puts it
    model = get_model("resnet20")
    fit = fit_micro_batch(
        model,
        device=torch.device("cuda", 0),
        precision=Precision("bf16", torch.bfloat16),
        effective_batch=512,
        cap=512,
        captured=True,
        data_bytes=data,
    )
    assert (fit.batch_size, fit.accum) == (128, 4) and fit.measured and fit.captured
    assert autobatch.data_bytes_on_device([120 * MIB], torch.device("cpu")) == 0
