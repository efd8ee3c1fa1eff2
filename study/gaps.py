"""`analyze.py gaps <comparison dir>`: each variant's val-loss gap to the baseline at every eval step,
paired by seed.

Within a seed every variant sees the same batches, so gap(step) = val loss(variant) − val loss(baseline)
on the same fixed validation windows is the measurement and the seeds are its replicates. Per variant
and eval step it reports the mean gap ± sd, a 95% t interval, and the share of the step-0 gap left
(mean gap / mean step-0 gap). The question it was built for (configs/study_need_gemma3.toml): a model
started from pretrained weights with one site changed is fine-tuned beside the unchanged one; a gap that
closes means the weights relied on the old site, one that stays means the model needs it.
"""
import json
from pathlib import Path

import numpy as np
from scipy import stats

from config import UserError
from study import plots
from training.runlog import read_metrics


def val_losses(run_dir):
    return {r["step"]: r["val_loss"] for r in read_metrics(run_dir) if r.get("val_loss") is not None}


def gap_rows(results, baseline):
    """[{variant, step, gaps (per seed), mean, sd, ci, left}] for every variant but the baseline."""
    ok = [r for r in results if r["status"] == "ok"]
    losses = {(r["variant"], r["seed"]): val_losses(r["run_dir"]) for r in ok}
    variants = list(dict.fromkeys(r["variant"] for r in ok if r["variant"] != baseline))
    rows = []
    for variant in variants:
        seeds = sorted(s for v, s in losses if v == variant and (baseline, s) in losses)
        steps = sorted(set.intersection(*[set(losses[variant, s]) & set(losses[baseline, s]) for s in seeds])) if seeds else []
        first = None
        for step in steps:
            g = np.array([losses[variant, s][step] - losses[baseline, s][step] for s in seeds])
            row = {"variant": variant, "step": step, "seeds": seeds, "gaps": g.tolist(), "mean": float(g.mean()),
                   "sd": None, "ci": None}
            if len(g) > 1:
                sd = float(g.std(ddof=1))
                half = float(stats.t.ppf(0.975, len(g) - 1) * sd / np.sqrt(len(g)))
                row.update(sd=sd, ci=[row["mean"] - half, row["mean"] + half])
            first = row["mean"] if first is None else first
            row["left"] = row["mean"] / first if first else None
            rows.append(row)
    return rows


def markdown(rows, folder, baseline):
    lines = [f"# Gap to {baseline} at each eval step, paired by seed: {folder}", "",
             f"gap = val loss (variant) − val loss ({baseline}) on the same windows, per seed (same seed = same "
             f"batches); 95% CI: Student's t over seeds; left: mean gap / mean gap at the first eval.", "",
             "| variant | step | seeds | gap (mean ± sd) | 95% CI | left | per seed |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = "–" if r["ci"] is None else f"[{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}]"
        sd = "–" if r["sd"] is None else f"{r['sd']:.4f}"
        left = "–" if r["left"] is None else f"{r['left']:.1%}"
        lines.append(f"| {r['variant']} | {r['step']} | {len(r['seeds'])} | {r['mean']:+.4f} ± {sd} | {ci} | {left} "
                     f"| {', '.join(f'{g:+.4f}' for g in r['gaps'])} |")
    return "\n".join(lines) + "\n"


def run_gaps(folder, baseline=None, log=print):
    folder = Path(folder)
    results = folder / "results.json"
    if not results.is_file():
        raise UserError(f"{str(folder)!r} has no results.json; give a comparison's out_dir (compare.py writes it)")
    data = json.loads(results.read_text())
    baseline = baseline or data[0]["variant"]  # compare.py's default baseline: the first variant
    if not any(r["variant"] == baseline and r["status"] == "ok" for r in data):
        raise UserError(f"{str(folder)!r} has no finished run of the baseline {baseline!r}; "
                        f"variants: {', '.join(sorted({r['variant'] for r in data}))}")
    rows = gap_rows(data, baseline)
    if not rows:
        raise UserError(f"{str(folder)!r}: no variant shares a seed and an eval step with {baseline!r}")
    text = markdown(rows, folder, baseline)
    (folder / "gaps.md").write_text(text)
    (folder / "gaps.json").write_text(json.dumps(rows, indent=1))
    plots.plot_gaps(rows, baseline, folder / "gaps.png", str(folder))
    log(text + f"\nwritten: {folder / 'gaps.md'}, gaps.json, gaps.png")
    return rows
