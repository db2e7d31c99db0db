from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cifarnet_cli.cli import app
from cifarnet_cli.data.classes import CIFAR10_CLASSES
from cifarnet_cli.data.images import ImageDecodeError, load_image

from .conftest import copy_run, train_once

runner = CliRunner()


@pytest.fixture(scope="module")
def _trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return train_once(tmp_path_factory, "p", per_class=8, splits=("train", "test"))


@pytest.fixture
def run(_trained: tuple[Path, Path]) -> Path:
    """The data of run "p" (one quick epoch), the run copied into this test's home."""
    copy_run(_trained[1])
    return _trained[0]


def _images(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = {}
    rgba = np.concatenate([rng.integers(0, 256, (40, 50, 3)), np.full((40, 50, 1), 128)], axis=2).astype(np.uint8)
    files["alpha.png"] = rgba
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8), "L").save(folder / "gray.png")
    Image.fromarray((rng.integers(0, 65536, (33, 31))).astype(np.uint16)).save(folder / "deep16.png")
    Image.new("P", (32, 32)).save(folder / "palette.png")
    Image.new("CMYK", (64, 48), (10, 200, 30, 0)).save(folder / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°
    Image.new("RGB", (80, 40), (200, 10, 10)).save(folder / "rotated.jpg", exif=exif)
    Image.new("RGB", (3000, 2000), (10, 10, 200)).save(folder / "huge.jpg", quality=50)
    Image.new("RGB", (1, 1), (0, 255, 0)).save(folder / "tiny.bmp")
    Image.new("RGB", (32, 32), (0, 255, 0)).save(folder / "pic.webp")
    good = folder / "truncated.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    good.write_bytes(good.read_bytes()[:200])
    (folder / "notes.png").write_text("this is text, not a PNG")
    return {p.name: p for p in folder.iterdir()}


def test_load_image_handles_every_mode(tmp_path: Path) -> None:
    files = _images(tmp_path / "imgs")
    for name in (
        "alpha.png",
        "gray.png",
        "deep16.png",
        "palette.png",
        "cmyk.jpg",
        "rotated.jpg",
        "huge.jpg",
        "tiny.bmp",
        "pic.webp",
    ):
        px = load_image(files[name])
        assert px.shape == (32, 32, 3) and px.dtype == np.uint8, name
    for name in ("truncated.jpg", "notes.png"):
        with pytest.raises(ImageDecodeError):
            load_image(files[name])


def test_sixteen_bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16)).save(tmp_path / "mid.png")
    assert abs(int(load_image(tmp_path / "mid.png")[0, 0, 0]) - 128) <= 1


def test_alpha_is_composited_on_white_and_exif_is_applied(tmp_path: Path) -> None:
    Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert load_image(tmp_path / "clear.png").min() == 255
    exif = Image.Exif()
    exif[0x0112] = 6
    img = Image.new("RGB", (64, 32), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 32, 32))  # left half white
    img.save(tmp_path / "rot.png", exif=exif)  # displayed rotated: the white half ends up on top
    px = load_image(tmp_path / "rot.png").astype(int)
    assert px[:16].mean() > px[16:].mean() + 100


def test_a_32x32_rgb_image_passes_through(tmp_path: Path) -> None:
    arr = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.png")
    assert np.array_equal(load_image(tmp_path / "x.png"), arr)


