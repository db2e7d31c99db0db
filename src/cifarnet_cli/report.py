"""Pictures of a run: training curves (``curves.png``), confusion matrices and overlaid validation curves
of several runs. Every file is written to a temporary name and renamed, so a reader (or a kill) never
sees half a PNG.

matplotlib is optional (``pip install 'cifarnet[plot]'``); without it the functions return None and the
caller says how to get it. Kept free of torch: only the figure's numbers come in.
"""

from __future__ import annotations

import io
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cifarnet_cli import fileio
from cifarnet_cli.events import EpochEnded, EpochStarted
from cifarnet_cli.runs import Run
from cifarnet_cli.text import printable

PLOT_HINT = "Install matplotlib to get curves.png in the run folder: pip install 'cifarnet[plot]'."


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float, height: float, columns: int) -> tuple[Any, Any] | None:
    """A figure and its axes on the Agg canvas, without pyplot (no global state: safe in a thread)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, columns, squeeze=False)[0]


def _save(fig: Any, target: Path, within: Path | None = None) -> Path:
    """Render in memory, then replace ``target`` atomically (fileio: the user's umask, errors naming it;
    ``within``: a folder that must still exist, see fileio.atomic_writer)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=110, format="png")
    fileio.write_bytes(target, buffer.getvalue(), within=within)
    return target


def _label(text: str, limit: int | None = None) -> str:
    """A class or run name as a plot label: printable (cifarnet_cli.text), at most ``limit`` characters (an
    ellipsis ends a cut one), and a "$" is a dollar sign, not the start of matplotlib's math markup (an
    unbalanced one fails the whole drawing)."""
    shown = printable(text)
    if limit is not None and len(shown) > limit:
        shown = shown[: limit - 1] + "\u2026"
    return shown.replace("$", r"\$")


#: The longest class name a confusion matrix's axes show whole: longer ones (120 characters) squeezed the
#: matrices to nothing ("constrained_layout not applied") and the picture was unreadable.
TICK_LABEL_LIMIT = 24


def _integer_epochs(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)


def best_epoch(rows: Sequence[dict[str, Any]]) -> int | None:
    """The first epoch with the highest validation accuracy (the one best.pt holds)."""
    best, best_acc = None, -math.inf
    for row in rows:
        acc = row.get("val_accuracy")
        if isinstance(acc, int | float) and acc > best_acc:
            best, best_acc = row["epoch"], acc
    return best


# --------------------------------------------------------------------------------------------------
# curves.png


def plot_curves(
    rows: Sequence[dict[str, Any]],
    target: Path,
    *,
    title: str,
    epochs: int | None = None,
    step_lrs: Sequence[float] | None = None,
    steps_per_epoch: int | None = None,
    eval_split: str = "val",
    patience: int = 0,
) -> Path | None:
    """Write :func:`curves_figure` to ``target``; None when there is nothing to draw or no matplotlib."""
    fig = curves_figure(
        rows,
        title=title,
        epochs=epochs,
        step_lrs=step_lrs,
        steps_per_epoch=steps_per_epoch,
        eval_split=eval_split,
        patience=patience,
    )
    return _save(fig, target) if fig is not None else None


def stopped_early(rows: Sequence[dict[str, Any]], planned: int, patience: int) -> int | None:
    """The epoch after which ``--patience`` stopped the run (as the engine decides it), or None."""
    done = max((r["epoch"] for r in rows), default=0)
    best = best_epoch(rows)
    if patience and best and done < planned and done - best >= patience:
        return done
    return None


