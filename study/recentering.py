"""`analyze.py recentering <comparison dir>`: can a norm site's input statistics say whether the trained
model needs that site's re-centering?

For every finished run of a comparison (compare.py's layout: runs/<variant>/[<key>_<value>/]seed<N>/,
each with result.json) and every norm site of it, it gathers
  - the site: its kind (attn, mlp, q, k, attn_out, mlp_out, final, embed), its norm class, and whether
    the trained norm re-centers (LayerNorm: the probe removes the mean subtraction) or not (the probe
    adds it);
  - the statistics of the site's input at the end of training (model/diagnostics.py): mean_share,
    offset_ratio, input_rms, gained_offset = offset_ratio * rms(g) (the first-order size of the change
    of the norm's output when its mean subtraction is flipped, g * (mean / rms) * ones, against an
    output of RMS rms(g)), and the three that massive activations do not dominate (ROBUST_STATISTICS);
    from diagnostics.jsonl at the checkpoint's step, or measured on the same batch train.py uses (the
    first batch of the fixed validation windows) when the run has none;
  - the probe's Δ val loss for flipping that site (study/probe.py; run when probe.json is missing or
    older than the run's newest checkpoint).
It reports Spearman's rank correlation of each statistic with |Δ| with a 95% bootstrap interval that
resamples RUNS, not sites (the sites of one run share its weights and data, so they are not
independent draws), a held-out check of a threshold on each statistic, and a scatter plot, into
recentering.md, recentering.json and recentering.png in the comparison folder.
"""
import json
from pathlib import Path

import numpy as np
from scipy import stats as scipy_stats

from config import UserError
from model.diagnostics import ROBUST_STATISTICS
from model.stack import parse_site
from study.report import fmt

STATISTICS = ("mean_share", "offset_ratio", "input_rms", "gained_offset") + ROBUST_STATISTICS
# A site "needs its re-centering state" when flipping it moves the val loss by more than this (nats):
# half the seed-to-seed spread of final val loss at this scale (~0.02, shared/FRONTIER.md), so a
# smaller flip is below what retraining with another seed would show; the issue's pilot uses it too.
DELTA_THRESHOLD = 0.01
BOOTSTRAP = 2000
FLOOR = 1e-7  # |Δ| and statistics below it are drawn at it on the log axes (a flip can give exactly 0)


def find_runs(folder):
    """[(run dir, {variant, seed})] of the finished runs under a comparison folder; a single run folder
    (one with checkpoints/) is a comparison of one run."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{str(folder)!r} is not a folder; give a comparison's out_dir (or a run dir)")
    if (folder / "checkpoints").is_dir():
        seed = json.loads((folder / "config.json").read_text()).get("seed") if (folder / "config.json").exists() else None
        return [(folder, {"variant": folder.name, "seed": seed})]
    runs = []
    for done in sorted(folder.glob("runs/**/result.json")):
        row = json.loads(done.read_text()).get("row", {})
        if row.get("status", "ok") == "ok":
            runs.append((done.parent, {"variant": row.get("variant", done.parent.parent.name), "seed": row.get("seed")}))
    if not runs:
        raise UserError(f"{str(folder)!r} has no finished runs (runs/**/result.json); run compare.py on it first")
    return runs


def site_kind(site):
    return parse_site(site)[1]


def gain_rms(module):
    weight = getattr(module, "weight", None)
    return 1.0 if weight is None else float(weight.detach().double().pow(2).mean().sqrt())


def end_statistics(run_dir, model, config, folder):
    """{site: {statistic: value}} at the checkpoint's step."""
    from study.probe import measure_once
    from training.checkpoint import read_meta
    from training.runlog import read_diagnostics
    step = read_meta(folder)["step"]
    line = next((d for d in reversed(read_diagnostics(run_dir)) if d.get("step") == step), None)
    if line is None or any(key not in line for key in ROBUST_STATISTICS):  # none at that step, or from older code
        line = measure_once(model, config)
    return statistics_of(model, line)


def statistics_of(model, line):
    """{site: {statistic: value}} from one diagnostics line, with gained_offset from the model's gains."""
    from model.diagnostics import norm_sites
    gains = {site: gain_rms(m) for site, m in norm_sites(model)}
    out = {}
    for i, site in enumerate(line["sites"]):
        values = {k: line[k][i] for k in ("mean_share", "offset_ratio", "input_rms") + ROBUST_STATISTICS}
        values["gained_offset"] = values["offset_ratio"] * gains.get(site, 1.0)
        out[site] = values
    return out


