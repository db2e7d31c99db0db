from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from cifarnet_cli import checkpoint, runs
from cifarnet_cli.config import TrainConfig
from cifarnet_cli.engine import EpochEnded, EpochStarted, TrainingInterrupted
from cifarnet_cli.errors import CifarNetError
from cifarnet_cli.training import train


def _config(data: Path, **kw: Any) -> TrainConfig:
    base = dict(epochs=3, batch_size=16, accum=2, val_split=20, data_dir=str(data), warmup_epochs=1, seed=7)
    base.update(kw)
    return TrainConfig(**base)


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "last.pt"
    checkpoint.save_atomic({"epoch": 1}, target)

    def broken_save(obj: object, fh: Any) -> None:
        fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        checkpoint.save_atomic({"epoch": 2}, target)
    monkeypatch.undo()
    assert checkpoint.load(target) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no partial file left behind


def test_unreadable_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(CifarNetError, match="is not a checkpoint"):
        checkpoint.load(bad)
    with pytest.raises(CifarNetError, match="No checkpoint"):
        checkpoint.load(tmp_path / "missing.pt")
    # a picture handed over by mistake is named for what it is (torch's page of weights_only advice was shown)
    picture = tmp_path / "cmp.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(CifarNetError, match=r"cmp.png is not a checkpoint \(a PNG image\)") as err:
        checkpoint.load(picture)
    assert "weights_only" not in str(err.value) and "PyTorch 2.6" not in str(err.value)
    # a real checkpoint cut short still reads as a damaged checkpoint
    whole = tmp_path / "whole.pt"
    checkpoint.save_atomic({"epoch": 1, "w": torch.zeros(1000)}, whole)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[:2000])
    with pytest.raises(CifarNetError, match="cut.pt is not a readable checkpoint"):
        checkpoint.load(cut)


def test_a_folder_that_is_not_a_run_is_named_as_such(tmp_path: Path) -> None:
    from cifarnet_cli import runs

    with pytest.raises(CifarNetError, match="is a folder, not a run"):
        runs.resolve_checkpoint(str(tmp_path))


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "hook": Path("/")}, evil)  # an arbitrary class: not allowed by weights_only
    with pytest.raises(CifarNetError):
        checkpoint.load(evil)


def test_strip_prefixes_and_strict_mismatch_message() -> None:
    model = torch.nn.Linear(2, 2)
    state = {"module._orig_mod.weight": torch.zeros(2, 2), "module._orig_mod.bias": torch.zeros(2)}
    checkpoint.load_state_strict(model, checkpoint.strip_prefixes(state), "x")
    with pytest.raises(CifarNetError, match=r"missing keys: bias; unexpected keys: extra"):
        checkpoint.load_state_strict(model, {"weight": torch.zeros(2, 2), "extra": torch.zeros(1)}, "x")


def test_run_writes_checkpoints_config_and_metrics(image_folder: Callable[..., Path]) -> None:
    data = image_folder(per_class=6)
    result = train(_config(data, epochs=2), run_name="r1", on_event=lambda e: None)
    run = runs.resolve_run("r1")
    assert {p.name for p in run.dir.iterdir()} >= {"last.pt", "best.pt", "config.json", "metrics.jsonl"}
    ckpt = torch.load(run.last, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["config"]["accum"] == 2
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "config", "fit_state", "meta"} <= ckpt.keys()
    rows = [json.loads(line) for line in run.metrics_file.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert result.epochs == 2 and result.checkpoint == str(run.best)
    assert json.loads(run.config_file.read_text())["meta"]["val_split"] == 20


def test_resume_continues_where_it_stopped(image_folder: Callable[..., Path]) -> None:
    data = image_folder(per_class=6)
    train(_config(data), run_name="straight", on_event=lambda e: None)

    started: list[int] = []

    def interrupt_in_epoch_3(event: object) -> None:
        if isinstance(event, EpochStarted):
            started.append(event.epoch)
            if event.epoch == 3:
                raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted) as err:
        train(_config(data), run_name="stopped", on_event=interrupt_in_epoch_3)
    assert err.value.completed_epochs == 2
    assert torch.load(runs.resolve_run("stopped").last, weights_only=True)["epoch"] == 2

    resumed: list[int] = []
    result = train(
        None,
        resume="stopped",
        on_event=lambda e: resumed.append(e.metrics["epoch"]) if isinstance(e, EpochEnded) else None,
    )
    assert resumed == [3]  # only the remaining epoch ran
    assert result.epochs == 3
    straight = torch.load(runs.resolve_run("straight").last, weights_only=True)["model"]
    continued = torch.load(runs.resolve_run("stopped").last, weights_only=True)["model"]
    for key in straight:
        torch.testing.assert_close(continued[key], straight[key], msg=key)
    metrics = runs.resolve_run("stopped").read_metrics()
    assert [r["epoch"] for r in metrics] == [1, 2, 3]


def test_resuming_a_finished_run_does_nothing(image_folder: Callable[..., Path]) -> None:
    data = image_folder(per_class=4)
    train(_config(data, epochs=1, warmup_epochs=0), run_name="done", on_event=lambda e: None)
    before = runs.resolve_run("done").last.stat().st_mtime_ns
    result = train(None, resume="done", on_event=lambda e: None)
    assert result.already_finished and result.epochs == 1
    assert runs.resolve_run("done").last.stat().st_mtime_ns == before


def test_existing_run_name_is_not_overwritten(image_folder: Callable[..., Path]) -> None:
    data = image_folder(per_class=4)
    train(_config(data, epochs=1, warmup_epochs=0), run_name="mine", on_event=lambda e: None)
    with pytest.raises(CifarNetError, match="--resume mine"):
        train(_config(data, epochs=1, warmup_epochs=0), run_name="mine", on_event=lambda e: None)


def test_a_long_third_party_message_is_cut_at_a_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's message for a truncated file runs on ("... a high likelihood that your checkpoint file is"
    was where it used to be cut); the reason shown ends with a whole sentence."""
    long = (
        "PytorchStreamReader failed reading zip archive: failed finding central directory. This is an internal "
        "miniz error. If you are seeing this error, there is a high likelihood that your checkpoint file is "
        "corrupted, possibly because it was truncated or written by an interrupted save."
    )

    def broken(*_a: Any, **_k: Any) -> None:
        raise RuntimeError(long)

    target = tmp_path / "best.pt"
    target.write_bytes(b"PK\x03\x04 a zip archive cut short")
    monkeypatch.setattr(torch, "load", broken)
    with pytest.raises(CifarNetError) as err:
        checkpoint.load(target)
    assert str(err.value).endswith("failed finding central directory. This is an internal miniz error.).")
