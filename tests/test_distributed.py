"""Several processes (torch.distributed, DDP, torchrun) on the CPU with gloo: the same recipe and the same
results as one process, one writer, stops that agree, a dead rank that ends the others, two torchrun agents
meeting at a c10d rendezvous; and the arithmetic that shares an epoch between processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from cifarnet_cli import checkpoint, devices, distributed, engine, launch, paths, training
from cifarnet_cli.cli import app
from cifarnet_cli.engine import window_sizes
from cifarnet_cli.errors import CifarNetError, UsageError
from tests.conftest import wait_until, write_image_folder

runner = CliRunner()

# 40 training images in micro-batches of 8: windows of 16, 16 and 8 images, so the last window has one
# micro-batch and, on two processes, rank 1 makes an empty pass in it.
RECIPE = [
    "--batch-size",
    "8",
    "--accum",
    "2",
    "--epochs",
    "3",
    "--val-split",
    "0",
    "--warmup-epochs",
    "0",
    "--lr",
    "0.05",
]
LINUX = sys.platform.startswith("linux")
needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and LINUX), reason="needs torch.distributed (gloo) and Linux's /proc"
)


# --------------------------------------------------------------------------------------------------
# Sharing an epoch: every micro-batch once, each window's weights those of one process


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_every_micro_batch_runs_once_with_the_one_process_weights(world: int) -> None:
    for n in (1, 2, 5, 7, 16, 33):
        for accum in (world, 2 * world, 3 * world):
            sizes = [8] * (n - 1) + [3]
            plans = [distributed.plan_epoch(sizes, accum, world, rank) for rank in range(world)]
            runs = sorted(i for plan in plans for w in plan for i in w.indices)
            assert runs == list(range(n)), (n, accum, world)  # each micro-batch once, none left out
            one_process = window_sizes(sizes, accum)
            for w, images in enumerate(one_process):
                windows = [plan[w] for plan in plans]
                assert {x.images for x in windows} == {images}
                assert sum(s / images for x in windows for s in x.sizes) == pytest.approx(1.0)
                assert len({x.passes for x in windows}) == 1  # every process takes part in every all-reduce
                assert all(len(x.indices) <= x.passes for x in windows)
                for x in windows:  # a process's micro-batches lie in its window, in order
                    assert list(x.indices) == sorted(x.indices)
                    assert all(w * accum <= i < (w + 1) * accum for i in x.indices)


def test_evaluation_shares_are_contiguous_and_cover_every_image() -> None:
    for n in (0, 1, 5, 40, 10_001):
        for world in (1, 2, 3, 8):
            bounds = [distributed.shard_bounds(n, world, r) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
            assert max(e - s for s, e in bounds) - min(e - s for s, e in bounds) <= 1


def test_the_recipe_is_shared_or_refused_naming_a_split_that_works() -> None:
    assert distributed.split_for_world(8, 2, 2, given=True) == (8, 2)  # 8 × 1 on each of two
    assert distributed.split_for_world(512, 1, 2, given=False) == (256, 2)  # the default re-cut
    assert distributed.split_for_world(512, 1, 8, given=False) == (64, 8)
    with pytest.raises(UsageError, match="--batch-size 6 --accum 4"):
        distributed.split_for_world(8, 3, 2, given=True)
    with pytest.raises(UsageError, match="divides the effective batch"):
        distributed.split_for_world(512, 1, 3, given=False)  # 3 does not divide 512
    assert distributed.fit_batch_for_world(512, 200, 2) == (128, 4)
    assert distributed.fit_batch_for_world(6, 6, 4) is None


def test_refusals_come_before_any_process_starts(tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data", per_class=2)
    base = ["train", "--data-dir", str(data), "--device", "cpu", "--nproc", "2"]
    split = runner.invoke(app, [*base, "--batch-size", "8", "--accum", "3"])
    assert split.exit_code == 2 and "--batch-size 6 --accum 4" in split.output
    sync = runner.invoke(app, [*base, "--sync-bn"])
    assert sync.exit_code == 1 and "--sync-bn needs GPUs" in sync.output
    assert len(sync.output.strip().splitlines()) == 1
    mps = runner.invoke(app, ["train", "--device", "mps", "--nproc", "2"])
    assert mps.exit_code == 2 and "one process" in mps.output
    assert not paths.runs_dir().exists() or not any(paths.runs_dir().iterdir())


def test_torch_without_distributed_refuses_several_devices_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NVIDIA's Jetson wheels: torch.distributed.is_available() is False. One device still trains."""
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    data = write_image_folder(tmp_path / "data", per_class=2)
    result = runner.invoke(app, ["train", "--data-dir", str(data), "--device", "cpu", "--nproc", "2", "--epochs", "1"])
    assert result.exit_code == 2
    assert "Jetson" in result.output and len(result.output.strip().splitlines()) == 1
    with pytest.raises(UsageError, match="is_available"):
        launch.plan("cuda:0,1", None)
    assert launch.plan("cpu", None) is None and launch.plan("cpu", 1) is None  # one process: as before