def curves_figure(
    rows: Sequence[dict[str, Any]],
    *,
    title: str,
    epochs: int | None = None,
    step_lrs: Sequence[float] | None = None,
    steps_per_epoch: int | None = None,
    eval_split: str = "val",
    patience: int = 0,
) -> Any:
    """Loss, accuracy and learning rate of a run (a matplotlib Figure); None when there is nothing to draw
    or no matplotlib. Every epoch is a marked point, so a 1-epoch run shows points, not empty axes.

    ``step_lrs`` (the rate of every optimizer step of the planned run) draws the schedule per step, solid
    for the steps done and dotted for the rest, so the warm-up ramp and the cosine are visible; without
    it the per-epoch rates of ``rows`` are drawn. ``eval_split`` names what the run evaluated on after each
    epoch: its validation split, or the test split (``--val-split 0``). A run ``patience`` stopped early is
    marked where it stopped.
    """
    if not rows:
        return None
    made = _figure(13, 3.6, 3)
    if made is None:
        return None
    fig, (loss_ax, acc_ax, lr_ax) = made
    epoch_x = [r["epoch"] for r in rows]
    done = max(epoch_x)
    planned = max(epochs or done, done)
    point = {"marker": "o", "markersize": 4}
    evaluated = "validation" if eval_split == "val" else eval_split

    def series(key: str, scale: float = 1.0) -> list[float]:
        return [scale * r[key] if isinstance(r.get(key), int | float) else math.nan for r in rows]

    loss_ax.plot(epoch_x, series("train_loss"), label="train", **point)
    if any(r.get("val_loss") is not None for r in rows):
        loss_ax.plot(epoch_x, series("val_loss"), label=evaluated, **point)
    loss_ax.set_title("loss")
    acc_ax.plot(epoch_x, series("train_accuracy", 100), label="train", **point)
    if any(r.get("val_accuracy") is not None for r in rows):
        acc_ax.plot(epoch_x, series("val_accuracy", 100), label=evaluated, **point)
    acc_ax.set_title("accuracy (%)")
    best = best_epoch(rows)
    if best is not None:
        acc = 100 * next(r["val_accuracy"] for r in rows if r["epoch"] == best)
        # In the legend, not beside the star: a note there runs into the axes' edge near the last epoch.
        acc_ax.plot(
            [best], [acc], marker="*", markersize=14, color="tab:red", linestyle="none", label=f"best {acc:.2f}%"
        )

    if step_lrs and steps_per_epoch:
        x = [(s + 1) / steps_per_epoch for s in range(len(step_lrs))]
        n_done = min(done * steps_per_epoch, len(step_lrs))
        many = n_done > 60
        lr_ax.plot(x[:n_done], step_lrs[:n_done], marker=None if many else ".", label="per optimizer step")
        if n_done < len(step_lrs):
            lr_ax.plot(x[n_done - 1 :], step_lrs[n_done - 1 :], linestyle=":", color="grey", label="planned")
        lr_ax.set_title("learning rate (per optimizer step)")
    else:
        lr_ax.plot(epoch_x, series("lr"), label="last step of the epoch", **point)
        lr_ax.set_title("learning rate")
    stop = stopped_early(rows, planned, patience)
    for ax in (loss_ax, acc_ax, lr_ax):
        if best is not None:
            ax.axvline(best, color="tab:red", alpha=0.3, linestyle="--", linewidth=1, label=f"best epoch ({best})")
        if stop is not None:
            ax.axvline(stop, color="black", alpha=0.6, linestyle=":", linewidth=1.2, label="stopped early")
        _integer_epochs(ax)
        ax.set_xlim(0, planned * 1.03 + 0.1)
        # "best" asked for, not defaulted: matplotlib then places it clear of the curves without warning on
        # stderr (in the middle of the epoch lines) when that takes long on a busy machine.
        ax.legend(fontsize=8, loc="best")
    if stop is not None:
        fig.suptitle(f"{title}: stopped early after epoch {done} of {planned} (--patience {patience})")
    else:
        fig.suptitle(f"{title}: epoch {done} of {planned}")
    return fig


#: The largest share of a run's time that redrawing curves.png may take.
BUDGET = 0.1


