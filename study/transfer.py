"""`analyze.py transfer A B [C ...]`: does a re-centering predictor fitted on one set of sites hold on
another? The held-out test across models: fit on SmolLM2's sites, test on Gemma 3's, and the other way
round, and against the small runs of the CPU study.

Each argument is a set of (model, site) records: a folder with recentering.json (analyze.py
recentering), that file, or a site-records file (docs/study_*/.../sites.json) written by
`--save_records`. A site "needs" its centering state as recentering.py labels it: on one model, when
the probe decided |Δ| above the threshold; across runs, |Δ| > threshold.

For every ordered pair (fitted on A, tested on B) and every statistic it reports
  - the threshold rule: t fitted on A for the best balanced accuracy (recentering.fit_threshold),
    scored on B beside the accuracy of calling no site; no rule when A has one class only;
  - the ranking: Spearman's rho of the statistic with |Δ| on A and on B, each with a 95% percentile
    bootstrap interval over clusters (runs when a set has at least 3, else blocks: the sites of one block
    share its weights), and whether the statistic ranked best on A is still informative on B. A ranking
    is scale-free, so it can transfer where a threshold in the units of one model cannot.
"""
import json
from pathlib import Path

import numpy as np

from config import UserError
from model.stack import parse_site
from study.recentering import BOOTSTRAP, DELTA_THRESHOLD, STATISTICS, fit_threshold, label_needs, scores, spearman
from study.report import fmt

RECORD_KEYS = ("run", "variant", "seed", "site", "kind", "norm", "recenters", "delta", "abs_delta", "decision",
               "probe_threshold") + STATISTICS


def read_records(path):
    """(name, records) of a folder with recentering.json, that file, or a saved records file."""
    path = Path(path)
    file = path / "recentering.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{str(path)!r} has no recentering.json; run `python analyze.py recentering {path}` first, "
                        f"or give a records file written by --save_records")
    data = json.loads(file.read_text())
    records = data["records"] if isinstance(data, dict) else data
    missing = [s for s in STATISTICS if records and s not in records[0]]
    if missing:
        raise UserError(f"{str(file)!r} lacks the statistics {', '.join(missing)}; run analyze.py recentering on it again")
    name = data.get("name") if isinstance(data, dict) else None
    return name or (file.parent.name if file.name == "recentering.json" else file.stem), records


def save_records(records, path, name):
    """The records a transfer test needs, compact enough to commit (docs/)."""
    Path(path).write_text(json.dumps({"name": name, "records": [{k: r.get(k) for k in RECORD_KEYS} for r in records]},
                                     separators=(",", ":")))


def clusters(records):
    """The bootstrap's unit per record: its run when there are at least 3 runs, else its block."""
    runs = sorted({r["run"] for r in records})
    if len(runs) >= 3:
        return [r["run"] for r in records]
    return [f"{r['run']}/{parse_site(r['site'])[0]}" for r in records]  # final and embed: a cluster each


def rho_with_interval(records, statistic, rng, n_boot=BOOTSTRAP):
    x = np.array([r[statistic] for r in records], dtype=float)
    y = np.array([r["abs_delta"] for r in records], dtype=float)
    rho = spearman(x, y)
    keys = clusters(records)
    units = sorted(set(keys))
    members = {u: np.array([i for i, k in enumerate(keys) if k == u]) for u in units}
    draws = []
    for _ in range(n_boot if rho is not None and len(units) >= 3 else 0):
        picked = np.concatenate([members[units[j]] for j in rng.integers(0, len(units), len(units))])
        value = spearman(x[picked], y[picked])
        if value is not None:
            draws.append(value)
    interval = [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))] if draws else None
    return {"rho": rho, "ci95": interval, "clusters": len(units)}


