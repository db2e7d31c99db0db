"""The one exception type a user can cause; the CLI turns it into a red line and an exit code."""

#: Exit status when the reader of the output went away (`cifarnet runs | head -1`): 128 + SIGPIPE, what the
#: shell reports for ls or cat stopped that way, so it is not mistaken for a runtime error (1).
EXIT_BROKEN_PIPE = 141


def quiet_stdout_after_broken_pipe() -> None:
    """Point stdout at /dev/null, so that flushing it at exit raises nothing more (Python's advice for
    SIGPIPE)."""
    import os
    import sys

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


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
