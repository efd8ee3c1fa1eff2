"""Compare norm variants on validation loss: every (variant, seed) trained by train.train().

    python compare.py configs/compare_default.toml              # every run, one after another
    python compare.py configs/compare_default.toml --jobs 2     # on 2 local workers (workers.py)
    python compare.py configs/compare_default.toml --shard 3/25 # only runs k with k % 25 == 3
    python compare.py configs/compare_default.toml --report     # no training: the report of what is done

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

Runs are independent: each holds its run folder's lock while it trains (runlog.run_folder_lock), so a
second worker, shard or invocation skips a run that is being trained, and a finished run (result.json)
is never trained again. A shard writes nothing but its runs' folders; `--report` then reads every
finished run and writes the same outputs as a sequential comparison (only timing columns differ).
"""
import json
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from study import sweeps
from training.checkpoint import list_checkpoints
from config import (ArgumentParser, Config, UserError, apply_overrides, check_folder, keys_tagged, load_config,
                    read_toml, run_main)
from hf.load import resolve_init_from
from model.stack import check_model_config
from study.report import device_name, machine, markdown_table, write_outputs
from training.metrics import RESULT_KEYS
from training.runlog import RunFolderBusy, read_metrics, run_folder_lock, run_folder_owner, write_atomic
from study.workers import run_in_workers

COMPARISON_KEYS = {"base_config", "base", "out_dir", "seeds", "baseline", "target_val_loss", "variants", "sweep"}
# the config keys that decide a run's data cache (data/prepare.py): runs that agree on them share one
DATA_KEYS = {*keys_tagged("data", "tokenizer"), "cache_dir"}


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
    if unknown and "variants" not in spec and set(unknown) <= set(Config().to_dict()):
        raise UserError(f"{path} is a training config (keys such as {', '.join(unknown[:3])}), not a comparison; "
                        f"train.py takes it: python train.py {path}")
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
    if "out_dir" not in spec or not isinstance(spec["out_dir"], str) or not spec["out_dir"].strip():
        raise UserError(f"{path}: out_dir (the comparison folder, a string) is required")
    check_folder(spec["out_dir"], f"{path}: out_dir")
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
            fixed = sorted({"seed", "out_dir", "tracker_project", "tracker_run_name", key} & set(overrides))
            if fixed:
                raise UserError(f"{path}: variant {name!r} sets {', '.join(fixed)}; the comparison sets those per run")
            for value in values:
                label = sweeps.point_label(name, key, value)
                run_dir = Path(spec["out_dir"]) / "runs" / name / sweeps.point_folder(key, value) / f"seed{seed}"
                per_run = {"seed": seed, "out_dir": str(run_dir), "tracker_project": path.stem,
                           "tracker_run_name": f"{label}/seed{seed}"}
                try:
                    config = apply_overrides(base, overrides)
                    config = apply_overrides(config, {**sweeps.sweep_overrides(config, key, value), **per_run}).validate()
                    if config.init_from:  # the stack is the checkpoint's: checked once it is known, as train.py does
                        resolve_init_from(config)
                    else:
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


def new_row(variant, seed, config, status="ok", error=""):
    return {"variant": variant, "seed": seed, "run_dir": str(config.out_dir), "status": status, "error": error}


TRACKER_LABELS = ("tracker_project", "tracker_run_name")


def finished_row(variant, seed, config):
    """The row a finished run saved (its result.json), or None; a run folder trained with another
    config stops the comparison (its results would be mixed with this one's)."""
    done = Path(config.out_dir) / "result.json"
    if not done.exists():
        return None
    saved = json.loads(done.read_text())
    saved_config = {**Config().to_dict(), **saved["config"]}  # a key it lacks is newer than the run: its default
    # the tracker's names label a run, they do not train it: a run another comparison file trained counts
    changed = sorted(k for k, v in config.to_dict().items() if saved_config.get(k) != v and k not in TRACKER_LABELS)
    if changed:
        raise UserError(f"{config.out_dir} was trained with a different config ({', '.join(changed)}); "
                        f"delete it or give the comparison another out_dir")
    return {**new_row(variant, seed, config), **saved["row"]}