def needs_probe(run_dir):
    """Whether probe.json is missing or older than the run's newest checkpoint."""
    from training.checkpoint import list_checkpoints
    path = Path(run_dir) / "probe.json"
    newest = list_checkpoints(run_dir)
    return not path.exists() or bool(newest and path.stat().st_mtime < newest[-1].stat().st_mtime)


def probe_task(run_dir, worker="main", log=print):
    """One run's probe (study/workers.py calls it in a worker process)."""
    from study.probe import run_probe
    log(f"probing {run_dir}")
    try:
        run_probe(run_dir, log=lambda *a: None)
    except Exception as e:  # in a worker an exception would end the process: reported as a row instead
        if worker == "main":
            raise
        return {"status": "failed", "run": str(run_dir), "error": f"{run_dir}: {type(e).__name__}: {e}"}
    return {"status": "ok", "run": str(run_dir)}


def gather(folder, jobs=1, log=print):
    """One record per (run, flipped site): run, variant, seed, site, kind, norm, recenters, delta and
    the site's end-of-training statistics. Runs without a current probe are probed first, on `jobs`
    worker processes."""
    from training.checkpoint import load_model
    runs = find_runs(folder)
    tasks = [(k, (run_dir,)) for k, (run_dir, _) in enumerate(runs) if needs_probe(run_dir)]
    if jobs > 1 and len(tasks) > 1:
        from study.workers import run_in_workers
        failed = [r for r in run_in_workers(tasks, jobs, probe_task, log).values() if r.get("status") != "ok"]
        if failed:
            raise UserError(f"the probe failed on {len(failed)} run(s): {failed[0].get('error')}")
    else:
        for _, (run_dir,) in tasks:
            probe_task(run_dir, log=log)
    records = []
    for run_dir, info in runs:
        rows = json.loads((run_dir / "probe.json").read_text())
        model, config, checkpoint = load_model(run_dir, log=log)
        records += site_records(str(run_dir), info, rows, end_statistics(run_dir, model, config, checkpoint))
    return records


def gather_pretrained(model, config, name, probe_options=None):
    """gather() for one model that was not trained here (a transformers checkpoint): its probe (on
    documents of both splits: it has seen none) and its statistics measured on the first batch of
    validation windows, written to config.out_dir."""
    from study.probe import measure_once, probe_model
    rows = probe_model(model, config, config.out_dir, name, log=lambda *a: None, splits=("val", "train"),
                       **(probe_options or {}))
    return site_records(name, {"variant": name, "seed": None}, rows, statistics_of(model, measure_once(model, config)))


def site_records(run, info, rows, statistics):
    """One record per probe row that flips a site's centering (removals are not centering flips)."""
    return [{"run": run, **info, "site": r["site"], "kind": site_kind(r["site"]), "norm": r["norm"],
             "recenters": r["recenters"], "delta": r["delta"], "abs_delta": abs(r["delta"]),
             "decision": r.get("decision"), "probe_threshold": r.get("threshold"), **statistics[r["site"]]}
            for r in rows if r["recenters"] is not None and r["site"] in statistics]


def spearman(x, y):
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:  # a constant has no rank order: no correlation
        return None
    rho = scipy_stats.spearmanr(x, y).statistic
    return None if rho is None or np.isnan(rho) else float(rho)


def correlations(records, statistic, rng, n_boot=BOOTSTRAP):
    """Spearman's rho of statistic vs |Δ| over the records, with a percentile bootstrap 95% interval
    over runs (each resample draws runs with replacement and pools all their sites)."""
    x = np.array([r[statistic] for r in records], dtype=float)
    y = np.array([r["abs_delta"] for r in records], dtype=float)
    rho = spearman(x, y)
    runs = sorted({r["run"] for r in records})
    by_run = {run: np.array([i for i, r in enumerate(records) if r["run"] == run]) for run in runs}
    interval = None
    if rho is not None and len(runs) >= 3:
        draws = []
        for _ in range(n_boot):
            picked = np.concatenate([by_run[runs[j]] for j in rng.integers(0, len(runs), len(runs))])
            value = spearman(x[picked], y[picked])
            if value is not None:
                draws.append(value)
        if draws:
            interval = [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]
    return {"statistic": statistic, "n_sites": len(records), "n_runs": len(runs), "rho": rho, "ci95": interval}


