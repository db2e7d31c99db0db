"""The standard streams as a command finds them: closed (``>&-``, ``<&-``), or in an encoding that cannot
show every character (``PYTHONIOENCODING=ascii``, a C locale).

:func:`prepare` runs once, before any command:

- A closed descriptor 0, 1 or 2 is re-opened on the null device, so that no file cifarnet opens later (a
  checkpoint, a download) gets that number and receives what a library prints to "stdout".
- A closed stdout is not a broken pipe (nobody read and left; there never was a reader): a command that has
  something to print there (a table, ``--json``) fails with one line on stderr and exit code 1, instead of
  succeeding silently or ending in an AttributeError. Commands that print nothing on stdout run as usual.
- A closed stdin reads as empty: a question (``runs rm`` without ``--yes``) is answered "no".
- Characters the output encoding cannot represent are written as backslash escapes instead of raising
  UnicodeEncodeError.
- A write to stdout is written whole or fails: when the reader of a pipe leaves while one long write waits
  (`cifarnet predict photos/ | head -1`), Python's own stdout drops what the pipe did not take without an
  error (CPython 3.11: the write returns the part written and the rest is lost), so the command would end
  with 0 and its output cut short instead of the broken pipe's 141.
"""

from __future__ import annotations

import io
import os
import sys
from typing import Any

from cifarnet_cli.errors import CifarNetError

CLOSED_STDOUT = (
    "Cannot print the output: standard output is closed (the command ran with >&-); redirect it to a file, or "
    "to /dev/null to discard it."
)


class StdoutClosed(CifarNetError):
    """Something was to be printed on a standard output that was closed when the command started."""

    def __init__(self) -> None:
        super().__init__(CLOSED_STDOUT)


class _ClosedOutput(io.TextIOBase):
    """Stands for a closed stdout: writing text raises :class:`StdoutClosed` (once; later writes, such as
    the interpreter's final flush, are ignored)."""

    encoding = "utf-8"

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: Any) -> int:
        if text and not self.failed:
            self.failed = True
            raise StdoutClosed()
        return len(text)


class _WholeWrites(io.RawIOBase):
    """A file descriptor whose ``write`` writes every byte (the system call may take part of them) or raises
    the error that stopped it (``BrokenPipeError`` when the reader left)."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd

    def isatty(self) -> bool:
        return os.isatty(self.fd)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.write(self.fd, view[done:])
        return done


def _whole_stdout(stream: Any) -> Any:
    """``stream`` (Python's stdout on descriptor 1) over :class:`_WholeWrites`, with its encoding and
    buffering; any other stream as it is."""
    if not isinstance(stream, io.TextIOWrapper):
        return stream
    try:
        if stream.fileno() != 1:
            return stream
        stream.flush()
    except (OSError, ValueError):
        return stream
    return io.TextIOWrapper(
        io.BufferedWriter(_WholeWrites(1)),
        encoding=stream.encoding,
        errors=stream.errors,
        line_buffering=stream.line_buffering,
        write_through=stream.write_through,
    )


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _occupy(fd: int) -> None:
    """Put the null device on descriptor ``fd`` (closed), so that it is not handed to the next open()."""
    null = os.open(os.devnull, os.O_RDWR)
    if null != fd:
        os.dup2(null, fd)
        os.close(null)


def prepare() -> None:
    """Make the standard streams safe to use (see the module's docstring). Call once, at start-up."""
    closed = [fd for fd in (0, 1, 2) if not _is_open(fd)]
    for fd in closed:
        _occupy(fd)
    if 0 in closed or sys.stdin is None:
        sys.stdin = open(os.devnull, encoding="utf-8")
    if 2 in closed or sys.stderr is None:
        sys.stderr = open(os.devnull, "w", encoding="utf-8")
    if 1 in closed or sys.stdout is None:
        sys.stdout = _ClosedOutput()
    else:
        sys.stdout = _whole_stdout(sys.stdout)
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors="backslashreplace")
            except (OSError, ValueError):  # pragma: no cover - a stream that cannot change its error handler
                pass


def write_raw_line(data: bytes) -> None:
    """``data`` and a newline on stdout exactly as they are, bypassing the text encoding: a path whose name
    is not UTF-8 (bytes Python keeps as surrogate escapes) must reach `cd "$(cifarnet runs --path X)"` as
    the same bytes, not as ``\\udcff`` (what the text layer's backslash escapes would make of it)."""
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:  # a closed stdout (_ClosedOutput) raises its own error; a text-only stream takes text
        sys.stdout.write(os.fsdecode(data) + "\n")
        return
    sys.stdout.flush()
    buffer.write(data + b"\n")
    buffer.flush()
