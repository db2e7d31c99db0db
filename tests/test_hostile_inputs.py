"""Hostile and odd inputs, second pass: what predict, evaluate and the model loaders are handed. FIFOs,
symbolic-link loops, strip-shaped PNGs, names full of markup and terminal escapes, malformed ONNX files
(built here with onnx.helper) and edited checkpoints are all made inside the tests."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cifarnet_cli import checkpoint, runtime, text
from cifarnet_cli.cli import app
from cifarnet_cli.config import TrainConfig
from cifarnet_cli.data import images
from cifarnet_cli.data.classes import CIFAR10_CLASSES
from cifarnet_cli.data.images import ImageDecodeError, load_image
from cifarnet_cli.data.sources import load_image_folder, load_source
from cifarnet_cli.models import get_model

from .conftest import synthetic_images, write_image_folder

runner = CliRunner()
needs_ort = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
    reason="onnx/onnxruntime not installed",
)

#: Markup, an emoji code, a screen clear, a window title (OSC), a colour, BEL, a right-to-left override and a
#: C1 control sequence introducer; no "/", so that it can be a file name too.
HOSTILE = "\x1b[2J\x1b]0;owned\x07[bold]B:smile:\x1b[31m\u202e\x9b1m"


def _no_traceback(result: Any) -> None:
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


def _inert(output: str) -> None:
    """Nothing in ``output`` acts on a terminal or was taken as markup or an emoji code."""
    for char in ("\x1b", "\x07", "\x9b", "\u202e"):
        assert char not in output, (char, output)
    assert "😄" not in output


def _checkpoint(path: Path, *, classes: tuple[str, ...] = CIFAR10_CLASSES, nan: bool = False, **meta: Any) -> Path:
    model = get_model("resnet20", num_classes=len(classes))
    state = model.state_dict()
    if nan:
        state = {k: torch.full_like(v, float("nan")) if k.endswith("fc.bias") else v for k, v in state.items()}
    obj = {
        "version": 1,
        "model": state,
        "config": TrainConfig().to_dict(),
        "meta": {"arch": "resnet20", "model_kwargs": {"num_classes": len(classes)}, "classes": list(classes), **meta},
        "epoch": 1,
    }
    torch.save(obj, path)
    return path


def _png(path: Path, size: tuple[int, int] = (40, 30), colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _onnx(
    path: Path,
    *,
    classes: list[Any] | Any = tuple(CIFAR10_CLASSES),
    outputs: int = 10,
    variant: str = "ok",
    props: dict[str, str] | None = None,
) -> Path:
    """A tiny ONNX classifier (mean colour → linear layer) with cifarnet metadata, or one of the ways such a
    file can be wrong (``variant``)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    f32, f16, i64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64
    weights = numpy_helper.from_array(np.random.default_rng(0).normal(size=(3, outputs)).astype(np.float32), "W")
    nodes = []
    inits = [weights]
    x = "images"
    in_type, in_shape = f32, ["N", 3, 32, 32]
    if variant == "fp16-input":
        in_type = f16
        nodes.append(helper.make_node("Cast", [x], ["x32"], to=f32))
        x = "x32"
    if variant == "nhwc-input":
        in_shape = ["N", 32, 32, 3]
        nodes.append(helper.make_node("Transpose", [x], ["nchw"], perm=[0, 3, 1, 2]))
        x = "nchw"
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "W"], ["scores"]),
    ]
    out_name, out_type, out_shape = "scores", f32, ["N", outputs]
    if variant == "nan":
        inits.append(numpy_helper.from_array(np.array([np.nan], dtype=np.float32), "nan"))
        nodes.append(helper.make_node("Mul", ["scores", "nan"], ["logits"]))
        out_name = "logits"
    elif variant == "scalar-output":
        nodes.append(helper.make_node("ReduceSum", ["scores"], ["total"], keepdims=0))
        out_name, out_shape = "total", []
    elif variant == "argmax-output":
        nodes.append(helper.make_node("ArgMax", ["scores"], ["label"], axis=1, keepdims=0))
        out_name, out_type, out_shape = "label", i64, ["N"]
    graph_outputs = [helper.make_tensor_value_info(out_name, out_type, out_shape)]
    graph_inputs = [helper.make_tensor_value_info("images", in_type, in_shape)]
    if variant == "two-inputs":
        graph_inputs.append(helper.make_tensor_value_info("extra", f32, ["N", 1]))
    if variant == "two-outputs":
        nodes.append(helper.make_node("Identity", ["scores"], ["copy"]))
        graph_outputs.append(helper.make_tensor_value_info("copy", f32, ["N", outputs]))
    graph = helper.make_graph(nodes, "g", graph_inputs, graph_outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    meta = {
        "cifarnet_arch": "resnet20",
        "cifarnet_classes": classes if isinstance(classes, str) else json.dumps(list(classes)),
        "cifarnet_input_size": "32",
        **(props or {}),
    }
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


def _class_folders(root: Path, classes: tuple[str, ...] = CIFAR10_CLASSES, per_class: int = 2) -> Path:
    for i, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for k, pixels in enumerate(synthetic_images(np.full(per_class, i), seed=i)):
            Image.fromarray(pixels).save(folder / f"{k}.png")
    return root


def _cli(*args: str, timeout: float = 90, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """`python -m cifarnet_cli ARGS` in a subprocess: a hang fails the test instead of stopping the suite."""
    return subprocess.run(
        [sys.executable, "-m", "cifarnet_cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=kwargs.pop("env", None) or dict(os.environ),
        **kwargs,
    )


# --------------------------------------------------------------------------------------------------
# 1. predict walks its inputs with the training walk's rules


@needs_ort
def test_fifos_and_link_loops_never_hang_predict_and_each_file_counts_once(tmp_path: Path) -> None:
    model = _onnx(tmp_path / "m.onnx")
    photos = tmp_path / "photos"
    _png(photos / "a.png")
    _png(photos / "deep" / "b.png")
    os.mkfifo(photos / "blocked.png")  # a reader that opens it waits for a writer forever
    os.mkfifo(photos / "deep" / "pipe.jpg")
    (photos / "deep" / "up").symlink_to("..")  # two loops: glob.glob follows both, level after level
    (photos / "deep" / "self").symlink_to(".")
    (tmp_path / "alias.png").symlink_to(photos / "a.png")
    proc = _cli(
        "predict",
        str(photos),
        str(photos / "**" / "*.png"),
        str(photos / "blocked.png"),
        str(tmp_path / "alias.png"),
        "--model",
        str(model),
        "--json",
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr  # the FIFOs cannot be classified
    rows = json.loads(proc.stdout)["predictions"]
    paths = [Path(r["path"]) for r in rows]
    assert sorted(p.name for p in paths if "top" in [*rows[paths.index(p)]]) == ["a.png", "b.png"]
    errors = {Path(r["path"]).name: r["error"] for r in rows if "error" in r}
    assert set(errors) == {"blocked.png", "pipe.jpg"}  # each special file said once, never opened
    assert all("named pipe (FIFO), not a regular file" in why for why in errors.values())
    assert len(rows) == 4, rows


def test_links_to_an_ancestor_to_root_or_into_a_system_folder_are_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cifarnet_cli.data import walk
    from cifarnet_cli.predict import Prediction, collect_inputs

    system = tmp_path / "system"  # stands for /proc, /sys and /dev: the test never walks the real ones
    _png(system / "inside" / "never.png")
    monkeypatch.setattr(walk, "SYSTEM_FOLDERS", (str(system),), raising=False)
    _png(tmp_path / "elsewhere" / "sibling.png")  # reached only through the link to the parent
    photos = tmp_path / "photos"
    _png(photos / "a.png")
    (photos / "here").symlink_to(photos)  # the walked folder itself
    (photos / "up").symlink_to(tmp_path)  # its parent: every sibling of the data
    (photos / "root").symlink_to("/")
    (photos / "sys").symlink_to(system / "inside")
    items = collect_inputs([str(photos)])
    found = [p.name for p in items if isinstance(p, Path)]
    rows = {Path(p.path).name: p.error for p in items if isinstance(p, Prediction)}
    assert found == ["a.png"], items
    assert set(rows) == {"up", "root", "sys"}, rows  # one row per link out, saying why; "here" is a loop, ended
    assert "folder being read" in str(rows["up"]) and "system folder" in str(rows["sys"]), rows
    items = collect_inputs([str(photos / "**" / "*.png")])  # ** follows the same rules
    assert [p.name for p in items if isinstance(p, Path)] == ["a.png"], items
    assert {Path(p.path).name for p in items if isinstance(p, Prediction)} == {"up", "root", "sys"}, items
    # A RAM disk under a system folder (/dev/shm) holds users' data and is followed.
    _png(system / "shm" / "fast.png")
    monkeypatch.setattr(walk, "USER_FOLDERS", (str(system / "shm"),))
    (photos / "ram").symlink_to(system / "shm")
    assert sorted(p.name for p in collect_inputs([str(photos)]) if isinstance(p, Path)) == ["a.png", "fast.png"]
    (photos / "ram").unlink()

    data = tmp_path / "data"
    cls = ["airplane", "automobile"]
    write_image_folder(data, per_class=2, classes=tuple(cls))
    (data / "train" / "airplane" / "up").symlink_to(tmp_path)
    (data / "train" / "airplane" / "root").symlink_to("/")
    (data / "train" / "automobile" / "sys").symlink_to(system)
    source = load_image_folder(data, classes=cls, use_cache=False)
    said = [w for w in source.warnings if "not followed" in w]
    assert len(said) == 1 and "3 symbolic link(s)" in said[0], source.warnings
    assert sum(len(s) for s in source.splits.values()) == 4  # the walk took only the data's own images

    # The same folders named as the input itself (directly or through a link): one row or one error, no walk.
    named = collect_inputs([str(photos / "root"), str(system / "inside")])
    rows = {p.path: p.error for p in named if isinstance(p, Prediction)}
    assert len(rows) == len(named) == 2, named
    assert "root of the file system" in str(rows[str(photos / "root")]), rows
    assert "system folder" in str(rows[str(system / "inside")]), rows
    for folder in (photos / "root", photos / "sys"):
        with pytest.raises(runtime.CifarNetError, match="name the folder of the images"):
            load_image_folder(folder, use_cache=False)


def test_a_folder_that_cannot_be_read_is_a_row_not_a_silent_gap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos = tmp_path / "photos"
    _png(photos / "a.png")
    _png(photos / "locked" / "b.png")
    locked = photos / "locked"
    if os.geteuid() != 0:
        locked.chmod(0o000)
    else:  # root reads any folder: refuse the listing as the kernel would for a user
        real = os.scandir

        def scandir(path: Any = ".") -> Any:
            if os.fspath(path) == str(locked):
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real(path)

        monkeypatch.setattr(os, "scandir", scandir)
    try:
        ckpt = _checkpoint(tmp_path / "m.pt")
        result = runner.invoke(app, ["predict", str(photos), "--checkpoint", str(ckpt), "--json"])
    finally:
        locked.chmod(0o755)
    rows = json.loads(result.stdout)["predictions"]
    assert [Path(r["path"]).name for r in rows] == ["a.png", "locked"], rows
    assert rows[1]["error"] == "permission denied" and result.exit_code == 1


# --------------------------------------------------------------------------------------------------
# 2. decoding is bounded by what it makes, not only by what it reads


@pytest.mark.parametrize("size", [(1, 20_000), (3_000, 2), (65, 1)])
def test_a_strip_shaped_image_is_unreadable_with_a_reason(tmp_path: Path, size: tuple[int, int]) -> None:
    path = _png(tmp_path / "strip.png", size)
    assert path.stat().st_size < 20_000  # a few KB that would resize to millions of pixels
    with pytest.raises(ImageDecodeError, match=r":1 strip, beyond the 64:1 limit"):
        load_image(path)
    assert load_image(_png(tmp_path / "wide.png", (64, 1))).shape == (32, 32, 3)  # 64:1 is still an image


def test_memory_error_in_one_file_never_ends_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = images._decode

    def decode(img: Any, size: int) -> np.ndarray:
        if img.size == (41, 41):
            raise MemoryError
        return real(img, size)

    monkeypatch.setattr(images, "_decode", decode)
    photos = tmp_path / "photos"
    _png(photos / "big.png", (41, 41))
    _png(photos / "fine.png")
    result = runner.invoke(app, ["predict", str(photos), "--checkpoint", str(_checkpoint(tmp_path / "m.pt"))])
    _no_traceback(result)
    assert result.exit_code == 1 and "not enough memory to decode it" in result.output
    assert "fine.png" in result.output
    # training data: the same file is skipped with a warning, the others load
    data = tmp_path / "data"
    _png(data / "cat" / "big.png", (41, 41))
    _png(data / "cat" / "ok.png")
    _png(data / "dog" / "ok.png")
    source = load_source(data)
    assert len(source.train) == 2
    assert any("not enough memory" in w for w in source.warnings)


# --------------------------------------------------------------------------------------------------
# 5. one escaping rule for text from data


def test_printable_shows_every_control_character_as_an_escape() -> None:
    assert text.printable("a\x1b[2Jb\x07c\x7f\x9b\u202e\u200b\ufeff\udcff") == (
        "a\\x1b[2Jb\\x07c\\x7f\\x9b\\u202e\\u200b\\ufeff\\xff"
    )
    assert text.printable("naïve 猫 🐱") == "naïve 猫 🐱"  # printable text stays as it is
    assert text.safe("[bold]x[/] [link=http://e]y") == "\\[bold]x\\[/] \\[link=http://e]y"


@needs_ort
def test_names_from_data_reach_the_terminal_inert(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command that shows class, file, run or folder names, with each of them hostile."""
    classes = tuple(f"c{i}{HOSTILE}" for i in range(9)) + ("[/]",)  # a bare closing tag crashed Rich
    model = _onnx(tmp_path / "m.onnx", classes=classes)
    image = _png(tmp_path / f"{HOSTILE}.png")
    outputs = []
    result = runner.invoke(app, ["predict", str(image), "--model", str(model), "-k", "3"])
    outputs.append(result)
    data = _class_folders(tmp_path / "data", classes[:9], per_class=1)
    outputs.append(runner.invoke(app, ["evaluate", "--model", str(model), "--data-dir", str(data)]))
    outputs.append(runner.invoke(app, ["predict", str(tmp_path / f"missing{HOSTILE}.png"), "--model", str(model)]))
    outputs.append(runner.invoke(app, ["evaluate", "--model", str(tmp_path / f"{HOSTILE}.onnx")]))

    home = tmp_path / f"home{HOSTILE}"
    monkeypatch.setenv("CIFARNET_HOME", str(home))
    run = home / "runs" / f"r{HOSTILE}"
    run.mkdir(parents=True)
    record = {"config": {"epochs": 2, "task": "[bold]t"}, "meta": {"arch": HOSTILE}, "device": f"[/]{HOSTILE}"}
    (run / "config.json").write_text(json.dumps(record))
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_accuracy": 0.5}) + "\n")
    (run / "eval-test.json").write_text(json.dumps({"split": HOSTILE, "accuracy": 0.5, "n": 3}))
    (run / f"{HOSTILE}.txt").write_text("")
    for args in (["runs"], ["runs", "show", run.name], ["runs", "--json"], ["info"], ["runs", "show", HOSTILE]):
        outputs.append(runner.invoke(app, args))
    for result in outputs:
        _no_traceback(result)
        _inert(result.output)
    joined = "".join(r.output for r in outputs)
    assert "[bold]B:smile:" in joined and "\\x1b[2J" in joined  # shown, as written
    assert outputs[0].output.count("\\x9b1m") >= 3  # the file name and the classes, escaped
    assert "[/]" in outputs[1].output
    assert outputs[2].exit_code == 1 and outputs[3].exit_code == 1


def test_class_names_that_break_lines_are_refused_for_labels_txt(tmp_path: Path) -> None:
    classes = ("cat\ndog",) + CIFAR10_CLASSES[1:]  # labels.txt would hold 11 lines for 10 outputs
    ckpt = _checkpoint(tmp_path / "m.pt", classes=classes)
    result = runner.invoke(app, ["export", str(ckpt), "--for", "jetson-inference", "-o", str(tmp_path / "j/m.onnx")])
    _no_traceback(result)
    assert result.exit_code == 1 and "Class name 'cat\\x0adog' cannot be written to labels.txt" in result.output
    assert not (tmp_path / "j" / "labels.txt").exists()


def test_dollar_signs_in_names_do_not_break_the_pictures(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from cifarnet_cli import report

    names = ["$\\frac{$", "dog"]  # an unbalanced math expression failed the whole drawing
    assert report.plot_confusion([[1, 0], [0, 1]], names, tmp_path / "c.png", title=names[0]) is not None
    rows = [{"epoch": 1, "val_accuracy": 0.5, "val_loss": 1.0}]
    assert report.plot_compare({names[0]: rows, "b": rows}, tmp_path / "p.png") is not None


# --------------------------------------------------------------------------------------------------
# 6. an exported model is checked when it is opened


@needs_ort
@pytest.mark.parametrize(
    "options,message",
    [
        ({"classes": CIFAR10_CLASSES[:3]}, "its output is N×10, not N×3"),
        ({"classes": CIFAR10_CLASSES + ("extra", "more")}, "not N×12"),
        ({"classes": []}, "cifarnet_classes must be a non-empty list"),
        ({"classes": '"cat"'}, "cifarnet_classes must be a non-empty list"),
        ({"classes": ["cat", "cat"] + list(CIFAR10_CLASSES[2:])}, "distinct class names"),
        ({"props": {"cifarnet_input_size": "0"}}, "cifarnet_input_size is '0'"),
        ({"props": {"cifarnet_input_size": "40000"}}, "cifarnet_input_size is '40000'"),
        ({"props": {"cifarnet_input_size": "64"}}, "not N×3×64×64"),
        ({"variant": "two-inputs"}, "2 input(s) and 1 output(s)"),
        ({"variant": "two-outputs"}, "1 input(s) and 2 output(s)"),
        ({"variant": "fp16-input"}, "its input is float16, not float32"),
        ({"variant": "nhwc-input"}, "its input is N×32×32×3, not N×3×32×32"),
        ({"variant": "scalar-output"}, "its output is a scalar, not N×10"),
        ({"variant": "argmax-output"}, "its output is int64"),
    ],
)
def test_a_malformed_onnx_model_is_refused_with_what_is_wrong(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    model = _onnx(tmp_path / "bad.onnx", **options)
    image = _png(tmp_path / "a.png")
    data = _class_folders(tmp_path / "data", CIFAR10_CLASSES[:3], per_class=1)
    for args in (
        ["predict", str(image), "--model", str(model)],
        ["evaluate", "--model", str(model), "--data-dir", str(data)],
    ):
        result = runner.invoke(app, args)
        _no_traceback(result)
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output.replace("\n", " "), (args, result.output)
        assert "Accuracy" not in result.output


def test_outputs_of_another_shape_than_the_class_names_are_refused_when_run(tmp_path: Path) -> None:
    """A graph whose class dimension is dynamic passes the check at opening; its outputs are checked."""
    info = runtime.ExportInfo("resnet20", CIFAR10_CLASSES[:3], 32, "none", "logits")
    model = runtime.ExportedModel(
        tmp_path / "m.onnx", info, lambda x: np.zeros((len(x), 10), np.float32), (1, None), ""
    )
    with pytest.raises(runtime.CifarNetError, match=r"returned float32 outputs of shape \(2, 10\) for 2 images"):
        model.logits(np.zeros((2, 32, 32, 3), np.uint8))


@needs_ort
def test_not_a_number_is_an_error_row_and_no_accuracy(tmp_path: Path) -> None:
    image = _png(tmp_path / "a.png")
    data = _class_folders(tmp_path / "data", per_class=1)
    for model in (_onnx(tmp_path / "nan.onnx", variant="nan"), _checkpoint(tmp_path / "nan.pt", nan=True)):
        option = "--model" if model.suffix == ".onnx" else "--checkpoint"
        result = runner.invoke(app, ["predict", str(image), option, str(model), "--json"])
        _no_traceback(result)
        assert result.exit_code == 1, result.output
        (row,) = json.loads(result.stdout)["predictions"]
        assert row["error"] == "the model's output is not a number (NaN or infinite) for this image"
        result = runner.invoke(
            app,
            ["evaluate", *([] if option == "--model" else [str(model)]), "--data-dir", str(data)]
            + (["--model", str(model)] if option == "--model" else []),
        )
        _no_traceback(result)
        assert result.exit_code == 1 and "not numbers (NaN or infinite) for 10 of 10" in result.output, result.output


@pytest.mark.parametrize(
    "meta,message",
    [
        ({"input_size": 0}, "'input_size' is 0"),
        ({"input_size": "abc"}, "'input_size' is 'abc'"),
        ({"input_size": 30000}, "'input_size' is 30000"),
        ({"input_size": True}, "'input_size' is True"),
        ({"val_split": "lots"}, "'val_split' is 'lots'"),
        ({"split_seed": -1}, "'split_seed' is -1"),
        ({"data_location": ["a"]}, "'data_location' is ['a']"),
    ],
)
def test_a_checkpoint_with_odd_meta_is_refused(tmp_path: Path, meta: dict[str, Any], message: str) -> None:
    ckpt = _checkpoint(tmp_path / "odd.pt", **meta)
    image = _png(tmp_path / "a.png")
    for args in (
        ["predict", str(image), "--checkpoint", str(ckpt)],
        ["evaluate", str(ckpt), "--data-dir", str(_class_folders(tmp_path / "data", per_class=1)), "--split", "all"],
    ):
        result = runner.invoke(app, args)
        _no_traceback(result)
        assert result.exit_code == 1 and message in result.output, (args, result.output)


# --------------------------------------------------------------------------------------------------
# 9. a checkpoint that carries code is refused in words, whatever torch's wording


class _Runs:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, ("echo owned",))


def test_a_code_carrying_checkpoint_is_refused_in_words(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    evil = tmp_path / "evil.pt"
    torch.save({"model": get_model("resnet20").state_dict(), "meta": {}, "hook": _Runs()}, evil)
    expected = "contains code or Python objects that cifarnet will not load (it holds posix.system)"
    result = runner.invoke(app, ["predict", str(_png(tmp_path / "a.png")), "--checkpoint", str(evil)])
    assert result.exit_code == 1 and expected in result.output.replace("\n", " "), result.output
    assert "weights_only" not in result.output and "owned" not in result.output

    real = torch.load

    def reworded(*args: Any, **kwargs: Any) -> Any:  # another torch version, other words
        try:
            return real(*args, **kwargs)
        except pickle.UnpicklingError:
            raise pickle.UnpicklingError("Refusing to rebuild that, see the documentation") from None

    monkeypatch.setattr(torch, "load", reworded)
    with pytest.raises(checkpoint.CifarNetError, match=r"it holds posix\.system"):
        checkpoint.load(evil)

    damaged = tmp_path / "damaged.pt"
    with zipfile.ZipFile(evil) as src, zipfile.ZipFile(damaged, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, b"\x80\x02\xff garbage" if name.endswith("data.pkl") else src.read(name))
    with pytest.raises(checkpoint.CifarNetError, match="not a readable checkpoint .its pickled contents are damaged"):
        checkpoint.load(damaged)
