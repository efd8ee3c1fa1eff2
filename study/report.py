"""The report of a comparison: per-run results, the summary table with its statistics, plots and
diagnostics panels (compare.py trains the runs; this writes what they show).

summarize() is the statistics (a Welch t-test of each variant against the baseline, with the verdict
rule in its docstring); write_outputs() writes results.csv/json, summary.md/json and the plots into
the comparison folder; sweep_report() adds a sweep's table and loss-vs-value plot.
"""
import csv
import json
import os
import platform
import subprocess

import numpy as np
from scipy import stats

from study import plots
from study import sweeps
from training.metrics import RESULT_KEYS
from training.runlog import read_diagnostics, read_metrics

# results.csv's columns: a run's place in the grid, what train() reported (training/metrics.py), and how it ran;
# sweep_value only with a [sweep]
CSV_COLUMNS = ["variant", "seed", "sweep_value", "status", "initial_val_loss", *RESULT_KEYS, "time_to_target_s",
               "run_seconds", "load_at_start", "device", "worker", "run_dir", "error"]
P_THRESHOLD = 0.05
METRIC_NAMES = {"final_val_loss": "final val loss (nats/token)", "final_val_bpb": "final val bits per byte"}


def ranking_metric(rows):
    """"final_val_loss", or "final_val_bpb" when the finished runs' tokenizers differ, by the hash of
    the tokenizer each run recorded (a run without one counts as different): a loss per token depends
    on the tokenizer, bits per byte does not (training/evaluation.py)."""
    hashes = {r.get("tokenizer_hash") for r in rows if r["status"] == "ok"}
    return "final_val_loss" if len(hashes) <= 1 else "final_val_bpb"


