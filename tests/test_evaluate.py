from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cifarnet_cli.cli import app
from cifarnet_cli.evaluation import confusion_matrix, metrics_from_logits

runner = CliRunner()
FAST = ["--epochs", "2", "--batch-size", "16", "--val-split", "40", "--warmup-epochs", "0.5", "--quiet", "--json"]


def test_confusion_and_per_class_on_a_known_case() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    preds = torch.tensor([0, 0, 1, 1, 2, 2])
    assert confusion_matrix(preds, labels, 3).tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    logits = torch.nn.functional.one_hot(preds, 3).float()
    acc, per_class, counts, cm = metrics_from_logits(logits, labels, [0, 1, 2], ["a", "b", "c"])
    assert acc == pytest.approx(4 / 6)
    assert per_class == {"a": pytest.approx(2 / 3), "b": 0.5, "c": 1.0}
    assert counts == {"a": 3, "b": 2, "c": 1}
    assert cm == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_subset_takes_the_argmax_over_the_subset_only() -> None:
    # true class 0; the model prefers class 2, which is outside the subset {0, 1}
    logits = torch.tensor([[1.0, 0.5, 3.0]])
    acc, _per, _n, _cm = metrics_from_logits(logits, torch.tensor([0]), [0, 1], ["a", "b"])
    assert acc == 1.0


@pytest.fixture
def trained_run(image_folder: Callable[..., Path]) -> tuple[Path, dict[str, object]]:
    data = image_folder(per_class=20, splits=("train", "test"))
    result = runner.invoke(app, ["train", "--data-dir", str(data), "--run", "ev", *FAST])
    assert result.exit_code == 0, result.output
    return data, json.loads(result.stdout.strip().splitlines()[-1])


