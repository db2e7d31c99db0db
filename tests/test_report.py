"""Pictures: curves.png (points, integer epochs, best epoch, per-step learning rate), written atomically
in the background, and the comparison plot."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from cifarnet_cli import report, runs
from cifarnet_cli.config import TrainConfig
from cifarnet_cli.engine import scheduled_lrs
from cifarnet_cli.events import EpochEnded, EpochStarted

pytest.importorskip("matplotlib")


def _row(epoch: int, val: float) -> dict[str, Any]:
    return {"epoch": epoch, "train_loss": 2.0 / epoch, "train_accuracy": val - 0.05, "val_loss": 1.5 / epoch,
            "val_accuracy": val, "lr_first": 0.1, "lr": 0.05}  # fmt: skip


def test_a_one_epoch_run_draws_points_and_the_schedule_per_step() -> None:
    config = TrainConfig(epochs=1, lr=0.4, warmup_epochs=0.5)
    lrs = scheduled_lrs(config, 10)
    fig = report.curves_figure([_row(1, 0.4)], title="r", epochs=1, step_lrs=lrs, steps_per_epoch=10)
    loss_ax, acc_ax, lr_ax = fig.axes[:3]
    for line in loss_ax.lines[:2] + acc_ax.lines[:2]:
        assert line.get_marker() == "o" and list(line.get_xdata()) == [1]  # a visible point, not an empty line
    step_line = lr_ax.lines[0]
    assert len(step_line.get_xdata()) == 10 and max(step_line.get_ydata()) == pytest.approx(0.4)
    assert list(step_line.get_ydata()[:5]) == pytest.approx([0.08, 0.16, 0.24, 0.32, 0.4])  # the warm-up ramp
    best = [line for line in acc_ax.lines if line.get_label() == "best 40.00%"]  # the star, named in the legend
    assert len(best) == 1 and list(best[0].get_xdata()) == [1]
    assert all(float(t).is_integer() for t in acc_ax.get_xticks())


def test_curves_show_the_planned_rest_and_the_best_epoch() -> None:
    lrs = scheduled_lrs(TrainConfig(epochs=6, lr=0.4, warmup_epochs=1), 4)
    rows = [_row(1, 0.3), _row(2, 0.6), _row(3, 0.5)]
    fig = report.curves_figure(rows, title="r", epochs=6, step_lrs=lrs, steps_per_epoch=4)
    lr_ax, acc_ax = fig.axes[2], fig.axes[1]
    done, planned = lr_ax.lines[0], lr_ax.lines[1]
    assert len(done.get_xdata()) == 12 and planned.get_linestyle() == ":" and planned.get_xdata()[-1] == 6
    assert [line for line in acc_ax.lines if line.get_label() == "best 60.00%"][0].get_xdata()[0] == 2
    assert report.best_epoch(rows) == 2 and report.best_epoch([]) is None


def test_curves_writer_draws_in_the_background_and_replaces_atomically(tmp_path: Path) -> None:
    run = runs.Run("bg", tmp_path / "bg")
    run.dir.mkdir()
    run.write_metrics([_row(1, 0.3)])
    calls: list[str] = []
    writer = report.CurvesWriter(
        run, epochs=3, lr_schedule=lambda steps: calls.append(threading.current_thread().name) or [0.1] * 3 * steps
    )
    writer(EpochStarted(1, 3, 5, 5))
    writer(EpochEnded(_row(1, 0.3), True))
    assert writer.close() == run.curves_file and run.curves_file.stat().st_size > 10_000
    assert calls == ["cifarnet-curves"] and len(writer.draw_seconds) == 1
    assert [p.name for p in run.dir.iterdir() if "partial" in p.name] == []


def test_compare_plot(tmp_path: Path) -> None:
    target = report.plot_compare({"a": [_row(1, 0.3), _row(2, 0.5)], "b": [_row(1, 0.4)]}, tmp_path / "c.png")
    assert target is not None and target.stat().st_size > 10_000


def _legend(ax: Any) -> list[str]:
    return [text.get_text() for text in ax.get_legend().get_texts()]


def test_curves_name_the_test_split_the_best_epoch_and_an_early_stop() -> None:
    rows = [_row(1, 0.3), _row(2, 0.6), _row(3, 0.5), _row(4, 0.55)]
    fig = report.curves_figure(rows, title="r", epochs=10, eval_split="test", patience=2)
    loss_ax, acc_ax, lr_ax = fig.axes[:3]
    assert "test" in _legend(loss_ax) and "test" in _legend(acc_ax) and "validation" not in _legend(acc_ax)
    for ax in (loss_ax, acc_ax, lr_ax):  # the dashed line of the best epoch and the stop are explained
        assert "best epoch (2)" in _legend(ax) and "stopped early" in _legend(ax)
    assert "best 60.00%" in _legend(acc_ax)
    assert fig._suptitle.get_text() == "r: stopped early after epoch 4 of 10 (--patience 2)"
    plain = report.curves_figure(rows, title="r", epochs=10)  # validation split, no patience: no stop drawn
    assert "validation" in _legend(plain.axes[1]) and "stopped early" not in _legend(plain.axes[1])
    assert plain._suptitle.get_text() == "r: epoch 4 of 10"


def test_a_subset_confusion_picture_names_its_classes(tmp_path: Path) -> None:
    from cifarnet_cli.evaluation import EvalReport, confusion_title

    subset = EvalReport(0.75, 12, ["cat", "dog"], {}, {}, [[5, 1], [2, 4]], "val", "best.pt",
                        "/data/pets (image-folder)", True, 0.6, data_fingerprint="3fa2b1c9aa", runs_own_data=False)  # fmt: skip
    title = confusion_title("ref", subset)
    assert title.splitlines() == [
        "ref: val split of pets (image-folder, data 3fa2b1c9), flip TTA",
        "2 classes: cat, dog",
        "accuracy 75.00% of 12 images",
    ]
    fig_path = report.plot_confusion(subset.confusion, ["$cat$", "dog"], tmp_path / "c.png", title=title)
    assert fig_path is not None and fig_path.stat().st_size > 10_000  # a "$" in a class name is not maths


def test_a_confusion_picture_of_long_class_names_keeps_its_matrices(tmp_path: Path) -> None:
    """Class folders of 120 characters squeezed the matrices to nothing (matplotlib warned on stderr that
    it could not lay the figure out): the axes show each name's start, with an ellipsis."""
    import warnings

    names = [f"{kind}-" + "a-very-long-class-name-" * 5 for kind in ("cat", "dog", "fox", "owl")]
    confusion = [[3, 1, 0, 0], [0, 4, 0, 0], [1, 0, 2, 1], [0, 0, 0, 4]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        drawn = report.plot_confusion(confusion, names, tmp_path / "c.png", title="long names")
    assert drawn is not None and drawn.stat().st_size > 10_000
    assert report._label(names[0], report.TICK_LABEL_LIMIT) == names[0][:23] + "\u2026"
