"""The fault suite (issue 13): hostile folders, damaged caches, odd file names, decompression bombs,
operating-system failures and hand-edited checkpoints. Each fault is made inside the test (links,
monkeypatched writes, a file-size limit, crafted files), so the suite needs nothing a user's machine lacks.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cifarnet_cli import checkpoint, fileio, paths
from cifarnet_cli.cli import app
from cifarnet_cli.config import TrainConfig
from cifarnet_cli.data import sources
from cifarnet_cli.data.classes import CIFAR10_CLASSES
from cifarnet_cli.data.images import MAX_IMAGE_PIXELS, ImageDecodeError, load_image
from cifarnet_cli.data.sources import load_source
from cifarnet_cli.errors import CifarNetError
from cifarnet_cli.models import get_model

from .conftest import synthetic_images

runner = CliRunner()


def _no_traceback(result: Any) -> None:
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


def _cache_files() -> list[Path]:
    return sorted(p for p in paths.cache_dir().rglob("*") if p.is_file())


def _two_classes(root: Path, per_class: int = 3) -> Path:
    for c_i, name in enumerate(("cat", "dog")):
        d = root / "train" / name
        d.mkdir(parents=True)
        for k, img in enumerate(synthetic_images(np.full(per_class, c_i + 3), seed=c_i)):
            Image.fromarray(img).save(d / f"{k:04d}.png")
    return root


# --------------------------------------------------------------------------------------------------
# 13.1 symbolic links: each real file once, loops end


def test_a_self_link_does_not_repeat_images(tmp_path: Path) -> None:
    root = _two_classes(tmp_path / "f")
    (root / "train" / "cat" / "self").symlink_to(".")
    src = load_source(root)
    assert len(src.train) == 6
    assert len({os.path.realpath(p) for p in src.train.paths or ()}) == 6
    assert any("linked folder" in w and "self" in w for w in src.warnings)


def test_a_link_loop_between_class_folders_ends_and_keeps_labels(tmp_path: Path) -> None:
    root = _two_classes(tmp_path / "f")
    (root / "train" / "cat" / "todog").symlink_to("../dog")
    (root / "train" / "dog" / "tocat").symlink_to("../cat")
    src = load_source(root)
    assert len(src.train) == 6
    labels = {Path(p).parent.name: int(y) for p, y in zip(src.train.paths or (), src.train.labels, strict=True)}
    assert labels == {"cat": 3, "dog": 5}  # the dog images were not taken as cats through the link
    assert any("2 linked folder(s)" in w for w in src.warnings)


def test_a_file_reached_twice_is_used_once_and_counted(tmp_path: Path) -> None:
    root = _two_classes(tmp_path / "f")
    (root / "train" / "cat" / "again.png").symlink_to(root / "train" / "dog" / "0000.png")
    os.link(root / "train" / "cat" / "0001.png", root / "train" / "cat" / "hard.png")
    src = load_source(root)
    assert len(src.train) == 6
    assert any("Skipped 2 duplicate image file(s)" in w for w in src.warnings)


def test_a_folder_of_links_to_files_elsewhere_works(tmp_path: Path) -> None:
    store = _two_classes(tmp_path / "store")
    linked = tmp_path / "linked" / "train"
    for cls in ("cat", "dog"):
        (linked / cls).mkdir(parents=True)
        for f in sorted((store / "train" / cls).iterdir()):
            (linked / cls / f.name).symlink_to(f)
    src = load_source(tmp_path / "linked")
    assert len(src.train) == 6 and not src.warnings


# --------------------------------------------------------------------------------------------------
# 13.2 a damaged decoded-image cache is named and rebuilt; one entry per folder


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flipped":
        flipped = bytearray(data)
        for i in range(len(data) // 3, len(data) // 3 + 4):
            flipped[i] ^= 0xFF
        path.write_bytes(bytes(flipped))
    else:
        path.write_bytes(b"")


@pytest.mark.parametrize("how", ["truncated", "flipped", "empty"])
def test_a_damaged_cache_is_reported_and_rebuilt(
    image_folder: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    root = image_folder(per_class=2)
    first = load_source(root)
    (entry,) = _cache_files()
    _damage(entry, how)
    second = load_source(root)
    damaged = [w for w in second.warnings if "damaged" in w]
    assert len(damaged) == 1 and str(entry) in damaged[0] and "rebuilding" in damaged[0]
    assert np.array_equal(first.train.images, second.train.images)
    assert second.fingerprint == first.fingerprint

    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("decoded again although the cache was rebuilt")

    monkeypatch.setattr(sources, "load_image", boom)
    third = load_source(root)
    assert not any("damaged" in w for w in third.warnings)
    assert np.array_equal(third.train.images, first.train.images)


def test_the_cache_keeps_one_entry_per_folder(image_folder: Callable[..., Path]) -> None:
    root = image_folder(per_class=2)
    target = root / "train" / "cat" / "0000.png"
    for i in range(3):
        os.utime(target, ns=(10**9 * (i + 1), 10**9 * (i + 1)))  # a change: the folder is decoded again
        load_source(root)
    assert len(_cache_files()) == 1


def test_a_failed_cache_write_leaves_nothing_and_training_data_still_loads(
    image_folder: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = image_folder(per_class=2)

    def full(_fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    src = load_source(root)
    assert len(src.train) == 20
    assert any("not cached" in w and "no space left" in w for w in src.warnings)
    assert _cache_files() == []  # no partial file


# --------------------------------------------------------------------------------------------------
# 13.3 any file name the operating system allows


def test_a_file_name_that_is_not_utf8(tmp_path: Path) -> None:
    root = _two_classes(tmp_path / "f")
    odd = os.path.join(os.fsencode(root / "train" / "cat"), b"caf\xe9-\xff.png")
    try:
        with open(odd, "wb") as fh:
            Image.new("RGB", (32, 32), (200, 0, 0)).save(fh, format="PNG")
    except OSError:
        pytest.skip("this file system does not allow names that are not UTF-8")
    for _attempt in ("decoded", "from the cache"):
        src = load_source(root)
        assert len(src.train) == 7
        assert os.fsdecode(odd) in (src.train.paths or ())
    ckpt = _checkpoint(tmp_path / "m.pt")
    predicted = runner.invoke(app, ["predict", str(root), "--checkpoint", str(ckpt), "--json", "-k", "1"])
    assert predicted.exit_code == 0, predicted.output
    assert len(json.loads(predicted.stdout)["predictions"]) == 7
    evaluated = runner.invoke(app, ["evaluate", str(ckpt), "--data-dir", str(root), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["n"] == 7


# --------------------------------------------------------------------------------------------------
# 13.4 decompression bombs are refused from the header


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A valid PNG header claiming ``width×height`` followed by a few bytes of image data: what a 388 KB
    20000×20000 bomb looks like to a reader of its header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.parametrize("size", [(20000, 20000), (9000, 9000)])
def test_a_decompression_bomb_is_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: tuple[int, int]
) -> None:
    from PIL import ImageFile

    bomb = png_header_only(tmp_path / "bomb.png", *size)

    def no_decoding(*_a: object, **_k: object) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageDecodeError, match=rf"{size[0]}×{size[1]}.*above the {MAX_IMAGE_PIXELS // 10**6} MP"):
        load_image(bomb)


def test_a_bomb_in_a_folder_is_skipped_with_its_name(tmp_path: Path) -> None:
    root = _two_classes(tmp_path / "f")
    png_header_only(root / "train" / "dog" / "bomb.png", 20000, 20000)
    src = load_source(root)
    assert len(src.train) == 6
    assert any("bomb.png" in w and "megapixels" in w for w in src.warnings)
    ckpt = _checkpoint(tmp_path / "m.pt")
    result = runner.invoke(
        app, ["predict", str(root / "train" / "dog" / "bomb.png"), "--checkpoint", str(ckpt), "--json"]
    )
    assert result.exit_code == 1 and "megapixels" in json.loads(result.stdout)["predictions"][0]["error"]


# --------------------------------------------------------------------------------------------------
# 13.5 / 13.6 what training records and refuses


FAST = ["--epochs", "1", "--batch-size", "16", "--warmup-epochs", "0", "--quiet"]


def test_a_relative_data_dir_is_recorded_absolute(
    image_folder: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image_folder("rel", per_class=4)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", "--data-dir", "rel", "--run", "r", "--val-split", "10", *FAST])
    assert result.exit_code == 0, result.output
    recorded = json.loads((paths.runs_dir() / "r" / "config.json").read_text())
    assert recorded["config"]["data_dir"] == str(tmp_path / "rel")
    assert recorded["meta"]["data_location"] == str(tmp_path / "rel")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    evaluated = runner.invoke(app, ["evaluate", "r", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    out = json.loads(evaluated.stdout)
    assert (out["split"], out["n"]) == ("val", 10) and out["data"].startswith(str(tmp_path / "rel"))


def test_one_class_is_refused_for_training(tmp_path: Path) -> None:
    root = tmp_path / "one"
    (root / "cat").mkdir(parents=True)
    for k, img in enumerate(synthetic_images(np.full(12, 3))):
        Image.fromarray(img).save(root / "cat" / f"{k}.png")
    result = runner.invoke(app, ["train", "--data-dir", str(root), *FAST])
    assert result.exit_code == 1 and "one class only (cat)" in result.output
    _no_traceback(result)


def test_too_few_images_for_a_validation_split_says_so(tmp_path: Path) -> None:
    root = _two_classes(tmp_path / "few")  # 6 images: 10% rounds to 0, and there is no test split
    result = runner.invoke(app, ["train", "--data-dir", str(root), *FAST])
    assert result.exit_code == 1
    assert "too few images to hold out a validation split" in result.output.replace("\n", " ")
    _no_traceback(result)


# --------------------------------------------------------------------------------------------------
# 13.11 / 10.14 operating-system failures: one line, exit 1, nothing half-written, the old file intact


@pytest.mark.parametrize(
    "fault,expect",
    [("fsync", "no space left"), ("replace", "the file system is read-only"), ("write", "file too large")],
)
def test_a_failed_checkpoint_write_keeps_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str, expect: str
) -> None:
    target = tmp_path / "last.pt"
    checkpoint.save_atomic({"epoch": 1}, target)
    if fault == "fsync":

        def fsync(_fd: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", fsync)
    elif fault == "replace":

        def replace(_a: object, _b: object) -> None:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        monkeypatch.setattr(os, "replace", replace)
    else:
        real_fdopen = os.fdopen

        class Limited:  # what a file-size limit or a full disk does to write()
            def __init__(self, fh: Any) -> None:
                self.fh, self.written = fh, 0

            def write(self, data: bytes) -> int:
                self.written += len(data)
                if self.written > 1000:
                    raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
                return int(self.fh.write(data))

            def __getattr__(self, name: str) -> Any:
                return getattr(self.fh, name)

        monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: Limited(real_fdopen(fd, *a, **k)))
    with pytest.raises(CifarNetError) as err:
        checkpoint.save_atomic({"epoch": 2, "weights": torch.zeros(10_000)}, target)
    monkeypatch.undo()
    assert str(target) in str(err.value) and expect in str(err.value)
    assert checkpoint.load(target) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_checkpoints_and_caches_follow_the_umask(
    tmp_path: Path, image_folder: Callable[..., Path], umask: int, mode: int
) -> None:
    old = os.umask(umask)
    try:
        checkpoint.save_atomic({"epoch": 1}, tmp_path / "last.pt")
        load_source(image_folder(per_class=1))
    finally:
        os.umask(old)
    assert (tmp_path / "last.pt").stat().st_mode & 0o777 == mode
    (entry,) = _cache_files()
    assert entry.stat().st_mode & 0o777 == mode


def _limit_file_size(limit: int) -> Callable[[], None]:
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs POSIX file-size limits")
def test_training_on_a_full_disk_is_one_line_and_leaves_no_partial_file(image_folder: Callable[..., Path]) -> None:
    data = image_folder(per_class=2)
    # 1 MB: the decoded-image cache (60 KB) and config.json fit, the first checkpoint (2.2 MB) does not.
    proc = subprocess.run(
        [sys.executable, "-m", "cifarnet_cli", "train", "--data-dir", str(data), "--run", "full", "--val-split", "10"]
        + FAST,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_limit_file_size(1_000_000),
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and "last.pt" in lines[0] and "file too large" in lines[0]
    # the first checkpoint could not be written: the new run holds nothing, and its folder is gone with it
    assert not (paths.runs_dir() / "full").exists()


def test_cifarnet_home_that_is_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home-file"
    home.write_text("not a folder")
    monkeypatch.setenv("CIFARNET_HOME", str(home))
    monkeypatch.delenv("CIFARNET_DATA")
    monkeypatch.delenv("CIFARNET_CACHE")
    info = runner.invoke(app, ["info"])
    assert info.exit_code == 1 and f"{home} is a file, not a folder" in info.output
    _no_traceback(info)
    train = runner.invoke(app, ["train", *FAST])
    assert train.exit_code == 1 and f"{home} is a file, not a folder" in train.output
    assert "Cannot reach" not in train.output
    _no_traceback(train)


def test_an_unwritable_home_is_one_line(
    image_folder: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data = image_folder(per_class=2)
    home = tmp_path / "locked"
    monkeypatch.setenv("CIFARNET_HOME", str(home))
    real_mkdir = Path.mkdir

    def mkdir(self: Path, *args: Any, **kwargs: Any) -> None:  # what a read-only CIFARNET_HOME answers
        if self.is_relative_to(home):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    result = runner.invoke(app, ["train", "--data-dir", str(data), "--val-split", "10", *FAST])
    assert result.exit_code == 1 and "permission denied" in result.output and str(home) in result.output
    _no_traceback(result)
    monkeypatch.setattr(os, "access", lambda *_a, **_k: False)
    info = runner.invoke(app, ["info", "--json"])
    assert info.exit_code == 1 and "no permission" in info.output


# --------------------------------------------------------------------------------------------------
# 13.12 numeric options are checked up front


@pytest.mark.parametrize(
    "command,option,value",
    [
        ("train", "--lr", "nan"),
        ("train", "--lr", "inf"),
        ("train", "--lr", "-1"),
        ("train", "--weight-decay", "nan"),
        ("train", "--warmup-epochs", "nan"),
        ("train", "--momentum", "nan"),
        ("train", "--gamma", "inf"),
        ("train", "--label-smoothing", "nan"),
        ("train", "--seed", "-1"),
        ("finetune-resnet50", "--backbone-lr-scale", "nan"),
        ("finetune-resnet50", "--image-size", "100000"),
        ("download", "--timeout", "-1"),
        ("download", "--timeout", "nan"),
        ("evaluate", "--batch-size", "0"),
    ],
)
def test_numeric_options_are_usage_errors(command: str, option: str, value: str) -> None:
    args = [command, "cifar10", option, value] if command == "download" else [command, option, value]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert option in result.output
    _no_traceback(result)


# --------------------------------------------------------------------------------------------------
# 13.13 / 10.4 checkpoints are validated once, before any command uses them


def _checkpoint(path: Path, *, classes: tuple[str, ...] = CIFAR10_CLASSES, epoch: int = 1, **changes: Any) -> Path:
    model = get_model("resnet20", num_classes=len(classes))
    obj: dict[str, Any] = {
        "version": 1,
        "kind": "best",
        "model": model.state_dict(),
        "config": TrainConfig().to_dict(),
        "meta": {"arch": "resnet20", "model_kwargs": {"num_classes": len(classes)}, "classes": list(classes)},
        "epoch": epoch,
        "fit_state": {"epoch": epoch, "best_accuracy": 0.0, "train_images": 0, "train_seconds": 0.0},
    }
    for key, value in changes.items():
        if key.startswith("meta_"):
            obj["meta"][key[5:]] = value
        else:
            obj[key] = value
    torch.save(obj, path)
    return path


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"meta_arch": None}, "names no architecture"),
        ({"meta_arch": "vgg16"}, "unknown architecture 'vgg16'"),
        ({"model": "weights"}, "not a state dict"),
        ({"meta_classes": ["cat", "dog"]}, "names 2 classes for a model with 10 outputs"),
        ({"meta_classes": ["cat", "dog"], "meta_model_kwargs": {}}, "names 2 classes for a model with 10 outputs"),
        ({"meta": "arch=resnet20"}, "'meta' is not a dictionary"),
        ({"hook": Path("/")}, "contains code or Python objects that cifarnet will not load (it holds pathlib"),
    ],
)
def test_a_hostile_checkpoint_is_refused_by_every_command(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    ckpt = _checkpoint(tmp_path / "bad.pt", **changes)
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(image)
    for args in (
        ["predict", str(image), "--checkpoint", str(ckpt)],
        ["evaluate", str(ckpt), "--data-dir", str(tmp_path)],
        ["export", str(ckpt), "--format", "torchscript", "-o", str(tmp_path / "m.ts")],
        ["train", "--init-from", str(ckpt), "--data-dir", str(tmp_path), "--epochs", "1", "--run", "x"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output.replace("\n", " "), (args, result.output)
        _no_traceback(result)
    assert not (tmp_path / "m.ts").exists()


def test_a_damaged_resume_checkpoint_is_refused(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "last.pt", optimizer={}, scheduler={}, fit_state={"epoch": "one"})
    result = runner.invoke(app, ["train", "--resume", str(ckpt)])
    assert result.exit_code == 1 and "'fit_state'" in result.output
    _no_traceback(result)


def test_an_untrained_checkpoint_named_explicitly_is_flagged(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "last.pt", epoch=0)
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(image)
    for args in (
        ["predict", str(image), "--checkpoint", str(ckpt)],
        ["evaluate", str(ckpt), "--data-dir", str(tmp_path)],
        ["export", str(ckpt), "--format", "torchscript", "-o", str(tmp_path / "m.ts")],
    ):
        result = runner.invoke(app, args)
        assert "has no completed epoch" in result.output.replace("\n", " "), (args, result.output)
    trained = runner.invoke(app, ["predict", str(image), "--checkpoint", str(_checkpoint(tmp_path / "ok.pt"))])
    assert trained.exit_code == 0 and "no completed epoch" not in trained.output


def test_an_os_error_names_the_file_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "home").write_text("")
    err = OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(tmp_path / "home" / "runs" / "x"))
    assert (
        fileio.os_error_message(err) == f"Cannot use {tmp_path}/home/runs/x: {tmp_path}/home is a file, not a folder."
    )


def test_an_exported_model_where_a_checkpoint_belongs_says_what_it_is(tmp_path: Path) -> None:
    """A TorchScript file printed torch's UserWarning and its weights_only advice; an ONNX file the advice."""
    script = tmp_path / "model.ts"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(script))
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"not read")
    for path, kind in ((script, "a TorchScript export"), (onnx_file, "an exported model (ONNX or TensorRT)")):
        for args in (["evaluate", str(path)], ["export", str(path)], ["train", "--init-from", str(path)]):
            result = runner.invoke(app, args)
            assert result.exit_code == 1, (args, result.output)
            text = result.output.replace("\n", " ")
            assert f"is {kind}" in text and "not a checkpoint" in text, (args, result.output)
            assert "Warning" not in result.output and "weights_only" not in result.output
