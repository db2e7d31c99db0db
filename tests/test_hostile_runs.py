"""Hostile and odd conditions around run folders and outputs: deletes that are killed or raced, outputs
named like inputs, damaged run records, leftovers of killed writers, closed or ASCII-only standard
streams, and links where a run folder belongs. Each fault is made inside the test (kill -9 of a child,
a monkeypatched listing, files written by hand)."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import stat
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cifarnet_cli import evaluation, fileio, paths, runlist, runs
from cifarnet_cli.cli import app
from cifarnet_cli.config import TrainConfig
from cifarnet_cli.data.classes import CIFAR10_CLASSES
from cifarnet_cli.errors import CifarNetError
from cifarnet_cli.models import get_model

from .conftest import synthetic_images

runner = CliRunner()


def _no_traceback(result: Any) -> None:
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


def _run(name: str, *, rows: int = 1, epochs: int = 2, checkpoint: bool = False, data: Path | None = None) -> runs.Run:
    """A run folder as training leaves it: config.json, metrics.jsonl and best.pt (a real model with
    ``checkpoint``, else placeholder bytes)."""
    run = runs.Run(name, paths.runs_dir() / name)
    run.dir.mkdir(parents=True)
    meta = {"arch": "resnet20", "model_kwargs": {"num_classes": 10}, "classes": list(CIFAR10_CLASSES)}
    if data is not None:
        meta.update(data_location=str(data), data_kind="image-folder")
    config = TrainConfig(epochs=epochs).to_dict()
    run.write_config({"config": config, "meta": meta, "device": "cpu"})
    run.write_metrics([{"epoch": i + 1, "val_accuracy": 0.5, "val_loss": 1.0} for i in range(rows)])
    if checkpoint:
        model = get_model("resnet20", num_classes=10)
        torch.save({"model": model.state_dict(), "meta": meta, "config": config, "epoch": rows}, run.best)
    else:
        run.best.write_bytes(b"placeholder checkpoint")
    return run


def _listed() -> dict[str, dict[str, Any]]:
    result = runner.invoke(app, ["runs", "--json"])
    _no_traceback(result)
    assert result.exit_code == 0, result.output
    return {r["name"]: r for r in json.loads(result.stdout)["runs"]}


def _cli(*args: str, shell_tail: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m cifarnet_cli ARGS` through the shell, so that ``shell_tail`` can close streams (>&-)."""
    command = " ".join([f"'{sys.executable}'", "-m", "cifarnet_cli", *(f"'{a}'" for a in args), shell_tail])
    return subprocess.run(  # a hang fails the test (TimeoutExpired) instead of stopping the suite
        ["bash", "-c", command], capture_output=True, text=True, timeout=120, env=env or dict(os.environ)
    )


# --------------------------------------------------------------------------------------------------
# 3. deleting what should stay