def run_one(variant, seed, config, target, worker="main", log=print):
    """Train one run unless it is already complete or another process is training it. A failed run
    comes back as a row with status "failed"; only a run folder trained with another config (or
    Ctrl-C) stops the comparison."""
    row = new_row(variant, seed, config)
    try:
        with run_folder_lock(config.out_dir):  # held until result.json is written; train() takes it again
            return _run_locked(row, config, target, worker, log)
    except RunFolderBusy:
        log(f"[{variant} seed {seed}] being trained by another process, skipped")
        return {**row, "status": "running elsewhere", "error": "another worker or shard held its run folder"}


def _run_locked(row, config, target, worker, log):
    from train import TrainingDiverged, train  # imported here: reading a comparison does not load the trainer
    variant, seed, run_dir = row["variant"], row["seed"], Path(config.out_dir)
    saved = finished_row(variant, seed, config)
    if saved is not None:
        log(f"[{variant} seed {seed}] complete, skipped")
        return saved
    # An interrupted run (checkpoints, no result.json) is RESUMED: train()'s resume is exact (model,
    # optimizer, batch generator and RNG states restored), so it ends where an uninterrupted run would,
    # without redoing the steps before the checkpoint. Its elapsed_s resumes from the checkpoint too, so
    # each step is counted once (the lost steps after the checkpoint are redone and timed again).
    resume = bool(list_checkpoints(run_dir))
    log(f"[{variant} seed {seed}] {'resuming' if resume else 'training'} -> {run_dir}")
    # the whole run's wall clock (startup and evals included) and the machine's load as it started:
    # on a shared machine the load says how far tokens/s can be trusted (a resumed run: this session only)
    started, row["load_at_start"] = time.time(), round(os.getloadavg()[0], 2)
    row.update(device=device_name(), worker=worker)
    try:
        result = train(config, resume=resume, log=lambda *a: None)
    except KeyboardInterrupt:
        raise
    except TrainingDiverged as e:  # a result (this config is unstable), not a failure: recorded and kept
        result = {"final_val_loss": None, "error": str(e).splitlines()[0]}
    except Exception as e:  # a failed run is reported and the others go on
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
        row.update({k: result[k] for k in RESULT_KEYS}, time_to_target_s=time_to_target(metrics, target))
        log(f"[{variant} seed {seed}] val loss {row['final_val_loss']:.4f}, {row['tokens_per_s']:,.0f} tokens/s")
    write_atomic(run_dir / "result.json", json.dumps({"row": row, "config": config.to_dict()}, indent=1))
    return row


def saved_row(variant, seed, config):
    """What --report knows of a run without training it: finished, failed, being trained, or missing."""
    row = finished_row(variant, seed, config)
    if row is not None:
        return row
    run_dir = Path(config.out_dir)
    if (run_dir / "error.txt").exists():
        lines = (run_dir / "error.txt").read_text().strip().splitlines()
        return new_row(variant, seed, config, "failed", lines[-1] if lines else "see error.txt")
    owner = run_folder_owner(run_dir)
    if owner is not None:
        return new_row(variant, seed, config, "running elsewhere", f"PID {owner} holds its run folder")
    if list_checkpoints(run_dir):
        return new_row(variant, seed, config, "interrupted", "has checkpoints; run the comparison again to resume it")
    return new_row(variant, seed, config, "missing")


def prepare_once(comparison, log):
    """Build each distinct data cache once, before workers start: they then only open it."""
    from data.prepare import prepare_data
    seen = set()
    for _, _, config in comparison.runs:
        key = json.dumps({k: v for k, v in config.to_dict().items() if k in DATA_KEYS}, sort_keys=True)
        if key not in seen:
            seen.add(key)
            prepare_data(config, log=log)


