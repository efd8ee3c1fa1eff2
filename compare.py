"""Compare norm variants on validation loss: every (variant, seed) trained by train.train().

    python compare.py configs/compare_default.toml

A comparison is a TOML file:

    base_config = "configs/default.toml"   # optional: a train config to start from
    out_dir = "runs/compare_default"        # the comparison folder
    seeds = [1, 2, 3]
    baseline = "layernorm"                  # the variant every other one is tested against
    target_val_loss = 5.0                   # time-to-target: training seconds until val loss <= this
    [base]                                  # optional: overrides on top of base_config
    max_steps = 300
    [variants.layernorm]                    # one table per variant: its config overrides
    norm = "layernorm"
    [variants.mixed]
    block_norms = "layernorm*2,rmsnorm*2"

An optional [sweep] table crosses every variant with every value of one config key, e.g.
learning_rate = [3e-3, 1e-2, 3e-2]; sweeps.py names the grid's points and computes LR sensitivity.

Runs go to <out_dir>/runs/<variant>/seed<seed> (with a sweep: runs/<variant>/<key>_<value>/seed<seed>). A run only differs from its siblings by the variant's
overrides: the seed alone picks the training batches (data/batches.py), and the validation windows are
fixed, so every variant of one seed sees the same batches in the same order (tests/test_compare.py).
Outputs in <out_dir>: results.csv and results.json (one row per run), summary.md (also printed) and
summary.json, val_loss_vs_step.png, val_loss_vs_time.png, and diagnostics_<variant>.png when the runs
record diagnostics; with a sweep also sweep.json and loss_vs_<key>.png. A run that diverges (non-finite
losses) is a result, with status "diverged", not a failure.
"""
import csv
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

import plots
import sweeps
from checkpoint import list_checkpoints
from config import Config, UserError, apply_overrides, load_config, read_toml, run_main
from model.norms import check_model_config
from runlog import read_diagnostics, read_metrics

COMPARISON_KEYS = {"base_config", "base", "out_dir", "seeds", "baseline", "target_val_loss", "variants", "sweep"}
RESULT_KEYS = ["variant", "seed", "sweep_value", "status", "initial_val_loss", "final_val_loss", "best_val_loss", "final_train_loss", "tokens_per_s",
               "wall_seconds", "time_to_target_s", "steps", "n_params", "corpus_hash", "run_seconds", "load_at_start",
               "run_dir", "error"]
P_THRESHOLD = 0.05


@dataclass
class Comparison:
    name: str
    out_dir: Path
    seeds: list
    baseline: str
    target_val_loss: float
    runs: list  # [(label, seed, Config)], seeds outer, variants inner; label: sweeps.point_label
    sweep_key: str | None = None
    points: dict = field(default_factory=dict)  # label -> (variant, sweep value)

    @property
    def variants(self):
        """The points of the grid: the variants, or with a sweep every (variant, value) label."""
        return list(dict.fromkeys(v for v, _, _ in self.runs))

    @property
    def base_variants(self):
        return list(dict.fromkeys(v for v, _ in self.points.values()))

    def baseline_for(self, label):
        """The baseline variant at the same sweep value: points are tested against their own value."""
        if self.sweep_key is None:
            return self.baseline
        return sweeps.point_label(self.baseline, self.sweep_key, self.points[label][1])


