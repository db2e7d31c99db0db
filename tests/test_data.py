from __future__ import annotations

import io
import os
import pickle
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifarnet_cli.data import sources
from cifarnet_cli.data.classes import CIFAR10_CLASSES, canonical_name, classes_for_folders, match_classes
from cifarnet_cli.data.sources import load_source
from cifarnet_cli.data.split import stratified_split
from cifarnet_cli.errors import CifarNetError, UsageError

from .conftest import synthetic_images


def test_official_folder_loads_both_splits(cifar_folder: Path) -> None:
    src = load_source(cifar_folder)
    assert src.kind == "cifar-python"
    assert src.train.images.shape == (100, 32, 32, 3) and src.train.images.dtype == np.uint8
    assert src.split("test").images.shape == (20, 32, 32, 3)
    assert src.classes == CIFAR10_CLASSES
    # pixels come back in HWC order exactly as written
    expected = synthetic_images(src.train.labels[:20], 1)
    assert np.array_equal(src.train.images[:20], expected)


def test_parent_of_official_folder_is_accepted(cifar_folder: Path) -> None:
    assert load_source(cifar_folder.parent).kind == "cifar-python"


def test_tarball_is_read_in_place(cifar_tarball: Path, tmp_path: Path) -> None:
    before = set(cifar_tarball.parent.rglob("*"))
    src = load_source(cifar_tarball)
    assert src.kind == "cifar-tarball" and len(src.train) == 100 and len(src.split("test")) == 20
    assert set(cifar_tarball.parent.rglob("*")) == before  # nothing extracted


