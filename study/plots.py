"""The PNGs of a comparison and of the probe: loss curves, diagnostics heatmaps, probe bars.

Headless (Agg backend): these run in CI and under nohup, where there is no display.
"""
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402


def eval_curve(metrics):
    """(steps, elapsed seconds, val losses) of a run's eval rows, step 0 left out: it is the
    untrained model (log(vocab_size) for every variant) and would squash the interesting range."""
    rows = [r for r in metrics if r.get("val_loss") is not None and r["step"] > 0]
    return (np.array([r["step"] for r in rows]), np.array([r["elapsed_s"] for r in rows]),
            np.array([r["val_loss"] for r in rows]))


def plot_loss_curves(curves, path_step, path_time, title="", target=None):
    """curves: {variant: [metrics rows of each seed]}. One line per variant: the mean over seeds,
    with a min-max band. Against wall-clock, x is the mean over seeds of the training seconds at
    each eval step (seeds of one variant share their eval steps). target: a dashed line at that loss."""
    for path, use_time in ((path_step, False), (path_time, True)):
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        for variant, runs in curves.items():
            runs = [eval_curve(m) for m in runs]
            n = min((len(r[0]) for r in runs), default=0)  # a failed or short seed trims the curve
            if n == 0:
                continue
            losses = np.stack([r[2][:n] for r in runs])
            x = np.stack([r[1][:n] for r in runs]).mean(0) if use_time else runs[0][0][:n]
            line, = ax.plot(x, losses.mean(0), marker="o", markersize=3, label=f"{variant} ({len(runs)} seeds)")
            ax.fill_between(x, losses.min(0), losses.max(0), color=line.get_color(), alpha=0.2, linewidth=0)
        if target is not None:
            ax.axhline(target, color="black", linestyle="--", linewidth=0.8, label=f"target {target:.3f}")
        ax.set_xlabel("training seconds (eval excluded)" if use_time else "step")
        ax.set_ylabel("val loss (nats/token)")
        ax.set_title(f"{title}: val loss vs {'wall-clock' if use_time else 'step'}", fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # no finished run: no legend (matplotlib warns on an empty one)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


HEATMAPS = [("input_rms", "RMS of norm input", "sites"), ("offset_ratio", "|mean| / rms of norm input", "sites"),
            ("mean_share", "mean² / mean(x²) of norm input", "sites"), ("resid_rms", "residual RMS after block", "blocks"),
            ("grad_norm", "gradient norm per block", "blocks"), ("attn_max_logit", "max attention logit", "blocks"),
            ("attn_entropy", "mean attention entropy (nats)", "blocks"),
            ("act_ratio", "max / median |activation| after block", "blocks"), ("log_z", "mean log Z of output logits", "output")]
PANELS_PER_ROW = 5


def average_diagnostics(runs):
    """Element-wise mean over seeds of diagnostics.jsonl rows, at the eval steps all seeds share."""
    steps = sorted(set.intersection(*[{r["step"] for r in rows} for rows in runs])) if runs else []
    by_step = [{r["step"]: r for r in rows} for rows in runs]
    mean = []
    for step in steps:
        entry = {"step": step, "sites": by_step[0][step]["sites"]}
        for key, _, _ in HEATMAPS:  # a line logged by older code may lack a key
            values = [b[step].get(key) for b in by_step if b[step].get(key) is not None]
            entry[key] = np.mean(values, axis=0).tolist() if values else None
        mean.append(entry)
    return mean


def plot_diagnostics(rows, path, title=""):
    """Heatmaps (layer x eval step) of every diagnostic in rows (diagnostics.jsonl, or a seed mean)."""
    n_rows = -(-len(HEATMAPS) // PANELS_PER_ROW)
    fig, axes = plt.subplots(n_rows, PANELS_PER_ROW, figsize=(3.3 * PANELS_PER_ROW, 3.2 * n_rows), dpi=80,
                             squeeze=False)
    for ax in axes.flat[len(HEATMAPS):]:
        ax.set_axis_off()
    steps = [r["step"] for r in rows]
    for ax, (key, label, kind) in zip(axes.flat, HEATMAPS):
        # grad_norm is null before the first step; nGPT has no norm sites (empty lists)
        present = [r for r in rows if r.get(key) is not None and np.size(r[key])]
        if not present:
            ax.set_axis_off()
            continue
        # rows: sites, blocks or the one output row; columns: eval steps
        grid = np.array([np.atleast_1d(r[key]) for r in present], dtype=float).T
        image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        names = {"sites": rows[0]["sites"], "output": ["logits"]}.get(kind, [f"block{i}" for i in range(grid.shape[0])])
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ticks = range(0, len(present), -(-len(present) // 5))  # at most 5 labels, evenly spaced
        ax.set_xticks(ticks, [present[i]["step"] for i in ticks], fontsize=7)
        ax.set_xlabel("step", fontsize=8)
        ax.set_title(label, fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(f"{title} (eval steps {steps[0]}..{steps[-1]})" if steps else title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_probe(rows, path, title=""):
    """Horizontal bars: change in val loss when each norm site's re-centering is flipped."""
    fig, ax = plt.subplots(figsize=(6.4, 0.35 * len(rows) + 1.2), dpi=100)
    labels = [f"{r['site']} ({r['norm']})" for r in rows]
    colors = ["tab:gray" if r["recenters"] is None else "tab:blue" if r["recenters"] else "tab:orange" for r in rows]
    deltas = np.array([r["delta"] for r in rows])
    ci = np.array([r.get("ci95") or [r["delta"]] * 2 for r in rows])  # a probe.json from before the intervals has none
    ax.barh(range(len(rows)), deltas, color=colors, xerr=[deltas - ci[:, 0], ci[:, 1] - deltas], error_kw={"lw": 0.8})
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("Δ val loss when the site is flipped (nats/token), with its 95% interval")
    # a long name wraps rather than running off the figure
    ax.set_title(textwrap.fill(title, 70) + "\nblue: re-centering removed, orange: re-centering added, "
                 "gray: site removed", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_loss_vs_sweep(summary, values, path, title=""):
    """Final val loss against the swept value, one line per variant (sweeps.summarize_sweep): the mean
    over seeds of min(final, initial) loss, diverged runs counted at the initial loss (an x marks a
    value where some seed diverged). Log x-axis when every value is a positive number."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    xs = values if numeric else list(range(len(values)))
    for s in summary:
        points = [(x, s["capped_means"][v], s["values"][v]["n_diverged"]) for x, v in zip(xs, values)
                  if v in s["capped_means"]]
        if not points:
            continue
        line, = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=s["variant"])
        bad = [p for p in points if p[2]]
        ax.scatter([p[0] for p in bad], [p[1] for p in bad], marker="x", s=80, color=line.get_color(), zorder=3)
    if numeric and all(v > 0 for v in values):
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(xs, [str(v) for v in values])
    ax.set_xlabel(summary[0]["key"] if summary else "")
    ax.set_ylabel("final val loss (nats/token)")
    ax.set_title(f"{title}: final val loss (diverged = initial loss, marked x)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_recentering(records, statistics, threshold, path, title="", floor=1e-7):
    """One log-log panel per statistic: |Δ val loss| of each (run, site) flip against the statistic of
    the site's input; blue: LayerNorm sites (mean subtraction removed), orange: others (added); the
    dashed line is the |Δ| threshold. Values below `floor` are drawn at it (a flip can give exactly 0)."""
    columns = min(4, len(statistics))
    rows = -(-len(statistics) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.6 * rows), dpi=90, squeeze=False)
    for ax in axes.flat[len(statistics):]:
        ax.set_visible(False)
    y = np.maximum([r["abs_delta"] for r in records], floor)
    for ax, statistic in zip(axes.flat, statistics):
        x = np.maximum([r[statistic] for r in records], floor)
        for recenters, color, label in ((True, "tab:blue", "LayerNorm: removed"), (False, "tab:orange", "other: added")):
            mask = np.array([r["recenters"] == recenters for r in records])
            if mask.any():
                ax.scatter(x[mask], y[mask], s=12, alpha=0.7, color=color, label=label)
        ax.axhline(threshold, color="black", linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # labels of 2x, 3x.. overlap on short ranges
        ax.set_xlabel(f"{statistic} of norm input", fontsize=9)
        ax.set_ylabel("|Δ val loss| when the site is flipped", fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"re-centering predictor: {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_gaps(rows, baseline, path, title=""):
    """Each variant's mean gap to the baseline against step, with its 95% interval as a band."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=90)
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        steps, means = [r["step"] for r in mine], [r["mean"] for r in mine]
        line, = ax.plot(steps, means, marker="o", label=variant)
        if all(r["ci"] is not None for r in mine):
            ax.fill_between(steps, [r["ci"][0] for r in mine], [r["ci"][1] for r in mine], color=line.get_color(), alpha=0.2)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.set_xlabel("step")
    ax.set_ylabel(f"val loss − {baseline} (nats/token)")
    ax.set_title(f"gap to {baseline}, mean over seeds, 95% CI: {title}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
