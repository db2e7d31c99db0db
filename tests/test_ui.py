"""Progress output a user watches: bars that fit the terminal, an ETA for the whole run, no echoed keys."""

from __future__ import annotations

import io
import os
import sys
import termios

import pytest
from rich.console import Console

from cifarnet_cli import ui
from cifarnet_cli.events import EpochEnded, EpochStarted, RunStarted, StepProgress

STARTED = RunStarted(
    run="r",
    run_dir="/tmp/r",
    device="cpu",
    precision="fp32",
    precision_reason="",
    step_mode="eager",
    data="d",
    train_images=100,
    eval_images=10,
    eval_split="val",
    arch="resnet20",
    parameters=1,
    trainable_parameters=1,
    batch_size=10,
    accum=1,
    effective_batch=10,
    peak_lr=0.1,
    epochs=4,
    start_epoch=0,
    on_device_data=True,
)


def _render(width: int, monkeypatch: pytest.MonkeyPatch) -> str:
    console = Console(file=io.StringIO(), width=width, force_terminal=True, color_system=None)
    monkeypatch.setattr(ui, "err_console", console)
    view = ui.TrainView(live=True)
    with view:
        view(STARTED)
        view(EpochStarted(1, 4, 10, 10))
        view(StepProgress(1, 5, 10, 50, 2.2, 0.1234, 0.05, 345.0))
        assert view._progress is not None
        view._progress.refresh()
        text = console.file.getvalue()  # type: ignore[attr-defined]
    return text


@pytest.mark.parametrize("width", [120, 90, 60])
def test_bars_and_counts_survive_narrow_terminals(width: int, monkeypatch: pytest.MonkeyPatch) -> None:
    text = _render(width, monkeypatch)
    last = [line for line in text.splitlines() if "epoch 1/4" in line][-1]
    assert "━" in last and "5/10" in last and "eta" in last
    assert ("lr 0.05" in last) == (width >= 90)  # the metrics shrink as the terminal narrows
    assert "loss 2.2" in last and "acc 12.3" in last  # loss and accuracy stay, even at 60 columns
    assert len(last) <= width
    run_row = [line for line in text.splitlines() if "run " in line and "0/4" in line][-1]
    assert "━" in run_row and "eta" in run_row


def test_the_run_row_has_an_eta_before_the_first_epoch_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    console = Console(file=io.StringIO(), width=120, force_terminal=True, color_system=None)
    monkeypatch.setattr(ui, "err_console", console)
    view = ui.TrainView(live=True)
    with view:
        view(STARTED)
        view(EpochStarted(1, 4, 10, 10))
        assert view._progress is not None and view._run_task is not None
        task = view._progress.tasks[view._run_task]
        view(StepProgress(1, 2, 10, 20, 2.2, 0.1, 0.05, 100.0))
        view(StepProgress(1, 6, 10, 60, 2.0, 0.2, 0.05, 100.0))
        assert task.completed == pytest.approx(0.6) and task.time_remaining is not None
        view(
            EpochEnded(
                {
                    "epoch": 1,
                    "train_loss": 2.0,
                    "train_accuracy": 0.2,
                    "val_loss": 2.0,
                    "val_accuracy": 0.3,
                    "lr": 0.05,
                    "images_per_second": 100.0,
                    "epoch_seconds": 1.0,
                },
                True,
            )
        )
        assert task.completed == 1 and task.fields["stats"] == "best 30.00%"


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_keys_are_not_echoed_while_bars_are_live(monkeypatch: pytest.MonkeyPatch) -> None:
    master, slave = os.openpty()
    tty = os.fdopen(slave, "r")
    monkeypatch.setattr(sys, "stdin", tty)
    try:
        before = termios.tcgetattr(slave)
        assert before[3] & termios.ECHO
        with ui._NoEcho():
            during = termios.tcgetattr(slave)
            assert not during[3] & termios.ECHO and not during[3] & termios.ECHOCTL
        assert termios.tcgetattr(slave) == before
    finally:
        tty.close()
        os.close(master)