def load_comparison(path):
    """Read and check a comparison TOML; every run's config is built and validated before any trains."""
    path = Path(path)
    spec = read_toml(path, "comparison file", "configs/compare_*.toml")
    unknown = sorted(set(spec) - COMPARISON_KEYS)
    if unknown:
        raise UserError(f"{path}: unknown key(s) {', '.join(unknown)}; a comparison has {', '.join(sorted(COMPARISON_KEYS))}")
    variants, seeds = spec.get("variants"), spec.get("seeds")
    if not isinstance(variants, dict) or not variants or not all(isinstance(v, dict) for v in variants.values()):
        raise UserError(f"{path}: give at least one variant as a table, e.g. [variants.rmsnorm] with norm = \"rmsnorm\"")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise UserError(f"{path}: seeds must be a non-empty list of distinct integers, got {seeds!r}")
    baseline = spec.get("baseline", next(iter(variants)))
    if baseline not in variants:
        raise UserError(f"{path}: baseline {baseline!r} is not a variant; variants: {', '.join(variants)}")
    target = spec.get("target_val_loss")
    if not isinstance(target, (int, float)) or isinstance(target, bool):
        raise UserError(f"{path}: target_val_loss must be a number (the val loss whose time-to-reach is reported)")
    if "out_dir" not in spec or not isinstance(spec["out_dir"], str):
        raise UserError(f"{path}: out_dir (the comparison folder, a string) is required")
    base_overrides = spec.get("base", {})
    if not isinstance(base_overrides, dict):
        raise UserError(f"{path}: base must be a table of config overrides, e.g. [base] with max_steps = 300")
    try:
        base = load_config(spec.get("base_config"), base_overrides)
    except UserError as e:
        raise UserError(f"{path}: base config: {e}") from None
    key, values = sweeps.parse_sweep(spec.get("sweep"), path)
    runs, points = [], {}
    for seed in seeds:  # seeds outer: a slow drift in machine load then hits every variant alike
        for name, overrides in variants.items():
            if not name.replace("_", "").replace("-", "").isalnum():
                raise UserError(f"{path}: variant name {name!r} must be letters, digits, '-' or '_' (it names a folder)")
            fixed = sorted({"seed", "out_dir", key} & set(overrides))
            if fixed:
                raise UserError(f"{path}: variant {name!r} sets {', '.join(fixed)}; the comparison sets those per run")
            for value in values:
                label = sweeps.point_label(name, key, value)
                run_dir = Path(spec["out_dir"]) / "runs" / name / sweeps.point_folder(key, value) / f"seed{seed}"
                try:
                    config = apply_overrides(base, overrides)
                    config = apply_overrides(config, {**sweeps.sweep_overrides(config, key, value), "seed": seed,
                                                      "out_dir": str(run_dir)}).validate()
                    check_model_config(config)
                except UserError as e:
                    raise UserError(f"{path}: variant {label!r}: {e}") from None
                runs.append((label, seed, config))
                points[label] = (name, value)
    return Comparison(path.stem, Path(spec["out_dir"]), seeds, baseline, float(target), runs, key, points)


def time_to_target(metrics, target):
    """Training seconds (eval excluded) at the first eval whose val loss is <= target, else None.
    Evals are discrete, so this is an upper bound to within one eval interval."""
    hit = next((r for r in metrics if r.get("val_loss") is not None and r["val_loss"] <= target), None)
    return None if hit is None else hit["elapsed_s"]


