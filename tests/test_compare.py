"""compare.py end to end on a tiny comparison: files, identical batches per seed, summary vs per-run
files, restart, a failing variant, bad configs; and analyze.py's probe on one of its runs."""
import csv
import hashlib
import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

import compare
from study import report
import train as train_module
from training import evaluation
from study.probe import run_probe
from config import UserError
from hf.gguf import PACKAGED
from repo import ROOT, assert_plotted, write_comparison


class HashedBatches(train_module.TrainBatches):
    """The trainer's own batch generator, recording a digest of every batch it hands out."""
    created = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.digest = hashlib.sha256()
        HashedBatches.created.append(self)

    def next(self, device="cpu"):
        x, y = super().next(device)
        self.digest.update(x.numpy().tobytes() + y.numpy().tobytes())
        return x, y


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, shared_cache):
    """configs/compare_tiny.toml's shape (2 variants x 2 seeds), run once with the batches hashed."""
    folder = tmp_path_factory.mktemp("compare")
    variants = {"layernorm": {"norm": "layernorm"}, "rmsnorm": {"norm": "rmsnorm"}}
    path = write_comparison(folder, shared_cache, variants)
    val_digests = []

    def hashed_validation(*args, **kwargs):
        digest = hashlib.sha256()
        for x, y, n_real in original_validation(*args, **kwargs):
            digest.update(x.numpy().tobytes() + y.numpy().tobytes())
            yield x, y, n_real
        val_digests.append(digest.hexdigest())

    original_validation = evaluation.validation_batches
    HashedBatches.created = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "TrainBatches", HashedBatches)
        mp.setattr(evaluation, "validation_batches", hashed_validation)
        rows, summary = compare.compare(path, log=lambda *a: None)
    train_digests = [b.digest.hexdigest() for b in HashedBatches.created]
    return path, folder / "out", rows, summary, train_digests, val_digests


# the train configs are checked by test_config.py; these have [variants]: compare.py's own format
COMPARISONS = sorted(p.name for p in (ROOT / "configs").glob("*.toml") if "variants" in tomllib.loads(p.read_text()))


@pytest.mark.parametrize("name", COMPARISONS)
def test_every_shipped_comparison_builds_a_valid_run_for_each_point_and_seed(name):
    source = tomllib.loads((ROOT / "configs" / name).read_text()).get("base", {}).get("init_from")
    if source in PACKAGED:  # its architecture comes from an optional model package: checked where installed
        try:
            importlib.metadata.distribution(PACKAGED[source]["package"])
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"{name} starts from {source}, not installed here ({PACKAGED[source]['pip']})")
    comparison = compare.load_comparison(ROOT / "configs" / name)  # validates every run's config
    assert len(comparison.runs) == len(comparison.variants) * len(comparison.seeds)
    assert comparison.baseline in comparison.base_variants or comparison.baseline in comparison.variants
    folders = [Path(config.out_dir) for _, _, config in comparison.runs]
    assert len(set(folders)) == len(folders) and all(comparison.out_dir / "runs" in f.parents for f in folders)
    assert {config.seed for _, _, config in comparison.runs} == set(comparison.seeds)


@pytest.mark.slow
def test_tiny_comparison_produces_every_file(tiny):
    _, out, rows, _, _, _ = tiny
    for name in ["results.csv", "results.json", "summary.md", "summary.json"]:
        assert (out / name).stat().st_size > 0, name
    for name, size in [("val_loss_vs_step.png", (640, 400)), ("val_loss_vs_time.png", (640, 400)),
                       ("diagnostics_layernorm.png", (1320, 512)), ("diagnostics_rmsnorm.png", (1320, 512))]:
        assert_plotted(out / name, size)
    assert [(r["variant"], r["seed"]) for r in rows] == [("layernorm", 1), ("rmsnorm", 1), ("layernorm", 2), ("rmsnorm", 2)]
    for r in rows:
        assert r["status"] == "ok"
        for name in ["metrics.jsonl", "diagnostics.jsonl", "result.json", "config.json"]:
            assert (Path(r["run_dir"]) / name).is_file()
    assert "![val loss vs time](val_loss_vs_time.png)" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_same_seed_same_batches_for_every_variant(tiny):
    *_, train_digests, val_digests = tiny
    ln1, rms1, ln2, rms2 = train_digests  # runs in order: seeds outer, variants inner
    assert ln1 == rms1 and ln2 == rms2
    assert ln1 != ln2  # the hash does see the data: another seed gives other batches
    assert len(val_digests) == 4 * 3 and len(set(val_digests)) == 1  # 3 evals per run, one fixed set


