"""The predictor across models (study/transfer.py, `analyze.py transfer`) on hand-made record sets."""
import json

import pytest

from config import UserError
from repo import run_cli
from study import transfer
from study.recentering import STATISTICS


def model_records(name, blocks, need, statistic):
    """One model's records: two sites per block; need(block, kind) says whether the probe decided it
    above the threshold (|Δ| 0.05) or below (|Δ| 1e-4); statistic(block, kind) gives every statistic."""
    out = []
    for b in range(blocks):
        for kind in ("attn", "mlp"):
            above = need(b, kind)
            out.append({"run": name, "variant": name, "seed": None, "site": f"block{b}.{kind}", "kind": kind,
                        "norm": "RMSNorm", "recenters": False, "delta": 0.05 if above else 1e-4,
                        "abs_delta": 0.05 if above else 1e-4, "decision": "above" if above else "below",
                        "probe_threshold": 0.01, **{s: statistic(b, kind) for s in STATISTICS}})
    return out


def test_a_rule_that_holds_on_both_models_transfers_both_ways():
    # model A: the MLP sites need it and carry the larger statistic; model B (another scale): the same
    # ordering at ten times the values, so a threshold fitted on A misplaces B while the ranking holds
    a = model_records("A", 6, lambda b, k: k == "mlp", lambda b, k: (0.5 if k == "mlp" else 0.1) + 0.01 * b)
    b = model_records("B", 6, lambda b, k: k == "mlp", lambda b, k: (5.0 if k == "mlp" else 1.0) + 0.1 * b)
    result = transfer.transfer([("A", a), ("B", b)])
    a_to_b, b_to_a = result["pairs"]
    assert (a_to_b["fitted_on"], a_to_b["tested_on"]) == ("A", "B")
    assert a_to_b["rho_test"]["rho"] == pytest.approx(result["ranking"]["B"][a_to_b["best_on_fit"]]["rho"])
    assert result["ranking"]["A"]["mean_share"]["rho"] > 0.8 and result["ranking"]["B"]["mean_share"]["rho"] > 0.8
    rule = next(r for r in a_to_b["rules"] if r["statistic"] == "mean_share")
    assert 0.15 < rule["threshold"] <= 0.5 and rule["balanced_accuracy"] == 0.5  # every B site called: wrong scale
    back = next(r for r in b_to_a["rules"] if r["statistic"] == "mean_share")
    assert back["balanced_accuracy"] == 0.5 and back["always_no_accuracy"] == 0.5  # no A site reaches B's threshold
    same = transfer.transfer([("A", a), ("A2", [dict(r, run="A2") for r in a])])
    assert next(r for r in same["pairs"][0]["rules"] if r["statistic"] == "mean_share")["balanced_accuracy"] == 1.0


def test_a_model_with_nothing_above_gives_a_ranking_and_no_rule(tmp_path):
    a = model_records("A", 5, lambda b, k: False, lambda b, k: 0.1 * b)
    b = model_records("B", 5, lambda b, k: b >= 3, lambda b, k: 0.1 * b)
    result = transfer.transfer([("A", a), ("B", b)])
    a_to_b = result["pairs"][0]
    assert a_to_b["positives_fit"] == 0 and all(r["threshold"] is None for r in a_to_b["rules"])
    assert "No threshold rule: no site of A needs" in transfer.markdown(result)
    # the per-block bootstrap of one model: 5 blocks are 5 clusters
    assert result["ranking"]["B"]["mean_share"]["clusters"] == 5


@pytest.mark.slow
def test_records_saved_compactly_read_back_and_the_command(tmp_path):
    a = model_records("A", 4, lambda b, k: k == "mlp", lambda b, k: 0.5 if k == "mlp" else 0.1 * (b + 1) / 5)
    b = model_records("B", 4, lambda b, k: k == "mlp" and b > 1, lambda b, k: 0.4 if k == "mlp" else 0.01 * b)
    transfer.save_records(a, tmp_path / "a.json", "smol")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "recentering.json").write_text(json.dumps({"records": b}))
    assert transfer.read_records(tmp_path / "a.json")[0] == "smol"
    out = run_cli("analyze.py", "transfer", str(tmp_path / "a.json"), str(tmp_path / "b"), "--out", str(tmp_path / "t"))
    assert out.returncode == 0, out.stderr
    written = json.loads((tmp_path / "t" / "transfer.json").read_text())
    assert [s["name"] for s in written["sets"]] == ["smol", "b"] and [s["needing"] for s in written["sets"]] == [4, 2]
    assert "### smol → b" in (tmp_path / "t" / "transfer.md").read_text()
    bad = run_cli("analyze.py", "transfer", str(tmp_path / "a.json"), str(tmp_path / "nowhere"), "--out", str(tmp_path / "t"))
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "has no recentering.json" in bad.stderr


def test_one_set_is_refused():
    with pytest.raises(UserError, match="at least two record sets"):
        transfer.run_transfer(["x"], "out")