def summarize(rows, comparison):
    """Per variant: mean ± std of the ranking metric (ranking_metric: final val loss, or bits per byte
    when the tokenizers differ) over finished seeds, Welch t-test against the baseline.

    Verdict rule: a variant is called "lower"/"higher" than the baseline only when BOTH the Welch
    t-test gives p < 0.05 AND |Δ| >= the pooled seed std, sqrt((s_v² + s_b²) / 2). Otherwise it is
    "within seed noise" when |Δ| < pooled std, and "not significant" when the difference exceeds the
    seed spread but p >= 0.05 (with 3 seeds a real, consistent difference can land there). The std
    condition keeps a tiny but consistent difference (std ~ 0) from being sold as a finding; no
    correction for testing several variants is made, so a lone p just under 0.05 is weak evidence.

    paired_p (shown, not used by the verdict): a paired t-test on the per-seed differences. Runs of one
    seed share their batches and, when the variants change only norms, their random initial weights
    (norm parameters start at constants and draw no random numbers): the pairing is by design."""
    metric = ranking_metric(rows)
    ok = [r for r in rows if r["status"] == "ok"]
    losses = {v: np.array([r[metric] for r in ok if r["variant"] == v]) for v in comparison.variants}
    summary = []
    for variant in comparison.variants:
        baseline = comparison.baseline_for(variant)
        base = losses[baseline]
        mine, runs = losses[variant], [r for r in ok if r["variant"] == variant]
        bpb = [r.get("final_val_bpb") for r in runs if r.get("final_val_bpb") is not None]
        entry = {"variant": variant, "metric": metric, "n_ok": len(mine), "n_runs": len(comparison.seeds),
                 "val_bpb": float(np.mean(bpb)) if bpb else None,
                 "mean": float(mine.mean()) if len(mine) else None,
                 "std": float(mine.std(ddof=1)) if len(mine) > 1 else None,
                 "delta": None, "p_value": None, "paired_p": None, "pooled_std": None,
                 "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in runs])) if runs else None}
        times = [r["time_to_target_s"] for r in runs if r["time_to_target_s"] is not None]
        entry.update(time_to_target_s=float(np.mean(times)) if times else None, n_reached=len(times))
        if variant == baseline:
            entry["verdict"] = "baseline"
        elif len(mine) < 2 or len(base) < 2:
            entry["verdict"] = "too few finished seeds to test"
        else:
            entry["delta"] = float(mine.mean() - base.mean())
            entry["pooled_std"] = float(np.sqrt((mine.var(ddof=1) + base.var(ddof=1)) / 2))
            p = float(stats.ttest_ind(mine, base, equal_var=False).pvalue)
            entry["p_value"] = None if np.isnan(p) else p
            mine_by_seed, base_by_seed = ({r["seed"]: r[metric] for r in ok if r["variant"] == v}
                                          for v in (variant, baseline))
            seeds = sorted(set(mine_by_seed) & set(base_by_seed))
            if len(seeds) >= 2:
                paired = stats.ttest_rel([mine_by_seed[s] for s in seeds], [base_by_seed[s] for s in seeds])
                entry["paired_p"] = None if np.isnan(paired.pvalue) else float(paired.pvalue)
            if entry["p_value"] is None:  # both groups without any spread: nothing to test against
                entry["verdict"] = "identical" if entry["delta"] == 0 else "no seed spread to test against"
            elif abs(entry["delta"]) < entry["pooled_std"]:
                entry["verdict"] = "within seed noise"
            elif p >= P_THRESHOLD:
                entry["verdict"] = f"not significant (p ≥ {P_THRESHOLD})"
            else:
                entry["verdict"] = "lower (better)" if entry["delta"] < 0 else "higher (worse)"
        summary.append(entry)
    return summary


def fmt(value, spec, missing="–"):
    return missing if value is None else format(value, spec)


def markdown_table(summary, comparison):
    metric = summary[0]["metric"] if summary else "final_val_loss"
    other = "val bpb (mean)" if metric == "final_val_loss" else "—"
    lines = [f"| variant | seeds | {METRIC_NAMES[metric]} (mean ± std) | Δ vs {comparison.baseline} | Welch p | verdict "
             f"| paired p | {other} | tokens/s | s to val ≤ {comparison.target_val_loss:g} |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e in summary:
        loss = f"{fmt(e['mean'], '.4f')} ± {fmt(e['std'], '.4f')}"
        reached = "not reached" if not e["n_reached"] else f"{e['time_to_target_s']:.1f} ({e['n_reached']}/{e['n_ok']})"
        bpb = fmt(e.get("val_bpb"), ".4f") if metric == "final_val_loss" else "—"
        lines.append(f"| {e['variant']} | {e['n_ok']}/{e['n_runs']} | {loss} | {fmt(e['delta'], '+.4f')} "
                     f"| {fmt(e['p_value'], '.3f')} | {e['verdict']} | {fmt(e['paired_p'], '.3f')} | {bpb} "
                     f"| {fmt(e['tokens_per_s'], ',.0f')} | {reached} |")
    return "\n".join(lines)


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        return platform.processor() or platform.machine()


def device_name():
    """What a run trains on: the GPU's name, or the CPU model."""
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_model()


def machine():
    import torch
    return f"{cpu_model()}, {os.cpu_count()} CPU threads visible, torch intra-op threads {torch.get_num_threads()}"


def write_outputs(rows, comparison, header):
    out = comparison.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    with open(out / "results.csv", "w", newline="") as f:
        columns = [c for c in CSV_COLUMNS if c != "sweep_value" or comparison.sweep_key is not None]
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    summary = summarize(rows, comparison)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    ok = [r for r in rows if r["status"] == "ok"]
    curves = {v: [read_metrics(r["run_dir"]) for r in ok if r["variant"] == v] for v in comparison.variants}
    plots.plot_loss_curves(curves, out / "val_loss_vs_step.png", out / "val_loss_vs_time.png", comparison.name)
    metric = ranking_metric(rows)
    ranked = "Ranked by final val loss (the runs share one tokenizer)." if metric == "final_val_loss" else \
        "Ranked by val bits per byte: the runs' tokenizers differ, so their losses per token are not comparable."
    text = [f"# Comparison {comparison.name}", "", *header, "", ranked, "", markdown_table(summary, comparison), "",
            f"Verdict rule: a variant differs from the baseline only if the Welch t-test ({METRIC_NAMES[metric]} over "
            f"seeds) gives p < {P_THRESHOLD} AND |Δ| >= the pooled seed std sqrt((s² + s_baseline²) / 2); "
            f"otherwise \"within seed noise\" (|Δ| < pooled std) or \"not significant\" (p >= {P_THRESHOLD}). "
            f"No correction for testing {len(comparison.variants) - 1} variants at once. "
            f"Paired p: a paired t-test over seeds (same seed = same batches and same initial weights), for "
            f"information; the verdict does not use it. Time to target: training "
            f"seconds (eval excluded) at the first eval reaching the target, mean over the seeds that reached it.",
            "", "The curves start at the first eval after step 0: the untrained model's loss (about ln(vocab_size) "
            "for every variant; results.csv's initial_val_loss) would squash the range where the variants differ.",
            "", "![val loss vs step](val_loss_vs_step.png)", "", "![val loss vs time](val_loss_vs_time.png)"]
    if comparison.sweep_key is not None:
        text += sweep_report(rows, comparison)
    failed = [r for r in rows if r["status"] not in ("ok", sweeps.DIVERGED)]
    if failed:
        text += ["", "## Failed runs", ""] + [f"- {r['variant']} seed {r['seed']}: {r['error']}" for r in failed]
    heatmaps = []
    for variant in comparison.variants:
        diagnostics = [d for d in (read_diagnostics(r["run_dir"]) for r in ok if r["variant"] == variant) if d]
        if diagnostics:
            name = f"diagnostics_{variant.replace('@', '_').replace('=', '_')}.png"
            plots.plot_diagnostics(plots.average_diagnostics(diagnostics), out / name,
                                   f"{variant}, mean of {len(diagnostics)} seeds")
            heatmaps += ["", f"### {variant}", "", f"![diagnostics {variant}]({name})"]
    if heatmaps:
        text += ["", "## Per-layer diagnostics (mean over seeds; model/diagnostics.py explains each panel)"] + heatmaps
    (out / "summary.md").write_text("\n".join(text) + "\n")
    return summary


def sweep_report(rows, comparison):
    """The sweep's section of summary.md (table, loss-vs-value plot), and sweep.json."""
    key, out = comparison.sweep_key, comparison.out_dir
    values = list(dict.fromkeys(value for _, value in comparison.points.values()))
    summary = sweeps.summarize_sweep(rows, comparison)
    (out / "sweep.json").write_text(json.dumps(summary, indent=1, default=str))
    plot = f"loss_vs_{key}.png"
    plots.plot_loss_vs_sweep(summary, values, out / plot, comparison.name)
    diverged = [f"- {r['variant']} seed {r['seed']}: {r['error']}" for r in rows if r["status"] == sweeps.DIVERGED]
    follows = " min_lr follows learning_rate at each variant's own min_lr / learning_rate ratio." \
        if key == "learning_rate" else ""
    return ["", f"## Sweep over {key}", "",
            f"Final val loss (mean ± std over the seeds that did not diverge; \"logit\": the largest attention "
            f"logit at the last eval, max over layers, mean over seeds) at each {key}.{follows} LR sensitivity "
            f"(Wortsman et al. 2023): the mean over the swept values of min(final, initial val loss) minus its "
            f"best value, a diverged run counting as its initial (step-0) loss; sweeps.py has the arithmetic.",
            "", sweeps.sweep_table(summary, values), "", f"![final val loss vs {key}]({plot})"] \
        + (["", "Diverged runs (results, not failures):", ""] + diverged if diverged else [])
