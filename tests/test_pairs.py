"""analyze.py pairs: each LayerNorm/RMSNorm pair of a study, paired by seed, on hand-made results."""
import json
import math

import pytest
from scipy import stats

from config import UserError
from study.pairs import detectable_effect, run_pairs


def write_study(folder, losses):
    """results.json for {variant: {seed: loss}}, each run with a probe.json and a diagnostics line."""
    rows = []
    for variant, by_seed in losses.items():
        for seed, loss in by_seed.items():
            run = folder / variant / f"seed{seed}"
            run.mkdir(parents=True)
            (run / "probe.json").write_text(json.dumps([
                {"site": "block0.attn", "recenters": True, "delta": 0.001 * seed},
                {"site": "block0.qk", "recenters": None, "delta": 0.5}]))  # a removal: not a flip
            (run / "diagnostics.jsonl").write_text(json.dumps({"step": 0, "mean_share": [0.5, 0.5]}) + "\n"
                                                   + json.dumps({"step": 400, "mean_share": [0.01 * seed, 0.002]}) + "\n")
            rows.append({"variant": variant, "seed": seed, "status": "ok", "final_val_loss": loss, "run_dir": str(run)})
    (folder / "results.json").write_text(json.dumps(rows))


def test_pairs_are_paired_by_seed(tmp_path):
    ln = {1: 3.50, 2: 3.60, 3: 3.55, 4: 3.58}
    rms = {1: 3.52, 2: 3.61, 3: 3.58, 4: 3.59}  # d = +0.02, +0.01, +0.03, +0.01
    write_study(tmp_path, {"pre_ln": ln, "pre_rms": rms, "solo": {1: 3.0}})
    [row] = run_pairs(tmp_path, log=lambda *_: None)
    d = [rms[s] - ln[s] for s in (1, 2, 3, 4)]
    mean, sd = sum(d) / 4, stats.tstd(d)
    assert row["pair"] == "pre" and row["seeds"] == [1, 2, 3, 4]
    assert row["mean_diff"] == pytest.approx(0.0175) and row["sd_diff"] == pytest.approx(sd)
    assert row["p"] == pytest.approx(stats.ttest_rel(list(rms.values()), list(ln.values())).pvalue)
    half = stats.t.ppf(0.975, 3) * sd / 2
    assert row["ci"] == pytest.approx((mean - half, mean + half))
    assert row["ci"][0] > 0  # every seed worse with RMSNorm: the interval excludes 0
    assert row["ln_probe_max"] == pytest.approx(0.004) and row["rms_mean_share_max"] == pytest.approx(0.04)
    assert "LayerNorm lower (better)" in (tmp_path / "pairs.md").read_text()


def test_detectable_effect_is_the_power_formula():
    # n = 4, sd = 0.01: (t_0.975,3 + t_0.8,3) * 0.01 / 2
    assert detectable_effect(0.01, 4) == pytest.approx((3.1824 + 0.9785) * 0.01 / 2, rel=1e-3)
    assert detectable_effect(0.01, 16) < detectable_effect(0.01, 4) / 2  # more seeds, finer
    assert math.isclose(detectable_effect(0.02, 5), 2 * detectable_effect(0.01, 5))


def test_a_pair_whose_interval_holds_zero_is_not_distinguishable(tmp_path):
    write_study(tmp_path, {"qk_ln": {1: 3.50, 2: 3.60, 3: 3.55}, "qk_rms": {1: 3.51, 2: 3.59, 3: 3.57}})
    [row] = run_pairs(tmp_path, log=lambda *_: None)
    assert row["ci"][0] < 0 < row["ci"][1]
    assert f"not distinguishable (a true d of ±{row['detectable']:.3f} is found" in (tmp_path / "pairs.md").read_text()


def test_a_folder_without_pairs_is_one_line(tmp_path):
    with pytest.raises(UserError, match="has no results.json"):
        run_pairs(tmp_path)
    write_study(tmp_path, {"layernorm": {1: 3.5}, "rmsnorm": {1: 3.6}})
    with pytest.raises(UserError, match="no <x>_ln / <x>_rms pair"):
        run_pairs(tmp_path)


def test_the_command_line_takes_help_and_a_folder(tmp_path, monkeypatch, capsys):
    """`analyze.py pairs --help` prints usage rather than taking "--help" for the folder."""
    import sys
    import analyze
    monkeypatch.setattr(sys, "argv", ["analyze.py", "pairs", "--help"])
    with pytest.raises(SystemExit) as e:
        analyze.main()
    assert e.value.code == 0 and "folder" in capsys.readouterr().out
    write_study(tmp_path, {"pre_ln": {1: 3.5, 2: 3.6}, "pre_rms": {1: 3.52, 2: 3.61}})
    monkeypatch.setattr(sys, "argv", ["analyze.py", "pairs", str(tmp_path)])
    analyze.main()
    assert (tmp_path / "pairs.md").exists()
