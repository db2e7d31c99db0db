from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cifarnet_cli.cli import app
from cifarnet_cli.evaluation import confusion_matrix, metrics_from_logits

from .conftest import copy_run, isolate, train_once, write_image_folder

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


@pytest.fixture(scope="module")
def _ev_once(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    """Run "ev" (2 epochs on 20 images per class, a test split beside): trained once for the tests below,
    each of which gets a copy of it."""
    root = tmp_path_factory.mktemp("ev")
    data = write_image_folder(root / "images", per_class=20, splits=("train", "test"))
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, root / "home")  # a module fixture comes before the per-test isolation
        result = runner.invoke(app, ["train", "--data-dir", str(data), "--run", "ev", *FAST])
    assert result.exit_code == 0, result.output
    return data, json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def trained_run(_ev_once: tuple[Path, dict[str, object]]) -> tuple[Path, dict[str, object]]:
    """A copy of run "ev" in this test's home (its data is shared: tests that change data make their own)."""
    from cifarnet_cli import paths

    data, reported = _ev_once
    copy = paths.runs_dir() / "ev"
    shutil.copytree(Path(str(reported["run_dir"])), copy)
    return data, {**reported, "run_dir": str(copy)}


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
        "voc",
        per_class=5,
        classes=("aeroplane", "car", "bird", "cat", "dog", "frog", "motorbike"),
        splits=("",),
        seed=500,  # other images than the run's (the same seed draws the same pixels)
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
    if not terminal:  # redirected: the legend is one line, never wrapped at 80 columns
        assert any("air=airplane" in line and "tru=truck" in line for line in result.stdout.splitlines())
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


# --------------------------------------------------------------------------------------------------
# Changed data: the validation split is kept by image identity, reports are kept per data


def test_a_split_record_sorts_images_by_what_the_run_did_with_them() -> None:
    from cifarnet_cli.data.split import SplitRecord, identify, image_ids

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    record = SplitRecord.of(images[:6], np.concatenate([images[6:9], images[:1]]))  # image 0 also trained on
    assert record.trained.size == 6 and record.held_out.size == 3  # a training image is never held out
    restored = SplitRecord.from_meta({"split_ids": record.to_meta()})
    assert restored is not None and np.array_equal(restored.held_out, record.held_out)
    assert SplitRecord.from_meta({}) is None and SplitRecord.from_meta({"split_ids": {"trained": [1]}}) is None
    changed = np.concatenate([images[1:], rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)])  # 0 gone, 2 new
    found = identify(image_ids(changed), record)
    assert found.held_out.tolist() == [5, 6, 7] and found.trained.tolist() == [0, 1, 2, 3, 4]
    assert (found.new, found.held_out_missing, found.trained_missing) == (3, 0, 1)  # image 9 was never seen


def test_a_run_started_from_another_holds_out_only_images_new_to_its_weights() -> None:
    """--init-from: the source's training images (``inherited``) always train, are never held out, count as
    trained on changed data, and are kept whole so that a resume draws the same split again."""
    from cifarnet_cli.data.split import SplitRecord, identify, image_ids, split_unseen, unseen_mask

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(12) % 2
    parent = SplitRecord.of(images[:8], images[8:10])  # 10 and 11 are new to the parent
    unseen = unseen_mask(images, parent.seen)
    assert np.flatnonzero(unseen).tolist() == [8, 9, 10, 11]
    train_idx, val_idx = split_unseen(labels, unseen, 2, seed=3)
    assert set(val_idx.tolist()) <= {8, 9, 10, 11} and sorted([*train_idx, *val_idx]) == list(range(12))
    assert split_unseen(labels, unseen, 4, seed=3)[1].tolist() == [8, 9, 10, 11]
    with pytest.raises(ValueError):
        split_unseen(labels, unseen, 5, seed=3)
    child = SplitRecord.of(images[train_idx], images[val_idx], parent.seen)
    restored = SplitRecord.from_meta({"split_ids": child.to_meta()})
    assert restored is not None and np.array_equal(restored.inherited, parent.seen)
    assert np.array_equal(restored.seen, np.unique(image_ids(images[train_idx])))  # the parent's are among them
    found = identify(image_ids(images[:8]), restored)  # the parent's images only: all seen by the child's weights
    assert found.held_out.size == 0 and found.trained.size == 8