def run_one(variant, seed, config, target, log=print):
    """Train one run unless it is already complete. A failed run comes back as a row with status "failed";
    only a run folder trained with another config (or Ctrl-C) stops the comparison."""
    from train import TrainingDiverged, train  # imported here: reading a comparison does not load the trainer
    run_dir = Path(config.out_dir)
    done = run_dir / "result.json"
    row = {"variant": variant, "seed": seed, "run_dir": str(run_dir), "status": "ok", "error": ""}
    if done.exists():
        saved = json.loads(done.read_text())
        saved_config = {**Config().to_dict(), **saved["config"]}  # keys added since it ran take their defaults
        if saved_config != config.to_dict():
            changed = sorted(k for k, v in config.to_dict().items() if saved_config.get(k) != v)
            raise UserError(f"{run_dir} was trained with a different config ({', '.join(changed)}); "
                            f"delete it or give the comparison another out_dir")
        log(f"[{variant} seed {seed}] complete, skipped")
        return {**row, **saved["row"]}
    # An interrupted run (checkpoints, no result.json) is RESUMED: train()'s resume is exact (model,
    # optimizer, batch generator and RNG states restored), so it ends where an uninterrupted run would,
    # without redoing the steps before the checkpoint. Its elapsed_s resumes from the checkpoint too, so
    # each step is counted once (the lost steps after the checkpoint are redone and timed again).
    resume = bool(list_checkpoints(run_dir))
    log(f"[{variant} seed {seed}] {'resuming' if resume else 'training'} -> {run_dir}")
    # the whole run's wall clock (startup and evals included) and the machine's load as it started:
    # on a shared machine the load says how far tokens/s can be trusted (a resumed run: this session only)
    started, row["load_at_start"] = time.time(), round(os.getloadavg()[0], 2)
    try:
        result = train(config, resume=resume, log=lambda *a: None)
    except KeyboardInterrupt:
        raise
    except TrainingDiverged as e:  # a result (this config is unstable), not a failure: recorded and kept
        result = {"final_val_loss": None, "error": str(e).splitlines()[0]}
    except Exception as e:  # a failed run is reported and the others go on
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.txt").write_text(traceback.format_exc())
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        log(f"[{variant} seed {seed}] FAILED: {type(e).__name__}: {message} (traceback in {run_dir / 'error.txt'})")
        return {**row, "status": "failed", "error": f"{type(e).__name__}: {message}"}
    (run_dir / "error.txt").unlink(missing_ok=True)
    metrics = read_metrics(run_dir)
    row["initial_val_loss"] = metrics[0]["val_loss"] if metrics and metrics[0]["step"] == 0 else None
    row["run_seconds"] = round(time.time() - started, 1)
    if result["final_val_loss"] is None or not np.isfinite(result["final_val_loss"]):
        row.update(status=sweeps.DIVERGED, error=result.get("error", "non-finite val loss"), final_val_loss=None,
                   steps=max(r["step"] for r in metrics))
        log(f"[{variant} seed {seed}] diverged: {row['error']}")
    else:
        keys = ["final_val_loss", "best_val_loss", "final_train_loss", "tokens_per_s", "wall_seconds", "steps",
                "n_params", "corpus_hash"]
        row.update({k: result[k] for k in keys}, time_to_target_s=time_to_target(metrics, target))
        log(f"[{variant} seed {seed}] val loss {row['final_val_loss']:.4f}, {row['tokens_per_s']:,.0f} tokens/s")
    done.write_text(json.dumps({"row": row, "config": config.to_dict()}, indent=1))
    return row