def test_decoding_is_a_bar_in_a_terminal_and_lines_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder's first read is progress, not a notice: a transient bar in a terminal, then one line; in a
    log, a line every 10,240 images and at the end."""
    from cifarnet_cli.events import DecodeProgress

    console = Console(file=io.StringIO(), width=100, force_terminal=True, color_system=None)
    monkeypatch.setattr(ui, "err_console", console)
    with ui.TrainView(live=True) as view:
        view(DecodeProgress(2048, 5000))
        assert view._decode is not None
        view._decode.refresh()
        view(DecodeProgress(5000, 5000))
        assert view._decode is None
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "2048/5000" in text and "Decoded 5,000 images" in text

    log = Console(file=io.StringIO(), width=100, force_terminal=False)
    monkeypatch.setattr(ui, "err_console", log)
    with ui.TrainView(live=False) as view:
        for done in range(2048, 20480, 2048):
            view(DecodeProgress(done, 20480))
        view(DecodeProgress(20480, 20480))
    assert log.file.getvalue().splitlines() == ["Decoding images: 10240/20480", "Decoding images: 20480/20480"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("width", [60, 120])
def test_predict_table_never_cuts_the_answer(width: int) -> None:
    """A narrow terminal folds paths, runners-up and errors; the predicted class and its probability stay whole."""
    from types import SimpleNamespace

    names = ["traffic_light_red", "traffic_light_green", "traffic_light_amber"]
    rows = [
        SimpleNamespace(
            path="/some/long/folder/" * 3 + "image.jpg",
            top=list(zip(names, (0.6, 0.3, 0.1), strict=True)),
            error=None,
        ),
        SimpleNamespace(path="broken.jpg", top=None, error="truncated: the file ends early"),
    ]
    console = Console(file=io.StringIO(), width=width, force_terminal=True, color_system=None)
    ui.prediction_table(rows, 3, console)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert "traffic_light_red" in out and "60.0%" in out and "…" not in out
    assert max(len(line) for line in out.splitlines()) <= width


def test_runs_table_fits_a_60_column_terminal() -> None:
    """The name, epochs, best and state stay; a long state wraps inside its cell instead of the whole
    table running past the terminal's edge."""
    from types import SimpleNamespace

    run = SimpleNamespace(
        name="resnet20-20261128-101500",
        command="train",
        arch="resnet20",
        epochs_done=2,
        epochs_planned=60,
        best_accuracy=0.5,
        best_epoch=2,
        final_accuracy=0.49,
        split="val",
        images_per_second=400.0,
        device="cpu (2 threads)",
        updated="2026-11-28T10:15:00",
        state="stopped-early",
        status="stopped early after epoch 2 (--patience 1)",
        path="/home/u/.local/share/cifarnet/runs/x",
    )
    console = Console(file=io.StringIO(), width=60, force_terminal=True, color_system=None)
    ui.runs_table([run], console)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert max(len(line) for line in out.splitlines()) <= 60
    assert "resnet20-20261128-101500" in out and "50.00% @2" in out and "2/60" in out and "…" not in out


def test_a_run_validated_on_the_test_split_says_test(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    """--val-split 0: the epoch lines and `runs show`'s columns name the test split, not "val"."""
    import dataclasses
    import json

    from cifarnet_cli import paths, runlist

    console = Console(file=io.StringIO(), width=200, force_terminal=False, color_system=None)
    monkeypatch.setattr(ui, "err_console", console)
    row = {"epoch": 1, "train_loss": 2.0, "train_accuracy": 0.2, "val_loss": 1.9, "val_accuracy": 0.3, "lr": 0.1,
           "lr_first": 0.1, "images_per_second": 100.0, "epoch_seconds": 1.0}  # fmt: skip
    with ui.TrainView(live=False) as view:
        view(dataclasses.replace(STARTED, eval_split="test"))
        view(EpochEnded(row, True))
    line = [x for x in console.file.getvalue().splitlines() if x.startswith("epoch")][-1]  # type: ignore[attr-defined]
    assert "test loss 1.9000 acc 30.00%" in line and "val" not in line
    run_dir = paths.runs_dir() / "t0"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"config": {"epochs": 1}, "meta": {"eval_split": "test"}}))
    (run_dir / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    out = Console(file=io.StringIO(), width=200, color_system=None)
    ui.run_detail(runlist.detail("t0"), out)
    shown = out.file.getvalue()  # type: ignore[attr-defined]
    assert "test loss" in shown and "test acc" in shown and "val loss" not in shown


def test_batch_size_auto_off_cuda_says_what_it_means(monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    console = Console(file=io.StringIO(), width=200, force_terminal=False, color_system=None)
    monkeypatch.setattr(ui, "err_console", console)
    with ui.TrainView(live=False, batch_size_auto=True) as view:
        view(dataclasses.replace(STARTED, device="cpu (2 threads)", batch_size=512, accum=1, effective_batch=512))
    said = console.file.getvalue()  # type: ignore[attr-defined]
    assert "--batch-size auto fits the micro-batch to a GPU's free memory; on cpu it is the recipe's: 512" in said
    console.file.truncate(0)  # type: ignore[attr-defined]
    with ui.TrainView(live=False, batch_size_auto=True) as view:
        view(dataclasses.replace(STARTED, device="cuda:0 (NVIDIA H200, 139.8 GiB)"))
    assert "--batch-size auto" not in console.file.getvalue()  # type: ignore[attr-defined]


def _run_with_reports(name: str) -> None:
    """A run folder (no checkpoint needed) with two reports: on its own data, and with TTA on other data."""
    import json

    from cifarnet_cli import paths

    run_dir = paths.runs_dir() / name
    (run_dir / "tensorboard").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"config": {"epochs": 2}, "meta": {"eval_split": "val"}}))
    (run_dir / "tensorboard" / "events.out.tfevents.1764581000.a-rather-long-host-name.example.org").write_bytes(b"")
    own = {"split": "all", "accuracy": 0.55, "n": 40, "data": "/home/someone/data/cifar10-jpeg-subset (image-folder)",
           "tta": False, "runs_own_data": True}  # fmt: skip
    other = dict(own, data="/mnt/shared/datasets/voc-crops-2012 (image-folder)", tta=True, runs_own_data=False)
    (run_dir / "eval-all.json").write_text(json.dumps(own))
    (run_dir / "eval-all-tta-3fa2b1c9.json").write_text(json.dumps(other))


