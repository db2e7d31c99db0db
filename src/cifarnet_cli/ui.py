"""Terminal rendering with Rich: progress bars when stderr is a terminal, plain log lines when it is
not (CI logs, pipes), nothing but errors with --quiet. The library never prints; it emits events."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from cifarnet_cli.errors import EXIT_BROKEN_PIPE
from cifarnet_cli.events import (
    BenchProgress,
    BoardStatus,
    CheckpointSaved,
    DecodeProgress,
    DownloadProgress,
    EpochEnded,
    EpochStarted,
    Notice,
    RunStarted,
    StepProgress,
    TrainResult,
)
from cifarnet_cli.text import CELL_LIMIT, clipped, printable, safe


class _Console(Console):
    """Every console cifarnet prints through: no emoji codes (``:smile:`` in a file name stays as typed), no
    highlighting; text from data goes through :func:`cifarnet_cli.text.safe`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(emoji=False, highlight=False, **kwargs)

    def on_broken_pipe(self) -> None:
        try:
            super().on_broken_pipe()  # quiet from now on, stdout pointed at /dev/null
        except SystemExit:
            raise SystemExit(EXIT_BROKEN_PIPE) from None  # not 1: the output's reader left, nothing failed


err_console = _Console(stderr=True)
out_console = _Console()


def _line(text: str) -> None:
    """One message on stderr: whole on one line in a file or a pipe, wrapped between words in a terminal."""
    err_console.print(text, soft_wrap=not err_console.is_terminal)


def error(message: str) -> None:
    _line(f"[bold red]Error:[/] {safe(message)}")


def warn(message: str) -> None:
    _line(f"[yellow]{safe(message)}[/]")


def info(message: str) -> None:
    _line(safe(message))


def success(message: str) -> None:
    _line(f"[green]✓[/] {safe(message)}")


def _pct(x: float | None) -> str:
    return "—" if x is None or x != x else f"{100 * x:.2f}%"


class _TrainProgress(Progress):
    """Bars that fit the terminal: as it narrows, the metrics shrink (all of them, then loss, accuracy and
    speed, then loss and accuracy alone) and the elapsed time goes; the bar, the counts and the ETA stay.
    Columns are chosen at every refresh from the widths of what is shown, so a resized terminal is followed."""

    #: (field of the task holding the metrics, whether the elapsed time is shown), richest first.
    TIERS = (("stats", True), ("short", True), ("tiny", False))

    def __init__(self, *, console: Console, **kwargs: Any) -> None:
        self._term = console  # Progress asks for its renderables before its own console is set up
        super().__init__(console=console, **kwargs)

    def _fixed(self, field: str | None, elapsed: bool) -> int:
        """Columns taken by everything but the bar (a space between columns)."""
        tasks = self.tasks or []
        label = max((cell_len(t.description) for t in tasks), default=10)
        counts = max((2 * len(str(int(t.total or 0))) + 1 for t in tasks), default=7)
        stats = max((cell_len(str(t.fields.get(field, ""))) for t in tasks), default=0) if field else 0
        width = label + 1 + counts + 1 + len("eta") + 1 + 7
        if field:
            width += stats + 1
        if elapsed:
            width += 7 + 1
        return width + 1

    def get_renderables(self) -> Any:
        width = self._term.width
        field: str | None = None
        elapsed = False
        for name, with_time in self.TIERS:
            if width - self._fixed(name, with_time) >= 8:
                field, elapsed = name, with_time
                break
        columns: list[Any] = [
            TextColumn("[bold blue]{task.description}"),
            BarColumn(bar_width=max(8, min(40, width - self._fixed(field, elapsed)))),
            MofNCompleteColumn(),
        ]
        if field is not None:
            columns.append(TextColumn("{task.fields[" + field + "]}"))
        if elapsed:
            columns.append(TimeElapsedColumn())
        columns += [TextColumn("eta"), TimeRemainingColumn()]
        self.columns = tuple(columns)
        yield self.make_tasks_table(self.tasks)


class _NoEcho:
    """Keys typed while the bars are live (Ctrl-C's "^C" included) are not echoed: an echoed character at the
    end of a full-width line wraps it, Rich then redraws one line too few and the bars are left behind in
    copies. The terminal's settings are restored on exit."""

    def __init__(self) -> None:
        self._saved: list[Any] | None = None

    def __enter__(self) -> _NoEcho:
        try:
            import termios

            if sys.stdin.isatty():
                fd = sys.stdin.fileno()
                self._saved = termios.tcgetattr(fd)
                quiet = list(self._saved)
                quiet[3] &= ~(termios.ECHO | termios.ECHOCTL)
                termios.tcsetattr(fd, termios.TCSANOW, quiet)
        except (ImportError, OSError, ValueError):  # not a POSIX terminal (Windows, a pipe)
            self._saved = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            import termios

            try:
                termios.tcsetattr(sys.stdin.fileno(), termios.TCSANOW, self._saved)
            except (OSError, ValueError):
                pass
            self._saved = None


