"""Writing files so that a crash, a full disk or Ctrl-C never leaves half of one, and operating-system
errors as one sentence a user can act on.

:func:`atomic_writer` is the one way cifarnet writes a file it cares about (checkpoints, the decoded-image
cache, downloads): the bytes go to a temporary file in the destination's folder, are flushed and fsync'ed,
and replace the destination with ``os.replace`` (atomic on POSIX and Windows), so a reader sees the old file
or the new one. The temporary file is removed on any failure. Files are created with mode 0666 minus the
user's umask, like every other file the user's programs write (``tempfile.mkstemp`` would force 0600).
An output that exists and is a FIFO or a character device (``--save-csv /dev/stdout``, ``/dev/null``) is
written into instead: a rename would replace the device with a regular file.

Kept free of torch and numpy: the CLI imports it to word a stray ``OSError``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import secrets
import stat
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from cifarnet_cli.errors import CifarNetError, UsageError

try:  # POSIX: a writer holds a lock on its temporary file, so a cleanup can tell a dead writer's leftover
    import fcntl
except ImportError:  # pragma: no cover - Windows: leftovers go by age instead
    fcntl = None  # type: ignore[assignment]

PARTIAL_SUFFIX = ".partial"
#: Without file locks (Windows), a temporary file is taken for a killed writer's once it is this old.
_STALE_PARTIAL_S = 3600.0

_PROBLEMS = {
    errno.ENOSPC: "no space left on the device; free some space",
    errno.EDQUOT: "disk quota exceeded; free some space",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "file too large (a file-size limit: ulimit -f, or the file system's maximum)",
    errno.EIO: "input/output error (a failing disk or a lost network mount)",
    errno.ENOENT: "no such file or folder",
    errno.ELOOP: "too many levels of symbolic links",
    errno.ENAMETOOLONG: "the name is too long",
}


_WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
#: How long a write into a FIFO waits for its reader to open it (a reader started a moment later, as in
#: ``cifarnet predict ... --save-csv fifo & cat fifo``) before it fails instead of waiting forever.
FIFO_READER_WAIT_S = 5.0


def display(path: str | os.PathLike[str]) -> str:
    """``path`` as printable text: bytes that are not valid UTF-8 (kept by Python as surrogates) are shown
    as ``\\xNN`` escapes instead of failing to print."""
    return os.fspath(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _file_in_the_way(path: Path) -> Path | None:
    """The first ancestor of ``path`` (or ``path``) that exists but is not a folder."""
    for candidate in [*reversed(path.parents), path]:
        try:
            if candidate.exists() and not candidate.is_dir():
                return candidate
        except OSError:
            return None
    return None


def problem(exc: OSError, path: str | os.PathLike[str] | None = None) -> str:
    """What went wrong, in words: the errno's meaning, or the real obstacle for "Not a directory"."""
    target = Path(path if path is not None else (exc.filename or "."))
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        blocker = _file_in_the_way(target)
        if blocker is not None:
            return f"{display(blocker)} is a file, not a folder"
    if exc.errno in _PROBLEMS:
        return _PROBLEMS[exc.errno]
    return exc.strerror or str(exc) or type(exc).__name__


def _home_hint(path: str | os.PathLike[str], exc: OSError) -> str:
    """For a file in cifarnet's own folders: where they are, and (disk full) how to move them."""
    from cifarnet_cli.paths import home_dir  # paths imports platformdirs; fileio stays light

    home = os.environ.get("CIFARNET_HOME")
    try:
        inside = Path(path).is_relative_to(Path(home).expanduser() if home else home_dir())
    except (OSError, ValueError):
        inside = False
    if not inside:
        return ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return " or point CIFARNET_HOME at a disk with room" + (f" (it is {display(home)})" if home else "")
    return f" (CIFARNET_HOME is {display(home)})" if home else ""


