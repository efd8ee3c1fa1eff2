"""The GPT: causality, KV-cache generation, initialisation, tied weights, optimizer groups."""
import math

import pytest
import torch

from model import GPT
from model.gpt import sample_next


@pytest.mark.parametrize("position", ["pre", "post"])
def test_changing_a_future_token_leaves_past_logits_unchanged(position, small_model_config):
    torch.manual_seed(0)
    model = GPT(small_model_config(norm_position=position, norm="layernorm")).eval()
    idx = torch.randint(0, 300, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 300
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm", "scalenorm"])
def test_greedy_generation_is_identical_with_and_without_kv_cache(norm, small_model_config):
    torch.manual_seed(0)
    model = GPT(small_model_config(norm=norm, block_size=16)).eval()
    prompt = torch.randint(0, 300, (2, 5))
    # 30 new tokens run past block_size (16), so the sliding window is covered too
    with_cache = model.generate(prompt, 30, temperature=0, use_cache=True)
    without = model.generate(prompt, 30, temperature=0, use_cache=False)
    assert torch.equal(with_cache, without)


def test_kv_cache_logits_match_full_forward(small_model_config):
    torch.manual_seed(0)
    model = GPT(small_model_config()).eval()
    idx = torch.randint(0, 300, (1, 10))
    full, _ = model(idx)
    caches = [{} for _ in model.transformer.h]
    first, _ = model(idx[:, :6], kv_caches=caches)
    rest = [model(idx[:, t:t + 1], kv_caches=caches)[0] for t in range(6, 10)]
    torch.testing.assert_close(torch.cat([first] + rest, dim=1), full, rtol=1e-5, atol=1e-5)


def test_sampling_is_seeded(small_model_config):
    model = GPT(small_model_config()).eval()
    prompt = torch.zeros(1, 1, dtype=torch.long)
    runs = [model.generate(prompt, 10, temperature=1.0, top_k=50, top_p=0.9,
                           generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_top_k_and_top_p_restrict_the_choice():
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0, -2.0]])
    g = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, 1.0, 2, 1.0, g).item() for _ in range(200)}
    assert picks == {0, 1}
    # top_p = 0.5: token 0 alone holds ~73% of the mass, so it is the only choice
    assert {sample_next(logits, 1.0, 0, 0.5, g).item() for _ in range(100)} == {0}


def test_gpt2_initialisation_and_tied_embeddings(small_model_config):
    torch.manual_seed(0)
    config = small_model_config(n_layer=8, n_embd=64, n_head=4)
    model = GPT(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    proj_std = torch.cat([b.mlp.c_proj.weight.flatten() for b in model.transformer.h]).std().item()
    fc_std = torch.cat([b.mlp.c_fc.weight.flatten() for b in model.transformer.h]).std().item()
    assert fc_std == pytest.approx(0.02, rel=0.05)
    assert proj_std == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.05)


def test_weight_decay_only_on_matrices(small_model_config):
    model = GPT(small_model_config(norm="scalenorm", bias=True))
    decay, no_decay = model.optimizer_groups(0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert no_decay["weight_decay"] == 0.0
    scalars = [p for p in no_decay["params"] if p.dim() == 0]
    assert len(scalars) == 2 * 2 + 1  # one ScaleNorm g per site: 2 blocks x 2 sublayers + final
    n_total = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == n_total


def test_mixed_stack_is_built_and_described(small_model_config):
    config = small_model_config(n_layer=3, norm="rmsnorm", block_norms="layernorm,layernorm/rmsnorm,rmsnorm")
    model = GPT(config)
    types = [(type(b.ln_1).__name__, type(b.ln_2).__name__) for b in model.transformer.h]
    assert types == [("LayerNorm", "LayerNorm"), ("LayerNorm", "RMSNorm"), ("RMSNorm", "RMSNorm")]
    text = model.describe_norms()
    assert "block 1: attn=layernorm mlp=rmsnorm" in text and "final: rmsnorm" in text


def test_dropout_is_active_only_in_training(small_model_config):
    torch.manual_seed(0)
    model = GPT(small_model_config(dropout=0.3))
    idx = torch.randint(0, 300, (2, 8))
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])