def test_variants_of_one_seed_start_from_the_same_random_weights():
    """What makes the paired p-value's pairing real: norms draw no random numbers at construction."""
    from model import GPT
    comparison = compare.load_comparison(ROOT / "configs" / "compare_default.toml")
    weights = []
    for _, _, config in comparison.runs[:len(comparison.variants)]:  # every variant of the first seed
        torch.manual_seed(config.seed)
        weights.append({k: v for k, v in GPT(config).state_dict().items() if v.dim() >= 2})
    assert all(torch.equal(weights[0][k], w[k]) for w in weights[1:] for k in weights[0])


@pytest.mark.slow
def test_summary_agrees_with_per_run_files(tiny):
    _, out, _, summary, _, _ = tiny
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4
    for row in table:
        metrics = [json.loads(l) for l in (Path(row["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        evals = [m for m in metrics if m["val_loss"] is not None]
        assert float(row["final_val_loss"]) == pytest.approx(evals[-1]["val_loss"])
        assert float(row["time_to_target_s"]) == next(m["elapsed_s"] for m in evals if m["val_loss"] <= 5.6)
    saved = json.loads((out / "summary.json").read_text())
    assert saved == summary
    text = (out / "summary.md").read_text()
    for entry in summary:
        losses = [float(r["final_val_loss"]) for r in table if r["variant"] == entry["variant"]]
        assert entry["mean"] == pytest.approx(np.mean(losses)) and entry["std"] == pytest.approx(np.std(losses, ddof=1))
        assert f"{entry['mean']:.4f} ± {entry['std']:.4f}" in text
    # the verdict follows from these runs' losses by the rule of report.summarize, recomputed here
    ln, rms = ([float(r["final_val_loss"]) for r in table if r["variant"] == v] for v in ("layernorm", "rmsnorm"))
    delta, pooled_std = np.mean(rms) - np.mean(ln), np.sqrt((np.var(rms, ddof=1) + np.var(ln, ddof=1)) / 2)
    p = stats.ttest_ind(rms, ln, equal_var=False).pvalue
    assert summary[1]["delta"] == pytest.approx(delta) and summary[1]["p_value"] == pytest.approx(p)
    assert summary[1]["paired_p"] == pytest.approx(stats.ttest_rel(rms, ln).pvalue)  # rows are in seed order
    expected = ("within seed noise" if abs(delta) < pooled_std else "not significant (p ≥ 0.05)" if p >= 0.05
                else "lower (better)" if delta < 0 else "higher (worse)")
    assert summary[1]["verdict"] == expected and summary[0]["verdict"] == "baseline"


@pytest.mark.slow
def test_restart_skips_finished_runs_and_resumes_an_interrupted_one(tiny, monkeypatch):
    path, out, rows, summary, _, _ = tiny
    (Path(rows[3]["run_dir"]) / "result.json").unlink()  # as if killed after its last checkpoint
    calls = []
    real_train = train_module.train
    monkeypatch.setattr(train_module, "train", lambda config, resume=False, log=None:
                        calls.append((config.out_dir, resume)) or real_train(config, resume=resume, log=log))
    again, summary_again = compare.compare(path, log=lambda *a: None)
    assert calls == [(rows[3]["run_dir"], True)]
    assert [r["final_val_loss"] for r in again] == pytest.approx([r["final_val_loss"] for r in rows])


@pytest.mark.slow
def test_a_changed_config_is_not_mixed_with_old_runs(tiny, tmp_path):
    path, *_ = tiny
    changed = tmp_path / "changed.toml"
    changed.write_text(path.read_text().replace("diagnostics = true", "diagnostics = true\nlearning_rate = 0.005"))
    with pytest.raises(UserError, match="different config"):
        compare.compare(changed, log=lambda *a: None)


@pytest.mark.slow
def test_probe_on_a_trained_run(tiny):
    _, _, rows, *_ = tiny
    run_dir = Path(rows[1]["run_dir"])
    probe = run_probe(run_dir, log=lambda *a: None)
    assert [r["site"] for r in probe] == ["block0.attn", "block0.mlp", "block1.attn", "block1.mlp", "final"]
    assert all(r["change"] == "mean subtraction added" for r in probe)
    assert_plotted(run_dir / "probe.png")
    assert "| final | RMSNorm |" in (run_dir / "probe.md").read_text()
    # fewer windows per flip: the screen and the most a flip gets
    fewer = run_probe(run_dir, log=lambda *a: None, screen=2, max_windows=2)
    assert all(r["windows"] == 2 for r in fewer) and max(r["windows"] for r in probe) > 2


@pytest.mark.slow
def test_a_failing_variant_is_reported_and_the_others_complete(tmp_path, shared_cache):
    variants = {"layernorm": {"norm": "layernorm"}, "broken": {"data": str(tmp_path / "missing" / "*.txt")}}
    path = write_comparison(tmp_path, shared_cache, variants, seeds=(1,), extra_base="max_steps = 10")
    rows, summary = compare.compare(path, log=lambda *a: None)
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert "does not exist" in rows[1]["error"] and (Path(rows[1]["run_dir"]) / "error.txt").is_file()
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "## Failed runs" in text and "broken seed 1" in text
    assert summary[1]["n_ok"] == 0 and summary[0]["n_ok"] == 1


@pytest.mark.parametrize("body, message", [
    ('seeds = [1]\nout_dir = "x"\ntarget_val_loss = 5\n[variants.a]\nnrom = "rmsnorm"\n', "variant 'a': unknown config key 'nrom'"),
    ('seeds = [1]\nout_dir = "x"\ntarget_val_loss = 5\nbaseline = "b"\n[variants.a]\n', "baseline 'b' is not a variant"),
    ('seeds = []\nout_dir = "x"\ntarget_val_loss = 5\n[variants.a]\n', "seeds must be"),
    ('seeds = [1]\nout_dir = "x"\ntarget_val_loss = 5\n[variants.a]\nseed = 3\n', "sets seed"),
    ('seeds = [1]\nout_dir = "x"\n[variants.a]\n', "target_val_loss"),
    ('seed = [1]\n', "is a training config (keys such as seed), not a comparison; train.py takes it"),
    ('seeds = [1]\nout_dir = "{tmp}/bad.toml"\ntarget_val_loss = 5\n[variants.a]\n', "out_dir '{tmp}/bad.toml' is a file"),
    ('seeds = [1]\nout_dir = ""\ntarget_val_loss = 5\n[variants.a]\n', "out_dir (the comparison folder, a string) is required"),
])
def test_bad_comparison_configs_are_one_line_errors(tmp_path, body, message):
    path = tmp_path / "bad.toml"
    path.write_text(body.format(tmp=tmp_path))
    message = message.format(tmp=tmp_path)
    with pytest.raises(UserError, match=re.escape(message)) as e:
        compare.load_comparison(path)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_command_line_error_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "compare.py"), str(tmp_path / "nope.toml")],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "does not exist" in done.stderr


def test_verdict_rule_on_hand_made_losses():
    seeds = [1, 2, 3]
    losses = {"base": [1.0, 1.1, 0.9], "worse": [2.0, 2.12, 1.88], "same": [1.01, 1.09, 0.92],
              "spread": [1.5, 2.5, 1.0]}
    comparison = compare.Comparison("hand", Path("x"), seeds, "base", 1.0,
                                    [(v, s, None) for s in seeds for v in losses])
    rows = [{"variant": v, "seed": s, "status": "ok", "final_val_loss": losses[v][i], "tokens_per_s": 1.0,
             "time_to_target_s": None} for i, s in enumerate(seeds) for v in losses]
    verdicts = {e["variant"]: e["verdict"] for e in report.summarize(rows, comparison)}
    assert verdicts == {"base": "baseline", "worse": "higher (worse)", "same": "within seed noise",
                        "spread": "not significant (p ≥ 0.05)"}
