"""Training curves of a run (loss, accuracy and learning rate per epoch) drawn to ``curves.png``.

matplotlib is optional (``pip install 'cifarnet[plot]'``); without it the caller is told how to get it.
"""

from __future__ import annotations

from pathlib import Path

from cifarnet_cli.runs import Run

PLOT_HINT = "Install matplotlib to get curves.png in the run folder: pip install 'cifarnet[plot]'."


def plot_curves(run: Run) -> Path | None:
    """Write ``<run>/curves.png``; return its path, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = run.read_metrics()
    if not rows:
        return None
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), constrained_layout=True)
    ax = axes[0]
    ax.plot(epochs, [r["train_loss"] for r in rows], label="train")
    if any(r.get("val_loss") is not None for r in rows):
        ax.plot(epochs, [r.get("val_loss") for r in rows], label="validation")
    ax.set_title("loss")
    ax.legend()
    ax = axes[1]
    ax.plot(epochs, [100 * r["train_accuracy"] for r in rows], label="train")
    if any(r.get("val_accuracy") is not None for r in rows):
        ax.plot(epochs, [100 * (r.get("val_accuracy") or 0) for r in rows], label="validation")
    ax.set_title("accuracy (%)")
    ax.legend()
    ax = axes[2]
    ax.plot(epochs, [r["lr"] for r in rows])
    ax.set_title("learning rate (end of epoch)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.suptitle(run.name)
    target = run.dir / "curves.png"
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target
