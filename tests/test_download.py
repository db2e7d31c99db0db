from __future__ import annotations

import hashlib
import io
import tarfile
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cifarnet_cli import download
from cifarnet_cli.cli import app
from cifarnet_cli.download import Asset, DownloadError, DownloadOptions, fetch, safe_extract_cifar
from cifarnet_cli.errors import CifarNetError, UsageError

from .conftest import pin_asset, write_cifar_tarball
from .tls_server import LocalCA, connect_proxy, serve

runner = CliRunner()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    return LocalCA(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def payload(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return write_cifar_tarball(tmp_path_factory.mktemp("payload")).read_bytes()


@pytest.fixture
def pinned(monkeypatch: pytest.MonkeyPatch, payload: bytes) -> Asset:
    """Point the cifar10 pin at the small test archive (the internal hook the issue allows)."""
    return pin_asset(monkeypatch, "cifar10", "https://127.0.0.1:9/unused/cifar-10-python.tar.gz", payload, "dataset")


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def _fetch(dest: Path, *mirrors: str, messages: list[str] | None = None, **opts: object) -> Path:
    """``messages`` collects what the user reads, in order: the notices, then the error's message."""
    notes = messages if messages is not None else []
    try:
        return fetch("cifar10", dest, DownloadOptions(mirrors=mirrors, **opts), notify=notes.append)  # type: ignore[arg-type]
    except DownloadError as exc:
        notes.append(str(exc))
        raise


def test_the_last_failure_is_said_once_in_the_error(pinned: Asset, tmp_path: Path) -> None:
    notes: list[str] = []
    with pytest.raises(DownloadError):
        _fetch(tmp_path, "http://127.0.0.1:9/x/", messages=notes, insecure_transport=True)
    reason = notes[-1].split(": ", 1)[1].split(". To finish by hand")[0]  # the error: "Could not download X: why."
    assert reason and not any(reason in n for n in notes[:-1])  # not also a line of its own before the error


def test_untrusted_issuer_then_success_with_ca_bundle(
    ca: LocalCA, pinned: Asset, payload: bytes, tmp_path: Path
) -> None:
    dest = tmp_path / "dest"
    with serve({pinned.filename: payload}, ca.leaf("good")) as base:
        notes: list[str] = []
        with pytest.raises(DownloadError) as err:
            _fetch(dest, f"{base}/good/", messages=notes)
        assert "does not trust" in str(err.value) and "--ca-bundle" in str(err.value)
        assert any("Retrying with the certifi" in n for n in notes)  # the second trust store, for an untrusted issuer
        assert _leftovers(dest) == []
        path = _fetch(dest, f"{base}/good/", ca_bundle=ca.pem)
    assert path.read_bytes() == payload and _leftovers(dest) == [pinned.filename]


def test_ssl_cert_file_environment_is_honoured(
    ca: LocalCA, pinned: Asset, payload: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.pem))
    with serve({pinned.filename: payload}, ca.leaf("env")) as base:
        assert _fetch(tmp_path, f"{base}/good/").read_bytes() == payload


@pytest.mark.parametrize(
    "leaf,expect,kind",
    [
        (dict(days_from=-30, days_to=-1), "has expired", "expired"),
        (dict(days_from=2, days_to=30), "not valid yet", "not_yet_valid"),
        (dict(ip=False, dns="other.invalid"), "another host name", "hostname"),
    ],
)
def test_certificate_defects_each_get_their_message(
    ca: LocalCA, pinned: Asset, payload: bytes, tmp_path: Path, leaf: dict[str, object], expect: str, kind: str
) -> None:
    notes: list[str] = []
    with serve({pinned.filename: payload}, ca.leaf(kind, **leaf)) as base:  # type: ignore[arg-type]
        with pytest.raises(DownloadError):
            _fetch(tmp_path, f"{base}/good/", messages=notes, ca_bundle=ca.pem)
    assert expect in notes[0]
    if kind == "not_yet_valid":
        assert time.strftime("%Y-%m-%d") in notes[0]  # shows the date the machine believes
    retried = any("Retrying with the certifi" in n for n in notes)
    assert retried == (
        kind == "expired"
    )  # certifi only for an expired chain (or untrusted issuer), never on a host mismatch
    assert _leftovers(tmp_path) == []


def test_tls_version_failure(ca: LocalCA, pinned: Asset, payload: bytes, tmp_path: Path) -> None:
    notes: list[str] = []
    with serve({pinned.filename: payload}, ca.leaf("old"), old_tls_only=True) as base:
        with pytest.raises(DownloadError):
            _fetch(tmp_path, f"{base}/good/", messages=notes, ca_bundle=ca.pem)
    assert "share no TLS version" in notes[0]


def test_plain_http_on_an_https_url(pinned: Asset, payload: bytes, tmp_path: Path) -> None:
    notes: list[str] = []
    with serve({pinned.filename: payload}, None) as base:
        with pytest.raises(DownloadError):
            _fetch(tmp_path, f"{base}/good/", messages=notes)
    assert "plain HTTP" in notes[0] and "captive portal" in notes[0]


@pytest.mark.parametrize("mode,expect", [("wrong", "SHA-256"), ("trunc", "truncated")])
def test_wrong_or_truncated_bytes_leave_nothing(
    ca: LocalCA, pinned: Asset, payload: bytes, tmp_path: Path, mode: str, expect: str
) -> None:
    notes: list[str] = []
    with serve({pinned.filename: payload}, ca.leaf(mode)) as base:
        with pytest.raises(DownloadError):
            _fetch(tmp_path, f"{base}/{mode}/", messages=notes, ca_bundle=ca.pem)
    assert expect in notes[0]
    assert _leftovers(tmp_path) == []


def test_stalled_server_times_out(ca: LocalCA, pinned: Asset, payload: bytes, tmp_path: Path) -> None:
    notes: list[str] = []
    start = time.monotonic()
    with serve({pinned.filename: payload}, ca.leaf("stall")) as base:
        with pytest.raises(DownloadError):
            _fetch(tmp_path, f"{base}/stall/", messages=notes, ca_bundle=ca.pem, timeout_s=0.5)
    assert "timeout" in notes[0] and time.monotonic() - start < 3.5
    assert _leftovers(tmp_path) == []


def test_mirror_after_primary_fails(
    ca: LocalCA, monkeypatch: pytest.MonkeyPatch, payload: bytes, tmp_path: Path
) -> None:
    monkeypatch.delenv("CIFARNET_OFFLINE")
    with (
        serve({"cifar-10-python.tar.gz": payload}, ca.leaf("bad", ip=False, dns="x.invalid")) as bad,
        serve({"cifar-10-python.tar.gz": payload}, ca.leaf("ok")) as good,
    ):
        asset = Asset(
            "cifar10",
            f"{bad}/good/cifar-10-python.tar.gz",
            len(payload),
            hashlib.sha256(payload).hexdigest(),
            "dataset",
        )
        monkeypatch.setitem(download.ASSETS, "cifar10", asset)
        notes: list[str] = []
        monkeypatch.setenv("CIFARNET_MIRROR", f"{good}/good/cifar-10-python.tar.gz")  # a full URL, from the env
        path = _fetch(tmp_path, messages=notes, ca_bundle=ca.pem)
    assert path.read_bytes() == payload and "another host name" in notes[0]


def test_from_file_with_no_network(pinned: Asset, payload: bytes, tmp_path: Path) -> None:
    good = tmp_path / "downloaded-elsewhere.tar.gz"
    good.write_bytes(payload)
    wrong = tmp_path / "wrong.tar.gz"
    wrong.write_bytes(b"nope")
    with pytest.raises(CifarNetError, match="is not cifar10"):
        fetch("cifar10", tmp_path / "d", DownloadOptions(from_file=wrong))
    assert _leftovers(tmp_path / "d") == []
    assert fetch("cifar10", tmp_path / "d", DownloadOptions(from_file=good)).read_bytes() == payload


def test_corrupt_cached_file_is_set_aside_and_replaced(
    ca: LocalCA, pinned: Asset, payload: bytes, tmp_path: Path
) -> None:
    (tmp_path / pinned.filename).write_bytes(b"corrupt")
    notes: list[str] = []
    with serve({pinned.filename: payload}, ca.leaf("c")) as base:
        path = _fetch(tmp_path, f"{base}/good/", messages=notes, ca_bundle=ca.pem)
    assert path.read_bytes() == payload
    assert (tmp_path / f"{pinned.filename}.corrupt").read_bytes() == b"corrupt"
    assert "does not match" in notes[0]


def test_verified_local_copy_needs_no_network(pinned: Asset, payload: bytes, tmp_path: Path) -> None:
    (tmp_path / pinned.filename).write_bytes(payload)
    assert _fetch(tmp_path) == tmp_path / pinned.filename  # offline, no mirror: the local file is enough


def test_insecure_transport_rules(
    ca: LocalCA, pinned: Asset, payload: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with serve({pinned.filename: payload}, ca.leaf("i")) as base:
        notes: list[str] = []
        with pytest.raises(DownloadError):
            _fetch(tmp_path, f"{base}/wrong/", messages=notes, insecure_transport=True)
        assert notes[0].startswith("WARNING") and any("SHA-256" in n for n in notes)
        assert _leftovers(tmp_path) == []
        assert _fetch(tmp_path, f"{base}/good/", insecure_transport=True).read_bytes() == payload
        unpinned = Asset("cifar10", pinned.url, None, None, "dataset")
        monkeypatch.setitem(download.ASSETS, "cifar10", unpinned)
        with pytest.raises(UsageError, match="only for pinned assets"):
            _fetch(tmp_path / "u", f"{base}/good/", insecure_transport=True)


def test_cli_self_signed_mirror_then_hash_failure_with_the_real_pins(ca: LocalCA, tmp_path: Path) -> None:
    fake = b"this is not the CIFAR-10 archive"
    data = tmp_path / "data"
    with serve({"cifar-10-python.tar.gz": fake}, ca.leaf("cli")) as base:
        first = runner.invoke(app, ["download", "cifar10", "--mirror", f"{base}/good/", "--data-dir", str(data)])
        assert first.exit_code == 1 and "certificate" in first.output and "Traceback" not in first.output
        assert _leftovers(data) == []
        second = runner.invoke(
            app,
            ["download", "cifar10", "--mirror", f"{base}/good/", "--data-dir", str(data), "--ca-bundle", str(ca.pem)],
        )
    assert second.exit_code == 1
    text = second.output.replace("\n", " ")
    assert "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce" in text
    assert hashlib.sha256(fake).hexdigest() in text
    assert "--from-file" in text and "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in text
    assert _leftovers(data) == []


def test_cli_from_file_wrong_file_is_refused(tmp_path: Path) -> None:
    wrong = tmp_path / "x.tar.gz"
    wrong.write_bytes(b"x")
    result = runner.invoke(
        app, ["download", "resnet50-v1", "--from-file", str(wrong), "--data-dir", str(tmp_path / "w")]
    )
    assert result.exit_code == 1 and "is not resnet50-v1" in result.output
    assert _leftovers(tmp_path / "w") == []


def test_cli_download_and_extract(ca: LocalCA, pinned: Asset, payload: bytes, tmp_path: Path) -> None:
    data = tmp_path / "data"
    with serve({pinned.filename: payload}, ca.leaf("x")) as base:
        result = runner.invoke(
            app,
            ["download", "cifar10", "--mirror", f"{base}/good/", "--ca-bundle", str(ca.pem), "--data-dir", str(data)],
        )
    assert result.exit_code == 0, result.output
    assert (data / "cifar-10-batches-py" / "data_batch_1").is_file()


def test_unknown_asset() -> None:
    result = runner.invoke(app, ["download", "imagenet"])
    assert result.exit_code == 2 and "cifar10, resnet50-v1, resnet50-v2" in result.output


def _tar(tmp_path: Path, name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> Path:
    archive = tmp_path / f"evil-{abs(hash(name))}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        ok = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        ok.size = 1
        tar.addfile(ok, io.BytesIO(b"x"))
        evil = tarfile.TarInfo(name)
        evil.type = kind
        evil.linkname = linkname
        if kind == tarfile.REGTYPE:
            evil.size = 1
            tar.addfile(evil, io.BytesIO(b"x"))
        else:
            tar.addfile(evil)
    return archive


@pytest.mark.parametrize(
    "name,kind,linkname",
    [
        ("../escape", tarfile.REGTYPE, ""),
        ("/etc/evil", tarfile.REGTYPE, ""),
        ("cifar-10-batches-py/test_batch", tarfile.SYMTYPE, "/etc/passwd"),
        ("cifar-10-batches-py/test_batch", tarfile.LNKTYPE, "cifar-10-batches-py/data_batch_1"),
        ("cifar-10-batches-py/surprise.sh", tarfile.REGTYPE, ""),
    ],
)
def test_unsafe_archives_are_refused(tmp_path: Path, name: str, kind: bytes, linkname: str) -> None:
    archive = _tar(tmp_path, name, kind, linkname)
    dest = tmp_path / "out"
    with pytest.raises(CifarNetError, match="refusing to extract"):
        safe_extract_cifar(archive, dest)
    assert _leftovers(dest) == [] and not (tmp_path / "escape").exists()


def test_safe_extract_of_a_good_archive(tmp_path: Path) -> None:
    archive = write_cifar_tarball(tmp_path / "a")
    out = safe_extract_cifar(archive, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["batches.meta", "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
    )
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["cifar-10-batches-py"]


def test_https_proxy_and_no_proxy_are_honoured(
    ca: LocalCA, pinned: Asset, payload: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with serve({pinned.filename: payload}, ca.leaf("p")) as base, connect_proxy() as (proxy_url, tunnels):
        monkeypatch.setenv("https_proxy", proxy_url)
        monkeypatch.setenv("no_proxy", "example.invalid")
        assert _fetch(tmp_path / "a", f"{base}/good/", ca_bundle=ca.pem).read_bytes() == payload
        assert tunnels == [base.removeprefix("https://")]
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        assert _fetch(tmp_path / "b", f"{base}/good/", ca_bundle=ca.pem).read_bytes() == payload
        assert len(tunnels) == 1  # bypassed


def test_from_file_of_the_wrong_size_is_refused_without_hashing(
    pinned: Asset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert pinned.size is not None
    wrong = tmp_path / "big.tar.gz"
    wrong.write_bytes(b"\0" * (pinned.size + 1))

    def no_hashing(*_a: object) -> None:
        raise AssertionError("a file of the wrong size was hashed")

    monkeypatch.setattr(download.hashlib, "sha256", no_hashing)
    with pytest.raises(CifarNetError, match=rf"is {pinned.size + 1} bytes, cifar10 is {pinned.size} bytes"):
        fetch("cifar10", tmp_path / "d", DownloadOptions(from_file=wrong))
    assert _leftovers(tmp_path / "d") == []


def test_mirror_schemes(pinned: Asset, payload: bytes, tmp_path: Path) -> None:
    local = tmp_path / "mirror" / pinned.filename
    local.parent.mkdir()
    local.write_bytes(payload)
    # file:// is a local copy, verified like any other: allowed without --insecure-transport
    assert _fetch(tmp_path / "a", local.parent.as_uri() + "/").read_bytes() == payload
    notes: list[str] = []
    with pytest.raises(DownloadError):
        _fetch(tmp_path / "b", "http://127.0.0.1:9/x/", messages=notes)
    assert "Skipping http://127.0.0.1:9/x/cifar-10-python.tar.gz" in notes[0] and "--insecure-transport" in notes[0]
    notes.clear()
    with pytest.raises(DownloadError):
        _fetch(tmp_path / "c", "http://127.0.0.1:9/x/", messages=notes, insecure_transport=True)
    assert not any("Skipping" in n for n in notes) and any("127.0.0.1" in n for n in notes[1:])


def test_a_download_onto_a_full_disk_says_so(
    pinned: Asset, payload: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = tmp_path / "mirror" / pinned.filename
    local.parent.mkdir()
    local.write_bytes(payload)

    def full(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(download.os, "fsync", full)
    dest = tmp_path / "dest"
    with pytest.raises(CifarNetError) as err:
        _fetch(dest, local.parent.as_uri() + "/")
    assert f"Cannot write {dest / pinned.filename}: no space left" in str(err.value)
    assert not isinstance(err.value, DownloadError)  # not "could not download": the disk is the problem
    assert _leftovers(dest) == []


def test_a_disk_full_extraction_is_not_called_a_bad_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = write_cifar_tarball(tmp_path / "a")

    def full(*_a: object, **_k: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tarfile.TarFile, "extractall", full)
    with pytest.raises(CifarNetError, match="Cannot extract into .*: no space left"):
        safe_extract_cifar(archive, tmp_path / "out")
    assert _leftovers(tmp_path / "out") == []


def test_a_local_mirror_folder_needs_no_trailing_slash_or_scheme(pinned: Asset, payload: bytes, tmp_path: Path) -> None:
    folder = tmp_path / "mirror"
    folder.mkdir()
    (folder / pinned.filename).write_bytes(payload)
    assert _fetch(tmp_path / "a", folder.as_uri()).read_bytes() == payload  # file:///…/mirror, no slash
    assert _fetch(tmp_path / "b", str(folder)).read_bytes() == payload  # a bare path
