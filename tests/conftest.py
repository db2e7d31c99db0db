"""Shared fixtures: every test gets its own user directories, no network, and tiny data sets."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifarnet_cli import download
from cifarnet_cli.data.classes import CIFAR10_CLASSES
from cifarnet_cli.download import Asset

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10-jpeg"

# Each class gets its own dominant colour (plus noise) so tiny models can learn it in an epoch or two.
_PALETTE = np.array(
    [
        [230, 30, 30],
        [30, 230, 30],
        [30, 30, 230],
        [230, 230, 30],
        [230, 30, 230],
        [30, 230, 230],
        [250, 150, 40],
        [120, 60, 20],
        [250, 250, 250],
        [20, 20, 20],
    ],
    dtype=np.float64,
)


def synthetic_images(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """uint8 N×32×32×3 images whose colour identifies the label."""
    rng = np.random.default_rng(seed)
    base = _PALETTE[labels % len(_PALETTE)][:, None, None, :]
    noise = rng.normal(0, 25, size=(len(labels), 32, 32, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--test-timeout",
        type=float,
        default=0.0,
        help="fail a test whose call runs longer than this many seconds (0: no limit); bench/gpu-check.sh sets it",
    )


class TimeLimitExceeded(BaseException):
    """A test ran past --test-timeout. Not an Exception: the code under test must not catch it as its own error."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """--test-timeout without pytest-timeout (which a GPU machine may lack): an alarm fails the test that runs
    too long, and the session goes on to the next test."""
    limit = float(item.config.getoption("--test-timeout"))
    if limit <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(_signum: int, _frame: object) -> None:
        raise TimeLimitExceeded(f"the test ran longer than --test-timeout {limit:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def wait_until(
    condition: Callable[[], bool], what: str, *, proc: subprocess.Popen[str] | None = None, timeout: float = 900.0
) -> None:
    """Poll ``condition`` until it holds; fail the test, naming ``what``, when ``proc`` (the process being
    watched) has exited first or after ``timeout`` seconds. The limit is generous because the suite also runs
    on busy machines; a healthy run returns as soon as the condition holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            _out, err = proc.communicate()
            pytest.fail(f"the process exited ({proc.returncode}) before {what}: {err[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`@pytest.mark.cuda` tests run where CUDA is, and are skipped (not failed) everywhere else."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (bench/gpu-check.sh runs these on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def isolate(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """Home, cache, data and hub folders under ``home``; offline; no proxy or certificate settings of the user's."""
    monkeypatch.setenv("CIFARNET_HOME", str(home / "cifarnet"))
    monkeypatch.setenv("CIFARNET_CACHE", str(home / "cache"))
    monkeypatch.setenv("CIFARNET_DATA", str(home / "no-data-here"))
    monkeypatch.setenv("TORCH_HOME", str(home / "torch"))
    monkeypatch.setenv("CIFARNET_OFFLINE", "1")  # nothing in the tests may reach the network
    for var in (
        "CIFARNET_MIRROR",
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "https_proxy",
        "HTTPS_PROXY",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every test gets its own home, cache and data folders. A MonkeyPatch of its own: a test's
    ``monkeypatch.undo()`` must not send the rest of that test to the user's real folders."""
    monkeypatch = pytest.MonkeyPatch()
    isolate(monkeypatch, tmp_path_factory.mktemp("home"))
    torch.manual_seed(0)
    # Training on CUDA turns cuDNN's autotuning on for the process: each test starts with the flags as they were.
    cudnn = torch.backends.cudnn
    flags = cudnn.benchmark, cudnn.deterministic
    yield
    cudnn.benchmark, cudnn.deterministic = flags
    monkeypatch.undo()


def _batch(images: np.ndarray, labels: np.ndarray) -> bytes:
    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # CIFAR stores CHW planes per row
    return pickle.dumps(
        {b"batch_label": b"test", b"labels": labels.tolist(), b"data": data, b"filenames": []}, protocol=2
    )


def write_cifar_folder(root: Path, per_batch: int = 20, test: int = 20, seed: int = 0) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(1, 6):
        labels = rng.integers(0, 10, per_batch)
        (folder / f"data_batch_{i}").write_bytes(_batch(synthetic_images(labels, seed + i), labels))
    labels = rng.integers(0, 10, test)
    (folder / "test_batch").write_bytes(_batch(synthetic_images(labels, seed + 99), labels))
    meta = {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_cases_per_batch": per_batch}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def write_cifar_tarball(root: Path, **kwargs: int) -> Path:
    folder = write_cifar_folder(root / "src", **kwargs)
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return archive


def write_image_folder(
    root: Path,
    per_class: int = 10,
    classes: tuple[str, ...] = CIFAR10_CLASSES,
    splits: tuple[str, ...] = ("train",),
    ext: str = "png",
    seed: int = 0,
) -> Path:
    for s_i, split in enumerate(splits):
        for c_i, name in enumerate(classes):
            d = root / split / name if split else root / name
            d.mkdir(parents=True, exist_ok=True)
            imgs = synthetic_images(np.full(per_class, c_i), seed + 100 * s_i + c_i)
            for k, img in enumerate(imgs):
                Image.fromarray(img).save(d / f"{k:04d}.{ext}")
    return root


@pytest.fixture
def cifar_folder(tmp_path: Path) -> Path:
    return write_cifar_folder(tmp_path / "data")


@pytest.fixture
def cifar_tarball(tmp_path: Path) -> Path:
    return write_cifar_tarball(tmp_path / "archive")


@pytest.fixture
def image_folder(tmp_path: Path) -> Callable[..., Path]:
    def make(name: str = "images", **kwargs: object) -> Path:
        return write_image_folder(tmp_path / name, **kwargs)  # type: ignore[arg-type]

    return make


def pin_asset(monkeypatch: pytest.MonkeyPatch, name: str, url: str, blob: bytes, kind: str) -> Asset:
    """Point the pin of asset ``name`` at ``blob`` (the internal hook the download issue allows)."""
    asset = Asset(name, url, len(blob), hashlib.sha256(blob).hexdigest(), kind)
    monkeypatch.setitem(download.ASSETS, name, asset)
    return asset


def train_quick(data: Path, run: str) -> None:
    """One fast epoch of ResNet-20 on ``data`` (validated on its test split) as run ``run``."""
    from typer.testing import CliRunner

    from cifarnet_cli.cli import app

    args = [
        "train",
        "--data-dir",
        str(data),
        "--run",
        run,
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--val-split",
        "0",
        "--warmup-epochs",
        "0",
        "--quiet",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "train").is_dir():
        pytest.skip("../shared/datasets/cifar10-jpeg is not present (a user's clone has no ../shared)")
    return SHARED_DATA


def real_subset(dest: Path, per_class: int, offset: int = 0) -> Path:
    """A folder of symlinks to ``per_class`` real JPEGs of each class (train/<class>/...)."""
    for cls_dir in sorted((SHARED_DATA / "train").iterdir()):
        out = dest / "train" / cls_dir.name
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(cls_dir.iterdir())[offset : offset + per_class]:
            (out / f.name).symlink_to(f)
    return dest


def train_once(
    factory: pytest.TempPathFactory, run: str, train: Callable[[Path, str], None] = train_quick, **data: object
) -> tuple[Path, Path]:
    """For a module-scoped fixture: an image folder (``write_image_folder(**data)``) and run ``run`` trained on
    it once by ``train(data, run)``, in a home of its own; returns the data and the run's folder. Each test
    takes a copy of the run with :func:`copy_run` (training is the slow part of most tests that need a run)."""
    root = factory.mktemp(run)
    folder = write_image_folder(root / "images", **data)  # type: ignore[arg-type]
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, root / "home")  # a module fixture comes before the per-test isolation
        train(folder, run)
    return folder, root / "home" / "cifarnet" / "runs" / run


def copy_run(run_dir: Path) -> Path:
    """A copy of the run folder ``run_dir`` in this test's runs folder, under the same name."""
    from cifarnet_cli import paths

    copy = paths.runs_dir() / run_dir.name
    shutil.copytree(run_dir, copy)
    return copy


@pytest.fixture
def other_process_lock() -> Iterator[Callable[[Path], subprocess.Popen[str]]]:
    """Lock a run folder from another process (a second `train` of the same run); killed (-9) at the end."""
    procs: list[subprocess.Popen[str]] = []

    def hold(run_dir: Path) -> subprocess.Popen[str]:
        code = (
            "import time\nfrom pathlib import Path\nfrom cifarnet_cli.runs import Run\n"
            f"Run({run_dir.name!r}, Path({str(run_dir)!r})).lock().acquire()\n"
            "print('locked', flush=True)\ntime.sleep(120)\n"
        )
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=dict(os.environ))
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        procs.append(proc)
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