def compare(path, jobs=1, shard=None, report_only=False, log=print):
    """Run (or finish) a comparison and write its outputs; returns (rows, summary). With a shard
    (i, n), train only runs k with k % n == i and write nothing outside their run folders (summary None)."""
    comparison = load_comparison(path)
    started = time.time()
    grid = f"{len(comparison.variants)} variants" if comparison.sweep_key is None else \
        f"{len(comparison.base_variants)} variants x {len(comparison.variants) // len(comparison.base_variants)} values"
    log(f"comparison {comparison.name}: {grid} x {len(comparison.seeds)} seeds -> {comparison.out_dir}")
    if comparison.sweep_key == "learning_rate":
        log("the sweep sets learning_rate; min_lr follows it at each variant's own min_lr / learning_rate ratio")
    indices = [k for k in range(len(comparison.runs)) if shard is None or k % shard[1] == shard[0]]
    tasks = [(k, (*comparison.runs[k], comparison.target_val_loss)) for k in indices]
    where = "main" if shard is None else f"shard {shard[0]}/{shard[1]}"
    if report_only:
        rows = {}
    elif jobs == 1:
        rows = {k: run_one(*args, worker=where, log=log) for k, args in tasks}
    else:
        prepare_once(comparison, log)
        rows = run_in_workers(tasks, jobs, run_one, log)
    if shard is not None:
        done = sum(rows[k]["status"] == "ok" for k in rows)
        log(f"shard {shard[0]}/{shard[1]}: {done}/{len(tasks)} runs finished; when every shard is done, "
            f"`python compare.py {path} --report` writes the summary")
        return [rows[k] for k in indices], None
    # every row as its run folder has it: the same summary whichever way the runs were trained
    rows = [rows.get(k) or saved_row(*comparison.runs[k]) for k in range(len(comparison.runs))]
    if comparison.sweep_key is not None:  # the swept value of each row's point: a column of its own in results.csv
        for row in rows:
            row["sweep_value"] = comparison.points[row["variant"]][1]
    if report_only and all(r["status"] == "missing" for r in rows):
        raise UserError(f"--report: none of the {len(rows)} runs of {path} has been trained yet (no run folder "
                        f"under {comparison.out_dir / 'runs'}); `python compare.py {path}` trains them")
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    flags = "" if jobs == 1 else f" --jobs {jobs}"
    timed = [r for r in rows if r.get("run_seconds") is not None]
    loads = [r["load_at_start"] for r in timed]
    header = [f"Command: `{threads}python compare.py {path}{flags}`" + (" (report of runs trained earlier)" if report_only else ""),
              "", f"Machine: {machine()}.", "",
              f"Wall time of the {len(timed)} finished runs, startup and evals included: "
              f"{sum(r['run_seconds'] for r in timed):.0f} s"
              + (f"; load average (1 min) at their starts {min(loads):.2f}–{max(loads):.2f}" if loads else "")
              + f". This invocation took {time.time() - started:.0f} s."]
    summary = write_outputs(rows, comparison, header)
    log("\n" + markdown_table(summary, comparison))
    failed = [r for r in rows if r["status"] not in ("ok", sweeps.DIVERGED)]
    diverged = sum(r["status"] == sweeps.DIVERGED for r in rows)
    log(f"\n{len(rows) - len(failed) - diverged}/{len(rows)} runs ok" + (f", {diverged} diverged" if diverged else "")
        + "".join(f"\n  {r['variant']} seed {r['seed']}: {r['status']} {r['error']}".rstrip() for r in failed)
        + f"\noutputs in {comparison.out_dir}")
    return rows, summary


def parse_shard(text):
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r}: expected I/N with integers, e.g. --shard 3/25") from None
    if not (n >= 1 and 0 <= i < n):
        raise UserError(f"--shard {text!r}: needs N >= 1 and 0 <= I < N, e.g. --shard 0/25 ... 24/25")
    return i, n


def main():
    p = ArgumentParser(description="Compare norm variants over seeds (see configs/compare_*.toml)",
                       hint="; usage: python compare.py <comparison.toml> [--jobs N | --shard I/N | --report]")
    p.add_argument("comparison")
    p.add_argument("--jobs", type=int, default=1, help="local worker processes (one per GPU, or a share of the cores)")
    p.add_argument("--shard", help="I/N: train only runs k with k %% N == I (job arrays); no summary")
    p.add_argument("--report", action="store_true", help="no training: summarize the finished runs")
    args = p.parse_args()
    if args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {args.jobs}")
    if sum([args.jobs > 1, args.shard is not None, args.report]) > 1:
        raise UserError("--jobs, --shard and --report are used one at a time")
    compare(args.comparison, args.jobs, parse_shard(args.shard) if args.shard else None, args.report)


if __name__ == "__main__":
    run_main(main)