def os_error_message(exc: OSError, path: str | os.PathLike[str] | None = None, action: str = "use") -> str:
    """One line naming the file and the problem, e.g. ``Cannot write /x/last.pt: no space left ...``."""
    if action == "use" and exc.errno in _WRITE_ERRORS:
        action = "write"
    where = path if path is not None else (exc.filename if exc.filename is not None else None)
    if where is None:
        return f"Cannot {action} a file: {problem(exc)}."
    if isinstance(where, bytes):
        where = os.fsdecode(where)
    return f"Cannot {action} {display(where)}: {problem(exc, where)}{_home_hint(where, exc)}."


def os_error(exc: OSError, path: str | os.PathLike[str] | None = None, action: str = "use") -> CifarNetError:
    return CifarNetError(os_error_message(exc, path, action))


def check_target(path: Path, *, within: Path | None = None) -> Path:
    """Fail early, in words, when ``path`` cannot become a file: it is a folder, a block device or a socket,
    or its folder cannot be created (a command that measures for a minute checks its ``--output`` before it
    starts). With ``within``, that folder must exist and is not created (see :func:`atomic_writer`)."""
    if path.is_dir():
        raise CifarNetError(f"Cannot write {display(path)}: it is a folder; give the path of a file.")
    with contextlib.suppress(OSError):
        mode = os.stat(path).st_mode
        # Neither written into (a disk's own bytes) nor replaced by a file (its node would be gone).
        kind = "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else None
        if kind is not None and _standard_stream(path) is None:
            raise CifarNetError(f"Cannot write {display(path)}: it is {kind}; give the path of a file.")
    if within is None:
        ensure_dir(path.parent)
        return path
    if not within.is_dir():
        raise CifarNetError(f"Cannot write {display(path)}: {display(within)} is gone (deleted while this ran).")
    below = path.parent.relative_to(within)
    folder = within
    for part in below.parts:
        folder = folder / part
        try:
            folder.mkdir(exist_ok=True)
        except OSError as exc:
            raise os_error(exc, folder, "create the folder") from exc
    return path


def ensure_dir(path: Path) -> Path:
    """``mkdir -p``, with a failure worded for the user (a file in the way, read-only, no permission)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # FileExistsError included: a file where the folder should be
        raise os_error(exc, path, "create the folder") from exc
    return path


class _Sink:
    """The file object handed to the writer. It remembers the first ``OSError`` of a write: torch.save
    turns a failed write into an unrelated RuntimeError ("unexpected pos ..."), and the real cause
    (no space left, file too large) is what the user needs to hear."""

    def __init__(self, fh: Any) -> None:
        self._fh = fh
        self.error: OSError | None = None

    def _guard(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except OSError as exc:
            if self.error is None:
                self.error = exc
            raise

    def write(self, data: Any) -> int:
        return int(self._guard(self._fh.write, data))

    def flush(self) -> None:
        self._guard(self._fh.flush)

    def tell(self) -> int:
        return int(self._fh.tell())

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return int(self._fh.seek(offset, whence))

    def seekable(self) -> bool:
        return bool(self._fh.seekable())

    def writable(self) -> bool:
        return True

    def read(self, _size: int = -1) -> bytes:
        # Present only because numpy tells file objects from paths by a ``read`` attribute.
        raise io.UnsupportedOperation("write-only")


def _fsync_dir(folder: Path) -> None:
    # The rename itself is durable only once the folder is synced; best effort (not possible on Windows).
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def open_regular(path: Path) -> Any:
    """``open(path, "rb")`` for a file cifarnet only reads, refusing what is not a regular file before a
    read can block on it: a FIFO named config.json would hang a listing forever (OSError otherwise)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


# --------------------------------------------------------------------------------------------------
# Temporary files: one name, one pattern


#: The longest file name most file systems allow (ext4, XFS, APFS, NTFS), in bytes.
NAME_MAX = 255


def _partial_stem(name: str) -> str:
    """``name``, cut at a byte where needed so that its temporary file's name fits :data:`NAME_MAX` (a
    254-byte output is allowed; ``.<name>.<8 hex>.partial`` adds 18)."""
    room = NAME_MAX - 2 - 8 - len(PARTIAL_SUFFIX)
    raw = os.fsencode(name)
    return name if len(raw) <= room else os.fsdecode(raw[:room])