def summarize(rows, comparison):
    """Per variant: mean ± std of final val loss over finished seeds, Welch t-test against the baseline.

    Verdict rule: a variant is called "lower"/"higher" than the baseline only when BOTH the Welch
    t-test gives p < 0.05 AND |Δ| >= the pooled seed std, sqrt((s_v² + s_b²) / 2). Otherwise it is
    "within seed noise" when |Δ| < pooled std, and "not significant" when the difference exceeds the
    seed spread but p >= 0.05 (with 3 seeds a real, consistent difference can land there). The std
    condition keeps a tiny but consistent difference (std ~ 0) from being sold as a finding; no
    correction for testing several variants is made, so a lone p just under 0.05 is weak evidence.

    paired_p (shown, not used by the verdict): a paired t-test on the per-seed differences. Runs of one
    seed share their batches and, when the variants change only norms, their random initial weights
    (norm parameters start at constants and draw no random numbers): the pairing is by design."""
    ok = [r for r in rows if r["status"] == "ok"]
    losses = {v: np.array([r["final_val_loss"] for r in ok if r["variant"] == v]) for v in comparison.variants}
    summary = []
    for variant in comparison.variants:
        baseline = comparison.baseline_for(variant)
        base = losses[baseline]
        mine, runs = losses[variant], [r for r in ok if r["variant"] == variant]
        entry = {"variant": variant, "n_ok": len(mine), "n_runs": len(comparison.seeds),
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
            mine_by_seed, base_by_seed = ({r["seed"]: r["final_val_loss"] for r in ok if r["variant"] == v}
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
    lines = [f"| variant | seeds | final val loss (mean ± std) | Δ vs {comparison.baseline} | Welch p | verdict "
             f"| paired p | tokens/s | s to val ≤ {comparison.target_val_loss:g} |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in summary:
        loss = f"{fmt(e['mean'], '.4f')} ± {fmt(e['std'], '.4f')}"
        reached = "not reached" if not e["n_reached"] else f"{e['time_to_target_s']:.1f} ({e['n_reached']}/{e['n_ok']})"
        lines.append(f"| {e['variant']} | {e['n_ok']}/{e['n_runs']} | {loss} | {fmt(e['delta'], '+.4f')} "
                     f"| {fmt(e['p_value'], '.3f')} | {e['verdict']} | {fmt(e['paired_p'], '.3f')} "
                     f"| {fmt(e['tokens_per_s'], ',.0f')} | {reached} |")
    return "\n".join(lines)


def machine():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        model = next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        model = platform.processor() or platform.machine()
    import torch
    return f"{model}, {os.cpu_count()} CPU threads visible, torch intra-op threads {torch.get_num_threads()}"


def write_outputs(rows, comparison, header):
    out = comparison.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_KEYS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    summary = summarize(rows, comparison)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    ok = [r for r in rows if r["status"] == "ok"]
    curves = {v: [read_metrics(r["run_dir"]) for r in ok if r["variant"] == v] for v in comparison.variants}
    plots.plot_loss_curves(curves, out / "val_loss_vs_step.png", out / "val_loss_vs_time.png", comparison.name)
    text = [f"# Comparison {comparison.name}", "", *header, "", markdown_table(summary, comparison), "",
            f"Verdict rule: a variant differs from the baseline only if the Welch t-test (final val loss over "
            f"seeds) gives p < {P_THRESHOLD} AND |Δ| >= the pooled seed std sqrt((s² + s_baseline²) / 2); "
            f"otherwise \"within seed noise\" (|Δ| < pooled std) or \"not significant\" (p >= {P_THRESHOLD}). "
            f"No correction for testing {len(comparison.variants) - 1} variants at once. "
            f"Paired p: a paired t-test over seeds (same seed = same batches and same initial weights), for "
            f"information; the verdict does not use it. Time to target: training "
            f"seconds (eval excluded) at the first eval reaching the target, mean over the seeds that reached it.",
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


def compare(path, log=print):
    """Run (or finish) a comparison and write its outputs; returns (rows, summary)."""
    comparison = load_comparison(path)
    started = time.time()
    grid = f"{len(comparison.variants)} variants" if comparison.sweep_key is None else \
        f"{len(comparison.base_variants)} variants x {len(comparison.variants) // len(comparison.base_variants)} values"
    log(f"comparison {comparison.name}: {grid} x {len(comparison.seeds)} seeds -> {comparison.out_dir}")
    if comparison.sweep_key == "learning_rate":
        log("the sweep sets learning_rate; min_lr follows it at each variant's own min_lr / learning_rate ratio")
    rows = [run_one(v, s, c, comparison.target_val_loss, log) for v, s, c in comparison.runs]
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    timed = [r for r in rows if r.get("run_seconds") is not None]
    loads = [r["load_at_start"] for r in timed]
    header = [f"Command: `{threads}python compare.py {path}`", "", f"Machine: {machine()}.", "",
              f"Wall time of the {len(timed)} finished runs, startup and evals included: "
              f"{sum(r['run_seconds'] for r in timed):.0f} s"
              + (f"; load average (1 min) at their starts {min(loads):.2f}–{max(loads):.2f}" if loads else "")
              + f". This invocation took {time.time() - started:.0f} s."]
    summary = write_outputs(rows, comparison, header)
    log("\n" + markdown_table(summary, comparison))
    failed = sum(r["status"] not in ("ok", sweeps.DIVERGED) for r in rows)
    diverged = sum(r["status"] == sweeps.DIVERGED for r in rows)
    log(f"\n{len(rows) - failed - diverged}/{len(rows)} runs ok" + (f", {diverged} diverged" if diverged else "")
        + (f", {failed} failed (see summary.md)" if failed else "")
        + f"; outputs in {comparison.out_dir}")
    return rows, summary


def main():
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        raise UserError("usage: python compare.py <comparison.toml>  (see configs/compare_*.toml)")
    compare(sys.argv[1])


if __name__ == "__main__":
    run_main(main)