class CurvesWriter:
    """Redraws ``curves.png`` after every epoch, as a consumer of the engine's events.

    A drawing costs about a third of a second of CPU (``python bench/plot_curves.py``), as long as a whole
    epoch of ResNet-20 on a big GPU, so it runs in a background thread: the training thread only hands the
    epoch over (under a millisecond) and the next epoch starts at once. When epochs are shorter than ten
    drawings, requests that arrive meanwhile collapse into one (at most :data:`BUDGET` of the time goes to
    drawing). :meth:`close` draws the last state (also after Ctrl-C, so the picture shows every saved epoch).
    """

    def __init__(
        self,
        run: Run,
        *,
        epochs: int,
        lr_schedule: Callable[[int], list[float]] | None = None,
        background: bool = True,
        eval_split: str = "val",
        patience: int = 0,
    ) -> None:
        self.run = run
        self.epochs = epochs
        self.eval_split = eval_split
        self.patience = patience
        self.lr_schedule = lr_schedule
        self.background = background
        self.draw_seconds: list[float] = []
        self.written: Path | None = None
        self.error: str | None = None
        self._steps: int | None = None
        self._lrs: list[float] | None = None
        self._cond = threading.Condition()
        self._pending = False
        self._closing = False
        self._thread: threading.Thread | None = None

    def __call__(self, event: object) -> None:
        if isinstance(event, EpochStarted):
            self._steps = event.steps
        elif isinstance(event, EpochEnded):
            self.request()

    def request(self) -> None:
        if not self.background:
            self.draw()
            return
        with self._cond:
            self._pending = True
            self._cond.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="cifarnet-curves", daemon=True)
                self._thread.start()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return
                self._pending = False
            start = time.perf_counter()
            self.draw()
            # Epochs shorter than ten drawings (a big GPU): rest so that drawing takes at most a tenth of
            # the time; the requests of the epochs in between collapse into one, and close() ends the rest.
            with self._cond:
                self._cond.wait_for(lambda: self._closing, timeout=(time.perf_counter() - start) * (1 / BUDGET - 1))

    def draw(self) -> Path | None:
        if self.error is not None:
            return None
        start = time.perf_counter()
        try:
            if self._lrs is None and self.lr_schedule is not None and self._steps:
                self._lrs = self.lr_schedule(self._steps)
            path = plot_curves(
                self.run.read_metrics(),
                self.run.curves_file,
                title=self.run.name,
                epochs=self.epochs,
                step_lrs=self._lrs,
                steps_per_epoch=self._steps,
                eval_split=self.eval_split,
                patience=self.patience,
            )
        except Exception as exc:  # noqa: BLE001 - a picture must never stop training
            self.error = f"{type(exc).__name__}: {exc}"
            return None
        if path is not None:
            self.written = path
            self.draw_seconds.append(time.perf_counter() - start)
        return path

    def close(self) -> Path | None:
        """Finish the pending drawing; return curves.png, or None when none was written."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        return self.written


# --------------------------------------------------------------------------------------------------
# evaluate and compare


def plot_confusion(
    confusion: Sequence[Sequence[int]], classes: Sequence[str], target: Path, *, title: str, within: Path | None = None
) -> Path | None:
    """Counts and row-normalised confusion matrices side by side (rows: true class)."""
    n = len(classes)
    classes = [_label(c, TICK_LABEL_LIMIT) for c in classes]
    # Room for the rotated class names under each matrix and for every line of the title; a gap between the
    # panels so the first colour bar's label stays clear of the second matrix's class names.
    extra = 0.25 * title.count("\n")
    made = _figure(min(8 + 1.0 * n, 23), min(4.2 + 0.45 * n, 12) + extra, 2)
    if made is None:
        return None
    fig, (counts_ax, norm_ax) = made
    fig.get_layout_engine().set(w_pad=0.15, wspace=0.12)
    totals = [sum(row) for row in confusion]
    normalised = [[v / t if t else 0.0 for v in row] for row, t in zip(confusion, totals, strict=True)]
    for ax, values, fmt, label in (
        (counts_ax, confusion, "{:d}", "images"),
        (norm_ax, normalised, "{:.2f}", "share of the true class"),
    ):
        image = ax.imshow(values, cmap="Blues", vmin=0)
        bar = fig.colorbar(image, ax=ax, shrink=0.8, label=label)
        if values is confusion:
            from matplotlib.ticker import MaxNLocator

            bar.locator = MaxNLocator(integer=True)
            bar.update_ticks()
        ax.set_xticks(range(n), classes, rotation=45, ha="right")
        ax.set_yticks(range(n), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if n <= 20:
            top = max((max(r) for r in values), default=0) or 1
            for i in range(n):
                for j in range(n):
                    v = values[i][j]
                    ax.text(
                        j,
                        i,
                        fmt.format(v),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if v > top / 2 else "black",
                    )
    counts_ax.set_title("counts")
    norm_ax.set_title("row-normalised")
    fig.suptitle("\n".join(_label(line) for line in title.split("\n")))  # each line made printable
    return _save(fig, target, within)


def plot_compare(
    curves: Mapping[str, Sequence[dict[str, Any]]], target: Path, *, splits: Mapping[str, str] | None = None
) -> Path | None:
    """Validation accuracy and loss of several runs, overlaid; a run that evaluated on the test split
    (``--val-split 0``, ``splits[name] == "test"``) says so in the legend."""
    made = _figure(11, 3.8, 2)
    if made is None:
        return None
    fig, (acc_ax, loss_ax) = made
    splits = splits or {}
    for name, rows in curves.items():
        x = [r["epoch"] for r in rows]
        label = _label(name) if splits.get(name, "val") == "val" else f"{_label(name)} ({splits[name]} split)"
        acc_ax.plot(
            x,
            [100 * r["val_accuracy"] if r.get("val_accuracy") is not None else math.nan for r in rows],
            marker="o",
            markersize=3,
            label=label,
        )
        loss_ax.plot(
            x,
            [r["val_loss"] if r.get("val_loss") is not None else math.nan for r in rows],
            marker="o",
            markersize=3,
            label=label,
        )
    evaluated = "validation" if all(v == "val" for v in splits.values()) else "validation (or test)"
    acc_ax.set_title(f"{evaluated} accuracy (%)")
    loss_ax.set_title(f"{evaluated} loss")
    for ax in (acc_ax, loss_ax):
        _integer_epochs(ax)
        ax.legend(fontsize=8)
    return _save(fig, target)
