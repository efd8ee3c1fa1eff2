"""study/to_target.py (analyze.py to-target): steps and seconds to the baseline's final val loss, from
hand-made metrics.jsonl logs whose answers are known."""
import json

import pytest
from scipy import stats

from config import UserError
from study.to_target import mean_ci, run_to_target, to_target


def log(losses, interval=10, seconds_per_step=0.5):
    """A metrics.jsonl: step 0, then one eval every `interval` steps with these val losses."""
    rows = [{"step": 0, "val_loss": 6.0, "elapsed_s": 0.0}]
    for i, loss in enumerate(losses, 1):
        rows.append({"step": i * interval - 5, "val_loss": None, "elapsed_s": 0.0})  # a log step between evals
        rows.append({"step": i * interval, "val_loss": loss, "elapsed_s": i * interval * seconds_per_step})
    return rows


RUNS = {"base": [log([5.0, 4.5, 4.0]), log([5.0, 4.6, 4.2])],          # finals 4.0 and 4.2: target 4.1
        "fast": [log([4.5, 4.05, 3.9]), log([4.0, 3.8, 3.7], seconds_per_step=1.0)],  # steps 20 and 10
        "slow": [log([5.5, 5.2, 5.0]), log([5.5, 5.2, 4.1])]}           # one never reaches it; 4.1 <= 4.1 does


def test_steps_and_seconds_to_the_baselines_mean_final_loss():
    target, entries = to_target(RUNS, "base")
    assert target == pytest.approx(4.1)
    by = {e["variant"]: e for e in entries}
    assert by["fast"]["n_reached"] == 2 and by["fast"]["per_seed"] == [{"steps": 20, "seconds": 10.0},
                                                                        {"steps": 10, "seconds": 10.0}]
    half = stats.t.ppf(0.975, 1) * 5  # steps 20, 10: std 7.07, sem 7.07 / sqrt(2) = 5
    assert by["fast"]["steps_to_target"] == pytest.approx((15.0, half))
    assert by["fast"]["seconds_to_target"] == pytest.approx((10.0, 0.0))
    assert by["fast"]["speedup_steps"][0] == pytest.approx((30 / 20 + 30 / 10) / 2)
    assert by["base"]["n_reached"] == 1 and by["base"]["steps_to_target"] == (30.0, None)  # 4.0 yes, 4.2 no
    assert by["slow"]["n_reached"] == 1 and by["slow"]["per_seed"][0] == {"steps": None, "seconds": None}
    assert by["slow"]["final_val_loss"][0] == pytest.approx(4.55)


def test_mean_ci_of_none_one_and_many():
    assert mean_ci([]) == (None, None) and mean_ci([None]) == (None, None) and mean_ci([3.0]) == (3.0, None)
    assert mean_ci([1.0, 2.0, 3.0]) == pytest.approx((2.0, stats.t.ppf(0.975, 2) * 1 / 3 ** 0.5))


def write_comparison(folder, runs, statuses=None):
    rows = []
    for variant, seeds in runs.items():
        for seed, metrics in enumerate(seeds):
            run_dir = folder / "runs" / variant / f"seed{seed}"
            run_dir.mkdir(parents=True)
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
            rows.append({"variant": variant, "seed": seed, "run_dir": str(run_dir),
                         "status": (statuses or {}).get((variant, seed), "ok")})
    (folder / "results.json").write_text(json.dumps(rows))
    (folder / "summary.json").write_text(json.dumps([{"variant": v, "verdict": "baseline" if v == "base" else "x"}
                                                     for v in runs]))


def test_a_comparison_folder_gives_the_table_and_the_curves(tmp_path):
    write_comparison(tmp_path, RUNS)
    target, entries = run_to_target(tmp_path, log=lambda *_: None)
    assert target == pytest.approx(4.1)
    text = (tmp_path / "to_target.md").read_text()
    assert "| slow | 1/2 |" in text and "(of runs that reached it)" in text
    assert json.loads((tmp_path / "to_target.json").read_text())["baseline"] == "base"
    assert (tmp_path / "to_target_vs_step.png").stat().st_size > 0 and (tmp_path / "to_target_vs_time.png").exists()
    _, fixed = run_to_target(tmp_path, baseline="slow", target=3.75, log=lambda *_: None)
    assert [e["n_reached"] for e in fixed] == [0, 1, 0]
    assert "| base | never |" in (tmp_path / "to_target.md").read_text()
    assert "fixed (--target)" in (tmp_path / "to_target.md").read_text()
    _, fixed = run_to_target(tmp_path, baseline="base", target=4.5, log=lambda *_: None)
    # base reaches 4.5 at steps 20 and 30 (mean 25); fast at step 10 in both seeds: 2.5 each
    assert fixed[1]["speedup_steps"] == pytest.approx((2.5, 0.0))


def test_a_comparison_with_an_unfinished_run_is_refused(tmp_path):
    write_comparison(tmp_path, RUNS, statuses={("slow", 1): "diverged"})
    with pytest.raises(UserError, match="not every run finished \\(slow seed 1: diverged\\)"):
        run_to_target(tmp_path, log=lambda *_: None)
    with pytest.raises(UserError, match="has no results.json"):
        run_to_target(tmp_path / "runs", log=lambda *_: None)