def folds(records):
    """Two halves of the runs for the held-out check: by seed (alternate seeds) when there are at least
    two seeds, else alternate runs. Whole runs stay on one side."""
    seeds = sorted({r["seed"] for r in records if r["seed"] is not None})
    if len(seeds) >= 2:
        half = set(seeds[::2])
        split = [r["seed"] in half for r in records]
        names = (f"seeds {seeds[::2]}", f"seeds {seeds[1::2]}")
    else:
        runs = sorted({r["run"] for r in records})
        half = set(runs[::2])
        split = [r["run"] in half for r in records]
        names = ("runs 1, 3, ...", "runs 2, 4, ...")
    a = [r for r, s in zip(records, split) if s]
    b = [r for r, s in zip(records, split) if not s]
    return (a, b), names


def scores(values, labels, threshold):
    predicted = values >= threshold
    tp, tn = int((predicted & labels).sum()), int((~predicted & ~labels).sum())
    fp, fn = int((predicted & ~labels).sum()), int((~predicted & labels).sum())
    rates = [tp / (tp + fn) if tp + fn else None, tn / (tn + fp) if tn + fp else None]
    known = [r for r in rates if r is not None]
    return {"accuracy": (tp + tn) / len(labels) if len(labels) else None,
            "balanced_accuracy": sum(known) / len(known) if known else None, "tp": tp, "tn": tn, "fp": fp, "fn": fn}


def fit_threshold(values, labels):
    """The threshold t (call "needs re-centering" when the statistic >= t) with the best balanced
    accuracy on these sites, ties to the smaller t; None when the labels are all one class."""
    if labels.all() or not labels.any():
        return None
    ordered = np.unique(values)
    candidates = np.concatenate([[ordered[0]], (ordered[:-1] + ordered[1:]) / 2, [ordered[-1] * 2 + 1]])
    best = max(candidates, key=lambda t: (scores(values, labels, t)["balanced_accuracy"], -t))
    return float(best)


def label_needs(records, delta_threshold):
    """Set each record's "needs" (the site needs its re-centering state). On a single model whose probe
    decided at this threshold (study/staged.py), only a site decided above it; otherwise, across runs
    whose seeds are the replication, |Δ| > threshold. Returns the rule, in words."""
    decided = len({r["run"] for r in records}) == 1 and all(
        r.get("decision") and r.get("probe_threshold") == delta_threshold for r in records)
    for r in records:
        r["needs"] = r["decision"] == "above" if decided else r["abs_delta"] > delta_threshold
    return "decided above the threshold by the probe's interval" if decided else "|Δ| > threshold"


def needs(record, delta_threshold):
    return record["needs"] if "needs" in record else record["abs_delta"] > delta_threshold  # labelled, or not yet


def held_out(records, statistic, delta_threshold):
    """Fit the threshold on one half of the runs, score it on the other, both ways round."""
    (a, b), (name_a, name_b) = folds(records)
    out = {"statistic": statistic, "split": f"{name_a} vs {name_b}", "folds": []}
    for fit, test, fitted_on, tested_on in ((a, b, name_a, name_b), (b, a, name_b, name_a)):
        if not fit or not test:
            continue
        fv, fl = (np.array([r[statistic] for r in fit]), np.array([needs(r, delta_threshold) for r in fit]))
        tv, tl = (np.array([r[statistic] for r in test]), np.array([needs(r, delta_threshold) for r in test]))
        t = fit_threshold(fv, fl)
        entry = {"fitted_on": fitted_on, "tested_on": tested_on, "n_fit": len(fit), "n_test": len(test), "positives_fit": int(fl.sum()), "positives_test": int(tl.sum()),
                 "threshold": t, "always_no_accuracy": float((~tl).mean())}
        if t is not None:
            entry.update(scores(tv, tl, t))
        out["folds"].append(entry)
    return out


def report(records, folder, delta_threshold, rng):
    """The correlations (pooled and per flip direction) and the held-out checks, as a dict."""
    groups = {"all sites": records,
              "LayerNorm sites (mean subtraction removed)": [r for r in records if r["recenters"]],
              "other sites (mean subtraction added)": [r for r in records if not r["recenters"]]}
    rule = label_needs(records, delta_threshold)
    out = {"folder": str(folder), "delta_threshold": delta_threshold, "n_runs": len({r["run"] for r in records}),
           "n_sites": len(records), "n_needing": sum(r["needs"] for r in records), "needs_rule": rule,
           "n_undecided": sum(r.get("decision") == "undecided" for r in records),
           "correlations": {name: [correlations(g, s, rng) for s in STATISTICS] for name, g in groups.items()
                            if g and (name == "all sites" or len(g) < len(records))},  # a one-direction study: pooled only
           "held_out": [held_out(records, s, delta_threshold) for s in STATISTICS],
           "largest": sorted(records, key=lambda r: -r["abs_delta"])[:10]}
    return out


