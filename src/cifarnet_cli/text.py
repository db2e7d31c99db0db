"""The one rule for showing text that comes from data (class names, file and run names, paths, ONNX metadata,
config.json fields, and messages that quote any of them) in a terminal.

A folder named ``ca[bold]t``, a class called ``[link=http://x]cat``, a file name holding ``ESC[2J`` (clear
screen) or ``ESC]8;;`` (a hyperlink) must print as those characters, not act on the terminal. So:

- control characters (C0, DEL, C1), Unicode format characters (bidirectional overrides such as U+202E,
  zero-width spaces and joiners, the byte-order mark) and line/paragraph separators become visible escapes
  (``\\x1b``, ``\\u202e``), the way file names that are not UTF-8 are already shown (``\\xNN``);
- Rich markup is escaped (``[bold]`` prints as ``[bold]``); emoji codes (``:smile:``) are left alone because
  every console cifarnet prints through is created with ``emoji=False`` (ui.py).

:func:`printable` is the rule for plain text; :func:`safe` adds Rich's markup escaping, for everything
handed to Rich; :func:`clipped` also cuts a long value (a 10,000-character arch in config.json) for a table
cell.
"""

from __future__ import annotations

import os
import re

from rich.markup import escape as _escape_markup

# Cc (C0, DEL, C1), Cf (format: soft hyphen, Arabic/Syriac marks, bidi marks and overrides, zero-width
# spaces and joiners, invisible operators, BOM, interlinear annotation, tags), Zl/Zp (line and paragraph
# separators) and lone surrogates (bytes that were not UTF-8, kept by Python's surrogateescape).
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b-\u200f"
    "\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\ud800-\udfff"
    "\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
    "\U000e0001\U000e0020-\U000e007f]"
)


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape): shown as that byte
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def printable(text: object) -> str:
    """``text`` (any object; paths and bytes-derived names too) with every character that could act on a
    terminal, or hide or reorder what is shown, replaced by a visible escape."""
    value = os.fspath(text) if isinstance(text, os.PathLike) else text
    if isinstance(value, bytes):
        value = value.decode("utf-8", "surrogateescape")
    s = value if isinstance(value, str) else str(value)
    return _UNSAFE.sub(_visible, s) if _UNSAFE.search(s) else s


def safe(text: object) -> str:
    """``text`` as inert Rich input: :func:`printable`, with Rich markup escaped."""
    return _escape_markup(printable(text))


#: Longest value from data a table cell shows (:func:`clipped`).
CELL_LIMIT = 80


def clipped(text: object, limit: int = CELL_LIMIT) -> str:
    """:func:`safe` for a table cell: what is shown cut to ``limit`` characters, the last an ellipsis, so one
    run's oversized field does not widen a listing of every run."""
    shown = printable(text)
    return _escape_markup(shown if len(shown) <= limit else shown[: limit - 1] + "…")
