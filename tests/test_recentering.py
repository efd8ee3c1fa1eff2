"""The re-centering predictor (study/recentering.py, `analyze.py recentering`): its statistics on
hand-made records, and the whole command on a tiny comparison."""
import json

import numpy as np
import pytest

from config import UserError
from repo import ROOT, assert_plotted, run_cli
from study import recentering


def records(runs, sites_per_run, delta, statistic, seeds=None):
    """Hand-made (run, site) records: delta(run, site) and statistic(run, site) give the values."""
    out = []
    for k in range(runs):
        for s in range(sites_per_run):
            out.append({"run": f"r{k}", "variant": "v", "seed": (seeds or list(range(runs)))[k], "site": f"block{s}.mlp",
                        "recenters": bool(k % 2), "abs_delta": delta(k, s), "delta": -delta(k, s),
                        **{name: statistic(k, s) for name in recentering.STATISTICS}})
    return out


def test_rank_correlation_and_a_run_level_bootstrap():
    rng = np.random.default_rng(0)
    monotone = records(6, 4, lambda k, s: 1e-4 * (4 * k + s + 1), lambda k, s: 1e-3 * (4 * k + s + 1))
    c = recentering.correlations(monotone, "mean_share", rng)
    assert c["rho"] == pytest.approx(1.0) and c["ci95"] == pytest.approx([1.0, 1.0])
    assert (c["n_sites"], c["n_runs"]) == (24, 6)
    # the same sites from 2 runs only: a run-level interval cannot be drawn, whatever the site count
    assert recentering.correlations(monotone[:8], "mean_share", rng)["ci95"] is None
    # within each run the statistic ranks the sites perfectly, but across runs it is reversed: resampling
    # runs (not sites) is what makes the interval wide when the runs disagree
    mixed = records(6, 4, lambda k, s: 1e-4 * (s + 1) * (1 + k), lambda k, s: 1e-3 * (s + 1) / (1 + k) ** 3)
    c = recentering.correlations(mixed, "mean_share", rng)
    assert c["ci95"][1] - c["ci95"][0] > 0.3


def test_threshold_fitted_on_half_the_seeds_is_scored_on_the_others():
    # sites with statistic > 0.5 need re-centering (|Δ| = 0.05), the others do not (|Δ| = 1e-4)
    values = records(4, 6, lambda k, s: 0.05 if s >= 3 else 1e-4, lambda k, s: 0.9 if s >= 3 else 0.1 + 0.01 * k)
    h = recentering.held_out(values, "mean_share", recentering.DELTA_THRESHOLD)
    assert h["split"] == "seeds [0, 2] vs seeds [1, 3]" and len(h["folds"]) == 2
    # each fold names its own direction: recentering.md labels its two rows with them
    assert [(f["fitted_on"], f["tested_on"]) for f in h["folds"]] == [("seeds [0, 2]", "seeds [1, 3]"), ("seeds [1, 3]", "seeds [0, 2]")]
    for fold in h["folds"]:
        assert fold["n_fit"] == fold["n_test"] == 12 and fold["positives_test"] == 6
        assert fold["accuracy"] == 1.0 and fold["balanced_accuracy"] == 1.0 and 0.13 < fold["threshold"] <= 0.9
        assert fold["always_no_accuracy"] == 0.5
    # one class only in the fitting half: no threshold, only the always-no rate
    flat = records(4, 3, lambda k, s: 1e-4, lambda k, s: 0.1 * s)
    assert all(f["threshold"] is None for f in recentering.held_out(flat, "mean_share", 0.01)["folds"])


def test_not_a_comparison_is_one_line(tmp_path):
    with pytest.raises(UserError, match="has no finished runs"):
        recentering.find_runs(tmp_path)
    with pytest.raises(UserError, match="is not a folder"):
        recentering.find_runs(tmp_path / "missing")


