"""SSL-safe downloads of pinned assets (the CIFAR-10 archive, the ResNet-50 weights).

Order of attempts: (0) local files (``--from-file``, the torch hub cache, the destination), always
re-hashed; (1) HTTPS with the operating system's trust store plus any CA bundle the user gave;
(2) the certifi bundle, only after an untrusted-issuer or expired-chain failure; (3) each mirror, with the
same pins and the same chain; (4) stop with the exact command to finish by hand.

Verification is never switched off unless ``--insecure-transport`` is given for a pinned asset; size and
SHA-256 are enforced whatever the transport. Bytes stream to ``<dest>.<random>.partial`` next to the
destination (fileio.atomic_writer: ``.<name>.<random>.partial``) and are renamed into place only after they
verify, so nothing unverified sits at the destination; a failure to write (no space, read-only) is named
as such, never mistaken for a network problem. ``ssl`` is never patched globally: each attempt builds its own context.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import http.client
import math
import os
import shutil
import socket
import ssl
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifarnet_cli import fileio, paths
from cifarnet_cli.choices import unknown
from cifarnet_cli.errors import CifarNetError, UsageError


@dataclass(frozen=True)
class Asset:
    name: str
    url: str
    size: int | None
    sha256: str | None  # None = unpinned (never allowed with --insecure-transport)
    kind: str  # "dataset" | "weights"

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def pinned(self) -> bool:
        return self.sha256 is not None and self.size is not None


#: The shipped pins. Tests point entries at their own files through this mapping (the internal hook).
ASSETS: dict[str, Asset] = {
    "cifar10": Asset(
        "cifar10",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        170498071,
        "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
        "dataset",
    ),
    "resnet50-v1": Asset(
        "resnet50-v1",
        "https://download.pytorch.org/models/resnet50-0676ba61.pth",
        102530333,
        "0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a",
        "weights",
    ),
    "resnet50-v2": Asset(
        "resnet50-v2",
        "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
        102540417,
        "11ad3fa62ca79e40addfd354a8ec4b7c75143b3038b8d2a807fbc68deab379ca",
        "weights",
    ),
}

MIRROR_ENV = "CIFARNET_MIRROR"
OFFLINE_ENV = "CIFARNET_OFFLINE"
CHUNK = 1 << 20
DEFAULT_TIMEOUT_S = 30.0
MAX_TIMEOUT_S = 86400.0  # a day; the socket layer refuses far larger values with an OverflowError

Notify = Callable[[str], None]
Progress = Callable[[int, int | None], None]


class DownloadError(CifarNetError):
    pass


@dataclass(frozen=True)
class DownloadOptions:
    from_file: Path | None = None
    mirrors: tuple[str, ...] = ()
    ca_bundle: Path | None = None
    insecure_transport: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S

    def validate(self) -> DownloadOptions:
        if not (math.isfinite(self.timeout_s) and 0 < self.timeout_s <= MAX_TIMEOUT_S):
            raise UsageError(
                f"--timeout must be a number of seconds in (0, {MAX_TIMEOUT_S:g}] (got {self.timeout_s:g})."
            )
        return self


def get_asset(name: str) -> Asset:
    try:
        return ASSETS[name]
    except KeyError:
        raise UsageError(unknown("asset", name, list(ASSETS))) from None


def default_destination(asset: Asset) -> Path:
    return paths.torch_hub_checkpoints_dir() if asset.kind == "weights" else paths.default_data_dir()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _matches(path: Path, asset: Asset) -> bool:
    if asset.size is not None and path.stat().st_size != asset.size:
        return False
    return asset.sha256 is None or sha256_file(path) == asset.sha256


def _set_aside(path: Path, asset: Asset, notify: Notify) -> None:
    corrupt = path.with_name(path.name + ".corrupt")
    os.replace(path, corrupt)
    notify(
        f"{path} does not match the pinned {asset.name} (size {asset.size}, SHA-256 {asset.sha256}); "
        f"moved it to {corrupt} and fetching a fresh copy."
    )


# --------------------------------------------------------------------------------------------------
# TLS contexts and failure messages


def _extra_ca_files(options: DownloadOptions) -> list[Path]:
    files = [options.ca_bundle] if options.ca_bundle else []
    for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        value = os.environ.get(var)
        if value:
            files.append(Path(value))
    out = []
    for f in files:
        if f is None:
            continue
        if not f.is_file():
            raise UsageError(f"CA bundle {f} does not exist; pass a PEM file with --ca-bundle.")
        out.append(f)
    return out


def system_context(options: DownloadOptions) -> ssl.SSLContext:
    """The operating system's trust store (truststore where installed), plus the user's CA bundles."""
    extra = _extra_ca_files(options)
    if not extra:
        try:
            import truststore

            return truststore.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        except ImportError:
            pass
    ctx = ssl.create_default_context()
    for f in extra:
        try:
            ctx.load_verify_locations(cafile=str(f))
        except ssl.SSLError as exc:
            raise UsageError(f"{f} is not a PEM CA bundle ({exc.reason or exc}).") from exc
    return ctx


def certifi_context() -> ssl.SSLContext | None:
    try:
        import certifi
    except ImportError:
        return None
    return ssl.create_default_context(cafile=certifi.where())


def insecure_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@dataclass(frozen=True)
class Failure:
    kind: str  # untrusted | expired | not_yet_valid | hostname | plain_http | tls_version | timeout | http | network | hash | size
    message: str


# OpenSSL X509_V_ERR_* codes
_UNTRUSTED = {2, 18, 19, 20, 21, 27}
_EXPIRED = 10
_NOT_YET_VALID = 9
_HOSTNAME = {62, 63, 64}  # host name, e-mail, IP address mismatch


def classify(exc: BaseException, url: str, timeout_s: float) -> Failure:
    host = urllib.parse.urlsplit(url).hostname or url
    reason: object = (
        exc.reason if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError) else exc
    )
    if url.lower().startswith("file:"):
        return Failure("network", f"Cannot read the mirror {url} ({getattr(reason, 'strerror', None) or reason}).")
    if isinstance(exc, http.client.IncompleteRead):
        return Failure(
            "truncated",
            f"{host} closed the connection before the whole file arrived (truncated transfer); retry or use a mirror.",
        )
    if isinstance(exc, http.client.HTTPException):
        return Failure("http", f"{host} sent a malformed HTTP response ({type(exc).__name__}: {exc}).")
    if isinstance(exc, urllib.error.HTTPError):
        return Failure("http", f"{host} answered HTTP {exc.code} {exc.reason} for {url}.")
    if isinstance(reason, ssl.SSLCertVerificationError):
        code = getattr(reason, "verify_code", None)
        text = str(getattr(reason, "verify_message", "") or reason)
        if code in _HOSTNAME or "mismatch" in text.lower() or "doesn't match" in text.lower():
            return Failure(
                "hostname",
                f"The certificate that {host} presented is for another host name ({text}): possible interception; "
                "not retrying with another trust store. Check your network or use a mirror you trust.",
            )
        if code == _EXPIRED or "expired" in text.lower():
            return Failure(
                "expired",
                f"The certificate chain of {host} has expired ({text}): update the CA store "
                "(apt install --reinstall ca-certificates, pip install -U certifi) or check the clock.",
            )
        if code == _NOT_YET_VALID or "not yet valid" in text.lower():
            now = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
            return Failure(
                "not_yet_valid",
                f"The certificate of {host} is not valid yet: this machine's clock says {now}, which is "
                "probably wrong (Jetson boards often boot with a stale date); set the time "
                "(sudo timedatectl set-ntp true, or sudo date -s ...) and retry.",
            )
        return Failure(
            "untrusted",
            f"The certificate of {host} is signed by an issuer this machine does not trust ({text}): a "
            "TLS-inspecting proxy or a missing CA store. Pass your organisation's CA with --ca-bundle PEM "
            "(or SSL_CERT_FILE).",
        )
    if isinstance(reason, ssl.SSLError):
        text = f"{reason.reason or ''} {reason}".upper()
        if any(
            s in text
            for s in (
                "WRONG_VERSION_NUMBER",
                "RECORD_LAYER_FAILURE",
                "PACKET_LENGTH_TOO_LONG",
                "HTTP_REQUEST",
            )
        ):
            return Failure(
                "plain_http",
                f"{host} answered plain HTTP on an HTTPS port: a captive portal or a proxy is in the way. "
                "Log in to the network, or set https_proxy to your proxy.",
            )
        if any(
            s in text for s in ("PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL", "NO_PROTOCOLS_AVAILABLE", "VERSION_TOO_LOW")
        ):
            return Failure(
                "tls_version",
                f"{host} and this machine share no TLS version ({reason.reason or reason}); "
                "update OpenSSL/Python or use a mirror.",
            )
        return Failure("tls", f"TLS handshake with {host} failed ({reason}).")
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return Failure(
            "timeout",
            f"{host} sent nothing for {timeout_s:g} s (timeout); check the network or use a mirror.",
        )
    if isinstance(reason, socket.gaierror):
        return Failure("network", f"Cannot resolve {host} ({reason.strerror or reason}): no network or no DNS.")
    if isinstance(reason, OSError):
        return Failure("network", f"Cannot reach {host} ({reason.strerror or reason}).")
    return Failure("network", f"Download from {host} failed ({reason}).")


# --------------------------------------------------------------------------------------------------
# Transfer


class _NoDowngradeRedirect(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but never from https to plain http."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        if req.full_url.startswith("https:") and not newurl.startswith("https:"):
            raise urllib.error.URLError(f"refusing redirect from https to {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _VerifyFailed(Exception):
    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


def _stream(
    url: str, dest: Path, asset: Asset, ctx: ssl.SSLContext, timeout_s: float, progress: Progress | None
) -> None:
    """Download ``url`` to ``dest`` through a temporary file in its folder; verify; rename."""
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx), _NoDowngradeRedirect())
    request = urllib.request.Request(url, headers={"User-Agent": "cifarnet"})
    # Network errors leave the atomic writer unchanged (the caller explains them); a failure to write the
    # file (no space, read-only) comes out as one CifarNetError naming it. Unverified bytes never reach dest.
    with opener.open(request, timeout=timeout_s) as response, fileio.atomic_writer(dest) as out:
        length = response.headers.get("Content-Length")
        total = asset.size or (int(length) if length and length.isdigit() else None)
        h = hashlib.sha256()
        done = 0
        while True:
            chunk = response.read(CHUNK)
            if not chunk:
                break
            out.write(chunk)
            h.update(chunk)
            done += len(chunk)
            if asset.size is not None and done > asset.size:
                raise _VerifyFailed(Failure("size", f"{url} sent more than the pinned {asset.size} bytes."))
            if progress is not None:
                progress(done, total)
        announced = int(length) if length and length.isdigit() else None
        if announced is not None and done < announced:
            raise _VerifyFailed(
                Failure(
                    "truncated",
                    f"{url} ended after {done} of {announced} bytes (truncated transfer); retry or use a mirror.",
                )
            )
        digest = h.hexdigest()
        if (asset.size is not None and done != asset.size) or (asset.sha256 is not None and digest != asset.sha256):
            raise _VerifyFailed(
                Failure(
                    "hash",
                    f"{url} sent {done} bytes with SHA-256 {digest}, but {asset.name} is pinned to "
                    f"{asset.size} bytes with SHA-256 {asset.sha256}; refusing it.",
                )
            )


def mirror_urls(asset: Asset, mirrors: Sequence[str]) -> list[str]:
    """A mirror is the URL of the file itself, or a base URL ending in '/' that gets the file name. A local
    folder is a base either way (file:///srv/mirror, or a path such as /srv/mirror, which becomes a file:// URL)."""
    env = os.environ.get(MIRROR_ENV, "")
    out = []
    for m in [*mirrors, *env.replace(",", " ").split()]:
        local = Path(m).expanduser()
        if "://" not in m and (local.is_absolute() or local.exists()):
            m = local.resolve().as_uri() + ("/" if m.endswith("/") else "")
        parts = urllib.parse.urlsplit(m)
        if parts.scheme == "file" and not m.endswith("/") and Path(urllib.parse.unquote(parts.path)).is_dir():
            m += "/"
        out.append(m + asset.filename if m.endswith("/") else m)
    return out


def _attempts(options: DownloadOptions) -> Iterator[tuple[str, ssl.SSLContext]]:
    if options.insecure_transport:
        yield "without certificate verification (--insecure-transport)", insecure_context()
        return
    yield "system trust store", system_context(options)


def _download(asset: Asset, dest: Path, options: DownloadOptions, notify: Notify, progress: Progress | None) -> None:
    offline = bool(os.environ.get(OFFLINE_ENV))
    urls = ([] if offline else [asset.url]) + mirror_urls(asset, options.mirrors)
    if not urls:
        raise DownloadError(_manual_message(asset, dest, f"{OFFLINE_ENV} is set, so nothing was fetched"))
    if options.insecure_transport:
        if not asset.pinned:
            raise UsageError(f"--insecure-transport is allowed only for pinned assets; {asset.name} has no pin.")
        notify(
            "WARNING: --insecure-transport: the server's certificate is NOT verified; the file is still "
            "checked against its pinned size and SHA-256."
        )
    last: Failure | None = None
    # An attempt's failure is said when another attempt follows it; the last one is the error's reason
    # (said once, not also as a line of its own).
    pending: list[str] = []

    def attempt_failed(message: str) -> None:
        pending.append(message)

    def next_attempt() -> None:
        for message in pending:
            notify(message)
        pending.clear()

    for url in urls:
        next_attempt()
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme not in ("https", "file") and not (scheme == "http" and options.insecure_transport):
            allowed = "https:// and file://" + (" (http:// with --insecure-transport)" if scheme == "http" else "")
            notify(f"Skipping {url}: only {allowed} URLs are used.")
            continue
        contexts = list(_attempts(options))
        i = 0
        while i < len(contexts):
            label, ctx = contexts[i]
            i += 1
            next_attempt()
            try:
                _stream(url, dest, asset, ctx, options.timeout_s, progress)
                return
            except _VerifyFailed as exc:
                last = exc.failure
                attempt_failed(last.message)
                break  # the server sent wrong bytes: another trust store will not fix that
            except (urllib.error.URLError, OSError, ssl.SSLError, http.client.HTTPException) as exc:
                last = classify(exc, url, options.timeout_s)
                tls_kinds = ("untrusted", "expired", "not_yet_valid", "hostname", "tls", "tls_version", "plain_http")
                attempt_failed(f"{last.message} [{label}]" if last.kind in tls_kinds else last.message)
                if last.kind in ("untrusted", "expired") and label == "system trust store":
                    certifi_ctx = certifi_context()
                    if certifi_ctx is not None:
                        contexts.append(("certifi CA bundle", certifi_ctx))
                        attempt_failed("Retrying with the certifi CA bundle.")
    reason = last.message if last is not None else "no usable URL"
    raise DownloadError(_manual_message(asset, dest, reason))


def _manual_message(asset: Asset, dest: Path, reason: str) -> str:
    size = f"{asset.size} bytes" if asset.size is not None else "size unknown"
    sha = f"SHA-256 {asset.sha256}" if asset.sha256 else "no pinned SHA-256"
    return (
        f"Could not download {asset.name}: {reason.rstrip('.')}. To finish by hand, fetch {asset.url} "
        f"({size}, {sha}) on any machine and run `cifarnet download {asset.name} --from-file FILE` "
        f"(it will be stored in {dest.parent}); --mirror URL and --ca-bundle PEM are the other ways out."
    )


def _from_file(src: Path, asset: Asset, dest: Path) -> Path:
    """Verify a local copy (size first: a wrong file is refused without reading it) and store it at dest."""
    if not src.is_file():
        raise CifarNetError(f"--from-file {src}: no such file.")
    size = src.stat().st_size
    if asset.size is not None and size != asset.size:
        raise CifarNetError(
            f"--from-file {src} is not {asset.name}: it is {size} bytes, {asset.name} is {asset.size} bytes "
            "(not hashed). Nothing was copied."
        )
    same = src.resolve() == dest.resolve()

    def wrong(digest: str) -> CifarNetError:
        return CifarNetError(
            f"--from-file {src} is not {asset.name}: {size} bytes with SHA-256 {digest}, "
            f"expected {asset.size} bytes with SHA-256 {asset.sha256}. Nothing was copied."
        )

    if same:
        digest = sha256_file(src)
        if asset.sha256 is not None and digest != asset.sha256:
            raise wrong(digest)
        return dest
    h = hashlib.sha256()
    with src.open("rb") as fin, fileio.atomic_writer(dest) as out:  # hashed while copied: one read
        for chunk in iter(lambda: fin.read(CHUNK), b""):
            h.update(chunk)
            out.write(chunk)
        if asset.sha256 is not None and h.hexdigest() != asset.sha256:
            raise wrong(h.hexdigest())  # the partial copy is removed; nothing reaches dest
    return dest


def fetch(
    name: str,
    dest_dir: Path | None = None,
    options: DownloadOptions = DownloadOptions(),
    *,
    notify: Notify = lambda _msg: None,
    progress: Progress | None = None,
) -> Path:
    """Return the verified file of asset ``name``, fetching it if no verified local copy exists."""
    asset = get_asset(name)
    options.validate()
    dest_dir = fileio.ensure_dir(dest_dir or default_destination(asset))  # a file in the way is named now
    dest = dest_dir / asset.filename
    # (0) local copies first
    if options.from_file is not None:
        return _from_file(options.from_file.expanduser(), asset, dest)
    candidates = [dest]
    if asset.kind == "weights":
        hub = paths.torch_hub_checkpoints_dir() / asset.filename
        if hub != dest:
            candidates.append(hub)
    for candidate in candidates:
        if candidate.is_file():
            if _matches(candidate, asset):
                return candidate
            _set_aside(candidate, asset, notify)
    # (1)-(4) network
    _download(asset, dest, options, notify, progress)
    return dest


# --------------------------------------------------------------------------------------------------
# CIFAR-10 archive

CIFAR_MEMBERS = frozenset(
    f"cifar-10-batches-py/{n}"
    for n in (
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
        "batches.meta",
        "readme.html",
    )
)


def safe_extract_cifar(archive: Path, dest_dir: Path) -> Path:
    """Extract only the expected regular files of the CIFAR-10 archive into ``dest_dir``; refuse the whole
    archive if it holds anything else (``..``, absolute paths, links, devices, unexpected names)."""

    def unreadable(exc: BaseException) -> CifarNetError:
        return CifarNetError(f"{archive} is not a readable CIFAR-10 archive ({exc}).")

    try:
        tar = tarfile.open(archive, "r:*")
        members = tar.getmembers()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise unreadable(exc) from exc
    with tar:
        for m in members:
            name = m.name.rstrip("/")
            if m.isdir() and name == "cifar-10-batches-py":
                continue
            if name not in CIFAR_MEMBERS or not m.isfile():
                what = "a link" if (m.issym() or m.islnk()) else ("a directory" if m.isdir() else "an entry")
                raise CifarNetError(
                    f"{archive} holds {what} {m.name!r} that a CIFAR-10 archive does not; refusing to extract it."
                )
        files = [m for m in members if m.isfile()]
        fileio.ensure_dir(dest_dir)
        try:
            staging = Path(tempfile.mkdtemp(prefix=".cifar-extract-", dir=dest_dir))
        except OSError as exc:
            raise fileio.os_error(exc, dest_dir, "extract into") from exc
        try:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(staging, members=files, filter="data")
            else:  # Python without PEP 706; the names were checked above
                tar.extractall(staging, members=files)  # noqa: S202
            target = dest_dir / "cifar-10-batches-py"
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging / "cifar-10-batches-py", target)
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise unreadable(exc) from exc
        except OSError as exc:
            # An errno means the file system refused a write (no space, read-only); none (BadGzipFile)
            # means the archive's bytes are bad.
            if exc.errno is None:
                raise unreadable(exc) from exc
            raise fileio.os_error(exc, dest_dir, "extract into") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def fetch_cifar10(
    data_dir: Path,
    options: DownloadOptions = DownloadOptions(),
    *,
    notify: Notify = lambda _msg: None,
    progress: Progress | None = None,
) -> Path:
    """Make ``data_dir/cifar-10-batches-py`` exist, from a verified archive."""
    archive = fetch("cifar10", data_dir, options, notify=notify, progress=progress)
    return safe_extract_cifar(archive, data_dir)
