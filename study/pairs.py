"""`analyze.py pairs <comparison dir>`: each LayerNorm/RMSNorm pair of a study, paired by seed.

A study such as configs/study_recentering.toml names its pairs `<x>_ln` and `<x>_rms`, identical but
for the norm at one site type. Within a seed both runs see the same batches and start from the same
weights (norm parameters start at constants), so the per-seed difference d = loss(rms) - loss(ln) is
the measurement and the seeds are its replicates. Per pair it reports mean d ± sd, a 95% confidence
interval, the paired t-test's p, and the smallest |d| the design could have detected (80% power,
two-sided α = 0.05, at this pair's sd and seed count): a pair whose interval holds 0 is "not
distinguishable", and its detectable effect says how large a difference that rules out. Beside it,
the probe's largest |Δ| for flipping one site's mean subtraction (probe.json, written by
`analyze.py recentering` or `analyze.py probe`) and the largest mean share of any norm input's
energy at the end of training (diagnostics.jsonl), for each norm of the pair.
"""
import json
from pathlib import Path

import numpy as np
from scipy import stats

from config import UserError
from study.report import fmt
from training.runlog import read_diagnostics

ALPHA, POWER = 0.05, 0.8


def detectable_effect(sd, n):
    """The smallest true mean difference a paired t-test on n differences with this sd detects with
    POWER at two-sided ALPHA (the normal-approximation formula with t quantiles)."""
    return (stats.t.ppf(1 - ALPHA / 2, n - 1) + stats.t.ppf(POWER, n - 1)) * sd / np.sqrt(n)


def run_extremes(run_dir):
    """(largest |Δ| of the probe's mean-subtraction flips, largest end-of-training mean_share) of one run."""
    run_dir = Path(run_dir)
    probe = json.loads((run_dir / "probe.json").read_text()) if (run_dir / "probe.json").is_file() else []
    flips = [abs(r["delta"]) for r in probe if r.get("recenters") is not None]
    lines = read_diagnostics(run_dir)
    share = max(lines[-1]["mean_share"]) if lines else None
    return (max(flips) if flips else None), share


def pair_rows(results):
    """One row per (x_ln, x_rms) pair from a comparison's results.json rows."""
    ok = [r for r in results if r["status"] == "ok"]
    by = {(r["variant"], r["seed"]): r for r in ok}
    names = sorted({r["variant"][:-3] for r in ok if r["variant"].endswith("_ln")},
                   key=lambda n: min(i for i, r in enumerate(results) if r["variant"] == n + "_ln"))
    rows = []
    for name in names:
        seeds = sorted(s for v, s in by if v == name + "_ln" and (name + "_rms", s) in by)
        ln = np.array([by[name + "_ln", s]["final_val_loss"] for s in seeds])
        rms = np.array([by[name + "_rms", s]["final_val_loss"] for s in seeds])
        d = rms - ln
        row = {"pair": name, "seeds": seeds, "ln_mean": ln.mean(), "ln_sd": ln.std(ddof=1) if len(d) > 1 else None,
               "rms_mean": rms.mean(), "rms_sd": rms.std(ddof=1) if len(d) > 1 else None, "diffs": d.tolist(),
               "mean_diff": d.mean(), "sd_diff": None, "ci": None, "p": None, "detectable": None}
        if len(d) > 1:
            sd = d.std(ddof=1)
            half = stats.t.ppf(1 - ALPHA / 2, len(d) - 1) * sd / np.sqrt(len(d))
            row.update(sd_diff=sd, ci=(d.mean() - half, d.mean() + half), detectable=detectable_effect(sd, len(d)),
                       p=float(stats.ttest_rel(rms, ln).pvalue) if sd > 0 else None)
        for norm in ("ln", "rms"):
            extremes = [run_extremes(by[f"{name}_{norm}", s]["run_dir"]) for s in seeds]
            flips = [f for f, _ in extremes if f is not None]
            shares = [m for _, m in extremes if m is not None]
            row[f"{norm}_probe_max"] = max(flips) if flips else None
            row[f"{norm}_mean_share_max"] = max(shares) if shares else None
        rows.append(row)
    return rows


def verdict(row):
    if row["ci"] is None:
        return "too few seeds"
    low, high = row["ci"]
    if low <= 0 <= high:
        return f"not distinguishable (a true d of ±{row['detectable']:.3f} is found 80% of the time)"
    return "RMSNorm lower (better)" if row["mean_diff"] < 0 else "LayerNorm lower (better)"


def markdown(rows, folder):
    lines = [f"# LayerNorm vs RMSNorm, paired by seed: {folder}", "",
             "d = final val loss (RMSNorm) − final val loss (LayerNorm), per seed; same seed = same batches and "
             "initial weights. Detectable: the smallest true |d| a paired t-test on these seeds finds with 80% power "
             "(two-sided α = 0.05). Probe: the largest absolute Δ val loss from flipping one site's mean subtraction; "
             "mean share: the largest share of any norm input's energy in its mean at the end of training.", "",
             "| pair | seeds | LN (mean ± sd) | RMS (mean ± sd) | d (mean ± sd) | 95% CI of d | paired p | detectable | "
             "verdict | probe max abs Δ LN / RMS | mean share max LN / RMS |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = "–" if r["ci"] is None else f"[{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}]"
        lines.append(f"| {r['pair']} | {len(r['seeds'])} | {r['ln_mean']:.4f} ± {fmt(r['ln_sd'], '.4f')} "
                     f"| {r['rms_mean']:.4f} ± {fmt(r['rms_sd'], '.4f')} | {r['mean_diff']:+.4f} ± {fmt(r['sd_diff'], '.4f')} "
                     f"| {ci} | {fmt(r['p'], '.3f')} | {fmt(r['detectable'], '.4f')} | {verdict(r)} "
                     f"| {fmt(r['ln_probe_max'], '.1e')} / {fmt(r['rms_probe_max'], '.1e')} "
                     f"| {fmt(r['ln_mean_share_max'], '.2%')} / {fmt(r['rms_mean_share_max'], '.2%')} |")
    lines += ["", f"No correction for testing {len(rows)} pairs: with many pairs, one p < 0.05 by chance is likely."]
    return "\n".join(lines) + "\n"


def run_pairs(folder, log=print):
    folder = Path(folder)
    results = folder / "results.json"
    if not results.is_file():
        raise UserError(f"{str(folder)!r} has no results.json; give a comparison's out_dir (compare.py writes it)")
    rows = pair_rows(json.loads(results.read_text()))
    if not rows:
        raise UserError(f"{str(folder)!r} has no <x>_ln / <x>_rms pair of finished runs "
                        f"(see configs/study_recentering.toml)")
    text = markdown(rows, folder)
    (folder / "pairs.md").write_text(text)
    (folder / "pairs.json").write_text(json.dumps(rows, indent=1, default=float))
    log(text + f"\nwritten: {folder / 'pairs.md'}, pairs.json")
    return rows
