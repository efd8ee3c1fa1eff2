"""Steps and seconds to reach the baseline's final val loss: the metric of the nGPT paper (Loshchilov et
al. 2025 report how many fewer steps nGPT needs for the loss the baseline ends at), read from every
run's metrics.jsonl in a finished comparison.

    python analyze.py to-target <comparison dir> [--baseline VARIANT] [--target LOSS]

target: the mean over seeds of the baseline variant's final val loss (the comparison's baseline unless
--baseline; a fixed value with --target). Per variant, over its seeds:
  - steps to target: the first eval step whose val loss is <= target; evals come every eval_interval
    steps, so this is an upper bound to within one interval;
  - seconds to target: the training seconds (elapsed_s: evals and saves excluded) at that eval;
  - a run that never reaches the target is counted ("2/4 reached"), never dropped; the mean and its
    CI are over the runs that reached it, and say so;
  - the final val loss at equal steps (every run trains max_steps), mean and CI;
  - speedup in steps: the baseline's steps over each seed's steps to target; the baseline's steps are
    its full run (it reaches its own final loss at the end, by construction of the target), or with
    --target the mean steps of the baseline's seeds that reached it.
CIs are 95 % Student t intervals over seeds (mean ± t * s / sqrt(n)); none for a single seed.
Outputs in the comparison folder: to_target.md (also printed), to_target.json, to_target_vs_step.png and
to_target_vs_time.png (the mean curves, with the target line).
"""
import json
from pathlib import Path

import numpy as np
from scipy import stats

from config import UserError
from study import plots
from training.runlog import read_metrics


def mean_ci(values):
    """(mean, half-width of the 95 % t interval) of values; (None, None) if empty, (mean, None) for one."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    if len(values) == 1:
        return float(values[0]), None
    sem = np.std(values, ddof=1) / np.sqrt(len(values))
    return float(np.mean(values)), float(stats.t.ppf(0.975, len(values) - 1) * sem)


def first_reaching(metrics, target):
    """(step, elapsed_s) at the first eval with val loss <= target, or (None, None)."""
    hit = next((r for r in metrics if r.get("val_loss") is not None and r["step"] > 0 and r["val_loss"] <= target), None)
    return (None, None) if hit is None else (hit["step"], hit["elapsed_s"])


def final_eval(metrics):
    return [r for r in metrics if r.get("val_loss") is not None][-1]


def to_target(runs, baseline, target=None):
    """runs: {variant: [metrics rows of each seed]} -> (target, [one entry per variant])."""
    if baseline not in runs or not runs[baseline]:
        raise UserError(f"baseline {baseline!r} has no finished run; variants: {', '.join(runs)}")
    if target is None:
        target = float(np.mean([final_eval(m)["val_loss"] for m in runs[baseline]]))
        reference_steps = max(final_eval(m)["step"] for m in runs[baseline])
    else:
        reference_steps = mean_ci([first_reaching(m, target)[0] for m in runs[baseline]])[0]
    entries = []
    for variant, seeds in runs.items():
        hits = [first_reaching(m, target) for m in seeds]
        steps = [s for s, _ in hits if s is not None]
        seconds = [t for _, t in hits if t is not None]
        max_steps = [final_eval(m)["step"] for m in seeds]
        entries.append({
            "variant": variant, "n": len(seeds), "n_reached": len(steps),
            "steps_to_target": mean_ci(steps), "seconds_to_target": mean_ci(seconds),
            "speedup_steps": mean_ci([reference_steps / s for s, _ in hits if s and reference_steps]),
            "final_val_loss": mean_ci([final_eval(m)["val_loss"] for m in seeds]),
            "final_step": max(max_steps), "training_seconds": mean_ci([final_eval(m)["elapsed_s"] for m in seeds]),
            "per_seed": [{"steps": s, "seconds": t} for s, t in hits]})
    return target, entries


def fmt(mean_and_ci, spec):
    mean, ci = mean_and_ci
    if mean is None:
        return "–"
    return format(mean, spec) + ("" if ci is None else f" ± {format(ci, spec)}")


def table(target, entries, baseline, fixed=False):
    source = f"fixed (--target); speedups against {baseline}" if fixed else f"the mean final val loss of {baseline}"
    lines = [f"Target: {target:.4f} nats/token, {source}. ± is a 95 % t interval over seeds.",
             "",
             "| variant | reached | steps to target | seconds to target | speedup in steps | final val loss "
             "(step {}) | training s (all steps) |".format(entries[0]["final_step"]),
             "|---|---|---|---|---|---|---|"]
    for e in entries:
        partial = e["n_reached"] < e["n"] and e["n_reached"] > 0
        note = " (of runs that reached it)" if partial else ""
        reached = "never" if not e["n_reached"] else f"{e['n_reached']}/{e['n']}"
        lines.append(f"| {e['variant']} | {reached} | {fmt(e['steps_to_target'], '.0f')}{note} | "
                     f"{fmt(e['seconds_to_target'], '.1f')}{note} | {fmt(e['speedup_steps'], '.2f')}{note} | "
                     f"{fmt(e['final_val_loss'], '.4f')} | {fmt(e['training_seconds'], '.1f')} |")
    return "\n".join(lines)


def run_to_target(folder, baseline=None, target=None, log=print):
    """The analysis of a finished comparison folder (its results.json) -> to_target.md/.json/.png."""
    folder = Path(folder)
    results = folder / "results.json"
    if not results.is_file():
        raise UserError(f"{str(folder)!r} has no results.json; give the out_dir of a finished comparison")
    rows = json.loads(results.read_text())
    bad = [f"{r['variant']} seed {r['seed']}: {r['status']}" for r in rows if r["status"] != "ok"]
    if bad:  # a diverged or missing run would silently shrink a variant's seeds
        raise UserError(f"not every run finished ({'; '.join(bad)}); finish them (compare.py) before to-target")
    runs = {}
    for r in rows:
        runs.setdefault(r["variant"], []).append(read_metrics(r["run_dir"]))
    if baseline is None:  # the comparison's own: its summary.json marks it
        summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else []
        baseline = next((e["variant"] for e in summary if e.get("verdict") == "baseline"), None)
        if baseline is None:
            raise UserError(f"{str(folder)!r}: no summary.json names a baseline; give --baseline VARIANT")
    fixed = target is not None
    target, entries = to_target(runs, baseline, target)
    text = f"# Steps and seconds to target: {folder.name}\n\n{table(target, entries, baseline, fixed)}\n"
    (folder / "to_target.md").write_text(text + "\n![val loss vs step](to_target_vs_step.png)\n\n"
                                         "![val loss vs time](to_target_vs_time.png)\n")
    (folder / "to_target.json").write_text(json.dumps({"target": target, "baseline": baseline, "variants": entries},
                                                      indent=1))
    plots.plot_loss_curves(runs, folder / "to_target_vs_step.png", folder / "to_target_vs_time.png", folder.name,
                           target=target)
    log(text + f"\nwritten: {folder / 'to_target.md'}, to_target.json, to_target_vs_step.png, to_target_vs_time.png")
    return target, entries
