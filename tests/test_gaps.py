"""`analyze.py gaps` (study/gaps.py): each variant's gap to the baseline per eval step, paired by seed,
on hand-written run folders."""
import json

import pytest
from scipy import stats

from config import UserError
from repo import assert_plotted
from study.gaps import run_gaps


def comparison(tmp_path, losses):
    """A comparison folder: losses[variant][seed] = {step: val loss}; each run's metrics.jsonl and results.json."""
    rows = []
    for variant, seeds in losses.items():
        for seed, curve in seeds.items():
            run_dir = tmp_path / "runs" / variant / f"seed{seed}"
            run_dir.mkdir(parents=True)
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "val_loss": v}) + "\n"
                                                           for s, v in curve.items()))
            rows.append({"variant": variant, "seed": seed, "run_dir": str(run_dir), "status": "ok"})
    (tmp_path / "results.json").write_text(json.dumps(rows))
    return tmp_path


def test_a_gap_that_closes_and_one_that_stays(tmp_path):
    base = {s: {0: 3.0, 10: 2.8 + 0.01 * s, 20: 2.7} for s in (1, 2, 3)}
    closing = {s: {0: 4.0, 10: 2.8 + 0.01 * s + 0.1 * s, 20: 2.7 + 0.01 * s} for s in (1, 2, 3)}
    staying = {s: {0: 3.5, 10: 3.3 + 0.01 * s, 20: 3.2} for s in (1, 2, 3)}
    rows = run_gaps(comparison(tmp_path, {"unflipped": base, "closing": closing, "staying": staying}), log=lambda *a: None)
    at = {(r["variant"], r["step"]): r for r in rows}
    assert at["closing", 0]["mean"] == pytest.approx(1.0) and at["closing", 0]["sd"] == pytest.approx(0.0)
    ten = at["closing", 10]  # per seed 0.1, 0.2, 0.3: mean 0.2, sd 0.1
    half = stats.t.ppf(0.975, 2) * 0.1 / 3 ** 0.5
    assert ten["gaps"] == pytest.approx([0.1, 0.2, 0.3]) and ten["ci"] == pytest.approx([0.2 - half, 0.2 + half])
    assert ten["left"] == pytest.approx(0.2) and at["closing", 20]["left"] == pytest.approx(0.02)
    assert at["staying", 20]["left"] == pytest.approx(1.0)
    assert "| closing | 10 | 3 | +0.2000 ± 0.1000 |" in (tmp_path / "gaps.md").read_text()
    assert_plotted(tmp_path / "gaps.png")


def test_a_missing_baseline_or_folder_is_one_line(tmp_path):
    folder = comparison(tmp_path, {"a": {1: {0: 1.0}}, "b": {1: {0: 1.5}}})
    with pytest.raises(UserError, match="no finished run of the baseline 'c'; variants: a, b"):
        run_gaps(folder, "c")
    with pytest.raises(UserError, match="has no results.json"):
        run_gaps(tmp_path / "runs")