def test_device_lists_and_nproc(monkeypatch: pytest.MonkeyPatch) -> None:
    assert launch.plan("cpu", 2) == launch.LaunchPlan(2, "cpu", None, " --nproc 2")
    assert launch.plan("auto", None) is None
    with pytest.raises(UsageError, match="--nproc must be"):
        launch.plan("cpu", 0)
    with pytest.raises(UsageError, match="twice"):
        launch.plan("cuda:1,1", None)
    if not torch.cuda.is_available():
        with pytest.raises(CifarNetError, match="CUDA is not available"):
            launch.plan("cuda:0,1", None)
    with pytest.raises(UsageError, match="several GPUs"):
        devices.resolve_device("cuda:0,1")  # evaluate, predict, export run on one device
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UsageError, match="--nproc-per-node"):
        launch.plan("cpu", 2)  # under a user's torchrun nothing is relaunched
    assert launch.plan("cuda:0,1", None) is None


@pytest.mark.parametrize("spec", ["garbage", "gpu", "cuda0", "cpu:0", "cuda;1"])
def test_a_device_of_no_known_form_is_refused_before_any_process_starts(spec: str) -> None:
    with pytest.raises(UsageError, match=f"Unknown --device '{spec}'.*Choose one of: auto, cpu, cuda, cuda:N"):
        launch.plan(spec, 2)
    result = runner.invoke(app, ["train", "--device", spec, "--nproc", "2", "--epochs", "1"])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Choose one of" in result.output


_GARBAGE_WORLDS = [
    ({"WORLD_SIZE": "0", "RANK": "0"}, "WORLD_SIZE='0'", ""),
    ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two'", ""),
    ({"WORLD_SIZE": "2", "RANK": "3"}, "RANK='3'", "Rank 3: "),
    ({"WORLD_SIZE": "2", "RANK": "-1"}, "RANK='-1'", "Rank -1: "),
    ({"WORLD_SIZE": "2", "RANK": "x"}, "RANK='x'", ""),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "x"}, "LOCAL_RANK='x'", "Rank 1: "),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_WORLD_SIZE": "0"}, "LOCAL_WORLD_SIZE='0'", ""),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "localhost", "MASTER_PORT": "abc"}, "MASTER_PORT='abc'", ""),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "", "MASTER_PORT": "29500"}, "MASTER_ADDR=''", ""),
]


@pytest.mark.parametrize(("env", "named", "prefix"), _GARBAGE_WORLDS)
def test_a_garbage_torchrun_environment_is_one_usage_line_on_every_rank(
    env: dict[str, str], named: str, prefix: str, tmp_path: Path
) -> None:
    data = write_image_folder(tmp_path / "data", per_class=2)
    clean = {k: v for k, v in _env(tmp_path).items() if k not in launch.TORCHRUN_ENV}
    done = subprocess.run(
        _cifarnet("train", "--data-dir", str(data), "--device", "cpu", "--epochs", "1"),
        env={**clean, "CIFARNET_DIST_TIMEOUT": "5", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"Error: {prefix}"), done.stderr
    assert named in done.stderr and "torchrun" in done.stderr, done.stderr
    assert not paths.runs_dir().exists() or not any(paths.runs_dir().iterdir())


def test_gpus_under_a_users_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda _device: None)
    second = distributed.World(rank=3, size=4, local_rank=1, local_size=2)
    assert distributed.worker_device("cuda", second, narrowed=False) == torch.device("cuda", 1)
    assert distributed.worker_device("auto", second, narrowed=False) == torch.device("cuda", 1)
    assert distributed.worker_device("cuda:2,3", second, narrowed=False) == torch.device("cuda", 3)
    assert distributed.worker_device("cuda:2,3", second, narrowed=True) == torch.device("cuda", 1)
    assert distributed.worker_device("cpu", second, narrowed=False) == torch.device("cpu")
    with pytest.raises(UsageError, match="names one GPU"):
        distributed.worker_device("cuda:2", second, narrowed=False)
    with pytest.raises(UsageError, match="lists 3"):
        distributed.worker_device("cuda:0,1,2", second, narrowed=False)