def test_run_detail_at_60_columns_keeps_its_boxes_and_breaks_paths_at_separators() -> None:
    from cifarnet_cli import runlist

    _run_with_reports("boxes")
    console = Console(file=io.StringIO(), width=60, force_terminal=True, color_system=None)
    ui.run_detail(runlist.detail("boxes"), console)
    lines = console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert max(len(line) for line in lines) <= 60
    body = [line for line in lines if line[:1] in "│┃"]
    assert body and all(line[-1] in "│┃" for line in body)  # every row closes its box on the same line
    assert any("voc-crops-2012" in line for line in lines) and any("all, TTA" in line for line in lines)
    assert any(line.startswith("│ tensorboard/") for line in lines)  # broken after the "/", not inside a name
    assert "Evaluations" in lines and "Files" in lines  # titles on lines of their own


def test_redirected_tables_have_no_trailing_spaces_and_titles_do_not_wrap() -> None:
    from cifarnet_cli import runlist

    _run_with_reports("wide")
    redirected = Console(file=io.StringIO(), width=80, force_terminal=False, color_system=None)
    ui.run_detail(runlist.detail("wide"), redirected)
    lines = redirected.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert not [line for line in lines if line != line.rstrip()]
    terminal = Console(file=io.StringIO(), width=120, force_terminal=True, color_system=None)
    table = ui.Table(title="Confusion matrix (rows: true class, columns: predicted)")
    table.add_column("a")
    ui.print_fitted(terminal, lambda _d: table)
    assert terminal.file.getvalue().splitlines()[0] == "Confusion matrix (rows: true class, columns: predicted)"  # type: ignore[attr-defined]


def test_an_evaluation_at_60_columns_wraps_between_words() -> None:
    """The heading and the "checkpoint on data" line fit the terminal, broken at spaces: a terminal's own
    wrapping cut "(image-folder)" into "(image" and "-folder)"."""
    from cifarnet_cli.evaluation import EvalReport

    classes = ["cat", "dog"]
    report = EvalReport(
        accuracy=0.5,
        n=4,
        classes=classes,
        per_class={"cat": 0.5, "dog": 0.5},
        per_class_n={"cat": 2, "dog": 2},
        confusion=[[1, 1], [1, 1]],
        split="val",
        checkpoint="/home/someone/.local/share/cifarnet/runs/ref/best.pt",
        data="/home/someone/data/added (image-folder)",
        tta=True,
        unrestricted_accuracy=0.25,
    )
    buf = io.StringIO()
    ui.eval_tables(report, Console(file=buf, width=60, force_terminal=True, color_system=None, emoji=False))
    lines = buf.getvalue().splitlines()
    assert max(map(len, lines)) <= 60
    assert any("(image-folder)" in line for line in lines) and "choosing among all classes" in buf.getvalue()
