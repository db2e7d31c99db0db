"""Signals during training: SIGTERM ends a run like Ctrl-C, and neither lands inside the writes that
finish an epoch.

systemd, ``docker stop``, cluster schedulers and ``timeout`` send SIGTERM; Python's default is to die on
the spot (exit 143, no message, a ``.partial`` checkpoint left when it lands mid-write). Raised as a
:class:`Terminated` (a KeyboardInterrupt), it takes the same path as Ctrl-C: the last completed epoch is
kept and the resume command printed.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any


class Terminated(KeyboardInterrupt):
    """SIGTERM, delivered like Ctrl-C."""

    exit_code = 143  # 128 + SIGTERM, what supervisors expect from a process that stopped on SIGTERM


def _raise_terminated(_signum: int, _frame: FrameType | None) -> None:
    raise Terminated()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


#: The signals that stop a command: Ctrl-C and a supervisor's SIGTERM.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def stop_signals_to(handler: Any) -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM go to ``handler`` (a function, or ``signal.SIG_DFL``); the
    previous handlers come back after it. Main thread only (Python's rule); elsewhere a no-op."""
    if not _main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (main thread only; a no-op elsewhere)."""
    if not _main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done, then deliver them.

    An epoch ends with several writes (best.pt, last.pt, metrics.jsonl/.csv) that must agree; a Ctrl-C
    between two of them would leave a checkpoint and metrics that disagree, and a message that names the
    wrong epoch. The writes take a fraction of a second, so holding a signal that long is not felt.
    """
    if not _main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum: int, _frame: FrameType | None) -> None:
        pending.append(signum)

    previous: dict[int, Any] = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for sig in dict.fromkeys(pending):
        signal.raise_signal(sig)  # now handled as it would have been: KeyboardInterrupt, Terminated, ...