def transfer(sets, delta_threshold=DELTA_THRESHOLD, seed=0):
    """sets: [(name, records)]. The ranking on each set and the threshold rule for each ordered pair."""
    rng = np.random.default_rng(seed)
    for _, records in sets:
        label_needs(records, delta_threshold)
    ranking = {name: {s: rho_with_interval(records, s, rng) for s in STATISTICS} for name, records in sets}
    pairs = []
    for fit_name, fit in sets:
        best = max(STATISTICS, key=lambda s: abs(ranking[fit_name][s]["rho"] or 0))
        for test_name, test in sets:
            if test_name == fit_name:
                continue
            tl = np.array([r["needs"] for r in test])
            rules = []
            for s in STATISTICS:
                t = fit_threshold(np.array([r[s] for r in fit], dtype=float), np.array([r["needs"] for r in fit]))
                rule = {"statistic": s, "threshold": t, "always_no_accuracy": float((~tl).mean())}
                if t is not None:
                    rule.update(scores(np.array([r[s] for r in test], dtype=float), tl, t))
                rules.append(rule)
            pairs.append({"fitted_on": fit_name, "tested_on": test_name, "best_on_fit": best,
                          "rho_fit": ranking[fit_name][best], "rho_test": ranking[test_name][best],
                          "positives_fit": int(sum(r["needs"] for r in fit)), "positives_test": int(tl.sum()),
                          "rules": rules})
    return {"delta_threshold": delta_threshold,
            "sets": [{"name": n, "sites": len(r), "runs": len({x["run"] for x in r}),
                      "needing": int(sum(x["needs"] for x in r))} for n, r in sets],
            "ranking": ranking, "pairs": pairs}


def markdown(result):
    names = [s["name"] for s in result["sets"]]
    lines = ["# Re-centering predictor across models", "",
             f"A site needs its centering state when its flip moves the val loss by more than "
             f"{result['delta_threshold']:g} nats (one model: decided above by the probe; several runs: |Δ| above).", "",
             "| set | sites | runs | sites that need it |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['sites']} | {s['runs']} | {s['needing']} |" for s in result["sets"]]
    lines += ["", "## Ranking: Spearman's ρ of each statistic with |Δ|", "",
              "95% percentile bootstrap over clusters (runs, or blocks of a single model).", "",
              "| statistic | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for s in STATISTICS:
        cells = []
        for n in names:
            r = result["ranking"][n][s]
            ci = "" if r["ci95"] is None else f" [{r['ci95'][0]:+.2f}, {r['ci95'][1]:+.2f}]"
            cells.append(f"{fmt(r['rho'], '+.2f')}{ci}")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", "## Fitted on one, tested on another", "",
              "The statistic with the largest |ρ| on the fitting set, read on the test set; and each statistic's "
              "threshold rule fitted on one set and scored on the other (always-no: the accuracy of calling no site).", ""]
    for p in result["pairs"]:
        ci = p["rho_test"]["ci95"]
        lines += [f"### {p['fitted_on']} → {p['tested_on']}", "",
                  f"Best ranking statistic on {p['fitted_on']}: {p['best_on_fit']} (ρ {fmt(p['rho_fit']['rho'], '+.2f')}); "
                  f"on {p['tested_on']}: ρ {fmt(p['rho_test']['rho'], '+.2f')}"
                  + ("" if ci is None else f" [{ci[0]:+.2f}, {ci[1]:+.2f}]") + ".", ""]
        if not p["positives_fit"]:
            lines += [f"No threshold rule: no site of {p['fitted_on']} needs its centering state at this threshold.", ""]
            continue
        lines += ["| statistic | threshold | accuracy | balanced accuracy | always-no |", "|---|---|---|---|---|"]
        lines += [f"| {r['statistic']} | {fmt(r['threshold'], '.3g')} | {fmt(r.get('accuracy'), '.3f')} "
                  f"| {fmt(r.get('balanced_accuracy'), '.3f')} | {r['always_no_accuracy']:.3f} |" for r in p["rules"]]
        lines.append("")
    return "\n".join(lines)


def run_transfer(paths, out, delta_threshold=DELTA_THRESHOLD, log=print):
    if len(paths) < 2:
        raise UserError("transfer needs at least two record sets (folders with recentering.json, or records files)")
    sets = [read_records(p) for p in paths]
    names = [n for n, _ in sets]
    if len(set(names)) < len(names):
        raise UserError(f"two record sets are both named {max(names, key=names.count)!r}; give distinct folders or files")
    result = transfer(sets, delta_threshold)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "transfer.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (out / "transfer.md").write_text(text)
    log(text + f"\nwritten: {out / 'transfer.md'}, transfer.json")
    return result