def test_a_resume_starts_the_processes_its_run_recorded(tmp_path: Path) -> None:
    run = paths.runs_dir() / "two-gpus"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"config": {"device": "cuda:0,1"}}))
    assert training.recorded_device("two-gpus") == "cuda:0,1"
    assert training.recorded_device("no-such-run") is None


def test_a_lost_peer_is_named_in_words() -> None:
    gone = RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:2480: Connection reset by peer. This")
    assert distributed.is_collective_failure(gone)
    assert distributed._lost_reason(gone) == "another process closed its connection (it ended or was killed)"
    assert not distributed.is_collective_failure(RuntimeError("shape mismatch"))


def test_a_worker_of_several_ends_without_finalizing_the_interpreter() -> None:
    """gloo's threads, left by DDP, can hold tensors when the interpreter finalizes, and freeing them then
    aborted finished runs (SIGABRT, "terminate called without an active exception": 2 of 18 two-process
    runs). A worker of several ends as the interpreter would (threads joined, atexit run, streams flushed)
    with its exit code, but skips finalization; a plain process ends as usual."""
    code = """if True:
        import atexit, sys, threading, time
        from cifarnet_cli import launch

        class Finalized:
            def __del__(self):
                print("finalized", flush=True)

        kept = Finalized()  # freed only by the interpreter's finalization
        atexit.register(lambda: print("atexit", flush=True))
        threading.Thread(target=lambda: (time.sleep(0.2), print("thread", flush=True))).start()
        print("output", end="")  # still buffered: flushed on the way out
        launch.end_worker(3)
        sys.exit(3)
    """
    for env, said in (
        ({"RANK": "1", "WORLD_SIZE": "2"}, "outputthread\natexit\n"),
        ({}, "outputthread\natexit\nfinalized\n"),
    ):
        plain = {k: v for k, v in os.environ.items() if k not in launch.TORCHRUN_ENV}
        done = subprocess.run(
            [sys.executable, "-c", code], env={**plain, **env}, capture_output=True, text=True, timeout=60
        )
        assert (done.returncode, done.stdout) == (3, said), done.stderr