def test_malicious_pickle_is_refused(cifar_folder: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[object, ...]:
            return (os.system, (f"touch {marker}",))

    (cifar_folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(CifarNetError, match="not a CIFAR-10 batch file"):
        load_source(cifar_folder)
    assert not marker.exists()


def test_missing_batch_says_how_to_fix(cifar_folder: Path) -> None:
    (cifar_folder / "data_batch_2").unlink()
    with pytest.raises(CifarNetError, match="data_batch_2"):
        load_source(cifar_folder)


def test_missing_data_explains_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(CifarNetError) as err:
        load_source(tmp_path / "nothing")
    assert "cifarnet download cifar10" in str(err.value) and "--data-dir" in str(err.value)


def test_image_folder_maps_cifar_names_to_standard_order(tmp_path: Path) -> None:
    from .conftest import write_image_folder

    # folders in a different order and with aliases still get the standard labels
    root = write_image_folder(
        tmp_path / "f",
        per_class=3,
        classes=("truck", "Aeroplane", "cars", "bird", "cat", "deer", "dog", "frog", "horse", "ship"),
    )
    src = load_source(root)
    assert src.classes == CIFAR10_CLASSES
    labels = {
        Path(p).parent.name: int(y) for p, y in zip(src.train.paths or (), src.train.labels.tolist(), strict=True)
    }
    assert labels == {
        "truck": 9,
        "Aeroplane": 0,
        "cars": 1,
        "bird": 2,
        "cat": 3,
        "deer": 4,
        "dog": 5,
        "frog": 6,
        "horse": 7,
        "ship": 8,
    }


def test_image_folder_any_size_and_mode_becomes_32x32_rgb(tmp_path: Path) -> None:
    root = tmp_path / "f" / "train"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir(parents=True)
    Image.new("L", (100, 60), 128).save(root / "cat" / "a.png")
    Image.new("RGBA", (7, 9), (255, 0, 0, 255)).save(root / "dog" / "b.webp")
    Image.new("RGB", (64, 64), (0, 0, 255)).save(root / "dog" / "c.bmp")
    src = load_source(tmp_path / "f")
    assert src.train.images.shape == (3, 32, 32, 3)


def test_custom_classes_are_sorted_folder_names(image_folder: Callable[..., Path]) -> None:
    root = image_folder(classes=("zebra", "apple"), per_class=2)
    src = load_source(root)
    assert src.classes == ("apple", "zebra")


def test_train_and_test_splits_of_a_folder(image_folder: Callable[..., Path]) -> None:
    src = load_source(image_folder(per_class=2, splits=("train", "test")))
    assert len(src.train) == 20 and len(src.split("test")) == 20 and src.has_test


def test_folder_cache_is_reused_and_invalidated(
    image_folder: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = image_folder(per_class=2)
    first = load_source(root)

    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(sources, "load_image", boom)
    second = load_source(root)
    assert np.array_equal(first.train.images, second.train.images) and first.fingerprint == second.fingerprint
    # a changed file changes the fingerprint: the folder is decoded again
    monkeypatch.undo()
    target = root / "train" / "cat" / "0000.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(target)
    os.utime(target, ns=(1, 1))
    third = load_source(root)
    assert third.fingerprint != first.fingerprint
    assert not np.array_equal(third.train.images, first.train.images)


def test_unreadable_images_are_skipped_with_a_warning(image_folder: Callable[..., Path]) -> None:
    root = image_folder(per_class=2)
    (root / "train" / "cat" / "broken.png").write_text("not an image")
    src = load_source(root)
    assert len(src.train) == 20
    assert any("broken.png" in w for w in src.warnings)


def test_unknown_folders_are_listed_for_a_model(image_folder: Callable[..., Path]) -> None:
    root = image_folder(per_class=2, classes=("aeroplane", "car", "motorbike", "person"))
    src = load_source(root, classes=CIFAR10_CLASSES)
    assert len(src.train) == 4  # aeroplane and car only
    assert any("motorbike" in w and "person" in w for w in src.warnings)


def test_aliases() -> None:
    assert canonical_name("aeroplane") == "airplane"
    assert canonical_name("Planes") == "airplane"
    assert canonical_name("car") == "automobile"
    assert canonical_name("automobiles") == "automobile"
    assert canonical_name("motorbike") == "motorbike"  # not a CIFAR-10 class
    mapping, unknown = match_classes(["aeroplane", "car", "bird", "cat", "dog", "frog", "motorbike"], CIFAR10_CLASSES)
    assert mapping == {"aeroplane": 0, "car": 1, "bird": 2, "cat": 3, "dog": 5, "frog": 6}
    assert unknown == ["motorbike"]
    assert classes_for_folders(["cat", "dog"]) == CIFAR10_CLASSES


def test_stratified_split_is_seeded_disjoint_and_balanced() -> None:
    labels = np.repeat(np.arange(10), 100)
    train, val = stratified_split(labels, 100, seed=3)
    assert len(val) == 100 and len(train) == 900
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert np.bincount(labels[val], minlength=10).tolist() == [10] * 10
    again_train, again_val = stratified_split(labels, 100, seed=3)
    assert np.array_equal(val, again_val) and np.array_equal(train, again_train)
    assert not np.array_equal(val, stratified_split(labels, 100, seed=4)[1])


def test_stratified_split_rounds_to_exact_total() -> None:
    labels = np.array([0] * 7 + [1] * 5 + [2] * 3)
    _train, val = stratified_split(labels, 4, seed=0)
    assert len(val) == 4


def test_split_rejects_sizes_that_leave_nothing() -> None:
    with pytest.raises(UsageError):
        stratified_split(np.zeros(10, dtype=np.int64), 10, seed=0)


def test_tar_with_unexpected_member_is_not_read(tmp_path: Path) -> None:
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../evil")
        data = b"x"
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(CifarNetError, match="data_batch_1"):
        load_source(archive)
    assert not (tmp_path.parent / "evil").exists()


def test_skipped_images_are_named_again_when_the_cache_is_used(image_folder: Callable[..., Path]) -> None:
    root = image_folder(per_class=2)
    (root / "train" / "cat" / "broken.png").write_text("not an image")
    for _run in ("decoded", "cached"):
        src = load_source(root)
        assert len(src.train) == 20
        assert [w for w in src.warnings if "Skipped 1 unreadable image(s) in train/" in w and "broken.png" in w]
        assert [w for w in src.warnings if "not an image file Pillow can read" in w]  # in words, not Pillow's


def test_cifarnet_home_moves_the_cache_too(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from cifarnet_cli import paths
    from cifarnet_cli.info import gather

    monkeypatch.setenv("CIFARNET_HOME", str(tmp_path / "h"))
    monkeypatch.delenv("CIFARNET_CACHE")
    monkeypatch.delenv("CIFARNET_DATA")
    assert paths.cache_dir() == tmp_path / "h" / "cache"
    assert paths.default_data_dir() == tmp_path / "h" / "datasets" / "cifar10"
    directories = gather()["directories"]
    assert directories["home"] == str(tmp_path / "h") and directories["cache"] == str(tmp_path / "h" / "cache")
    monkeypatch.setenv("CIFARNET_CACHE", str(tmp_path / "c"))  # the finer override still wins
    assert paths.cache_dir() == tmp_path / "c"


def test_the_same_data_has_the_same_fingerprint_wherever_it_lies(cifar_folder: Path, tmp_path: Path) -> None:
    import shutil

    from .conftest import write_cifar_tarball

    copy = tmp_path / "copy"
    shutil.copytree(cifar_folder, copy)
    archive = write_cifar_tarball(tmp_path / "archive")  # the same batches (same seed), archived
    fingerprints = {load_source(p).fingerprint for p in (cifar_folder, copy, archive)}
    assert len(fingerprints) == 1
    other = write_cifar_tarball(tmp_path / "other", seed=5)
    assert load_source(other).fingerprint not in fingerprints