def test_evaluate_val_reproduces_the_training_split(trained_run: tuple[Path, dict[str, object]]) -> None:
    _data, reported = trained_run
    result = runner.invoke(app, ["evaluate", "ev", "--split", "val", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["n"] == 40
    assert out["accuracy"] == pytest.approx(reported["best_accuracy"], abs=1e-9)
    assert set(out) >= {"accuracy", "n", "per_class", "confusion", "classes"}
    assert sum(map(sum, out["confusion"])) == 40
    run_dir = Path(str(reported["run_dir"]))
    assert json.loads((run_dir / "eval-val.json").read_text())["accuracy"] == out["accuracy"]


def test_evaluate_defaults_to_the_latest_run_and_the_test_split(trained_run: tuple[Path, dict[str, object]]) -> None:
    result = runner.invoke(app, ["evaluate", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["split"] == "test" and out["n"] == 200


def test_evaluate_tables(trained_run: tuple[Path, dict[str, object]]) -> None:
    result = runner.invoke(app, ["evaluate", "ev", "--tta"])
    assert result.exit_code == 0, result.output
    assert "Per-class accuracy" in result.output and "Confusion matrix" in result.output and "flip TTA" in result.output


def test_voc_style_folder_with_class_subset(
    trained_run: tuple[Path, dict[str, object]], image_folder: Callable[..., Path]
) -> None:
    voc = image_folder(
        "voc", per_class=5, classes=("aeroplane", "car", "bird", "cat", "dog", "frog", "motorbike"), splits=("",)
    )
    result = runner.invoke(
        app, ["evaluate", "ev", "--data-dir", str(voc), "--classes", "aeroplane,car,bird,cat,dog,frog", "--json"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["classes"] == ["airplane", "automobile", "bird", "cat", "dog", "frog"]
    assert out["n"] == 30 and "unrestricted_accuracy" in out
    assert out["accuracy"] >= out["unrestricted_accuracy"]
    assert "motorbike" in result.stderr  # the unknown folder is named, not silently mislabelled


def test_evaluate_errors(trained_run: tuple[Path, dict[str, object]]) -> None:
    assert runner.invoke(app, ["evaluate", "nosuchrun"]).exit_code == 1
    bad_split = runner.invoke(app, ["evaluate", "ev", "--split", "dev"])
    assert bad_split.exit_code == 2 and "test, val, train" in bad_split.output
    bad_class = runner.invoke(app, ["evaluate", "ev", "--classes", "unicorn"])
    assert bad_class.exit_code == 2 and "unicorn" in bad_class.output
    # one class (every image "right") and an empty list (silently all classes) are refused
    for given in ("cat", ""):
        refused = runner.invoke(app, ["evaluate", "ev", "--split", "val", "--classes", given])
        assert refused.exit_code == 2 and "at least two classes" in refused.output


def test_each_class_subset_keeps_its_own_report(trained_run: tuple[Path, dict[str, object]]) -> None:
    run_dir = Path(str(trained_run[1]["run_dir"]))
    for subset in ("cat,dog", "airplane,ship"):
        assert runner.invoke(app, ["evaluate", "ev", "--split", "val", "--classes", subset]).exit_code == 0
    written = {p.name for p in run_dir.glob("eval-val-*.json")}
    assert {"eval-val-cat+dog.json", "eval-val-airplane+ship.json"} <= written


def test_evaluate_without_runs_says_how_to_train() -> None:
    result = runner.invoke(app, ["evaluate"])
    assert result.exit_code == 1 and "cifarnet train" in result.output


def test_a_split_the_data_does_not_have_is_refused(image_folder: Callable[..., Path]) -> None:
    data = image_folder(per_class=6)  # a folder of class folders: no test split
    trained = runner.invoke(app, ["train", "--data-dir", str(data / "train"), "--run", "one", *FAST])
    assert trained.exit_code == 0, trained.output
    result = runner.invoke(app, ["evaluate", "one", "--split", "test"])
    assert result.exit_code == 1
    assert "has no test split; choose one of: val, train, all" in result.output.replace("\n", " ")
    everything = json.loads(runner.invoke(app, ["evaluate", "one", "--split", "all", "--json"]).stdout)
    assert (everything["split"], everything["n"]) == ("all", 60)
    default = json.loads(runner.invoke(app, ["evaluate", "one", "--json"]).stdout)
    assert (default["split"], default["n"]) == ("val", 40)


def test_a_copy_of_the_training_folder_is_recognised_by_content(
    image_folder: Callable[..., Path], tmp_path: Path
) -> None:
    data = image_folder(per_class=6)
    trained = runner.invoke(app, ["train", "--data-dir", str(data / "train"), "--run", "c", *FAST])
    assert trained.exit_code == 0, trained.output
    copy = tmp_path / "copy"
    shutil.copytree(data / "train", copy)  # new modification times and a new place: same images
    result = runner.invoke(app, ["evaluate", "c", "--data-dir", str(copy), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert (out["split"], out["n"]) == ("val", 40)
    assert "differs" not in result.stderr
    original = json.loads(runner.invoke(app, ["evaluate", "c", "--split", "val", "--json"]).stdout)
    assert original["accuracy"] == out["accuracy"]


def test_evaluate_writes_a_confusion_png_and_says_where(trained_run: tuple[Path, dict[str, object]]) -> None:
    pytest.importorskip("matplotlib")
    run_dir = Path(str(trained_run[1]["run_dir"]))
    result = runner.invoke(app, ["evaluate", "ev", "--split", "val"])
    assert result.exit_code == 0, result.output
    assert (run_dir / "confusion-val.png").stat().st_size > 10_000
    assert f"Wrote eval-val.json, confusion-val.png to {run_dir}" in result.output
    out = json.loads(runner.invoke(app, ["evaluate", "ev", "--split", "val", "--json"]).stdout)
    assert out["files"] == [str(run_dir / "eval-val.json"), str(run_dir / "confusion-val.png")]


@pytest.mark.parametrize("width,terminal", [(80, False), (60, True)])
def test_class_names_are_never_cut(
    trained_run: tuple[Path, dict[str, object]], monkeypatch: pytest.MonkeyPatch, width: int, terminal: bool
) -> None:
    """Redirected output (Rich assumes 80 columns) and narrow terminals: full names or a legend, no "…"."""
    from rich.console import Console

    from cifarnet_cli import ui

    monkeypatch.setattr(ui, "out_console", Console(width=width, force_terminal=terminal, highlight=False))
    result = runner.invoke(app, ["evaluate", "ev"])
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout
    for name in ("airplane", "automobile", "deer", "dog"):
        assert name in result.stdout
    assert "aut=automobile" in result.stdout and "dee=deer" in result.stdout  # the matrix's legend
    if terminal:  # and the tables fit the terminal
        plain = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout)
        assert max(len(line) for line in plain.splitlines() if "best.pt" not in line) <= width


def test_a_report_that_cannot_be_written_is_one_worded_line(trained_run: tuple[Path, dict[str, object]]) -> None:
    """The results are printed anyway; the failure reads like every other file error (no "[Errno 21]")."""
    run_dir = Path(str(trained_run[1]["run_dir"]))
    (run_dir / "eval-val.json").mkdir()  # something in the way that even root cannot write over
    result = runner.invoke(app, ["evaluate", "ev", "--split", "val"])
    assert result.exit_code == 0, result.output
    assert "Accuracy on val" in result.stdout
    assert f"Cannot write {run_dir / 'eval-val.json'}" in result.output and "Errno" not in result.output
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".partial")]