@pytest.mark.parametrize("name", ["", ".", "..", "./", " ", "keep/..", "../keep/."])
def test_rm_refuses_empty_and_dot_names_from_inside_a_run(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _run("keep")
    before = sorted(p.name for p in run.dir.iterdir())
    monkeypatch.chdir(run.dir)  # `cifarnet runs rm "$UNSET"` typed inside the run folder
    result = runner.invoke(app, ["runs", "rm", name, "--yes"])
    _no_traceback(result)
    assert result.exit_code == 2, result.output
    assert sorted(p.name for p in run.dir.iterdir()) == before


def test_a_delete_killed_half_way_leaves_no_half_run() -> None:
    _run("big", rows=3)
    _run("other")
    code = (
        "import os, shutil, sys, time\n"
        "from cifarnet_cli import runlist\n"
        "def slow(path, *a, **k):\n"  # deletes one file, then is killed
        "    os.unlink(os.path.join(path, 'metrics.jsonl'))\n"
        "    print('deleting', flush=True)\n"
        "    time.sleep(60)\n"
        "shutil.rmtree = slow\n"
        "runlist.remove(runlist.removable('big'))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "deleting"
    finally:
        proc.kill()  # kill -9: no cleanup runs
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert list(_listed()) == ["other"]  # "big" is gone whole, not listed as never trained
    assert runner.invoke(app, ["runs", "show", "big"]).exit_code == 1
    result = runner.invoke(app, ["runs", "rm", "other", "--yes"])
    assert result.exit_code == 0, result.output
    assert list(paths.runs_dir().iterdir()) == []  # the leftover of the killed delete went too


def test_evaluate_racing_a_delete_does_not_bring_the_run_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    for i, name in enumerate(CIFAR10_CLASSES):
        (data / name).mkdir(parents=True)
        Image.fromarray(synthetic_images(np.full(1, i))[0]).save(data / name / "0.png")
    run = _run("raced", checkpoint=True, data=data)
    real = evaluation.metrics_from_logits

    def deleted_meanwhile(*args: Any) -> Any:  # `runs rm raced` in another terminal, mid-evaluation
        runlist.remove(runlist.removable("raced"))
        return real(*args)

    monkeypatch.setattr(evaluation, "metrics_from_logits", deleted_meanwhile)
    result = runner.invoke(app, ["evaluate", "raced", "--data-dir", str(data), "--split", "all"])
    _no_traceback(result)
    assert result.exit_code == 0, result.output
    assert "not saved in the run folder" in result.output.replace("\n", " ")
    assert not run.dir.exists() and list(paths.runs_dir().iterdir()) == []


# --------------------------------------------------------------------------------------------------
# 4. outputs never replace inputs


def test_export_never_writes_over_a_checkpoint(tmp_path: Path) -> None:
    run = _run("src", checkpoint=True)
    other = _run("other")
    kept = {p: p.read_bytes() for p in (run.best, other.best)}
    for args in (
        ["export", "src", "-o", str(run.best)],  # ONNX bytes into the checkpoint it reads
        ["export", "src", "--format", "torchscript", "-o", str(run.best)],
        ["export", "src", "--format", "torchscript", "-o", str(other.best)],  # another run's checkpoint
        ["export", "src", "-o", str(tmp_path / "model.pt")],  # an ONNX file named like a checkpoint
        ["export", "src", "--for", "jetson-inference", "-o", str(other.dir / "config.json")],
    ):
        result = runner.invoke(app, args)
        _no_traceback(result)
        assert result.exit_code == 2, (args, result.output)
    assert {p: p.read_bytes() for p in kept} == kept
    assert not (tmp_path / "model.pt").exists()


def test_predict_csv_compare_plot_and_bench_output_never_replace_inputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _run("a", checkpoint=True)
    _run("b")
    image = tmp_path / "cat.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(image)
    (tmp_path / "alias.csv").symlink_to(image)
    kept = {p: p.read_bytes() for p in (image, run.best)}
    from cifarnet_cli import benchmark

    monkeypatch.setattr(benchmark, "run_bench", lambda *a, **k: pytest.fail("measured before checking --output"))
    for args in (
        ["predict", str(image), "--run", "a", "--save-csv", str(image)],
        ["predict", str(image), "--run", "a", "--save-csv", str(tmp_path / "alias.csv")],  # the same file
        ["predict", str(image), "--run", "a", "--save-csv", str(run.best)],
        ["runs", "compare", "a", "b", "--plot", str(run.best)],
        ["bench", "--output", str(run.best)],
    ):
        result = runner.invoke(app, args)
        _no_traceback(result)
        assert result.exit_code == 2, (args, result.output)
    assert {p: p.read_bytes() for p in kept} == kept


def _device(path: Path, minor: int) -> Path:
    """A character device made in the test's folder (major 1: minor 3 is null, 7 is full, as in /dev), so
    that the real /dev/null and /dev/full are never written, renamed over or removed."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, minor))
        os.close(os.open(path, os.O_WRONLY))  # a file system mounted nodev makes the node but refuses to open it
    except OSError as exc:
        pytest.skip(f"cannot make a device node here: {exc}")
    return path


def _read_fifo(fifo: Path) -> tuple[threading.Thread, list[bytes]]:
    """A reader of ``fifo`` in a thread (a daemon: a writer that never opens the FIFO must not keep the
    tests alive); what it read lands in the list."""
    got: list[bytes] = []

    def read() -> None:
        with open(fifo, "rb") as fh:
            got.append(fh.read())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader, got


def _partials(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if fileio.is_partial(p.name)]


def test_an_output_that_is_a_fifo_or_a_device_is_written_into_never_replaced(tmp_path: Path) -> None:
    fifo = tmp_path / "out.csv"
    os.mkfifo(fifo)
    reader, got = _read_fifo(fifo)
    fileio.write_bytes(fifo, b"a,b\n")
    reader.join(timeout=20)
    assert got == [b"a,b\n"] and stat.S_ISFIFO(os.lstat(fifo).st_mode)

    _run("a", checkpoint=True)
    image = tmp_path / "cat.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(image)
    reader, got = _read_fifo(fifo)
    result = runner.invoke(app, ["predict", str(image), "--run", "a", "--save-csv", str(fifo)])
    reader.join(timeout=20)
    _no_traceback(result)
    assert result.exit_code == 0, result.output
    assert got and got[0].startswith(b"path") and b"cat.png" in got[0], got
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)

    null = _device(tmp_path / "null", 3)
    fileio.write_bytes(null, b"x" * 200_000)
    assert stat.S_ISCHR(os.lstat(null).st_mode) and os.lstat(null).st_rdev == os.makedev(1, 3)
    assert _partials(tmp_path) == []


def test_an_output_that_is_standard_output_goes_to_it_and_the_link_stays(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """/dev/stdout redirected to a file (``> out.txt``) is a link to a regular file: a rename would replace
    the link (in /dev, as root) and the bytes would never reach the output. The link here stands for it."""
    link = tmp_path / "stdout"
    link.symlink_to(f"/proc/{os.getpid()}/fd/1")  # fd 1 is pytest's capture file: a regular file
    print("table", flush=True)
    fileio.write_bytes(link, b"a,b\n")
    assert capfd.readouterr().out == "table\na,b\n"
    assert link.is_symlink() and _partials(tmp_path) == []


def test_a_fifo_that_nobody_reads_is_one_line_not_a_hang(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fileio, "FIFO_READER_WAIT_S", 0.2, raising=False)
    fifo = tmp_path / "out.csv"
    os.mkfifo(fifo)
    with pytest.raises(CifarNetError, match="nobody reads it"):
        fileio.write_bytes(fifo, b"a,b\n")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and _partials(tmp_path) == []


def test_a_socket_or_block_device_as_output_is_refused(tmp_path: Path) -> None:
    import socket

    sock = tmp_path / "s.csv"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock))
    outputs = [sock]
    with contextlib.suppress(OSError):  # a block device node of a loop device that does not exist: never opened
        os.mknod(tmp_path / "disk", stat.S_IFBLK | 0o600, os.makedev(7, 250))
        outputs.append(tmp_path / "disk")
    try:
        for target in outputs:
            with pytest.raises(CifarNetError, match="give the path of a file"):
                fileio.write_bytes(target, b"a,b\n")
            assert not stat.S_ISREG(os.lstat(target).st_mode)
    finally:
        server.close()


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    full = _device(tmp_path / "full", 7)  # every write: ENOSPC
    with pytest.raises(CifarNetError, match="no space left on the device"):
        fileio.write_bytes(full, b"x" * 200_000)
    assert stat.S_ISCHR(os.lstat(full).st_mode)
    target = tmp_path / "report.json"
    with pytest.raises(CifarNetError, match="no space left on the device"), fileio.atomic_writer(target) as fh:
        fh.write(b"{")  # then a library that writes by other means than the file it was given meets a full disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert not target.exists() and _partials(tmp_path) == []

    _run("a", checkpoint=True)
    image = tmp_path / "cat.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(image)
    result = runner.invoke(app, ["predict", str(image), "--run", "a", "--save-csv", str(full)])
    _no_traceback(result)
    assert result.exit_code == 1 and "no space left on the device" in result.output, result.output
    assert stat.S_ISCHR(os.lstat(full).st_mode) and _partials(tmp_path) == []


def test_an_output_whose_name_is_near_the_limit_is_written(tmp_path: Path) -> None:
    target = tmp_path / ("é" * 100 + "x" * 50 + ".csv")  # 254 bytes: its temporary file's name would be 272
    assert len(os.fsencode(target.name)) == 254
    leftover = fileio.partial_path(target)  # a killed writer's (no lock held): removed by the next write
    leftover.write_bytes(b"half")
    fileio.write_bytes(target, b"a,b\n")
    assert target.read_bytes() == b"a,b\n" and _partials(tmp_path) == []


@pytest.mark.parametrize("record", [".lock", "curves.png", "eval-val.json", "confusion-test-cat-dog.png"])
def test_a_runs_lock_curves_and_reports_are_never_outputs(tmp_path: Path, record: str) -> None:
    run = _run("a", checkpoint=True)
    _run("b")
    kept = run.dir / record
    kept.write_bytes(b"the run's own record")
    image = tmp_path / "cat.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(image)
    for args in (
        ["predict", str(image), "--run", "a", "--save-csv", str(kept)],
        ["runs", "compare", "a", "b", "--plot", str(kept)],
    ):
        result = runner.invoke(app, args)
        _no_traceback(result)
        assert result.exit_code == 2 and f"is the {record} of run 'a'" in result.output, (args, result.output)
    assert kept.read_bytes() == b"the run's own record"


# --------------------------------------------------------------------------------------------------
# 7. one damaged run never hides the others


def _unreadable(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``folder``'s contents unreadable: chmod for a user; for root (which reads anything), the
    file operations refuse paths inside it as the kernel would."""
    if os.geteuid() != 0:
        folder.chmod(0o000)
        return
    inside = str(folder) + os.sep

    def guard(real: Any, *, itself: bool) -> Any:
        def call(path: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(path, str | os.PathLike) and (os.fspath(path) + os.sep).startswith(inside):
                if not (itself and os.fspath(path) == str(folder)):
                    raise PermissionError(13, "Permission denied", os.fspath(path))
            return real(path, *args, **kwargs)

        return call

    monkeypatch.setattr(os, "stat", guard(os.stat, itself=True))  # the folder itself can be looked at
    monkeypatch.setattr(os, "scandir", guard(os.scandir, itself=False))
    monkeypatch.setattr(io, "open", guard(io.open, itself=False))
    monkeypatch.setattr(os, "open", guard(os.open, itself=False))


def test_one_damaged_run_never_hides_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    _run("healthy", rows=2)
    many = _run("many")
    many.config_file.write_text(json.dumps({"config": {"epochs": "many"}, "meta": {}}))
    high = _run("high")
    with high.metrics_file.open("a") as fh:
        fh.write(json.dumps({"epoch": 2, "val_accuracy": "high"}) + "\n")
    huge = _run("huge")
    with huge.metrics_file.open("a") as fh:
        fh.write('{"epoch": 2, "note": "' + "x" * 200_000 + '"}\n')
    _run("notobj").config_file.write_text("[1, 2]")
    _run("typed").config_file.write_text(json.dumps({"config": {}, "meta": {"arch": ["resnet20"]}, "device": 3}))
    locked = _run("locked")
    _unreadable(locked.dir, monkeypatch)
    try:
        listed = _listed()
        table = runner.invoke(app, ["runs"])
        shown = runner.invoke(app, ["runs", "show", "many"])
        compared = runner.invoke(app, ["runs", "compare", "healthy", "many", "high"])
    finally:
        locked.dir.chmod(0o755)
    assert listed["healthy"]["state"] == "finished"
    reasons = {name: r["status"] for name, r in listed.items() if r["state"] == "damaged"}
    assert set(reasons) == {"many", "high", "huge", "notobj", "typed", "locked"}, listed
    assert "config.epochs is 'many'" in reasons["many"]
    assert "line 2: val_accuracy is 'high', not a number" in reasons["high"]
    assert "line 2 is longer than 64 KB" in reasons["huge"]
    assert "does not hold a JSON object" in reasons["notobj"]
    assert "permission denied" in reasons["locked"]
    for result in (table, shown, compared):
        _no_traceback(result)
        assert result.exit_code == 0, result.output
    assert "healthy" in table.output and "damaged: config.json" in shown.output.replace("\n", " ")


def test_a_fifo_in_a_run_folder_never_hangs_the_listing() -> None:
    _run("healthy")
    for name, record in (("cfg", "config.json"), ("rows", "metrics.jsonl"), ("lock", ".lock")):
        run = _run(name)
        (run.dir / record).unlink(missing_ok=True)
        os.mkfifo(run.dir / record)  # opening it for reading waits for a writer that never comes
    proc = _cli("runs", "--json")
    assert proc.returncode == 0, proc.stderr
    states = {r["name"]: r["status"] for r in json.loads(proc.stdout)["runs"]}
    assert states["healthy"] == "stopped after epoch 1" and states["lock"] == "stopped after epoch 1"
    assert states["cfg"] == "damaged: config.json cannot be read (not a regular file)"
    assert states["rows"] == "damaged: metrics.jsonl cannot be read (not a regular file)"


def test_a_huge_metrics_line_is_not_read_into_memory() -> None:
    run = _run("huge")
    with run.metrics_file.open("a") as fh:
        fh.write('{"epoch": 2, "note": "' + "x" * 8_000_000 + '"}\n')
        fh.write(json.dumps({"epoch": 3, "val_accuracy": 0.7}) + "\n")
    tracemalloc.start()
    try:
        rows = run.read_metrics()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r["epoch"] for r in rows] == [1, 3]
    assert peak < 1_000_000, peak  # the 8 MB line is skipped in 64 KB pieces


#: config.json edits, metrics.jsonl lines and eval-*.json reports that no run of cifarnet writes, and the
#: reason each damaged run's status gives.
_RECORD_EDITS: dict[str, tuple[dict[str, Any], str]] = {
    "epochs-word": ({"config": {"epochs": "many"}}, "config.epochs is 'many', not a whole number"),
    "lr-word": ({"config": {"lr": "fast"}}, "config.lr is 'fast', not a finite number"),
    "batch-list": ({"config": {"batch_size": [1]}}, "config.batch_size is [1], not a whole number"),
    "arch-number": ({"config": {"arch": 5}}, "config.arch is 5, not text"),
    "epochs-bool": ({"config": {"epochs": True}}, "config.epochs is True, not a whole number"),
    "lr-bool": ({"config": {"lr": True}}, "config.lr is True, not a finite number"),
    "epochs-huge": ({"config": {"epochs": 10**12}}, "recorded --epochs must be at least 1 and at most 100000"),
    "meta-text": ({"meta": "x"}, "config and meta must be JSON objects"),
    "config-number": ({"config": 3}, "config and meta must be JSON objects"),
    "world-bool": ({"world_size": True}, "world_size is True"),
    "base-batch-0": ({"config": {"base_batch": 0}}, "config.base_batch is 0, not a whole number of at least 1"),
}
_ROW_EDITS: dict[str, tuple[str, str]] = {
    "acc-5": ('{"epoch": 1, "val_accuracy": 5.0}', "val_accuracy is 5.0, not from 0 to 1"),
    "acc-neg": ('{"epoch": 1, "val_accuracy": -1}', "val_accuracy is -1, not from 0 to 1"),
    "acc-nan": ('{"epoch": 1, "val_accuracy": NaN}', "val_accuracy is nan, not a number"),
    "loss-inf": ('{"epoch": 1, "val_accuracy": 0.5, "train_loss": Infinity}', "train_loss is inf, not a number"),
    "acc-true": ('{"epoch": 1, "val_accuracy": true}', "val_accuracy is True, not a number"),
    "epoch-huge": ('{"epoch": 1000000000000, "val_accuracy": 0.5}', "epoch is 1000000000000, not a whole number"),
}
_EVAL_EDITS: dict[str, tuple[str, str]] = {
    "eval-5": ('{"accuracy": 5.0, "n": 10, "split": "test"}', "eval-test.json: accuracy is 5.0, not a number from 0"),
    "eval-nan": ('{"accuracy": NaN, "n": 10, "split": "test"}', "eval-test.json: accuracy is nan"),
    "eval-n": ('{"accuracy": 0.5, "n": true, "split": "test"}', "eval-test.json: n is True, not a count of images"),
    "eval-junk": ("{not json", "eval-test.json is not valid JSON"),
}


def test_wrong_types_and_impossible_figures_show_the_run_as_damaged() -> None:
    _run("healthy", rows=2)
    for name, (edit, _why) in _RECORD_EDITS.items():
        run = _run(name)
        record = json.loads(run.config_file.read_text())
        for key, value in edit.items():
            record[key] = {**record[key], **value} if isinstance(value, dict) else value
        run.config_file.write_text(json.dumps(record))
    for name, (line, _why) in _ROW_EDITS.items():
        _run(name, rows=0).metrics_file.write_text(line + "\n")
    for name, (report, _why) in _EVAL_EDITS.items():
        (_run(name).dir / "eval-test.json").write_text(report)
    cut = _run("epochs-missing")  # a key every version records, gone: the listing said "1/0 epochs, stopped"
    record = json.loads(cut.config_file.read_text())
    del record["config"]["epochs"]
    cut.config_file.write_text(json.dumps({**record}))
    _run("config-junk").config_file.write_text(json.dumps({**record, "config": {"x": {"y": [1]}}}))
    listed = _listed()
    assert listed["healthy"]["state"] == "finished"
    assert "config.epochs is missing" in listed["epochs-missing"]["status"], listed["epochs-missing"]
    assert "config.epochs is missing" in listed["config-junk"]["status"], listed["config-junk"]
    for name, (_edit, why) in {**_RECORD_EDITS, **_ROW_EDITS}.items():
        assert listed[name]["state"] == "damaged" and why in listed[name]["status"], listed[name]
        assert listed[name]["best_accuracy"] is None and listed[name]["epochs_planned"] == 0  # no figure shown
    for name in (*_RECORD_EDITS, *_ROW_EDITS, *_EVAL_EDITS):
        shown = runner.invoke(app, ["runs", "show", name], env={"COLUMNS": "100"})
        _no_traceback(shown)
        assert shown.exit_code == 0, shown.output
        assert "damaged: " in shown.output.replace("\n", " "), (name, shown.output)
        cells = " ".join(line for line in shown.output.splitlines() if line.startswith("│"))
        for figure in ("500.00%", "-100.00%", "nan", "inf"):
            assert figure not in cells and f" {figure}%" not in shown.output, (name, shown.output)
    for name, (_report, why) in _EVAL_EDITS.items():
        summary = json.loads(runner.invoke(app, ["runs", "show", name, "--json"]).stdout)["summary"]
        assert summary["state"] == "damaged" and why in summary["status"], summary
    table = runner.invoke(app, ["runs"], env={"COLUMNS": "200"})
    _no_traceback(table)
    assert table.exit_code == 0 and "healthy" in table.output
    # a figure left out (null) is no damage, and is shown as missing
    _run("lr-null", rows=0).metrics_file.write_text('{"epoch": 1, "val_accuracy": 0.5, "lr_first": 0.1, "lr": null}\n')
    shown = runner.invoke(app, ["runs", "show", "lr-null"], env={"COLUMNS": "100"})
    _no_traceback(shown)
    assert shown.exit_code == 0 and "damaged" not in shown.output, shown.output


def test_init_from_a_run_with_a_damaged_record_takes_nothing_from_it() -> None:
    from cifarnet_cli import training

    run = _run("meta-text")
    run.config_file.write_text(json.dumps({"config": {}, "meta": "x"}))
    assert training.init_defaults("meta-text") == {}  # the checkpoint's own check decides


def test_an_unreadable_run_folder_is_that_run_damaged(monkeypatch: pytest.MonkeyPatch) -> None:
    _run("healthy", rows=2)
    locked = _run("locked")
    _unreadable(locked.dir, monkeypatch)
    try:
        shown = runner.invoke(app, ["runs", "show", "locked", "--json"])
        path = runner.invoke(app, ["runs", "--path", "locked"])
        compared = runner.invoke(app, ["runs", "compare", "healthy", "locked"], env={"COLUMNS": "150"})
    finally:
        locked.dir.chmod(0o755)
    for result in (shown, path, compared):
        _no_traceback(result)
        assert result.exit_code == 0, result.output
    summary = json.loads(shown.stdout)["summary"]
    assert summary["name"] == "locked" and summary["state"] == "damaged"
    assert "permission denied" in summary["status"]
    assert path.stdout.strip() == str(locked.dir)
    assert "permission denied" in compared.output.replace("\n", " ")


def test_oversized_values_are_cut_in_the_listing() -> None:
    run = _run("r" * 200)
    record = json.loads(run.config_file.read_text())
    record["meta"]["arch"] = "a" * 10_000
    run.config_file.write_text(json.dumps(record))
    _run("healthy")
    table = runner.invoke(app, ["runs"], env={"COLUMNS": "400"})
    _no_traceback(table)
    assert table.exit_code == 0
    assert "a" * 79 + "…" in table.output and "a" * 80 not in table.output
    assert "r" * 79 + "…" in table.output and "r" * 80 not in table.output
    assert max(len(line) for line in table.output.splitlines()) < 400
    assert _listed()["r" * 200]["arch"] == "a" * 10_000  # --json keeps the values whole


# --------------------------------------------------------------------------------------------------
# 8. leftovers and odd streams


def test_a_killed_writers_temporary_file_is_removed_and_never_listed() -> None:
    run = _run("r")
    target = run.dir / "model.onnx"  # export's default output, in the run folder
    code = (
        "import sys, time\nfrom pathlib import Path\nfrom cifarnet_cli import fileio\n"
        f"with fileio.atomic_writer(Path({str(target)!r})) as fh:\n"
        "    fh.write(b'half an export')\n    fh.flush()\n    print('writing', flush=True)\n    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
        (partial,) = [p for p in run.dir.iterdir() if p.name.endswith(".partial")]
        assert run.clean_partials() == [] and partial.exists()  # its writer is alive: kept
    finally:
        proc.kill()  # kill -9 mid-write
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    files = json.loads(runner.invoke(app, ["runs", "show", "r", "--json"]).stdout)["files"]
    assert [f["name"] for f in files if "partial" in f["name"]] == []
    assert run.clean_partials() == [partial] and not partial.exists()
    # and the next write of the same file removes its own leftovers, wherever it is
    elsewhere = paths.home_dir() / "downloads"
    elsewhere.mkdir()
    leftover = fileio.partial_path(elsewhere / "cifar-10-python.tar.gz")
    leftover.write_bytes(b"killed download")
    fileio.write_bytes(elsewhere / "cifar-10-python.tar.gz", b"verified")
    assert sorted(p.name for p in elsewhere.iterdir()) == ["cifar-10-python.tar.gz"]


def test_a_closed_stdout_is_one_line_and_never_a_silent_success() -> None:
    _run("r")
    for args in (["runs", "--json"], ["runs"], ["runs", "show", "r"]):
        proc = _cli(*args, shell_tail=">&-")
        assert proc.returncode == 1, (args, proc.stderr)
        assert proc.stderr.strip() == (
            "Error: Cannot print the output: standard output is closed (the command ran with >&-); redirect it to "
            "a file, or to /dev/null to discard it."
        ), proc.stderr
    proc = _cli("runs", "rm", "r", "--yes", shell_tail=">&-")  # prints nothing on stdout: works
    assert proc.returncode == 0 and "Deleted r" in proc.stderr, proc.stderr
    assert not (paths.runs_dir() / "r").exists()


def test_runs_path_of_a_folder_not_named_in_utf8_is_written_as_its_bytes(tmp_path: Path) -> None:
    folder = os.fsencode(paths.runs_dir()) + b"/r\xff\xfe-old"  # written on a system with another encoding
    os.makedirs(folder)
    with open(folder + b"/config.json", "w") as fh:
        fh.write("{}")
    out = tmp_path / "path.txt"
    proc = _cli("runs", "--path", "last", shell_tail=f"> '{out}'")
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == folder + b"\n"  # what `cd "$(cifarnet runs --path last)"` needs
    assert os.path.isdir(out.read_bytes().rstrip(b"\n"))


def test_a_closed_stdin_answers_no() -> None:
    run = _run("r")
    proc = _cli("runs", "rm", "r", shell_tail="<&-")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "No answer, so nothing was deleted" in proc.stderr
    assert run.best.exists()


def test_an_ascii_only_output_shows_other_characters_as_escapes(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONIOENCODING="ascii", CIFARNET_HOME=str(tmp_path / "héllo"))
    run = runs.Run("r", tmp_path / "héllo" / "runs" / "r")
    run.dir.mkdir(parents=True)
    run.write_config({"config": TrainConfig(epochs=1).to_dict(), "meta": {"arch": "resnet20"}, "device": "cpu"})
    for args in (["runs"], ["runs", "show", "r"]):
        proc = _cli(*args, env=env)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert "h\\xe9llo" in proc.stdout, proc.stdout


@pytest.mark.parametrize(
    "option,value,message",
    [
        ("--batch", "10000000000000", "--batch 10000000000000: give a batch size from 1 to 1024"),
        ("--batch-range", "1:8:1000000000", "MAX <= 65536"),
    ],
)
def test_an_absurd_export_batch_is_a_usage_error(option: str, value: str, message: str) -> None:
    _run("r", checkpoint=True)
    result = runner.invoke(
        app, ["export", "r", "--format", "torchscript" if option == "--batch" else "onnx", option, value]
    )
    _no_traceback(result)
    assert result.exit_code == 2 and message in result.output.replace("\n", " "), result.output


def test_a_run_folder_that_is_a_link_is_never_written_through(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    paths.runs_dir().mkdir(parents=True)
    (paths.runs_dir() / "linked").symlink_to(outside)
    with pytest.raises(CifarNetError, match="is a symbolic link"):
        runs.create_run("linked")
    (outside / "config.json").write_text(json.dumps({"config": {}, "meta": {}}))
    with pytest.raises(CifarNetError, match="is a symbolic link"):  # a resume locks the run first
        runs.resolve_run("linked").lock().acquire()
    assert sorted(p.name for p in outside.iterdir()) == ["config.json"]
    result = runner.invoke(app, ["runs", "rm", "linked", "--yes"])  # the link goes, not what it points to
    assert result.exit_code == 0, result.output
    assert not (paths.runs_dir() / "linked").exists() and (outside / "config.json").exists()


def test_a_resume_whose_best_checkpoint_is_a_folder_fails_before_training() -> None:
    run = _run("r")
    run.best.unlink()
    run.best.mkdir()
    run.last.write_bytes(b"never read: the folder is refused first")
    result = runner.invoke(app, ["train", "--resume", "r"])
    _no_traceback(result)
    assert result.exit_code == 1, result.output
    assert "best.pt: it is a folder" in result.output.replace("\n", " "), result.output