@needs_gloo
def test_a_process_waiting_for_peers_that_never_come_stops_on_sigterm(tmp_path: Path) -> None:
    """torchrun's variables set by hand with no second process: torch waits in C++ for the peer (up to the
    collective timeout, 30 minutes), where Python's signal handlers never run, and SIGTERM and Ctrl-C were
    ignored all that time. While it waits, they end it at once."""
    data = write_image_folder(tmp_path / "data", per_class=2, splits=("",))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lone = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    proc = subprocess.Popen(
        _cifarnet("train", "--data-dir", str(data), "--epochs", "1", "--device", "cpu"),
        env=_env(tmp_path, **lone),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def waiting() -> bool:  # rank 0 serves the store its peers join through
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0

        wait_until(waiting, "the lone process waiting for its peer", proc=proc)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    assert proc.returncode == -signal.SIGTERM


def test_a_second_signal_stops_at_once() -> None:
    stops = distributed.StopRequests()
    stops._on_signal(signal.SIGTERM, None)
    assert stops.requested() == 143
    with pytest.raises(KeyboardInterrupt):
        stops._on_signal(signal.SIGINT, None)


def test_the_launcher_reports_each_way_the_processes_end(tmp_path: Path) -> None:
    plan = launch.LaunchPlan(2, "cpu", None, " --nproc 2")

    def folder(name: str, files: dict[str, Any]) -> Path:
        path = tmp_path / name
        path.mkdir()
        for file, content in files.items():
            (path / file).write_text(content if isinstance(content, str) else json.dumps(content))
        return path

    run = {"run": "r", "command": "cifarnet train"}
    agreed = folder("agreed", {"status-0.json": {"exit": 130, "agreed": True}, "pid-0": "1", "pid-1": "2"})
    assert launch._outcome(agreed, 0, plan) == (130, None)  # rank 0 said it; torchrun saw two clean exits
    killed = folder(
        "killed", {"pid-0": "1", "pid-1": "2", "status-0.json": {"exit": 1, "agreed": True}, "run.json": run}
    )
    code, message = launch._outcome(killed, 1, plan)
    assert code == 1 and message is not None
    assert message.startswith("Rank 1 of 2 ended without a word") and "cifarnet train --resume r --nproc 2" in message
    own = folder("own", {"pid-0": "1", "pid-1": "2", "status-1.json": {"exit": 1, "agreed": False}})
    assert launch._outcome(own, 1, plan) == (1, None)  # rank 1 printed its own error
    code, message = launch._outcome(folder("none", {}), 1, plan)
    assert message is not None and "torchrun could not start" in message


@pytest.mark.skipif(not LINUX, reason="file locks and kill -9 as on Linux")
def test_the_folders_of_killed_launchers_are_removed_by_the_next_launch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kill -9 of the launcher skips its cleanup: the next launch removes such folders, not a live one's."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    holder = (
        "import fcntl, os, sys, tempfile, time\n"
        f"folder = tempfile.mkdtemp(prefix='cifarnet-launch-', dir={str(tmp_path)!r})\n"
        "fd = os.open(os.path.join(folder, 'launcher.lock'), os.O_WRONLY | os.O_CREAT, 0o600)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nprint(folder, flush=True)\ntime.sleep(120)\n"
    )
    killed = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    alive = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert killed.stdout is not None and alive.stdout is not None
        stale, live = Path(killed.stdout.readline().strip()), Path(alive.stdout.readline().strip())
        killed.kill()  # kill -9: its folder stays behind
        killed.wait()
        assert stale.is_dir()
        unlocked_new = Path(tempfile.mkdtemp(prefix="cifarnet-launch-"))  # being created by another launcher
        unlocked_old = Path(tempfile.mkdtemp(prefix="cifarnet-launch-"))  # an older version's leftover
        os.utime(unlocked_old, (time.time() - 7200, time.time() - 7200))
        other = tmp_path / "cifarnet-launch-notes.txt"
        other.write_text("not a launcher's folder")
        code, _message = launch.run(launch.LaunchPlan(1, "cpu", None, ""), ["--no-python", "true"])
        assert code == 0
        left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("cifarnet-launch-"))
        assert left == sorted([live.name, unlocked_new.name, other.name])  # and its own folder is gone
        assert not stale.exists() and not unlocked_old.exists()
    finally:
        for proc in (killed, alive):
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def test_only_rank_0_speaks_for_what_every_rank_shares(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    shared = distributed.mark_agreed(CifarNetError("the data is missing"))
    assert not launch.speaks(shared)
    monkeypatch.setattr(distributed, "_initialised", True)
    own = CifarNetError("out of memory")
    assert launch.speaks(own) and launch.ranked(str(own)) == "Rank 1: out of memory"
    monkeypatch.setenv("RANK", "0")
    assert launch.speaks(shared) and launch.ranked("x") == "x"


# --------------------------------------------------------------------------------------------------
# Several processes, for real (gloo on the CPU)


@dataclass(frozen=True)
class Reference:
    data: Path
    rows: list[dict[str, Any]]
    state: dict[str, torch.Tensor]


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@contextmanager
def _one_thread() -> Iterator[None]:
    """Torch's threads down to one while a test trains in its own process: on a small shared machine two
    threads against two more processes are several times slower, not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """One process trains the recipe (the figures every multi-process run must reproduce)."""
    root = tmp_path_factory.mktemp("distributed")
    data = write_image_folder(root / "data", per_class=4, splits=("train", "test"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CIFARNET_HOME", str(root / "home"))
        mp.setenv("CIFARNET_CACHE", str(root / "cache"))
        mp.setenv("CIFARNET_OFFLINE", "1")
        with _one_thread():
            result = runner.invoke(app, ["train", "--data-dir", str(data), "--run", "ref", "--device", "cpu", *RECIPE])
        assert result.exit_code == 0, result.output
        run_dir = root / "home" / "runs" / "ref"
        return Reference(data, _rows(run_dir), checkpoint.load(run_dir / "last.pt")["model"])


def assert_trains_as_the_reference(run_dir: Path, ref: Reference) -> None:
    """The same metrics rows (the learning rates, train and validation figures) and the same final weights
    and BatchNorm statistics, to float tolerance."""
    rows = _rows(run_dir)
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in ref.rows]
    for got, want in zip(rows, ref.rows, strict=True):
        for key in ("lr_first", "lr", "train_accuracy", "val_accuracy"):
            assert got[key] == pytest.approx(want[key], abs=1e-9), (key, got, want)
        for key in ("train_loss", "val_loss"):
            assert got[key] == pytest.approx(want[key], abs=2e-5), (key, got, want)
    state = checkpoint.load(run_dir / "last.pt")["model"]
    assert state.keys() == ref.state.keys()
    for key, want in ref.state.items():
        torch.testing.assert_close(state[key].double(), want.double(), atol=2e-5, rtol=1e-4, msg=key)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    (tmp_path / "tmp").mkdir(exist_ok=True)
    # TMPDIR: the launcher's folder (pids, statuses) lands where the test can read it.
    return {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "OMP_NUM_THREADS": "1", **extra}


def _cifarnet(*args: str) -> list[str]:
    return [sys.executable, "-m", "cifarnet_cli", *args]


def _wait_for_epoch(run_dir: Path, proc: subprocess.Popen[str]) -> None:
    metrics = run_dir / "metrics.jsonl"
    try:
        wait_until(lambda: metrics.is_file() and bool(metrics.read_text().strip()), "the first epoch", proc=proc)
    finally:
        if not (metrics.is_file() and metrics.read_text().strip()) and proc.poll() is None:
            proc.kill()  # the test failed: leave no processes


def _worker_pids(tmp_path: Path) -> dict[int, int]:
    return {
        int(path.name.split("-")[1]): int(path.read_text())
        for path in (tmp_path / "tmp").glob("cifarnet-launch-*/pid-*")
    }


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@needs_gloo
def test_two_torchrun_agents_at_a_c10d_rendezvous_train_as_one_process(reference: Reference, tmp_path: Path) -> None:
    """A two-node run on one machine: two torchrun agents, one process each, meeting at a c10d rendezvous.
    It trains exactly as one process does; rank 0 alone writes the run; a one-process evaluation of the run
    gives its last validation figures, to the image."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node)]
            + ["--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"]
            + ["--rdzv-id", "cifarnet-test", "--max-restarts", "0"]
            + ["-m", "cifarnet_cli", "train", "--data-dir", str(reference.data), "--name", "two", "--device", "cpu"]
            + [*RECIPE, "--quiet"],
            env=_env(tmp_path, CIFARNET_DIST_TIMEOUT="60"),
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    outputs = [agent.communicate(timeout=240)[1] for agent in agents]
    assert [a.returncode for a in agents] == [0, 0], outputs
    run_dir = paths.runs_dir() / "two"
    assert [p.name for p in paths.runs_dir().iterdir()] == ["two"]
    written = {p.name for p in run_dir.iterdir()} - {"curves.png", ".lock"}  # the picture needs matplotlib
    assert written == {"best.pt", "config.json", "last.pt", "metrics.csv", "metrics.jsonl"}
    assert not list(run_dir.glob("*.partial"))
    record = json.loads((run_dir / "config.json").read_text())
    assert record["world_size"] == 2 and "× 2 processes" in record["device"]
    assert checkpoint.load(run_dir / "last.pt")["world_size"] == 2
    shown = runner.invoke(app, ["runs", "show", "two", "--json"])
    assert json.loads(shown.stdout)["summary"]["world_size"] == 2
    assert_trains_as_the_reference(run_dir, reference)
    with _one_thread():
        evaluated = runner.invoke(app, ["evaluate", "two", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    figures = json.loads(evaluated.stdout)
    assert figures["n"] == 40
    assert figures["accuracy"] == pytest.approx(_rows(run_dir)[-1]["val_accuracy"], abs=1e-9)


@needs_gloo
def test_ctrl_c_to_the_launcher_stops_every_process_and_the_run_resumes_on_one(
    reference: Reference, tmp_path: Path
) -> None:
    # --save-minutes: the processes also agree on saves inside an epoch, at every optimizer step here.
    proc = subprocess.Popen(
        _cifarnet("train", "--data-dir", str(reference.data), "--run", "cc", "--device", "cpu", "--nproc", "2")
        + [*RECIPE, "--save-minutes", "0.000001"],
        env=_env(tmp_path),
        stderr=subprocess.PIPE,
        text=True,
    )
    run_dir = paths.runs_dir() / "cc"
    _wait_for_epoch(run_dir, proc)
    started = [*_worker_pids(tmp_path).values(), *_children(proc.pid)]
    assert len(started) >= 3  # two processes, and torchrun
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Interrupted; epoch" in err and "Continue with: cifarnet train --resume cc --nproc 2" in err
    assert "Traceback" not in err and "ChildFailedError" not in err
    assert not [pid for pid in started if _alive(pid)]  # no process left behind
    saved = checkpoint.load(run_dir / "last.pt")
    checkpoint.validate_resumable(saved, run_dir / "last.pt")
    assert saved["epoch"] in (1, 2) and not list(run_dir.glob("*.partial"))
    with _one_thread():  # the run trained by two processes continues in one, from the step it was saved at
        resumed = runner.invoke(app, ["train", "--resume", "cc", "--save-minutes", "0", "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((run_dir / "config.json").read_text())["world_size"] == 1
    assert_trains_as_the_reference(run_dir, reference)


@needs_gloo
def test_a_one_process_run_resumes_on_two(
    reference: Reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_position = engine._FitLoop.save_position

    def stop_in_the_second_epoch(loop: Any, position: engine.EpochPosition) -> None:
        save_position(loop, position)
        if position.epoch == 2:
            raise KeyboardInterrupt  # as Ctrl-C right after a save in the middle of the second epoch

    monkeypatch.setattr(engine._FitLoop, "save_position", stop_in_the_second_epoch)
    every_step = ["--save-minutes", "0.000001"]
    with _one_thread():
        first = runner.invoke(
            app, ["train", "--data-dir", str(reference.data), "--run", "one", "--device", "cpu", *RECIPE, *every_step]
        )
    assert first.exit_code == 130, first.output
    assert checkpoint.load(paths.runs_dir() / "one" / "last.pt")["position"]["steps"] == 1
    monkeypatch.undo()
    done = subprocess.run(
        _cifarnet("train", "--resume", "one", "--nproc", "2", "--quiet"),
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == ""  # --quiet: rank 1 says nothing either
    assert_trains_as_the_reference(paths.runs_dir() / "one", reference)


@needs_gloo
def test_a_killed_rank_ends_the_others_with_a_message(reference: Reference, tmp_path: Path) -> None:
    timeout_s = 20
    proc = subprocess.Popen(
        _cifarnet("train", "--data-dir", str(reference.data), "--run", "kill", "--device", "cpu", "--nproc", "2")
        + [*RECIPE[:4], "--epochs", "200", *RECIPE[6:]],
        env=_env(tmp_path, CIFARNET_DIST_TIMEOUT=str(timeout_s)),
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_epoch(paths.runs_dir() / "kill", proc)
    pids = _worker_pids(tmp_path)
    started = [*pids.values(), *_children(proc.pid)]
    killed_at = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    _out, err = proc.communicate(timeout=timeout_s + 90)
    assert time.monotonic() - killed_at < timeout_s + 60
    assert proc.returncode == 1
    last = err.strip().splitlines()[-1]
    assert "Rank 1 of 2 ended without a word" in last and "cifarnet train --resume kill --nproc 2" in last, err
    assert "Lost contact with the other processes" in err  # rank 0's own line
    assert not [pid for pid in started if _alive(pid)]


@needs_gloo
def test_a_run_from_another_holds_out_the_same_new_images_on_two_processes(
    reference: Reference, tmp_path: Path
) -> None:
    """--init-from on two processes: rank 0 sends the identities of the images the starting weights trained
    on, so every process holds out the same images (those new to the weights) and trains on the same others:
    the run trains as it does on one process."""
    import shutil

    grown = tmp_path / "grown"
    shutil.copytree(reference.data, grown)
    extra = write_image_folder(tmp_path / "extra", per_class=1, seed=77)
    for image in extra.glob("train/*/*"):
        shutil.copy(image, grown / "train" / image.parent.name / f"new-{image.name}")
    parent = reference.data.parent / "home" / "runs" / "ref" / "best.pt"  # trained on all 40 images of data/train
    child = ["train", "--data-dir", str(grown), "--init-from", str(parent), "--device", "cpu", *RECIPE[:4]]
    child += ["--epochs", "1", "--val-split", "10", "--warmup-epochs", "0", "--lr", "0.05", "--seed", "3"]
    with _one_thread():
        one = runner.invoke(app, [*child, "--run", "one-child", "--quiet"])
    assert one.exit_code == 0, one.output
    two = subprocess.run(
        _cifarnet(*child, "--run", "two-child", "--nproc", "2", "--quiet"),
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert two.returncode == 0, two.stderr
    one_dir = paths.runs_dir() / "one-child"
    expected = Reference(grown, _rows(one_dir), checkpoint.load(one_dir / "last.pt")["model"])
    assert_trains_as_the_reference(paths.runs_dir() / "two-child", expected)
