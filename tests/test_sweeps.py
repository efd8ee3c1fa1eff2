"""Sweeps in a comparison: the grid, min_lr following learning_rate, LR sensitivity on hand-made results
(a diverged run counted as its initial loss), and a tiny swept comparison end to end with one run that
diverges."""
import csv
import json
import math
from types import SimpleNamespace

import pytest

import compare
from study import sweeps
import train as train_module
from config import UserError
from model import GPT
from repo import assert_plotted, write_comparison


def test_grid_crosses_variants_values_and_seeds(tmp_path, shared_cache):
    path = write_comparison(tmp_path, shared_cache, {"layernorm": {"norm": "layernorm"}, "rmsnorm": {"norm": "rmsnorm"}},
                            seeds=(1, 2), extra_base="[sweep]\nlearning_rate = [3e-3, 1e-2, 3e-2]")
    c = compare.load_comparison(path)
    assert len(c.runs) == 2 * 3 * 2 and c.sweep_key == "learning_rate"
    assert c.base_variants == ["layernorm", "rmsnorm"]
    assert c.variants[:3] == ["layernorm@learning_rate=0.003", "layernorm@learning_rate=0.01", "layernorm@learning_rate=0.03"]
    label, seed, config = c.runs[4]
    assert (label, seed) == ("rmsnorm@learning_rate=0.01", 1)
    assert config.out_dir.endswith("runs/rmsnorm/learning_rate_0.01/seed1")
    # tiny.toml: learning_rate 1e-2, min_lr 1e-3, so min_lr stays a tenth of the swept value
    assert config.learning_rate == 1e-2 and config.min_lr == pytest.approx(1e-3)
    assert c.runs[5][2].min_lr == pytest.approx(3e-3) and c.runs[3][2].min_lr == pytest.approx(3e-4)
    assert c.baseline_for("rmsnorm@learning_rate=0.03") == "layernorm@learning_rate=0.03"
    assert len({cfg.out_dir for _, _, cfg in c.runs}) == len(c.runs)


def test_a_sweep_of_another_key_leaves_min_lr_alone():
    config = SimpleNamespace(learning_rate=1e-2, min_lr=1e-3)
    assert sweeps.sweep_overrides(config, "warmup_steps", 200) == {"warmup_steps": 200}
    assert sweeps.sweep_overrides(config, "learning_rate", 0.1) == {"learning_rate": 0.1, "min_lr": pytest.approx(1e-2)}
    assert sweeps.point_label("none", "norm_position", "post") == "none@norm_position=post"
    assert sweeps.point_folder(None, None) == "" and sweeps.point_label("x", None, None) == "x"


@pytest.mark.parametrize("sweep, message", [
    ("learning_rate = []", "non-empty list of distinct values"),
    ("learning_rate = [1e-2, 1e-2]", "non-empty list of distinct values"),
    ("learning_rate = [1e-2]\nwarmup_steps = [10]", "exactly one config key"),
    ("learning_rte = [1e-2]", "unknown config key 'learning_rte'"),
    ("learning_rate = [-1.0]", "learning_rate = -1.0 is out of range"),
])
def test_bad_sweeps_are_one_line_errors(tmp_path, shared_cache, sweep, message):
    path = write_comparison(tmp_path, shared_cache, {"layernorm": {"norm": "layernorm"}}, extra_base=f"[sweep]\n{sweep}")
    with pytest.raises(UserError, match=message) as e:
        compare.load_comparison(path)
    assert "\n" not in str(e.value)


def test_a_variant_may_not_set_the_swept_key(tmp_path, shared_cache):
    path = write_comparison(tmp_path, shared_cache, {"layernorm": {"norm": "layernorm", "learning_rate": 1e-3}},
                            extra_base="[sweep]\nlearning_rate = [1e-2]")
    with pytest.raises(UserError, match="variant 'layernorm' sets learning_rate"):
        compare.load_comparison(path)


def row(status, final, initial=6.0):
    return {"status": status, "final_val_loss": final, "initial_val_loss": initial}


def test_capped_loss_counts_a_diverged_run_as_its_initial_loss():
    assert sweeps.capped_loss(row("ok", 4.0)) == 4.0
    assert sweeps.capped_loss(row("ok", 7.5)) == 6.0  # worse than the untrained model: capped
    assert sweeps.capped_loss(row("diverged", None)) == 6.0
    assert sweeps.capped_loss(row("ok", math.nan)) == 6.0


def test_lr_sensitivity_on_hand_made_results():
    # L(3e-3) = 4.0, L(1e-2) = (3.6 + 3.8) / 2 = 3.7, L(3e-2) = (6.0 [diverged] + 4.6) / 2 = 5.3
    capped = {3e-3: [4.0, 4.0], 1e-2: [3.6, 3.8], 3e-2: [sweeps.capped_loss(row("diverged", None)), 4.6]}
    sensitivity, best, means = sweeps.lr_sensitivity(capped)
    assert best == 1e-2 and means[3e-2] == pytest.approx(5.3)
    assert sensitivity == pytest.approx((4.0 + 3.7 + 5.3) / 3 - 3.7)
    assert sweeps.lr_sensitivity({1e-2: [3.0], 3e-2: [3.0]})[0] == 0.0  # equally good everywhere
    assert sweeps.lr_sensitivity({1e-2: []}) == (None, None, {})