def partial_path(target: Path) -> Path:
    """The temporary file :func:`atomic_writer` writes ``target`` through: ``.<name>.<random>.partial`` in
    the same folder (hidden, and never mistaken for the file itself)."""
    return target.with_name(f".{_partial_stem(target.name)}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}")


def is_partial(name: str, target: str | None = None) -> bool:
    """Whether the file name ``name`` is one of :func:`partial_path`'s (of the file named ``target``, or of
    any file)."""
    if not (name.startswith(".") and name.endswith(PARTIAL_SUFFIX)):
        return False
    if target is None:
        return True
    stem = _partial_stem(target)
    return name.startswith(f".{stem}.") and len(name) > len(stem) + 2 + len(PARTIAL_SUFFIX)


def hold_lock(path: Path) -> int | None:
    """Create ``path`` and lock it for as long as the returned descriptor stays open (it is not inherited by
    child processes), so that :func:`owner_is_gone` tells another process whether its owner still runs;
    None where the file system has no locks."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError:
            pass
    os.close(fd)
    return None


def owner_is_gone(path: str) -> bool:
    """Whether no process holds the lock on ``path`` any more (its owner ended, however it ended): a writer
    holds its temporary file's for as long as it writes (:func:`atomic_writer`), a process the file of
    :func:`hold_lock` for as long as it runs."""
    if fcntl is None:  # pragma: no cover - Windows
        import time

        return time.time() - os.stat(path).st_mtime > _STALE_PARTIAL_S
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def remove_partials(folder: Path, target: str | None = None, *, legacy: bool = False) -> list[Path]:
    """Delete the temporary files in ``folder`` (of the file named ``target``, or of any file) whose
    writers are gone (``kill -9`` skips every cleanup); those still being written stay. ``legacy`` also
    takes ``<name>.partial`` (the name older versions wrote run records through)."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        if not (is_partial(entry.name, target) or (legacy and entry.name.endswith(PARTIAL_SUFFIX))):
            continue
        with contextlib.suppress(OSError):
            if entry.is_symlink() or (entry.is_file(follow_symlinks=False) and owner_is_gone(entry.path)):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


# --------------------------------------------------------------------------------------------------
# Atomic writes


@contextlib.contextmanager
def atomic_writer(path: Path, *, within: Path | None = None) -> Iterator[Any]:
    """Yield a binary file object; on a clean exit its bytes replace ``path`` atomically.

    Failures of the file itself (no space, read-only, no permission, size limit) become a
    :class:`CifarNetError` naming ``path``; anything else the writer raises (Ctrl-C, a network error)
    propagates unchanged. Either way the temporary file is gone and ``path`` is as it was.

    A ``path`` that is a FIFO or a character device is written into, not replaced (see
    :func:`_stream_writer`). ``within`` (a folder above ``path``) must exist already: folders below it are created, it never is. A
    report written into a run folder that `runs rm` deleted meanwhile then fails instead of bringing the
    folder back. Temporary files of ``path`` left by a killed writer are removed first."""
    check_target(path, within=within)
    std = _standard_stream(path)
    if std is not None or _is_stream(path):
        with _stream_writer(path, std) as sink:
            yield sink
        return
    folder = path.parent
    remove_partials(folder, path.name)
    tmp = partial_path(path)
    try:
        # 0o666 & ~umask, the mode open() gives; O_EXCL: never write through a planted file or link.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as exc:
        raise os_error(exc, path, "write") from exc
    if fcntl is not None:  # tells a cleanup that this writer lives (a new file: the lock is free)
        with contextlib.suppress(OSError):  # a file system without locks: its leftovers stay until removed
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fh = os.fdopen(fd, "wb")
    sink = _Sink(fh)
    stage = "body"
    try:
        yield sink
        stage = "finish"
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            fh.close()  # a no-op when closed; otherwise its flush may fail too, after the first error
        with contextlib.suppress(OSError):
            tmp.unlink()
        if sink.error is not None:
            raise os_error(sink.error, path, "write") from exc
        if isinstance(exc, OSError) and (stage == "finish" or exc.errno in _DISK_FULL):
            raise os_error(exc, path, "write") from exc
        raise
    _fsync_dir(folder)