def markdown(result):
    lines = [f"# Re-centering predictor: {result['folder']}", "",
             f"{result['n_sites']} (run, site) flips from {result['n_runs']} runs; {result['n_needing']} move the val "
             f"loss by more than {result['delta_threshold']:g} nats ({result['needs_rule']}: the site \"needs\" its "
             f"re-centering state; {result['n_undecided']} undecided). Statistics are of each norm's input at the end of training "
             f"(model/diagnostics.py; gained_offset = offset_ratio × rms(gain)); Δ is the probe's (study/probe.py).", "",
             "## Spearman's ρ of each statistic with |Δ|", "",
             "95% intervals: percentile bootstrap over RUNS (2000 resamples; each draws runs with replacement and "
             "pools their sites), since the sites of one run share its weights and data and are not independent; "
             "none with fewer than 3 runs.", "",
             "| sites | statistic | n sites | n runs | ρ | 95% CI |", "|---|---|---|---|---|---|"]
    for group, rows in result["correlations"].items():
        for c in rows:
            ci = "–" if c["ci95"] is None else f"[{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}]"
            lines.append(f"| {group} | {c['statistic']} | {c['n_sites']} | {c['n_runs']} | {fmt(c['rho'], '+.2f')} | {ci} |")
    lines += ["", "## Held-out check", "",
              "A threshold t on each statistic (\"needs re-centering\" when statistic ≥ t) is fitted on one half of "
              "the runs (best balanced accuracy) and scored on the other half, both ways round. Always-no: the "
              "accuracy of calling no site, the rate to beat. No threshold when the fitting half has one class only.", ""]
    if not result["n_needing"]:
        lines += [f"No site's flip moved the val loss by more than {result['delta_threshold']:g} nats, so there is "
                  f"nothing to predict at this threshold: calling no site is always right.", ""]
    lines += ["| statistic | fitted on → tested on | sites (positives) | threshold | accuracy | balanced accuracy | always-no |",
              "|---|---|---|---|---|---|---|"]
    for h in result["held_out"]:
        for f in h["folds"]:  # each row names its own direction: the halves swap between a statistic's two rows
            lines.append(f"| {h['statistic']} | {f['fitted_on']} → {f['tested_on']} | {f['n_fit']} ({f['positives_fit']}) → {f['n_test']} "
                         f"({f['positives_test']}) | {fmt(f['threshold'], '.3g')} | {fmt(f.get('accuracy'), '.3f')} "
                         f"| {fmt(f.get('balanced_accuracy'), '.3f')} | {f['always_no_accuracy']:.3f} |")
    lines += ["", "## Largest flips", "", "| run | site | norm | Δ val loss | mean_share | offset_ratio | gained_offset |",
              "|---|---|---|---|---|---|---|"]
    for r in result["largest"]:
        run = r["variant"] if r["seed"] is None else f"{r['variant']} seed {r['seed']}"  # a pretrained model has none
        lines.append(f"| {run} | {r['site']} | {r['norm']} | {r['delta']:+.5f} "
                     f"| {r['mean_share']:.2e} | {r['offset_ratio']:.3f} | {r['gained_offset']:.3f} |")
    lines += ["", "![|Δ| against each statistic](recentering.png)", ""]
    return "\n".join(lines)


def run_recentering(folder, delta_threshold=DELTA_THRESHOLD, jobs=1, seed=0, log=print, pretrained=None,
                    probe_options=None):
    """The report for a comparison folder (or one run dir); with pretrained = (model, config, name), for
    that one model instead (probed with probe_options: study/probe.py's probe_model), written to config.out_dir."""
    from study import plots
    if not delta_threshold > 0:
        raise UserError(f"--delta_threshold must be > 0 nats, got {delta_threshold}")
    if jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {jobs}")
    if pretrained is not None:
        model, config, name = pretrained
        records = gather_pretrained(model, config, name, {**(probe_options or {}), "threshold": delta_threshold})
        folder = Path(config.out_dir)
    else:
        folder = Path(folder)
        records = gather(folder, jobs, log)
    if not records:
        raise UserError(f"{str(folder)!r}: its runs' probes flipped no norm site")
    result = report(records, folder, delta_threshold, np.random.default_rng(seed))
    (folder / "recentering.json").write_text(json.dumps({**result, "records": records}, indent=1))
    text = markdown(result)
    (folder / "recentering.md").write_text(text)
    plots.plot_recentering(records, STATISTICS, delta_threshold, folder / "recentering.png", str(folder), FLOOR)
    log(text + f"\nwritten: {folder / 'recentering.md'}, recentering.json, recentering.png")
    return result