@pytest.fixture(scope="module")
def _trained_once(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One run (resnet20, 1 epoch) on a folder of class folders, 80 images, 30 held out: trained once for
    the tests below, each of which copies it."""
    root = tmp_path_factory.mktemp("once")
    data = write_image_folder(root / "data", per_class=8, splits=("",))
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, root)
        args = ["train", "--data-dir", str(data), "--run", "idr", "--epochs", "1", "--batch-size", "16"]
        result = runner.invoke(app, [*args, "--val-split", "30", "--warmup-epochs", "0", "--quiet"])
        assert result.exit_code == 0, result.output
    return data, root / "cifarnet" / "runs" / "idr"


@pytest.fixture
def id_run(_trained_once: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the run in this test's home, and of its data (which the test may change)."""
    from cifarnet_cli import paths

    data, run_dir = _trained_once
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    shutil.copytree(run_dir, paths.runs_dir() / "idr")
    return copy, paths.runs_dir() / "idr"


def _add_images(folder: Path, n: int, seed: int) -> None:
    from PIL import Image

    from tests.conftest import synthetic_images

    for k, img in enumerate(synthetic_images(np.zeros(n, dtype=np.int64), seed)):
        Image.fromarray(img).save(folder / f"new-{seed}-{k}.png")


def _scored(run: str, data: Path, split: str | None) -> tuple[np.ndarray, list[str]]:
    """The identities of the images `evaluate` scores, and what it says."""
    from cifarnet_cli.data.split import image_ids
    from cifarnet_cli.evaluation import _eval_set
    from cifarnet_cli.inference import load_model

    said: list[str] = []
    chosen = _eval_set(load_model(run, torch.device("cpu")), data, split, lambda e: said.append(str(e)))
    return image_ids(chosen.images.images), said


def test_val_on_changed_data_scores_only_the_images_the_run_held_out(id_run: tuple[Path, Path]) -> None:
    """Adding images to one class folder reshuffles a recomputed split: the held-out images are found by
    identity instead, and none of the run's training images is ever scored as 'val'."""
    from cifarnet_cli.checkpoint import read_model
    from cifarnet_cli.data.split import SplitRecord

    data, run_dir = id_run
    record = SplitRecord.from_meta(read_model(run_dir / "best.pt").meta)
    assert record is not None and (record.trained.size, record.held_out.size) == (50, 30)
    assert "split_ids" not in json.loads((run_dir / "config.json").read_text())["meta"]  # config.json stays small
    _add_images(data / "airplane", 10, seed=7)
    (data / "cat" / "0000.png").unlink()  # one image less: held out or trained on
    for split in ("val", None):  # --split val, and the default on a folder without a test split
        ids, said = _scored("idr", data, split)
        assert set(ids.tolist()) <= set(record.held_out.tolist())
        assert not set(ids.tolist()) & set(record.trained.tolist())
        assert len(ids) >= 29 and "still in it" in " ".join(said)
    out = json.loads(
        runner.invoke(app, ["evaluate", "idr", "--data-dir", str(data), "--split", "val", "--json"]).stdout
    )
    found = out["identities"]
    assert found["recorded"] == 30 and found["found"] + found["missing"] == 30 and found["new_left_out"] == 10
    assert out["n"] == found["found"] and out["runs_own_data"] is False


def test_copies_of_held_out_images_are_counted_apart_from_the_images_found(id_run: tuple[Path, Path]) -> None:
    """A class folder copied under other names holds some held-out images twice: the run's images found
    never outnumber those it recorded ("the 28 of its 25" was said), and the copies are counted apart."""
    data, _run_dir = id_run
    for image in sorted((data / "cat").iterdir()):
        shutil.copy(image, data / "cat" / f"copy-{image.name}")
    result = runner.invoke(app, ["evaluate", "idr", "--data-dir", str(data), "--split", "val", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    found = out["identities"]
    assert found["recorded"] == 30 and found["found"] == 30 and found["missing"] == 0
    assert found["copies"] >= 1 and out["n"] == 30 + found["copies"]
    said = " ".join(result.stderr.split())
    assert "the 30 of its 30 images held out" in said and f"{out['n']} images scored" in said


def test_train_and_all_on_changed_data_say_which_images_were_trained_on(id_run: tuple[Path, Path]) -> None:
    data, run_dir = id_run
    _add_images(data / "airplane", 4, seed=8)
    result = runner.invoke(app, ["evaluate", "idr", "--data-dir", str(data), "--split", "all", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["n"] == 84 and out["identities"] == {"trained_included": 50}
    assert "50 of these 84 images (all) are images the run trained on" in result.stderr
    train = json.loads(
        runner.invoke(app, ["evaluate", "idr", "--data-dir", str(data), "--split", "train", "--json"]).stdout
    )
    assert train["n"] == 50


def _strip_record(run_dir: Path) -> None:
    """Make the run look like one trained before runs recorded image identities."""
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(run_dir / name, weights_only=True)
        del ckpt["meta"]["split_ids"]
        torch.save(ckpt, run_dir / name)


def test_an_older_run_on_changed_data_refuses_val_and_warns_of_all(id_run: tuple[Path, Path]) -> None:
    data, run_dir = id_run
    _strip_record(run_dir)
    assert json.loads(runner.invoke(app, ["evaluate", "idr", "--split", "val", "--json"]).stdout)["n"] == 30
    _add_images(data / "airplane", 3, seed=9)
    refused = runner.invoke(app, ["evaluate", "idr", "--data-dir", str(data), "--split", "val"])
    assert refused.exit_code == 1 and "cannot be found in it" in refused.output.replace("\n", " ")
    default = runner.invoke(app, ["evaluate", "idr", "--data-dir", str(data), "--json"])
    assert default.exit_code == 0 and json.loads(default.stdout)["split"] == "all"
    assert "may be among them" in default.stderr.replace("\n", " ")  # never silently scores training images


def test_results_on_other_data_never_replace_earlier_ones(id_run: tuple[Path, Path], tmp_path: Path) -> None:
    from cifarnet_cli.data.sources import load_source
    from cifarnet_cli.runlist import detail

    data, run_dir = id_run
    other = tmp_path / "other"
    shutil.copytree(data, other)
    _add_images(other / "airplane", 2, seed=10)
    for args in ([], ["--data-dir", str(other)], ["--tta"], ["--data-dir", str(other), "--tta"]):
        assert runner.invoke(app, ["evaluate", "idr", "--split", "all", *args]).exit_code == 0
    reports = sorted(p.name for p in run_dir.glob("eval-all*.json"))
    assert len(reports) == 4 and "eval-all.json" in reports and "eval-all-tta.json" in reports
    fingerprint = load_source(other).fingerprint
    assert f"eval-all-{fingerprint[:8]}.json" in reports and f"eval-all-tta-{fingerprint[:8]}.json" in reports
    shown = detail("idr").evaluations
    assert {(e["data"].startswith(str(other)), e["tta"]) for e in shown} == {(a, b) for a in (0, 1) for b in (0, 1)}


#: Class folder names of 120 characters: three of them in a report's name make it 380 bytes, past the
#: 255 that file systems allow.
LONG_CLASSES = tuple(f"{word}-" + "very-long-class-name-" * 5 + "x" * (120 - len(word) - 106) for word in "abcd")


@pytest.fixture(scope="module")
def _long_names_once(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return train_once(tmp_path_factory, "long", classes=LONG_CLASSES, per_class=4, splits=("train", "test"))


def test_report_names_of_long_class_names_are_bounded_and_paired(_long_names_once: tuple[Path, Path]) -> None:
    data, trained = _long_names_once
    run_dir = copy_run(trained)
    assert all(len(name) == 120 for name in LONG_CLASSES)
    for subset in (LONG_CLASSES[:3], LONG_CLASSES[1:]):
        result = runner.invoke(app, ["evaluate", "long", "--classes", ",".join(subset), "--json"])
        assert result.exit_code == 0, result.output
        assert "Traceback" not in result.output and "not saved" not in result.output, result.output
    reports = sorted(p.name for p in run_dir.glob("eval-*.json"))
    assert len(reports) == 2, reports  # each subset keeps its own report
    for name in reports:
        assert len(name.encode()) <= 220 and name.startswith(("eval-test-a-very-long", "eval-test-b-very-long")), name
    pytest.importorskip("matplotlib")
    pictures = sorted(p.name for p in run_dir.glob("confusion-*.png"))
    assert [n.replace("confusion-", "eval-").replace(".png", ".json") for n in pictures] == reports
    shown = runner.invoke(app, ["runs", "show", "long", "--json"])
    assert shown.exit_code == 0, shown.output
    assert sorted(e["file"] for e in json.loads(shown.stdout)["evaluations"]) == reports
