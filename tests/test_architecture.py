"""The modern-decoder keys, each against an independent reference: rotary positions, grouped-query
attention, SwiGLU and ReLU², untied heads, logit soft-capping, the embedding norm, LayerNorm Scaling,
Derf and SeeDNorm, and val_bpb."""
import math

import pytest
import torch
import torch.nn.functional as F

from config import UserError
from model import GPT, make_norm
from model.diagnostics import collect, norm_sites
from model.layers import MLP, Rotary, mlp_hidden_size
from study.probe import probe


def rotate_complex(x, positions, theta):
    """RoPE written as complex multiplication: feature pair (i, i + d/2) is the complex number
    x_i + j x_{i+d/2}, multiplied by exp(j * position * theta^(-2i/d))."""
    d = x.size(-1)
    z = torch.complex(x[..., :d // 2].double(), x[..., d // 2:].double())
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = z * torch.polar(torch.ones_like(freqs), positions[:, None].double() * freqs)
    return torch.cat([z.real, z.imag], dim=-1)


def test_rope_is_the_complex_rotation():
    torch.manual_seed(0)
    rotary = Rotary(head_dim=8, block_size=32, theta=10000.0)
    x = torch.randn(2, 3, 5, 8)  # (B, heads, T, head_dim)
    for past in (0, 7):
        expected = rotate_complex(x, torch.arange(past, past + 5), 10000.0)
        torch.testing.assert_close(rotary(x, past).double(), expected, rtol=1e-6, atol=1e-6)


def test_rope_scores_depend_only_on_the_position_difference():
    torch.manual_seed(0)
    rotary = Rotary(head_dim=16, block_size=64, theta=500.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    scores = {(m, n): (rotary(q, m) * rotary(k, n)).sum().item() for m, n in [(3, 1), (12, 10), (40, 38), (5, 5), (30, 30)]}
    assert scores[(3, 1)] == pytest.approx(scores[(12, 10)], abs=1e-5) == pytest.approx(scores[(40, 38)], abs=1e-5)
    assert scores[(5, 5)] == pytest.approx((q * k).sum().item(), abs=1e-5)
    assert scores[(3, 1)] != pytest.approx(scores[(5, 5)], abs=1e-3)


def test_rope_tables_are_built_once_per_device(small_model_config):
    model = GPT(small_model_config(pos_emb="rope"))
    rotary = model.transformer.h[0].attn.rotary
    assert rotary is model.transformer.h[1].attn.rotary  # one table for every layer
    model(torch.randint(0, 300, (1, 8)))
    tables = rotary.tables[torch.device("cpu")]
    model(torch.randint(0, 300, (1, 8)))
    assert rotary.tables[torch.device("cpu")] is tables and len(rotary.tables) == 1
    assert "wpe" not in model.transformer and not any("rotary" in k for k in model.state_dict())


@pytest.mark.parametrize("overrides", [dict(pos_emb="rope"), dict(pos_emb="rope", n_kv_head=1),
                                       dict(pos_emb="rope", qk_norm="rmsnorm", mlp="swiglu", tie_embeddings=False),
                                       dict(pos_emb="none", mlp="relu2", logit_softcap=5.0, embed_norm="layernorm")])
def test_kv_cache_generation_equals_full_recompute(overrides, small_model_config):
    torch.manual_seed(0)
    model = GPT(small_model_config(block_size=16, **overrides)).eval()
    prompt = torch.randint(0, 300, (2, 5))
    # 30 new tokens run past block_size, so the sliding window (positions restart) is covered too
    assert torch.equal(model.generate(prompt, 30, temperature=0, use_cache=True),
                       model.generate(prompt, 30, temperature=0, use_cache=False))
    idx = torch.randint(0, 300, (1, 10))
    caches = [{} for _ in model.transformer.h]
    steps = [model(idx[:, :6], kv_caches=caches)[0]] + [model(idx[:, t:t + 1], kv_caches=caches)[0] for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), model(idx)[0], rtol=1e-5, atol=1e-5)


def test_grouped_query_attention_shares_each_key_head(small_model_config):
    """n_kv_head = 1 is multi-query attention: the same as full attention whose k and v projections
    are copies of the one kv head."""
    torch.manual_seed(0)
    gqa = GPT(small_model_config(n_head=2, n_kv_head=1, pos_emb="rope")).eval()
    full = GPT(small_model_config(n_head=2, pos_emb="rope")).eval()
    state = gqa.state_dict()
    for i in range(2):
        w = state[f"transformer.h.{i}.attn.c_attn.weight"]  # rows: q (16) | k (8) | v (8)
        q, k, v = w[:16], w[16:24], w[24:32]
        state[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat([q, k, k, v, v])
    full.load_state_dict(state)
    idx = torch.randint(0, 300, (2, 9))
    torch.testing.assert_close(gqa(idx)[0], full(idx)[0], rtol=1e-5, atol=1e-5)
    assert gqa.transformer.h[0].attn.c_attn.out_features == 32


@pytest.mark.parametrize("kind, formula", [
    ("swiglu", lambda m, x: (F.silu(x @ m.c_fc.weight.T) * (x @ m.c_up.weight.T)) @ m.c_proj.weight.T),
    ("relu2", lambda m, x: (torch.clamp(x @ m.c_fc.weight.T, min=0) ** 2) @ m.c_proj.weight.T),
    ("gelu_tanh", lambda m, x: (0.5 * (h := x @ m.c_fc.weight.T) * (1 + torch.tanh(math.sqrt(2 / math.pi)
                                                                          * (h + 0.044715 * h ** 3)))) @ m.c_proj.weight.T),
    ("gelu", lambda m, x: (0.5 * (h := x @ m.c_fc.weight.T) * (1 + torch.erf(h / math.sqrt(2)))) @ m.c_proj.weight.T),
])
def test_mlp_matches_its_formula(kind, formula, small_model_config):
    torch.manual_seed(0)
    mlp = MLP(small_model_config(mlp=kind)).eval()
    x = torch.randn(3, 16)
    torch.testing.assert_close(mlp(x), formula(mlp, x), rtol=1e-5, atol=1e-6)


def test_mlp_hidden_width_rules(small_model_config):
    assert mlp_hidden_size(small_model_config()) == 64  # 4 * 16
    assert mlp_hidden_size(small_model_config(n_embd=128, n_head=4, mlp="swiglu")) == 384  # 8/3 * 128 = 341 -> 384
    assert mlp_hidden_size(small_model_config(n_embd=768, n_head=12, mlp="swiglu")) == 2048
    assert mlp_hidden_size(small_model_config(mlp="swiglu", mlp_hidden=40)) == 40


def test_untied_head_is_a_separate_parameter(small_model_config):
    tied, untied = GPT(small_model_config()), GPT(small_model_config(tie_embeddings=False))
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.num_params() - tied.num_params() == 300 * 16
    assert untied.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.1)  # initialised as the embedding


def test_logit_softcap_is_c_tanh_z_over_c(small_model_config):
    torch.manual_seed(0)
    capped = GPT(small_model_config(logit_softcap=2.0)).eval()
    plain = GPT(small_model_config()).eval()
    plain.load_state_dict(capped.state_dict())
    with torch.no_grad():
        plain.lm_head.weight.mul_(300)  # logits far beyond the cap
    capped.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 300, (2, 7))
    z, _ = plain(idx)
    c, loss = capped(idx, idx)
    torch.testing.assert_close(c, 2.0 * torch.tanh(z / 2.0), rtol=1e-5, atol=1e-5)
    assert z.abs().max() > 10 and c.abs().max() <= 2.0
    torch.testing.assert_close(loss, F.cross_entropy(c.view(-1, 300), idx.view(-1)))
    # the log Z diagnostic (and z_loss, computed from the same logits in train.py) sees the capped logits
    assert collect(capped, idx)["log_z"] <= math.log(300) + 2.0 + 1e-6


def test_embed_norm_is_a_site_of_diagnostics_and_probe(small_model_config, tiny_config):
    config = small_model_config(embed_norm="layernorm", norm="rmsnorm")
    model = GPT(config).eval()
    assert norm_sites(model)[0] == ("embed", model.transformer.ln_e)
    stats = collect(model, torch.randint(0, 300, (2, 8)))
    assert stats["sites"][0] == "embed" and len(stats["mean_share"]) == len(stats["sites"])

    from probe_windows import windows
    rows = probe(model, windows(8, config.block_size), log=lambda *a: None)
    embed = [r for r in rows if r["site"] == "embed"]
    assert len(embed) == 1 and embed[0]["change"] == "mean subtraction removed" and embed[0]["delta"] != 0


def test_layernorm_scaling_multiplies_each_blocks_input_norms(small_model_config):
    torch.manual_seed(0)
    model = GPT(small_model_config(n_layer=3, norm_scaling="layer")).eval()
    assert [b.input_scale for b in model.transformer.h] == [1.0, 1 / math.sqrt(2), 1 / math.sqrt(3)]
    seen = []
    model.transformer.h[2].attn.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    model.transformer.h[2].ln_1.register_forward_hook(lambda m, args, out: seen.append(out))
    model(torch.randint(0, 300, (1, 6)))
    torch.testing.assert_close(seen[1] * math.sqrt(3), seen[0])  # ln_1 output, then what attention gets
    with pytest.raises(UserError, match="norm_scaling = 'layer' scales the input norms of pre and peri blocks"):
        GPT(small_model_config(norm_scaling="layer", norm_position="post"))


def test_fused_add_norm_with_the_new_keys_equals_unfused(small_model_config):
    torch.manual_seed(0)
    config = small_model_config(norm="rmsnorm", fused_add_norm=True, pos_emb="rope", mlp="swiglu",
                                norm_scaling="layer", tie_embeddings=False, embed_norm="rmsnorm", logit_softcap=10.0)
    model = GPT(config).eval()
    idx = torch.randint(0, 300, (2, 8))
    torch.testing.assert_close(model(idx)[0], model(idx, fused_add_norm=False)[0], rtol=1e-5, atol=1e-5)


def test_derf_matches_its_formula(small_model_config):
    torch.manual_seed(0)
    norm = make_norm("derf", 8, small_model_config(derf_alpha=0.7))
    with torch.no_grad():
        norm.shift.fill_(0.1)
        norm.weight.copy_(torch.linspace(0.5, 1.5, 8))
        norm.bias.copy_(torch.linspace(-0.2, 0.2, 8))
    x = torch.randn(4, 8)
    w, b = norm.weight.tolist(), norm.bias.tolist()
    expected = [[w[j] * math.erf(0.7 * x.tolist()[i][j] + 0.1) + b[j] for j in range(8)]
                for i in range(4)]
    torch.testing.assert_close(norm(x), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert float(norm.alpha) == pytest.approx(0.7) and norm.alpha.dim() == 0 and norm.shift.dim() == 0


def test_seednorm_matches_its_formula_and_starts_as_rmsnorm(small_model_config):
    torch.manual_seed(0)
    config = small_model_config()
    norm, rms = make_norm("seednorm", 8, config), make_norm("rmsnorm", 8, config)
    x = torch.randn(4, 8) * 3
    torch.testing.assert_close(norm(x), rms(x))  # beta = 0: tanh(0) = 0, gain = gamma = 1
    with torch.no_grad():
        norm.beta.copy_(torch.linspace(-1, 1, 8))
        norm.alpha.copy_(torch.linspace(0.5, 2, 8))
        norm.weight.copy_(torch.linspace(1, 2, 8))
    expected = []
    for row in x.tolist():
        rms_value = math.sqrt(sum(v * v for v in row) / 8 + config.norm_eps)
        s = math.tanh(sum(v * b for v, b in zip(row, norm.beta.tolist())))
        expected.append([(s * a + g) * v / rms_value for v, a, g in zip(row, norm.alpha.tolist(), norm.weight.tolist())])
    torch.testing.assert_close(norm(x), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    model = GPT(small_model_config(norm="seednorm"))
    decayed = {id(p) for p in model.optimizer_groups(0.1)[0]["params"]}
    block = model.transformer.h[0].ln_1
    assert id(block.alpha) in decayed and id(block.beta) in decayed and id(block.weight) not in decayed
    with pytest.raises(UserError, match="seednorm with norm_gain = false"):
        GPT(small_model_config(norm="seednorm", norm_gain=False))


def test_default_keys_keep_todays_parameter_names(small_model_config):
    """Checkpoints written before these keys existed load into a default model: same names and shapes."""
    names = {k: tuple(v.shape) for k, v in GPT(small_model_config(n_layer=1)).state_dict().items()}
    block = {"ln_1.weight": (16,), "attn.c_attn.weight": (48, 16), "attn.c_proj.weight": (16, 16),
             "ln_2.weight": (16,), "mlp.c_fc.weight": (64, 16), "mlp.c_proj.weight": (16, 64)}
    expected = {"transformer.wte.weight": (300, 16), "transformer.wpe.weight": (16, 16),
                "transformer.ln_f.weight": (16,), "lm_head.weight": (300, 16),
                **{f"transformer.h.0.{k}": v for k, v in block.items()}}
    assert names == expected


@pytest.mark.parametrize("bad, message", [
    (dict(pos_emb="alibi"), "pos_emb = 'alibi' is not valid; choose one of learned, rope, none"),
    (dict(mlp="geglu"), "mlp = 'geglu' is not valid; choose one of gelu, gelu_tanh, swiglu, geglu_tanh, relu2"),
    (dict(n_kv_head=3, n_head=2), r"n_head \(2\) must be a multiple of n_kv_head \(3\)"),
    (dict(logit_softcap=-1.0), r"logit_softcap = -1.0 is out of range; valid: >= 0"),
    (dict(norm_scaling="depth"), "norm_scaling = 'depth' is not valid; choose one of none, layer"),
    (dict(pos_emb="rope", n_embd=18, n_head=2), "pos_emb = 'rope' needs an even head size"),
])
def test_bad_architecture_values_are_one_line(bad, message, small_model_config):
    with pytest.raises(UserError, match=message):
        small_model_config(**bad)


def test_embed_norm_name_is_checked(small_model_config):
    with pytest.raises(UserError, match="unknown norm 'rms' in embed_norm"):
        GPT(small_model_config(embed_norm="rms"))


def test_val_bpb_on_a_hand_made_window(small_model_config):
    """A model whose logits are all 0 predicts uniformly: every target costs ln V nats. The window's
    targets are [eod, 7, 9, 3] with 0, 2, 3 and 1 bytes: bpb = 3 ln V / (ln 2 * 6); val_loss = ln V."""
    from accelerate import Accelerator
    from training.evaluation import evaluate_loss_and_bpb
    config = small_model_config(block_size=4, eval_windows=1, batch_size=1)
    model = GPT(config)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    token_bytes = torch.zeros(300, dtype=torch.int64)
    token_bytes[[7, 9, 3, 5]] = torch.tensor([2, 3, 1, 4])
    tokens = torch.tensor([5, 0, 7, 9, 3]).numpy()
    loss, bpb = evaluate_loss_and_bpb(model, tokens, config, Accelerator(cpu=True), token_bytes)
    assert loss == pytest.approx(math.log(300), rel=1e-6)
    assert bpb == pytest.approx(3 * math.log(300) / (math.log(2) * 6), rel=1e-6)
    assert evaluate_loss_and_bpb(model, tokens, config, Accelerator(cpu=True))[1] is None


def test_a_comparison_across_tokenizers_ranks_by_bits_per_byte():
    """The tokenizer hash each run recorded decides, not its config: runs with different tokenizers
    (another vocabulary, or another init_from's) are ranked per byte; a failed run does not count."""
    from types import SimpleNamespace
    from study.report import markdown_table, ranking_metric, summarize
    same = [{"status": "ok", "tokenizer_hash": "a"}, {"status": "ok", "tokenizer_hash": "a"},
            {"status": "failed", "tokenizer_hash": None}]
    assert ranking_metric(same) == "final_val_loss"
    assert ranking_metric(same + [{"status": "ok", "tokenizer_hash": "b"}]) == "final_val_bpb"
    assert ranking_metric(same + [{"status": "ok"}]) == "final_val_bpb"  # a run that recorded none
    # per token, "big" (a larger vocabulary) looks worse; per byte it is better, and that is the ranking
    rows = [{"variant": v, "seed": s, "status": "ok", "final_val_loss": loss + 0.01 * s, "final_val_bpb": bpb + 0.001 * s,
             "tokens_per_s": 1.0, "time_to_target_s": None, "tokenizer_hash": v}
            for s in (1, 2, 3) for v, loss, bpb in (("small", 3.0, 1.40), ("big", 4.0, 1.20))]
    comparison = SimpleNamespace(variants=["small", "big"], seeds=[1, 2, 3], baseline="small", target_val_loss=3.5,
                                 baseline_for=lambda v: "small")
    summary = summarize(rows, comparison)
    assert summary[1]["delta"] == pytest.approx(-0.20) and summary[1]["verdict"] == "lower (better)"
    assert "final val bits per byte" in markdown_table(summary, comparison)


def test_mixed_stacks_and_positions_work_with_the_new_keys(small_model_config):
    """Per-block norms and positions, QK-norm and output norms together with RoPE, grouped-query
    heads, SwiGLU, an untied head, soft-capping and LayerNorm Scaling: causal, cache-exact, trainable."""
    torch.manual_seed(0)
    config = small_model_config(n_layer=3, n_head=4, n_embd=32, block_norms="layernorm,rmsnorm/derf,seednorm",
                                block_positions="pre,peri,pre", qk_norm="rmsnorm", pos_emb="rope", n_kv_head=2,
                                mlp="swiglu", tie_embeddings=False, logit_softcap=10.0, norm_scaling="layer",
                                embed_norm="rmsnorm")
    model = GPT(config).eval()
    idx = torch.randint(0, 300, (2, 12))
    changed = idx.clone()
    changed[:, 8] = (changed[:, 8] + 1) % 300
    a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])
    assert torch.equal(model.generate(idx[:, :4], 20, temperature=0), model.generate(idx[:, :4], 20, temperature=0,
                                                                                      use_cache=False))
    model.train()
    _, loss = model(idx, idx)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
