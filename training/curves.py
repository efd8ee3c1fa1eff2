"""A run's own curves: train and val loss, and the learning rate, against step -> <run dir>/curves.png.

Redrawn from metrics.jsonl at every evaluation (train.py's Recorder, outside the timed part of the
step), so the picture of a run that is still training or was killed is never older than its last eval.
Drawn with matplotlib's object API on the Agg canvas: no pyplot, so no global backend and no figure
left open in a process that trains many runs (compare.py). A comparison's plots are study/plots.py's.
"""
import os
from pathlib import Path

CURVES = "curves.png"


def plot_run_curves(rows, path, title=""):
    """rows: metrics.jsonl lines. Top: train loss at every log step, val loss at every eval (step 0
    included: the untrained model's loss is where the curve starts); bottom: the learning rate."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 5.0), dpi=100)
    FigureCanvasAgg(fig)
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    for key, label, style in (("train_loss", "train loss", "-"), ("val_loss", "val loss", "o-")):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            loss_ax.plot(*zip(*points), style, markersize=3, label=label)
    loss_ax.set_ylabel("loss (nats/token)")
    loss_ax.set_title(title, fontsize=9)
    loss_ax.grid(alpha=0.3)
    loss_ax.legend(fontsize=8)
    points = [(r["step"], r["lr"]) for r in rows if r.get("lr") is not None]
    if points:
        lr_ax.plot(*zip(*points), color="tab:green")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step")
    lr_ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")  # renamed over the old picture: a kill leaves one whole
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