def _is_stream(path: Path) -> bool:
    """Whether ``path`` exists as a FIFO or a character device (through links: /dev/stdout)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


def _standard_stream(path: Path) -> int | None:
    """1 or 2 when the link ``path`` leads to this process's standard output or error (/dev/stdout,
    /dev/fd/2, /proc/self/fd/1): written through that descriptor, whatever it is (a file after ``> out``, a
    pipe, a terminal, a socket). Renaming over the link would replace it (in /dev) and lose the bytes."""
    try:
        if not os.path.islink(path):
            return None
        st = os.stat(path)
    except OSError:
        return None
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            if os.path.samestat(st, os.fstat(fd)):
                return fd
    return None


def _open_stream(path: Path) -> int:
    """A descriptor for writing into the FIFO or device ``path``, in blocking mode. O_NONBLOCK makes the open
    of a FIFO without a reader fail (ENXIO) instead of waiting forever; it is retried for
    :data:`FIFO_READER_WAIT_S`."""
    import time

    deadline = time.monotonic() + FIFO_READER_WAIT_S
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
            break
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise os_error(exc, path, "write") from exc
            if time.monotonic() >= deadline:
                raise CifarNetError(
                    f"Cannot write {display(path)}: it is a named pipe (FIFO) and nobody reads it; start its "
                    "reader first (e.g. cat) or give the path of a file."
                ) from None
            time.sleep(0.05)
    os.set_blocking(fd, True)  # writes wait for a slow reader rather than fail with EAGAIN
    return fd


@contextlib.contextmanager
def _stream_writer(path: Path, std: int | None = None) -> Iterator[Any]:
    """Write straight into the FIFO or device ``path``, or into the standard stream ``std`` it leads to (it
    stays what it is; nothing to rename or sync)."""
    if std is not None:  # after what the process has printed there so far
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    fh = os.fdopen(os.dup(std) if std is not None else _open_stream(path), "wb")
    sink = _Sink(fh)
    try:
        yield sink
        fh.flush()
    except BaseException as exc:
        if sink.error is None and isinstance(exc, OSError) and exc.errno in (*_DISK_FULL, errno.EPIPE):
            sink.error = exc  # the final flush, or a full /dev/full-like device
        if sink.error is not None:
            raise os_error(sink.error, path, "write") from exc
        raise
    finally:
        with contextlib.suppress(OSError):
            fh.close()


def write_bytes(path: Path, data: bytes, *, within: Path | None = None) -> None:
    """Atomically replace ``path`` with ``data`` (``within``: see :func:`atomic_writer`)."""
    with atomic_writer(path, within=within) as fh:
        fh.write(data)


def check_output(target: Path, inputs: Iterable[str | os.PathLike[str]] = (), *, option: str = "--output") -> Path:
    """Refuse an output file that would destroy what the command reads or what a run keeps: one of
    ``inputs`` (by path or as the same file through a link), or a run's checkpoint or record (best.pt,
    last.pt, epoch-NNN.pt, config.json, metrics.*, .lock, curves.png, eval-*.json, confusion-*.png), or a folder. Call it before the work that produces the
    output."""
    target = Path(os.path.expanduser(target))
    check_target(target)
    where = os.path.realpath(target)
    for source in inputs:
        same = os.path.realpath(source) == where
        if not same and target.exists():
            with contextlib.suppress(OSError):
                same = os.path.samefile(source, target)
        if same:
            raise UsageError(
                f"{option} {display(target)} is also an input of this command ({display(source)}); writing it would "
                "destroy it. Give another file name."
            )
    from cifarnet_cli.runs import run_file  # runs imports this module

    owner = run_file(Path(where))
    if owner is not None:
        raise UsageError(f"{option} {display(target)} is {owner}; give another file name.")
    return target
