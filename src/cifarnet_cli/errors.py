"""The one exception type a user can cause; the CLI turns it into a red line and an exit code."""

from __future__ import annotations

import os
import sys

#: Exit status when the reader of the output went away (`cifarnet runs | head -1`): 128 + SIGPIPE, what the
#: shell reports for ls or cat stopped that way, so it is not mistaken for a runtime error (1).
EXIT_BROKEN_PIPE = 141


def quiet_stdout_after_broken_pipe() -> None:
    """Point stdout at /dev/null, so that flushing it at exit raises nothing more (Python's advice for
    SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


class StdoutWatch:
    """Tells, when the program ends, whether the reader of stdout went away while it wrote (`cifarnet train
    --help | head -c10`), however the write failed: through a console of ours (exit 141 already), Rich's own
    (Typer's help: exit 1) or click's (exit 1). The pipe at start is remembered; at the end it is gone (a
    broken pipe's stdout is pointed at /dev/null) or its reader has closed (poll reports an error)."""

    def __init__(self) -> None:
        self.pipe: tuple[int, int] | None = None
        try:
            import stat

            st = os.fstat(1)
            if stat.S_ISFIFO(st.st_mode):
                self.pipe = (st.st_dev, st.st_ino)
        except OSError:
            pass

    def reader_left(self) -> bool:
        if self.pipe is None:
            return False
        try:
            st = os.fstat(1)
        except OSError:
            return True
        if (st.st_dev, st.st_ino) != self.pipe:
            return True
        import select

        if not hasattr(select, "poll"):  # Windows: no pipe state to ask
            return False
        poller = select.poll()
        poller.register(1, select.POLLOUT)
        return any(events & select.POLLERR for _fd, events in poller.poll(0))


class CifarNetError(Exception):
    """A problem the user can fix: the message says what to do.

    ``exit_code`` is 1 for runtime failures (missing file, no network) and 2 for usage errors
    (an option value that can never work), following the convention of click/Typer.
    """

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(CifarNetError):
    """An option or argument that is invalid on its face (exit code 2)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=2)


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (third-party errors can run to pages), or its type name.
    A line longer than ``limit`` ends at its last full sentence that fits (or at ``limit``, marked "…"),
    never in the middle of a word."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = text.splitlines()[0].strip()
    if len(line) <= limit:
        return line
    end = line.rfind(". ", 0, limit)
    return line[: end + 1] if end > 0 else line[: limit - 1].rstrip() + "…"