def test_predict_json_lists_good_and_broken_files(run: Path, tmp_path: Path) -> None:
    files = _images(tmp_path / "imgs")
    result = runner.invoke(app, ["predict", str(tmp_path / "imgs"), "--json", "--top-k", "3"])
    assert result.exit_code == 1  # two files are broken
    out = json.loads(result.stdout)["predictions"]
    by_name = {Path(o["path"]).name: o for o in out}
    assert set(by_name) == set(files)
    for name in ("truncated.jpg", "notes.png"):
        assert "error" in by_name[name] and "top" not in by_name[name]
    good = by_name["alpha.png"]
    assert len(good["top"]) == 3 and set(good["top"][0]) == {"class", "probability"}
    probs = [t["probability"] for t in good["top"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_predict_all_good_exits_zero_and_globs(run: Path) -> None:
    pattern = str(run / "test" / "cat" / "*.png")
    result = runner.invoke(app, ["predict", pattern, "--json", "-k", "1"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["predictions"]) == 8


def test_predict_matches_evaluate_on_test_images(run: Path) -> None:
    result = runner.invoke(app, ["predict", str(run / "test"), "--json", "-k", "1"])
    preds = json.loads(result.stdout)["predictions"]
    correct = sum(Path(p["path"]).parent.name == p["top"][0]["class"] for p in preds)
    evaluation = json.loads(runner.invoke(app, ["evaluate", "p", "--split", "test", "--json"]).stdout)
    assert evaluation["n"] == len(preds)
    assert correct / len(preds) == pytest.approx(evaluation["accuracy"])


def test_predict_table_and_missing_file(run: Path) -> None:
    result = runner.invoke(app, ["predict", str(run / "test" / "dog" / "0000.png"), "missing.png"])
    assert result.exit_code == 1
    assert "probability" in result.output and "%" in result.output  # the good file got a row
    assert "no such file" in result.output and "1 of 2 input(s)" in result.output


def test_a_folder_without_images_is_an_error_not_an_empty_answer(run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("no pictures here")
    result = runner.invoke(app, ["predict", str(folder), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["predictions"] == [{"path": str(folder), "error": "no image files in this folder"}]


def test_predict_without_runs_explains(tmp_path: Path) -> None:
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    result = runner.invoke(app, ["predict", str(tmp_path / "a.png")])
    assert result.exit_code == 1 and "cifarnet train" in result.output and "--checkpoint" in result.output


def test_predict_with_checkpoint_path(run: Path) -> None:
    from cifarnet_cli import runs

    best = runs.resolve_run("p").best
    result = runner.invoke(app, ["predict", str(run / "test" / "cat"), "--checkpoint", str(best), "--json"])
    assert result.exit_code == 0 and len(json.loads(result.stdout)["predictions"]) == 8
    both = runner.invoke(app, ["predict", "x.png", "--checkpoint", str(best), "--run", "p"])
    assert both.exit_code == 2


def test_predict_keeps_input_order_and_explains_errors(run: Path, tmp_path: Path) -> None:
    a, b = run / "test" / "cat" / "0000.png", run / "test" / "dog" / "0001.png"
    truncated = tmp_path / "cut.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    (tmp_path / "text.png").write_text("not a picture")
    inputs = [str(b), "missing.png", str(truncated), str(a), str(tmp_path / "text.png"), str(b)]
    table = runner.invoke(app, ["predict", *inputs, "-k", "1"])
    assert table.exit_code == 1
    lines = table.stdout.splitlines()
    header = next(line for line in lines if "file" in line)
    assert [h.strip() for h in header.split("┃")[1:-1]] == ["file", "class", "probability", "error"]
    assert "Truncated File Read" not in table.stdout and "truncated" in table.stdout
    assert "not an image file" in table.stdout
    rows = runner.invoke(app, ["predict", *inputs, "--json", "--save-csv", str(tmp_path / "out.csv")])
    expected = [str(b), "missing.png", str(truncated), str(a), str(tmp_path / "text.png")]  # b is listed once
    assert [p["path"] for p in json.loads(rows.stdout)["predictions"]] == expected
    with (tmp_path / "out.csv").open() as fh:
        csv_rows = list(csv.DictReader(fh))
    assert [r["path"] for r in csv_rows] == expected
    assert csv_rows[0]["class"] in CIFAR10_CLASSES and 0 < float(csv_rows[0]["probability"]) <= 1
    assert csv_rows[1]["class"] == "" and csv_rows[1]["error"] == "no such file or folder"


def test_predict_checks_numbers_first_and_names_the_model(run: Path) -> None:
    for args in (["--batch-size", "-5"], ["--batch-size", "0"], ["--top-k", "0"]):
        result = runner.invoke(app, ["predict", "missing.png", *args])
        assert result.exit_code == 2 and args[0] in result.output and "at least 1" in result.output, args
        assert result.stdout == ""
    from cifarnet_cli import runs

    result = runner.invoke(app, ["predict", str(run / "test" / "cat" / "0000.png"), "--json"])
    out = json.loads(result.stdout)
    assert out["model"] == str(runs.resolve_run("p").best) and out["arch"] == "resnet20"
    assert f"Model: {runs.resolve_run('p').best}" in result.stderr


def test_redirected_prediction_rows_keep_paths_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """Output to a file (Rich assumes 80 columns) is not folded: each input stays on one line, for grep."""
    import io

    from rich.console import Console

    from cifarnet_cli import ui
    from cifarnet_cli.predict import Prediction

    long = "/data/photos/" + "x" * 70 + ".jpg"
    rows = [
        Prediction(long, top=[("cat", 0.9), ("dog", 0.05), ("frog", 0.01)]),
        Prediction("/data/photos/broken.png", error="truncated: the file ends early"),
    ]
    out = Console(file=io.StringIO(), width=80, force_terminal=False, highlight=False)
    monkeypatch.setattr(ui, "out_console", out)
    ui.prediction_table(rows, 3)
    lines = out.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert any(long in line and "cat" in line and "dog 5.0%" in line for line in lines)
    assert any("broken.png" in line and "truncated: the file ends early" in line for line in lines)