@pytest.mark.slow
def test_recentering_on_a_tiny_comparison(tmp_path, shared_cache):
    from compare import compare
    spec = (ROOT / "configs" / "compare_tiny.toml").read_text().replace('out_dir = "runs/compare_tiny"',
                                                                         f'out_dir = "{tmp_path / "cmp"}"')
    spec = spec.replace("[base]\n", f'[base]\ncache_dir = "{shared_cache}"\nmax_steps = 10\neval_interval = 10\n')
    (tmp_path / "tiny.toml").write_text(spec)
    rows, _ = compare(tmp_path / "tiny.toml", log=lambda *_: None)
    assert [r["status"] for r in rows] == ["ok"] * 4
    folder = tmp_path / "cmp"
    result = recentering.run_recentering(folder, jobs=2, log=lambda *_: None)
    saved = json.loads((folder / "recentering.json").read_text())
    # every (run, site) flip: 2 variants x 2 seeds x (2 blocks x 2 sites + final)
    assert len(saved["records"]) == 4 * 5 == result["n_sites"]
    assert {r["norm"] for r in saved["records"]} == {"LayerNorm", "RMSNorm"}
    for r in saved["records"]:
        probe = json.loads((folder / "runs" / r["variant"] / f"seed{r['seed']}" / "probe.json").read_text())
        assert r["delta"] == next(p["delta"] for p in probe if p["site"] == r["site"])
        assert 0 <= r["mean_share"] <= 1 and r["input_rms"] > 0
    pooled = {c["statistic"]: c for c in saved["correlations"]["all sites"]}
    assert set(pooled) == set(recentering.STATISTICS) and all(c["n_runs"] == 4 for c in pooled.values())
    text = (folder / "recentering.md").read_text()
    assert "Spearman" in text and "Held-out check" in text
    assert_plotted(folder / "recentering.png", (1296, 648))  # 7 statistics: 2 rows of 4 panels
    # one run dir is a comparison of one run; the CLI prints its report
    run = folder / "runs" / "layernorm" / "seed1"
    cli = run_cli("analyze.py", "recentering", str(run))
    assert cli.returncode == 0 and "Re-centering predictor" in cli.stdout, cli.stderr
    bad = run_cli("analyze.py", "recentering", str(folder), "--delta_threshold", "0")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--delta_threshold" in bad.stderr


STUDY_CONFIGS = ["study_recentering.toml", "study_recentering_modern.toml", "study_guided_stack.toml", "study_stability_400.toml",
                 "gpu/study_recentering_20m.toml", "gpu/study_recentering_124m.toml"]


@pytest.mark.parametrize("name", STUDY_CONFIGS)
def test_study_configs_build_every_run(name, tmp_path):
    import re
    from compare import load_comparison
    text = (ROOT / "configs" / name).read_text()
    # the commented pairs are meant to be enabled by deleting "# ": they must build too
    enabled = re.sub(r"^# (\[variants\.|[a-z_]+ = )", r"\1", text, flags=re.M)
    for spec in {text, enabled}:
        (tmp_path / "c.toml").write_text(spec.replace('out_dir = "runs/', f'out_dir = "{tmp_path}/'))
        comparison = load_comparison(tmp_path / "c.toml")
        assert len(comparison.runs) == len(comparison.seeds) * len(comparison.variants)
        pairs = [v for v in comparison.variants if v.endswith(("_ln", "_rms"))]
        # each LN variant has its RMS twin, differing only in the norm names
        for ln in [v for v in pairs if v.endswith("_ln")]:
            configs = {label: c for label, seed, c in comparison.runs if seed == comparison.seeds[0]}
            a, b = configs[ln].to_dict(), configs[ln[:-3] + "_rms"].to_dict()
            differ = {k for k in a if a[k] != b[k]} - {"out_dir", "tracker_run_name"}
            assert differ and differ <= {"norm", "qk_norm", "output_norm"}, (ln, differ)
