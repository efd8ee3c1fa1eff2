"""Diagnostics statistics on hand-made inputs, their hook in training, and the re-centering probe."""
import json
import math
from pathlib import Path

import pytest
import torch

from config import Config
from probe_windows import windows
from study.probe import Centered, Uncentered, probe, with_centering
from model import GPT
from model.diagnostics import ROBUST_STATISTICS, collect, grad_square_sum, norm_sites, robust_stats, token_stats
from model.norms import LayerNorm, RMSNorm
from train import train


def test_constant_vector_is_all_mean():
    rms, offset, share = token_stats(torch.full((3, 8), -2.5))
    assert rms == pytest.approx(2.5) and offset == 1.0 and share == 1.0


def test_zero_mean_vector_has_no_offset():
    x = torch.tensor([[1.0, -1.0, 3.0, -3.0], [0.5, -0.5, 0.0, 0.0]])
    rms, offset, share = token_stats(x)
    assert offset == 0.0 and share == 0.0
    assert rms == pytest.approx((math.sqrt(5.0) + math.sqrt(0.125)) / 2)


def test_partial_offset_and_all_zero_token():
    # x = 1 + [a, -a]: mean 1, mean(x^2) = 1 + a^2, so share 1 / (1 + a^2) and ratio its square root
    a = 3.0
    rms, offset, share = token_stats(torch.tensor([[1 + a, 1 - a]]))
    assert share == pytest.approx(1 / (1 + a * a)) and offset == pytest.approx(1 / math.sqrt(1 + a * a))
    assert token_stats(torch.zeros(2, 4)) == (0.0, 0.0, 0.0)  # no division by zero


def test_one_massive_coordinate_fools_mean_share_not_the_robust_statistics():
    # d = 64: one coordinate M = 1000, the others +-1 summing to 0 (and one of them 0). mean = M/d, so
    # mean_share ~ 1/d and offset_ratio ~ 1/sqrt(d) whatever the bulk holds; the robust statistics compare
    # the mean with the bulk: median |x| = 1, the rms without the top 4 is 1 (the 3 others set aside are 1s)
    d, big = 64, 1000.0
    bulk = torch.tensor([1.0, -1.0] * 31 + [0.0])
    x = torch.cat([torch.tensor([big]), bulk]).unsqueeze(0)
    rms, offset, share = token_stats(x)
    assert share == pytest.approx((big / d) ** 2 / ((big ** 2 + 62) / d))  # ~ 1/d
    over_median, trimmed, top_share = robust_stats(x)
    assert over_median == pytest.approx(big / d)
    assert trimmed == pytest.approx((big / d) / math.sqrt((62 - 3) / (d - 4)))
    assert top_share == pytest.approx((big ** 2 + 3) / (big ** 2 + 62))
    # the same bulk without the massive coordinate: zero mean, nothing to find
    assert robust_stats(bulk.unsqueeze(0))[:2] == (0.0, 0.0)
    assert robust_stats(torch.zeros(2, 8)) == (0.0, 0.0, 0.0)  # no division by zero


def test_collect_reports_the_robust_statistics_per_site():
    torch.manual_seed(0)
    model = GPT(Config(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=300, qk_norm="rmsnorm").validate())
    stats = collect(model, torch.randint(0, 300, (2, 8)))
    for key in ROBUST_STATISTICS:
        assert len(stats[key]) == len(stats["sites"]) and all(v >= 0 for v in stats[key])
    assert all(0 < v <= 1 for v in stats["top_energy_share"])


def test_grad_square_sum_of_hand_made_gradients():
    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])
    assert grad_square_sum([a, b, c]).item() == pytest.approx(25.0) and grad_square_sum([c]) is None