class TrainView:
    """Turns engine events into bars (TTY), log lines (no TTY) or silence (--quiet)."""

    def __init__(
        self,
        *,
        quiet: bool = False,
        live: bool | None = None,
        log_every_s: float = 10.0,
        batch_size_auto: bool = False,
    ) -> None:
        self.quiet = quiet
        self.batch_size_auto = batch_size_auto  # the user asked for --batch-size auto
        self.live = err_console.is_terminal if live is None else live
        self.log_every_s = log_every_s
        self._last_log = 0.0
        self._progress: Progress | None = None
        self._run_task: TaskID | None = None
        self._epoch_task: TaskID | None = None
        self._epochs = 0
        self.started: RunStarted | None = None
        self._download: DownloadView | None = None
        self._decode: Progress | None = None
        self._no_echo = _NoEcho()
        self._best: float | None = None
        self._board: BoardStatus | None = None

    # context manager so the live display is always torn down (also on Ctrl-C)
    def __enter__(self) -> TrainView:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._download is not None:
            self._download.__exit__()
            self._download = None
        if self._decode is not None:
            self._decode.stop()
            self._decode = None
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self._no_echo.__exit__()

    def __call__(self, event: Any) -> None:
        if isinstance(event, DownloadProgress):
            if not self.quiet:
                if self._download is None:
                    self._download = DownloadView(description=event.name)
                self._download.progress(event.done, event.total)
                if event.total is not None and event.done >= event.total:
                    self._download.__exit__()
                    self._download = None
            return
        if isinstance(event, DecodeProgress):
            if not self.quiet:
                self._decoding(event)
            return
        if isinstance(event, Notice):
            if not self.quiet:
                self._print(f"[yellow]{safe(event.message)}[/]")
        elif isinstance(event, RunStarted):
            self.started = event
            if not self.quiet:
                self._run_started(event)
        elif self.quiet:
            return
        elif isinstance(event, EpochStarted):
            self._epoch_started(event)
        elif isinstance(event, StepProgress):
            self._step(event)
        elif isinstance(event, EpochEnded):
            self._epoch_ended(event)
        elif isinstance(event, BoardStatus):
            self._board = event
        elif isinstance(event, CheckpointSaved):
            self._print(f"[dim]Saved step {event.step}/{event.steps} of epoch {event.epoch} to {safe(event.path)}[/]")

    def _decoding(self, e: DecodeProgress) -> None:
        """A folder's first read: a bar in a terminal (it can take a minute), a line every 10,240 images
        otherwise; progress, not a warning, so not in yellow."""
        finished = e.done >= e.total
        if not self.live:
            if finished or e.done % 10240 == 0:
                err_console.print(f"Decoding images: {e.done}/{e.total}", soft_wrap=True)
            return
        if self._decode is None:
            self._decode = Progress(
                TextColumn("[bold blue]decoding images"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=err_console,
                transient=True,
            )
            self._decode.start()
            self._decode.add_task("decode", total=e.total)
        self._decode.update(self._decode.task_ids[0], completed=e.done, total=e.total)
        if finished:
            self._decode.stop()
            self._decode = None
            err_console.print(f"Decoded {e.total:,} images", soft_wrap=True)

    def _print(self, text: str) -> None:
        console = self._progress.console if self._progress is not None else err_console
        console.print(text, soft_wrap=not console.is_terminal)  # a terminal wraps a long notice between words

    def _run_started(self, e: RunStarted) -> None:
        verb = f"Resuming run {e.run} after epoch {e.start_epoch}" if e.start_epoch else f"Run {e.run}"
        if e.start_step:
            verb = f"Resuming run {e.run} at step {e.start_step} of epoch {e.start_epoch + 1}"
        self._print(f"[bold]{safe(verb)}[/] → {safe(e.run_dir)}")
        why = f" ({safe(e.precision_reason)})" if e.precision_reason and e.precision_reason != "asked for" else ""
        step = ", step captured as CUDA graphs" if e.step_mode == "graph" else ""
        self._print(f"Device: {safe(e.device)}, precision {e.precision}{why}{step}")
        self._print(
            f"Data: {safe(e.data)}: {e.train_images:,} training images, {e.eval_images:,} for {e.eval_split}"
            + ("" if e.on_device_data else " (kept in pinned host memory)")
        )
        accum = f" × accum {e.accum}" if e.accum > 1 else ""
        self._print(
            f"Model: {e.arch}, {e.parameters:,} parameters"
            + (f" ({e.trainable_parameters:,} trainable)" if e.trainable_parameters != e.parameters else "")
            + f"; batch {e.batch_size}{accum} = effective batch {e.effective_batch}, peak lr {e.peak_lr:g}, "
            f"{e.epochs} epoch{'s' if e.epochs != 1 else ''}"
        )
        if self.batch_size_auto and not e.device.startswith("cuda"):
            self._print(
                f"--batch-size auto fits the micro-batch to a GPU's free memory; on {safe(e.device.split(' (')[0])} "
                f"it is the recipe's: {e.batch_size} × accum {e.accum} = effective batch {e.effective_batch}."
            )
        self._epochs = e.epochs
        if self.live:
            self._no_echo.__enter__()
            # The run's ETA comes from its fractional progress (epochs + steps), averaged over a minute.
            self._progress = _TrainProgress(console=err_console, transient=False, speed_estimate_period=60)
            self._progress.start()
            self._run_task = self._progress.add_task(
                "run", total=e.epochs, completed=e.start_epoch, stats="", short="", tiny=""
            )

    def _epoch_started(self, e: EpochStarted) -> None:
        if self._progress is not None:
            if self._epoch_task is not None:
                self._progress.remove_task(self._epoch_task)
            self._epoch_task = self._progress.add_task(
                f"epoch {e.epoch}/{e.epochs}", total=e.steps, stats="", short="", tiny=""
            )

    def _gpu(self) -> str:
        """A Jetson's GPU temperature, and whether it throttles (BoardStatus, every few seconds)."""
        board = self._board
        if board is None or board.temp_c is None:
            return ""
        return f"  GPU {board.temp_c:.0f}°C" + (" [bold red]throttling[/]" if board.throttling else "")

    def _step(self, e: StepProgress) -> None:
        gpu = self._gpu()
        stats = f"loss {e.loss:.3f}  acc {_pct(e.accuracy)}  lr {e.lr:.4g}  {e.images_per_second:,.0f} img/s{gpu}"
        if self._progress is not None and self._epoch_task is not None:
            short = f"loss {e.loss:.3f}  acc {_pct(e.accuracy)}  {e.images_per_second:,.0f} img/s{gpu}"
            tiny = f"loss {e.loss:.2f} acc {100 * e.accuracy:.1f}%"
            self._progress.update(self._epoch_task, completed=e.step, stats=stats, short=short, tiny=tiny)
            if self._run_task is not None:
                self._progress.update(self._run_task, completed=e.epoch - 1 + e.step / max(e.steps, 1))
            return
        now = time.monotonic()
        if now - self._last_log >= self.log_every_s:
            self._last_log = now
            err_console.print(f"epoch {e.epoch}/{self._epochs} step {e.step}/{e.steps}  {stats}", soft_wrap=True)

    def _epoch_ended(self, e: EpochEnded) -> None:
        m = e.metrics
        best = " [green]best[/]" if e.is_best else ""
        on = self.started.eval_split if self.started is not None else "val"  # "test" with --val-split 0
        line = (
            f"epoch {m['epoch']:>3}/{self._epochs}  train loss {m['train_loss']:.4f} acc {_pct(m['train_accuracy'])}"
            f"  {on} loss {m['val_loss'] if m['val_loss'] is not None else float('nan'):.4f}"
            f" acc {_pct(m['val_accuracy'])}  lr {m['lr']:.4g}  {m['images_per_second']:,.0f} img/s"
            f"  {m['epoch_seconds']:.1f}s{best}"
        )
        self._print(line)
        if m.get("val_accuracy") is not None and (self._best is None or m["val_accuracy"] > self._best):
            self._best = m["val_accuracy"]
        if self._progress is not None and self._run_task is not None:
            best = f"best {_pct(self._best)}" if self._best is not None else ""
            self._progress.update(self._run_task, completed=m["epoch"], stats=best, short=best, tiny=best)


def train_summary(result: TrainResult, eval_split: str | None = None) -> None:
    table = Table(
        title="Training finished" if not result.already_finished else "Run already finished", show_header=False
    )
    table.add_column("", no_wrap=True)
    table.add_column("")
    label = f" ({eval_split})" if eval_split else ""
    table.add_row("run", safe(result.run))
    table.add_row("epochs", str(result.epochs))
    table.add_row(f"best accuracy{label}", _pct(result.best_accuracy))
    table.add_row(f"final accuracy{label}", _pct(result.final_accuracy))
    table.add_row("training speed", f"{result.images_per_second:,.0f} images/s")
    table.add_row("checkpoint", PathCell(result.checkpoint))
    print_fitted(err_console, lambda _d: table, wrap=True)


class DownloadView:
    """A byte progress bar on a terminal; notices (failures, retries, warnings) as yellow lines."""

    def __init__(self, *, quiet: bool = False, description: str = "download") -> None:
        self.quiet = quiet
        self.description = description
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> DownloadView:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._task = None

    def notify(self, message: str) -> None:
        # Warnings about verification are printed even with --quiet.
        if not self.quiet or message.startswith("WARNING"):
            console = self._progress.console if self._progress else err_console
            console.print(f"[yellow]{safe(message)}[/]", soft_wrap=not console.is_terminal)

    def progress(self, done: int, total: int | None) -> None:
        if self.quiet or not err_console.is_terminal:
            return
        if self._progress is None:
            from rich.progress import DownloadColumn, TransferSpeedColumn

            self._progress = Progress(
                TextColumn("[bold blue]{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=err_console,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=total)
        assert self._task is not None
        self._progress.update(self._task, completed=done, total=total)


class PathCell:
    """A path in a table cell that a narrow column breaks after its separators ("runs/ref/" + "best.pt") or
    a space, not in the middle of a name; a single name longer than the column is folded. Plain text: no
    markup is read from it."""

    def __init__(self, path: object, style: str = "") -> None:
        self.path = printable(path)  # the one rule for text from data (cifarnet_cli.text), without markup
        self.style = style

    def _pieces(self) -> list[str]:
        pieces = re.findall(r"[^/\\\s]*(?:[/\\]|\s+)|[^/\\\s]+$", self.path)
        return pieces or [self.path]

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        longest = max(cell_len(piece) for piece in self._pieces())
        return Measurement(min(longest, options.max_width), min(cell_len(self.path), options.max_width))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Any:
        width = max(1, options.max_width)
        lines: list[str] = []
        line = ""
        for piece in self._pieces():
            if line and cell_len((line + piece).rstrip()) > width:
                lines.append(line.rstrip())
                line = ""
            line += piece
            while cell_len(line.rstrip()) > width:  # one name longer than the column
                lines.append(line[:width])
                line = line[width:]
        lines.append(line.rstrip())
        yield Text("\n".join(lines), style=self.style, no_wrap=True, overflow="fold")


def _print_table(console: Console, table: Table, *, wide: Console | None = None) -> None:
    """``table`` with its title on a line of its own: Rich would centre the title over the table, wrap it to
    the table's width (a narrow table's title took several lines) and pad it with spaces to that width
    (trailing spaces in a file). The title wraps between words in a terminal and stays one line in a file;
    the table itself goes through ``wide`` when it is wider than the terminal."""
    title, table.title = table.title, None
    if title:
        # emoji=False as on every console of ours: ":smile:" in a run folder's name stays as typed
        text = Text.from_markup(title, emoji=False) if isinstance(title, str) else Text(printable(title))
        text.stylize("table.title")
        console.print(text, soft_wrap=not console.is_terminal)
    (wide or console).print(table)


#: Wider than any table: printed through a console this wide, a table takes its natural width.
_UNLIMITED = 10_000


def _natural_width(console: Console, table: Table) -> int:
    """The width of ``table``'s cells and borders; not of its title, which :func:`_print_table` prints on
    lines of its own."""
    title, table.title = table.title, None
    try:
        return console.measure(table, options=console.options.update(width=_UNLIMITED)).maximum
    finally:
        table.title = title


def print_fitted(
    console: Console, build: Callable[[set[str]], Table], droppable: Sequence[str] = (), *, wrap: bool = False
) -> None:
    """Print the table ``build(dropped)`` without cutting a cell: in a terminal too narrow for it, drop the
    ``droppable`` columns (least important first) until it fits; when output goes to a file or a pipe, print
    it at its full width (Rich would otherwise squeeze it into 80 columns and truncate names with "…")."""
    dropped: set[str] = set()
    table = build(dropped)
    if console.is_terminal:
        for name in droppable:
            if _natural_width(console, table) <= console.width:
                break
            dropped.add(name)
            table = build(dropped)
    if wrap and console.is_terminal and _natural_width(console, table) > console.width:
        _print_table(console, table)  # its wrapping columns (a state, a recipe value) take the lines they need
        return
    _print_wide(console, table)


def _print_wide(console: Console, table: Table) -> None:
    """Print ``table`` at its natural width, wider than the console if need be. Redirected output is not
    measured first: a measurement is a whole pass over the cells (a quarter of the time of printing
    100,000 predictions), and a table never grows wider than its natural width anyway."""
    width = _natural_width(console, table) if console.is_terminal else _UNLIMITED
    wide = None
    if width > console.width:
        # Console.print clamps its width argument to the console's: print through a wider twin instead.
        wide = _Console(
            file=console.file,
            width=width,
            force_terminal=console.is_terminal,
            color_system=console.color_system,
        )
    _print_table(console, table, wide=wide)


def abbreviations(names: Sequence[str], *, shortest: int = 3) -> list[str]:
    """The shortest unique prefixes of ``names`` (at least ``shortest`` characters): airplane → air,
    automobile → aut, deer → dee, dog → dog. Numbers when prefixes would stay long (custom classes
    that share a stem, like class_01, class_02)."""
    out = []
    for name in names:
        n = min(shortest, len(name))
        while n < len(name) and any(o != name and o.startswith(name[:n]) for o in names):
            n += 1
        out.append(name[:n])
    if len(set(out)) < len(out) or max((len(a) for a in out), default=0) > 6:
        return [str(i) for i in range(len(names))]
    return out


def eval_tables(report: Any, console: Console | None = None) -> None:
    """Overall and per-class accuracy, then the confusion matrix (rows: true class). Class names are never
    cut: the matrix's columns use short unique abbreviations, explained in a legend."""
    console = console or out_console
    head = f"Accuracy on {safe(report.split)}: [bold]{_pct(report.accuracy)}[/] of {report.n:,} images"
    if report.unrestricted_accuracy is not None:
        head += (
            f" (over {len(report.classes)} classes; {_pct(report.unrestricted_accuracy)} choosing among all classes)"
        )
    if report.tta:
        head += ", flip TTA"
    # whole lines in a file; wrapped between words in a terminal (not cut mid-word by the terminal)
    console.print(head, soft_wrap=not console.is_terminal)
    console.print(f"[dim]{safe(report.checkpoint)} on {safe(report.data)}[/]", soft_wrap=not console.is_terminal)

    def per_class(_dropped: set[str]) -> Table:
        per = Table(title="Per-class accuracy")
        per.add_column("class", no_wrap=True)
        per.add_column("accuracy", justify="right", no_wrap=True)
        per.add_column("images", justify="right", no_wrap=True)
        for name in report.classes:
            per.add_row(safe(name), _pct(report.per_class[name]), f"{report.per_class_n[name]:,}")
        return per

    print_fitted(console, per_class)
    short = abbreviations(report.classes)

    def matrix(dropped: set[str]) -> Table:
        compact = "full row names" in dropped
        title = "Confusion matrix (rows: true class, columns: predicted)"
        # Narrow terminals: abbreviated row names, no vertical rules, one space between columns (10 classes
        # with 4-digit counts then fit in 60 columns).
        cm = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 0, 0, 1)) if compact else Table(title=title)
        cm.add_column("", no_wrap=True)
        for s in short:
            cm.add_column(safe(s), justify="right", no_wrap=True)
        for i, row in enumerate(report.confusion):
            cm.add_row(
                safe(short[i] if compact else report.classes[i]),
                *[f"[bold]{v}[/]" if i == j else (str(v) if v else "[dim]·[/]") for j, v in enumerate(row)],
            )
        return cm

    print_fitted(console, matrix, droppable=["full row names"])
    if short != list(report.classes):
        legend = "  ".join(f"{safe(a)}={safe(c)}" for a, c in zip(short, report.classes, strict=True))
        console.print(legend, soft_wrap=not console.is_terminal)  # a file gets it on one line, never cut at 80
    if getattr(report, "files", None):
        err_console.print(
            f"Wrote {', '.join(safe(Path(f).name) for f in report.files)} to {safe(str(Path(report.files[0]).parent))}",
            soft_wrap=not err_console.is_terminal,
        )


def prediction_table(predictions: list[Any], top_k: int, console: Console | None = None) -> None:
    """One row per input, in input order; files that could not be read say why in an "error" column. A
    narrow terminal folds long cells; output to a file or a pipe keeps each row on one line (paths whole)."""
    console = console or out_console
    show_next = top_k > 1 and any(p.top and len(p.top) > 1 for p in predictions)
    show_error = any(p.error is not None for p in predictions)
    table = Table()
    table.add_column("file")  # PathCell: a narrow terminal breaks a path after a "/", not inside a name
    # The answer is never cut: a narrow terminal folds the file, next and error columns instead.
    longest = max((len(safe(p.top[0][0])) for p in predictions if p.error is None and p.top), default=5)
    table.add_column("class", no_wrap=True, min_width=max(5, longest))
    header = "probability" if console.width >= 100 or not console.is_terminal else "prob"
    table.add_column(header, justify="right", no_wrap=True, min_width=len(header))
    if show_next:
        table.add_column("next", overflow="fold")
    if show_error:
        table.add_column("error", overflow="fold")
    for p in predictions:
        row: list[Any]
        if p.error is not None:
            row = [PathCell(p.path), "[red]—[/]", ""] + ([""] if show_next else []) + [f"[red]{safe(p.error)}[/]"]
        else:
            (cls, prob), rest = p.top[0], p.top[1:]
            row = [PathCell(p.path), safe(cls), f"{100 * prob:.1f}%"]
            if show_next:
                row.append("  ".join(f"{safe(c)} {100 * q:.1f}%" for c, q in rest))
            if show_error:
                row.append("")
        table.add_row(*row)
    if console.is_terminal:
        _print_table(console, table)
    else:
        _print_wide(console, table)


class BenchView:
    """One line per measurement on stderr (a bench run is a handful of steps of seconds each)."""

    def __init__(self, *, quiet: bool = False) -> None:
        self.quiet = quiet

    def __call__(self, event: Any) -> None:
        if self.quiet:
            return
        if isinstance(event, BenchProgress):
            err_console.print(f"[dim][{event.index}/{event.total}][/] {safe(event.what)}", soft_wrap=True)
        elif isinstance(event, Notice):
            err_console.print(f"[yellow]{safe(event.message)}[/]", soft_wrap=not err_console.is_terminal)


def _rate(x: float | None) -> str:
    return "—" if x is None else f"{x:,.0f}"


def bench_tables(result: dict[str, Any]) -> None:
    env = result["environment"]
    where = env.get("gpu", env["device"]) + (
        f" (compute capability {env['compute_capability']})" if "gpu" in env else ""
    )
    out_console.print(
        f"[bold]cifarnet bench[/] on {safe(where)}, torch {safe(env['torch'])}"
        + (" (--quick)" if result["quick"] else "")
        + f", {result['seconds']:.0f} s"
    )
    t = Table(title="ResNet-20 training, images/s (effective batch 512, crop + flip on the device)")
    for col in ("precision", "micro-batch", "eager", "CUDA graphs", "speed-up"):
        t.add_column(col, justify="right" if col not in ("precision",) else "left")
    rows: dict[tuple[str, int], dict[bool, float]] = {}
    accums: dict[int, int] = {}
    for r in result["train"]:
        rows.setdefault((r["precision"], r["batch_size"]), {})[r["capture"]] = r["images_per_second"]
        accums[r["batch_size"]] = r["accum"]
    for (precision, batch), rates in rows.items():
        eager, graph = rates.get(False), rates.get(True)
        speedup = f"{graph / eager:.2f}×" if eager and graph else "—"
        t.add_row(precision, f"{batch} × {accums[batch]}", _rate(eager), _rate(graph), speedup)
    print_fitted(out_console, lambda _d: t, wrap=True)
    full = result.get("full_epoch")
    if full:
        out_console.print(
            f"One {full['images']:,}-image epoch of the default recipe ({full['precision']}, batch {full['batch_size']}"
            f"{', CUDA graphs' if full['capture'] else ''}): {full['seconds']:.2f} s, "
            f"[bold]{full['images_per_second']:,.0f}[/] images/s"
        )
    p, f = result["predict"], result["finetune"]
    s = Table(title="Inference and fine-tuning", show_header=False)
    s.add_column()
    s.add_column(justify="right")
    s.add_row(f"predict latency, batch 1 ({p['precision']})", f"{p['latency_ms_batch1']:.2f} ms")
    s.add_row("predict throughput, batch 256", f"{p['images_per_second_batch256']:,.0f} images/s")
    s.add_row(
        f"finetune-resnet50 ({f['precision']}, batch {f['batch_size']} × {f['accum']})",
        f"{f['images_per_second']:,.1f} images/s",
    )
    if f.get("peak_memory_bytes") is not None:
        s.add_row("finetune-resnet50 peak GPU memory", f"{f['peak_memory_bytes'] / 2**30:.2f} GiB")
    elif f.get("process_peak_rss_bytes") is not None:
        s.add_row("process peak resident memory", f"{f['process_peak_rss_bytes'] / 2**30:.2f} GiB")
    print_fitted(out_console, lambda _d: s, wrap=True)
    d = result.get("distributed")
    if d:
        what = f"ResNet-20, {d['processes']} processes (DDP), {d['batch_size']} × {d['accum']}, {d['precision']}"
        if d.get("error"):
            out_console.print(f"{what}: [red]{safe(str(d['error']))}[/]")
        else:
            out_console.print(
                f"{what}: [bold]{d['images_per_second']:,.0f}[/] images/s against {d['one_process_images_per_second']:,.0f} "
                f"for one process: scaling efficiency {100 * d['scaling_efficiency']:.0f}%"
            )


def info_tables(data: dict[str, Any]) -> None:
    def gib(x: int | None) -> str:
        return "—" if x is None else f"{x / 2**30:.1f} GiB"

    t = Table(title="cifarnet", show_header=False)
    t.add_column()
    t.add_column()
    for key in ("cifarnet", "python", "platform", "torch", "torchvision"):
        t.add_row(key, safe(data[key]))
    t.add_row("CUDA build", f"yes (CUDA {data['cuda_version']})" if data["cuda_build"] else "no (CPU-only torch)")
    gpus = sum(1 for dev in data["devices"] if dev["type"] == "cuda")
    why = data.get("cuda_unavailable_reason")
    t.add_row(
        "CUDA", f"available ({gpus} GPU{'s' if gpus != 1 else ''})" if gpus else f"not available ({why or 'no GPU'})"
    )
    if data["jetson"]:
        t.add_row("Jetson", safe(data["jetson"]))
    t.add_row("default device", safe(data["default_device"]))
    t.add_row("precisions", safe("; ".join(f"{k}: {', '.join(v)}" for k, v in data["precisions"].items())))
    print_fitted(out_console, lambda _d: t, wrap=True)
    d = Table(title="Devices")
    for col in ("device", "name", "memory", "compute capability", "--precision auto"):
        d.add_column(col)
    for dev in data["devices"]:
        auto = dev.get("precision_auto", "")
        if dev.get("precision_reason"):
            auto += f" ({dev['precision_reason'].split(': ', 1)[-1]})"
        if dev["type"] == "cuda":
            mem = gib(dev["total_memory_bytes"])
            if dev.get("available_memory_bytes") is not None:
                mem += f" (unified; {gib(dev['available_memory_bytes'])} available)"
            elif dev.get("free_memory_bytes") is not None:
                mem += f" ({gib(dev['free_memory_bytes'])} free)"
            d.add_row(f"cuda:{dev['index']}", safe(dev["name"]), mem, safe(dev["compute_capability"]), safe(auto))
        else:
            d.add_row(safe(dev["type"]), safe(dev.get("name", "")), "", "", safe(auto))
    print_fitted(out_console, lambda _d: d, wrap=True)
    p = Table(title="Files", show_header=False)
    p.add_column(no_wrap=True)
    p.add_column()  # PathCell: a narrow terminal breaks a path after a "/", never cuts it
    for key, value in data["directories"].items():
        p.add_row(key, PathCell(value))
    for key, value in data["assets"].items():
        p.add_row(key, PathCell(value) if value else f"[dim]not downloaded (cifarnet download {key})[/]")
    print_fitted(out_console, lambda _d: p, wrap=True)


_DOCTOR_STYLE = {"ok": "green", "warning": "yellow", "problem": "bold red"}


def doctor_table(report: Any, console: Console | None = None) -> None:
    """One row per check: its status in colour, what was found, and the command that fixes it."""
    console = console or out_console
    fixes = any(c.fix for c in report.checks)
    table = Table(title="cifarnet doctor", box=box.SIMPLE_HEAD)
    for col in ("", "check", "found", "fix")[: 4 if fixes else 3]:
        table.add_column(col, overflow="fold")
    area = None
    for c in report.checks:
        if c.area != area and area is not None:
            table.add_section()
        area = c.area
        row = [f"[{_DOCTOR_STYLE.get(c.status, '')}]{c.status}[/]", safe(c.name), safe(c.detail)]
        table.add_row(*row, *([safe(c.fix)] if fixes else []))
    _print_table(console, table)  # the title on a line of its own, like every other table's
    counts = f"{report.problems} problem{'s' * (report.problems != 1)}, {report.warnings} warning{'s' * (report.warnings != 1)}"
    (error if report.problems else warn if report.warnings else success)(
        f"{counts}; training runs on {report.training_device}"
    )


# --------------------------------------------------------------------------------------------------
# cifarnet runs

_STATE_STYLE = {
    "running": "bold blue",
    "finished": "green",
    "stopped-early": "green",
    "stopped": "yellow",
    "damaged": "red",
}


def _acc(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def runs_table(summaries: list[Any], console: Console | None = None) -> None:
    """One row per run, newest first. In a narrow terminal the least useful columns go first; the name,
    epochs, best accuracy and state always stay."""
    console = console or out_console
    if not summaries:
        err_console.print("No runs yet; train one with `cifarnet train`.")
        return
    columns: list[tuple[str, Callable[[Any], str], str]] = [
        ("run", lambda s: clipped(s.name), "left"),
        ("task", lambda s: s.command, "left"),
        ("arch", lambda s: clipped(s.arch), "left"),
        ("epochs", lambda s: f"{s.epochs_done}/{s.epochs_planned}", "right"),
        ("best", lambda s: _acc(s.best_accuracy) + (f" @{s.best_epoch}" if s.best_epoch else ""), "right"),
        ("final", lambda s: _acc(s.final_accuracy), "right"),
        ("on", lambda s: clipped(s.split), "left"),
        ("img/s", lambda s: f"{s.images_per_second:,.0f}" if s.images_per_second else "—", "right"),
        ("device", lambda s: clipped(s.device.split(" (")[0]), "left"),
        ("updated", lambda s: safe(s.updated.replace("T", " ")[:16]), "left"),
        ("state", lambda s: f"[{_STATE_STYLE.get(s.state, 'dim')}]{clipped(s.status, 2 * CELL_LIMIT)}[/]", "left"),
    ]

    def build(dropped: set[str]) -> Table:
        table = Table(title=f"Runs in {safe(str(Path(summaries[0].path).parent))}", title_justify="left")
        shown = [c for c in columns if c[0] not in dropped]
        for header, _get, justify in shown:
            wraps = header == "state"  # the one column that may take several lines in a narrow terminal
            table.add_column(
                header,
                justify=justify,  # type: ignore[arg-type]
                no_wrap=not wraps,
                overflow="fold" if wraps else "ellipsis",
            )
        for s in summaries:
            table.add_row(*[get(s) for _h, get, _j in shown])
        return table

    print_fitted(console, build, droppable=["device", "task", "img/s", "on", "updated", "arch", "final"], wrap=True)


def run_detail(d: Any, console: Console | None = None) -> None:
    console = console or out_console
    s = d.summary
    wrap_lines = not console.is_terminal  # a file gets each line whole; a terminal wraps them between words
    console.print(f"[bold]{safe(s.name)}[/] → {safe(s.path)}", soft_wrap=wrap_lines)
    console.print(
        f"{s.command} {clipped(s.arch)}, {s.epochs_done}/{s.epochs_planned} epochs, "
        f"[{_STATE_STYLE.get(s.state, 'dim')}]{safe(s.status)}[/]; best {_acc(s.best_accuracy)}"
        + (f" (epoch {s.best_epoch})" if s.best_epoch else "")
        + f", final {_acc(s.final_accuracy)} on {clipped(s.split)}"
        + (f"; {clipped(s.device)}" if s.device else ""),
        soft_wrap=wrap_lines,
    )

    def recipe(_dropped: set[str]) -> Table:
        table = Table(title="Recipe", show_header=False, title_justify="left")
        table.add_column(no_wrap=True)
        table.add_column(overflow="fold")
        for key, value in d.recipe_rows():
            table.add_row(safe(key), safe(value))
        return table

    print_fitted(console, recipe, wrap=True)
    if d.metrics:

        def metrics(dropped: set[str]) -> Table:
            table = Table(title="Per epoch", title_justify="left")
            cols = [
                ("epoch", lambda r: str(r["epoch"])),
                ("train loss", lambda r: _num(r.get("train_loss"))),
                ("train acc", lambda r: _acc(r.get("train_accuracy"))),
                (f"{s.split} loss", lambda r: _num(r.get("val_loss"))),  # "test" with --val-split 0
                (
                    f"{s.split} acc",
                    lambda r: _acc(r.get("val_accuracy")) + (" *" if r["epoch"] == s.best_epoch else "  "),
                ),
                (
                    "lr",
                    lambda r: (
                        f"{_num(r.get('lr_first'), '.3g')}→{_num(r.get('lr'), '.3g')}"
                        if "lr_first" in r
                        else _num(r.get("lr"))
                    ),
                ),
                ("img/s", lambda r: f"{r.get('images_per_second') or 0:,.0f}"),
                ("seconds", lambda r: _num(r.get("epoch_seconds"), ".1f")),
            ]
            shown = [c for c in cols if c[0] not in dropped]
            for header, _get in shown:
                table.add_column(header, justify="right", no_wrap=True)
            for row in d.metrics:
                table.add_row(*[get(row) for _h, get in shown])
            return table

        print_fitted(console, metrics, droppable=["seconds", "img/s", "train loss", "lr"])
    if d.evaluations:
        print_fitted(console, lambda dropped: _evaluations_table(d.evaluations, dropped), ["file"], wrap=True)
    files = Table(title="Files", title_justify="left")
    files.add_column("file")  # PathCell: a narrow terminal breaks names after a "/"; the box stays whole
    files.add_column("size", justify="right", no_wrap=True)
    for name, size in d.files:
        files.add_row(PathCell(name), _size(size))
    print_fitted(console, lambda _d: files, wrap=True)
    if d.resume:
        console.print(f"Continue it with: [bold]{safe(d.resume)}[/]", soft_wrap=True)


def _evaluations_table(evaluations: list[dict[str, Any]], dropped: set[str]) -> Table:
    """One row per eval-*.json: what was evaluated (split, class subset, TTA), on which data, the result and
    the file. In a narrow terminal the file column goes first (the Files table lists it), then the data
    wraps after its "/"s; the figures never wrap."""
    table = Table(title="Evaluations", title_justify="left")
    table.add_column("split")
    table.add_column("data")
    table.add_column("accuracy", justify="right", no_wrap=True)
    table.add_column("images", justify="right", no_wrap=True)
    if "file" not in dropped:
        table.add_column("file")
    for e in evaluations:
        what = str(e.get("split"))
        subset = e.get("classes")
        if subset:
            what += f" ({', '.join(subset)})" if len(subset) <= 3 else f" ({len(subset)} classes)"
        if e.get("tta"):
            what += ", TTA"
        data = str(e.get("data") or "—")
        if e.get("runs_own_data"):
            data += ", the run's own"
        elif e.get("data_fingerprint"):  # two states of one folder differ here (and in the file name)
            data += f", data {str(e['data_fingerprint'])[:8]}"
        n = e.get("n")
        cells: list[Any] = [
            safe(what),
            PathCell(data),
            _acc(e.get("accuracy")),
            f"{n:,}" if isinstance(n, int) else "—",
        ]
        if "file" not in dropped:
            cells.append(PathCell(e["file"]))
        table.add_row(*cells)
    return table


def compare_table(c: Any, console: Console | None = None) -> None:
    console = console or out_console

    def build(_dropped: set[str]) -> Table:
        table = Table(title="Runs compared (recipe options that differ, then results)", title_justify="left")
        table.add_column("", no_wrap=True)
        for s in c.summaries:
            table.add_column(clipped(s.name), justify="right", overflow="fold")  # narrow: values wrap, keys stay
        for key, values in c.differences.items():
            table.add_row(
                safe(key.replace("_", "-")),
                *["—" if v is None else clipped(v if isinstance(v, str) else json.dumps(v)) for v in values],
            )
        if not c.differences:
            table.add_row("[dim](same recipe)[/]", *["" for _ in c.summaries])
        table.add_section()
        table.add_row("epochs", *[f"{s.epochs_done}/{s.epochs_planned}" for s in c.summaries])
        table.add_row(
            "best", *[_acc(s.best_accuracy) + (f" @{s.best_epoch}" if s.best_epoch else "") for s in c.summaries]
        )
        table.add_row("final", *[_acc(s.final_accuracy) for s in c.summaries])
        table.add_row("on", *[clipped(s.split) for s in c.summaries])
        table.add_row("img/s", *[f"{s.images_per_second:,.0f}" if s.images_per_second else "—" for s in c.summaries])
        table.add_row("state", *[clipped(s.status, 2 * CELL_LIMIT) for s in c.summaries])
        return table

    print_fitted(console, build, wrap=True)
    if c.plot:
        err_console.print(f"Validation curves: {safe(c.plot)}", soft_wrap=True)


def _num(x: Any, fmt: str = ".4f") -> str:
    return "—" if not isinstance(x, int | float) else format(x, fmt)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)