def test_sweep_table_on_hand_made_rows(tmp_path):
    comparison = SimpleNamespace(sweep_key="learning_rate", base_variants=["a"],
                                 points={"a@learning_rate=0.01": ("a", 0.01), "a@learning_rate=0.1": ("a", 0.1)})
    d = str(tmp_path)  # no diagnostics there: no logit column entries
    rows = [{"variant": "a@learning_rate=0.01", "run_dir": d, **row("ok", 4.0)},
            {"variant": "a@learning_rate=0.01", "run_dir": d, **row("ok", 4.2)},
            {"variant": "a@learning_rate=0.1", "run_dir": d, **row("diverged", None)},
            {"variant": "a@learning_rate=0.1", "run_dir": d, **row("ok", 5.0)},
            {"variant": "a@learning_rate=0.1", "run_dir": d, **row("failed", None, None)}]  # not a result: left out
    [s] = sweeps.summarize_sweep(rows, comparison)
    assert s["values"][0.01]["mean"] == pytest.approx(4.1) and s["values"][0.1]["n_diverged"] == 1
    assert s["best_value"] == 0.01 and s["n_diverged"] == 1
    assert s["lr_sensitivity"] == pytest.approx((4.1 + 5.5) / 2 - 4.1)
    table = sweeps.sweep_table([s], [0.01, 0.1])
    assert "| a | 4.100 ± 0.141 | 5.000 (1 diverged) | 0.01 | 1 | 0.700 |" in table


class DivergesAtHighLR(GPT):
    """A GPT whose training loss is inf at learning rates >= 0.1, as an unstable run's becomes."""

    def forward(self, idx, targets=None, kv_caches=None, fused_add_norm=None, per_token=False):
        logits, loss = super().forward(idx, targets, kv_caches, fused_add_norm, per_token)
        if self.training and self.config.learning_rate >= 0.1:
            loss = loss * float("inf")
        return logits, loss


@pytest.mark.slow
def test_swept_comparison_end_to_end_with_a_diverged_run(tmp_path, shared_cache, monkeypatch):
    path = write_comparison(tmp_path, shared_cache, {"layernorm": {"norm": "layernorm"},
                                                     "qk": {"norm": "rmsnorm", "qk_norm": "rmsnorm"}},
                            seeds=(1,), extra_base="max_steps = 10\n[sweep]\nlearning_rate = [1e-2, 0.1]")
    monkeypatch.setattr(train_module, "make_model", DivergesAtHighLR)
    rows, _ = compare.compare(path, log=lambda *a: None)
    assert [r["status"] for r in rows] == ["ok", "diverged", "ok", "diverged"]
    assert all(r["initial_val_loss"] > 5 for r in rows)
    out = tmp_path / "out"
    with open(out / "results.csv") as f:  # each row's swept value has a column of its own
        assert [row["sweep_value"] for row in csv.DictReader(f)] == ["0.01", "0.1", "0.01", "0.1"]
    for name in ["sweep.json", "summary.md"]:
        assert (out / name).stat().st_size > 0, name
    assert_plotted(out / "loss_vs_learning_rate.png", (640, 420))
    assert_plotted(out / "diagnostics_qk_learning_rate_0.01.png", (1320, 512))
    summary = json.loads((out / "sweep.json").read_text())
    assert [s["variant"] for s in summary] == ["layernorm", "qk"] and all(s["n_diverged"] == 1 for s in summary)
    text = (out / "summary.md").read_text()
    assert "## Sweep over learning_rate" in text and "min_lr follows learning_rate" in text
    assert "Failed runs" not in text and "Diverged runs" in text
    # a rerun skips every run, the diverged ones included: they are results
    rows_again, _ = compare.compare(path, log=lambda *a: None)
    assert [r["status"] for r in rows_again] == [r["status"] for r in rows]


def test_a_finished_run_whose_saved_config_lacks_newer_keys_is_skipped(tmp_path, shared_cache):
    path = write_comparison(tmp_path, shared_cache, {"layernorm": {"norm": "layernorm"}}, seeds=(1,))
    [(label, seed, config)] = compare.load_comparison(path).runs
    old = {k: v for k, v in config.to_dict().items() if k not in ("qk_norm", "block_positions", "output_norm",
                                                                   "dyt_alpha", "z_loss")}
    run_dir = tmp_path / "out" / "runs" / "layernorm" / "seed1"
    run_dir.mkdir(parents=True)
    (run_dir / "result.json").write_text(json.dumps({"row": {"final_val_loss": 4.0}, "config": old}))
    assert compare.run_one(label, seed, config, 5.0, log=lambda *a: None)["final_val_loss"] == 4.0
    (run_dir / "result.json").write_text(json.dumps({"row": {}, "config": {**old, "qk_norm": "rmsnorm"}}))
    with pytest.raises(UserError, match="different config \\(qk_norm\\)"):
        compare.run_one(label, seed, config, 5.0, log=lambda *a: None)


def test_a_run_another_comparison_file_trained_is_shared(tmp_path, shared_cache):
    """Two comparison files with one out_dir (a study and a part of it) share a finished run: the
    tracker's names differ (they label the run), the training config does not."""
    path = write_comparison(tmp_path, shared_cache, {"layernorm": {"norm": "layernorm"}}, seeds=(1,))
    [(label, seed, config)] = compare.load_comparison(path).runs
    run_dir = tmp_path / "out" / "runs" / "layernorm" / "seed1"
    run_dir.mkdir(parents=True)
    other = {**config.to_dict(), "tracker_project": "another_study", "tracker_run_name": "x/seed1"}
    (run_dir / "result.json").write_text(json.dumps({"row": {"final_val_loss": 4.0}, "config": other}))
    assert compare.run_one(label, seed, config, 5.0, log=lambda *a: None)["final_val_loss"] == 4.0
    (run_dir / "result.json").write_text(json.dumps({"row": {}, "config": {**other, "seed": 7}}))
    with pytest.raises(UserError, match="different config \\(seed\\)"):
        compare.run_one(label, seed, config, 5.0, log=lambda *a: None)