def test_collect_sees_every_norm_site(small_model_config):
    config = small_model_config(n_layer=3, block_norms="layernorm,rmsnorm*2", final_norm="scalenorm")
    model = GPT(config).train()
    stats = collect(model, torch.randint(0, config.vocab_size, (2, 8)))
    assert stats["sites"] == ["block0.attn", "block0.mlp", "block1.attn", "block1.mlp", "block2.attn", "block2.mlp", "final"]
    assert all(len(stats[k]) == 7 for k in ("input_rms", "offset_ratio", "mean_share")) and len(stats["resid_rms"]) == 3
    # the final norm's input is the last block's output
    assert stats["input_rms"][-1] == pytest.approx(stats["resid_rms"][-1])
    assert model.training and not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


@pytest.mark.slow
def test_diagnostics_are_recorded_at_evals_and_do_not_change_training(tiny_config):
    plain = tiny_config(out_dir=str(Path(tiny_config().out_dir).parent / "plain"), max_steps=10, eval_interval=5)
    with_diag = tiny_config(max_steps=10, eval_interval=5, diagnostics=True)
    a, b = train(plain, log=lambda *_: None), train(with_diag, log=lambda *_: None)
    assert a["final_val_loss"] == b["final_val_loss"] and a["final_train_loss"] == b["final_train_loss"]
    rows = [json.loads(l) for l in (Path(with_diag.out_dir) / "diagnostics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 5, 10]
    assert rows[0]["grad_norm"] is None and all(g > 0 for g in rows[-1]["grad_norm"])
    assert not (Path(plain.out_dir) / "diagnostics.jsonl").exists()


def norm_config(small_model_config, **overrides):
    return small_model_config(**{"n_embd": 16, "bias": True, **overrides})


def test_centered_rmsnorm_is_layernorm_with_the_same_gain(small_model_config):
    config = norm_config(small_model_config, bias=False)
    rms, ln = RMSNorm(16, config), LayerNorm(16, config)
    with torch.no_grad():
        rms.weight.copy_(torch.randn(16))
        ln.weight.copy_(rms.weight)
    x = torch.randn(4, 16) + 3.0
    torch.testing.assert_close(Centered(rms)(x), ln(x), rtol=1e-5, atol=1e-5)


def test_uncentered_layernorm_is_rmsnorm_with_the_same_gain_and_bias(small_model_config):
    config = norm_config(small_model_config)
    ln, rms = LayerNorm(16, config), RMSNorm(16, config)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(16))
        ln.bias.copy_(torch.randn(16))
        rms.weight.copy_(ln.weight)
    x = torch.randn(4, 16) + 3.0
    torch.testing.assert_close(Uncentered(ln)(x), rms(x) + ln.bias, rtol=1e-5, atol=1e-5)
    zero_mean = x - x.mean(-1, keepdim=True)  # nothing to remove: the same as the LayerNorm
    torch.testing.assert_close(Uncentered(ln)(zero_mean), ln(zero_mean), rtol=1e-5, atol=1e-5)


@pytest.fixture
def mixed_model(small_model_config):
    config = small_model_config(block_norms="layernorm,rmsnorm", final_norm="prmsnorm")
    torch.manual_seed(0)
    return GPT(config).eval(), config, windows(8, config.block_size)


def test_probe_has_one_row_per_site_and_flips_each(mixed_model):
    model, config, val_windows = mixed_model
    rows = probe(model, val_windows, log=lambda *a: None)
    assert [r["site"] for r in rows] == [name for name, _ in norm_sites(model)]
    assert [r["change"] for r in rows] == ["mean subtraction removed"] * 2 + ["mean subtraction added"] * 3
    assert all(r["delta"] != 0 for r in rows)  # a random model's norm inputs have a mean to remove
    assert [type(m).__name__ for _, m in norm_sites(model)] == ["LayerNorm"] * 2 + ["RMSNorm"] * 2 + ["PartialRMSNorm"]


def test_a_site_changed_to_the_same_norm_gives_exactly_zero(mixed_model):
    model, config, val_windows = mixed_model
    for _, norm in norm_sites(model):
        assert with_centering(norm, isinstance(norm, LayerNorm)) is norm
    for center in (True, False):
        rows = probe(model, val_windows, center=center, log=lambda *a: None)
        same = [r for r in rows if r["recenters"] == center]
        assert same and all(r["delta"] == 0.0 and r["ci95"] == [0.0, 0.0] and r["change"] == "same" for r in same)


def test_attention_entropy_of_hand_made_maps():
    from model.diagnostics import attention_entropy
    for k in (1, 2, 5, 16):
        assert attention_entropy(torch.full((3, k), 1.0 / k)) == pytest.approx(math.log(k))
    assert attention_entropy(torch.eye(4)) == 0.0  # one-hot rows
    # rows are averaged: one uniform over 4 keys (with 0s for masked keys), one one-hot
    assert attention_entropy(torch.tensor([[0.25] * 4, [0.0, 1.0, 0.0, 0.0]])) == pytest.approx(math.log(4) / 2)


def test_attention_stats_mask_the_future():
    from model.diagnostics import attention_stats
    T = 5
    q = torch.zeros(1, 1, T, 4)  # all scores 0: query i attends uniformly to its i + 1 keys
    _, entropy = attention_stats(q, torch.randn(1, 1, T, 4))
    assert entropy == pytest.approx(sum(math.log(i + 1) for i in range(T)) / T)
    # a huge score on a FUTURE key (0 sees 4) must not count; the largest causal score is q3.k1 = 3*2/sqrt(4)
    q, k = torch.zeros(1, 1, T, 4), torch.zeros(1, 1, T, 4)
    q[0, 0, 0, 0], k[0, 0, 4, 0] = 100.0, 100.0
    q[0, 0, 3, 1], k[0, 0, 1, 1] = 3.0, 2.0
    max_logit, _ = attention_stats(q, k)
    assert max_logit == pytest.approx(3.0)


def test_activation_ratio_is_max_over_median():
    from model.diagnostics import activation_ratio
    assert activation_ratio(torch.tensor([[1.0, -2.0, 2.0, 100.0, -1.0]])) == pytest.approx(50.0)


def test_collect_reports_attention_logits_log_z_and_new_sites(small_model_config):
    config = small_model_config(norm="rmsnorm", qk_norm="rmsnorm", block_positions="peri,output")
    model = GPT(config)
    x = torch.randint(0, config.vocab_size, (2, 8))
    stats = collect(model, x)
    assert stats["sites"] == ["block0.attn", "block0.q", "block0.k", "block0.attn_out", "block0.mlp", "block0.mlp_out",
                              "block1.q", "block1.k", "block1.attn_out", "block1.mlp_out", "final"]
    assert len(stats["attn_max_logit"]) == len(stats["attn_entropy"]) == len(stats["act_ratio"]) == 2
    assert all(0 <= e <= math.log(8) for e in stats["attn_entropy"]) and all(r >= 1 for r in stats["act_ratio"])
    logits, _ = model(x)
    assert stats["log_z"] == pytest.approx(torch.logsumexp(logits.double(), -1).mean().item())
    # the hooks exist for that one pass only
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_probe_removes_qk_norms_and_output_norms(small_model_config):
    config = small_model_config(norm="rmsnorm", qk_norm="rmsnorm", block_positions="pre,peri")
    torch.manual_seed(0)
    model = GPT(config).eval()
    rows = probe(model, windows(8, config.block_size), log=lambda *a: None)
    removed = [(r["site"], r["change"]) for r in rows if r["recenters"] is None]
    assert removed == [("block0.qk", "QK-norm removed"), ("block1.qk", "QK-norm removed"),
                       ("block1.attn_out", "output norm removed"), ("block1.mlp_out", "output norm removed")]
    assert all(r["delta"] != 0 for r in rows)
    # the model is put back as it was
    assert [name for name, _ in norm_sites(model)][:3] == ["block0.attn", "block0.q", "block0.k"]
    assert type(model.transformer.h[1].ln_1_out).__name__ == "RMSNorm"
