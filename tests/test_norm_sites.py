"""The norm sites beyond the pre-norm pair (QK-norm, peri/output positions per block), DyT and z-loss:
each against a hand-computed reference, with the KV cache, with resume, and bad values refused."""
import json
import math

import pytest
import torch

from training.checkpoint import check_resumable
from config import UserError, save_config
from model import GPT, check_model_config
from model.gpt import z_loss
from model.norms import NORMS, DyT


def rms(x, eps=1e-5):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def randomize_gains(model):
    """Norm gains start at 1 and biases at 0: random ones make a mistaken parameter show."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name or "_norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() else 0.5))


def test_dyt_is_gamma_tanh_alpha_x_plus_beta(small_model_config):
    config = small_model_config(dyt_alpha=0.7)
    dyt = DyT(8, config)
    assert dyt.alpha.shape == () and dyt.alpha.item() == pytest.approx(0.7)
    assert dyt.weight.shape == (8,) and dyt.bias.shape == (8,)
    with torch.no_grad():
        dyt.weight.copy_(torch.arange(8.0))
        dyt.bias.copy_(torch.linspace(-1, 1, 8))
    x = torch.randn(3, 8) * 5
    expected = torch.arange(8.0) * torch.tanh(0.7 * x) + torch.linspace(-1, 1, 8)
    torch.testing.assert_close(dyt(x), expected)
    no_gain = DyT(8, small_model_config(norm_gain=False))
    assert no_gain.weight is None
    torch.testing.assert_close(no_gain(x), torch.tanh(0.5 * x))  # default alpha 0.5, beta 0


def test_dyt_llama_recipe_attention_alpha_and_embedding_scale(small_model_config):
    """The DyT paper's LLaMA recipe: a larger alpha at the attention norms (ln_1) than elsewhere, and a
    learned scalar on the embedding; the scalar multiplies wte + wpe before the first block and is
    not weight-decayed."""
    config = small_model_config(norm="dyt", dyt_alpha=0.2, dyt_alpha_attn=0.8, embed_scale=50.0, n_layer=2)
    model = GPT(config)
    for block in model.transformer.h:
        assert block.ln_1.alpha.item() == pytest.approx(0.8) and block.ln_2.alpha.item() == pytest.approx(0.2)
    assert model.transformer.ln_f.alpha.item() == pytest.approx(0.2)
    assert model.embed_scale.item() == 50.0 and model.embed_scale.requires_grad
    seen = []
    model.transformer.h[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    idx = torch.randint(0, config.vocab_size, (2, 5))
    model(idx)
    t = model.transformer
    torch.testing.assert_close(seen[0], 50.0 * (t.wte(idx) + t.wpe(torch.arange(5))))
    decayed, plain = model.optimizer_groups(0.1)
    assert any(p is model.embed_scale for p in plain["params"])
    assert not any(p is model.embed_scale for p in decayed["params"])
    text = model.describe_norms()
    assert "dyt: alpha initialised to 0.2\n  dyt_alpha_attn: alpha initialised to 0.8 at the attention input norm " \
           "(ln_1) of 2 of 2 blocks\n" in text
    assert "embed: times a learned scalar, initialised to 50" in text
    # where it cannot reach, the stack's log says so: q/k and attention output norms keep dyt_alpha
    peri = GPT(small_model_config(norm="dyt", dyt_alpha_attn=0.8, qk_norm="dyt", block_positions="output,peri"))
    assert peri.transformer.h[1].ln_1.alpha.item() == pytest.approx(0.8)
    assert peri.transformer.h[1].ln_1_out.alpha.item() == pytest.approx(0.5)
    assert "(ln_1) of 1 of 2 blocks; the q/k and attention output norms keep dyt_alpha\n" in peri.describe_norms()
    unused = GPT(small_model_config(norm="rmsnorm", dyt_alpha_attn=0.8)).describe_norms()
    assert "of 0 of 2 blocks (no ln_1 is dyt here: it changes nothing)" in unused
    default = GPT(small_model_config(norm="dyt", dyt_alpha=0.3))
    assert default.transformer.h[0].ln_1.alpha.item() == pytest.approx(0.3) and not hasattr(default, "embed_scale")


def test_qk_norm_is_per_head_with_gains_of_head_dim(small_model_config):
    config = small_model_config(n_embd=16, n_head=4, qk_norm="rmsnorm", block_size=8)
    model = GPT(config).eval()
    randomize_gains(model)
    attn = model.transformer.h[0].attn
    assert attn.q_norm.weight.shape == (4,) and attn.k_norm.weight.shape == (4,)
    x = torch.randn(2, 8, 16)
    # by hand: split into 4 heads of 4, RMS-normalise each head's q and k over its 4 features
    q, k, v = (t.view(2, 8, 4, 4) for t in attn.c_attn(x).split(16, dim=2))
    q, k = rms(q) * attn.q_norm.weight, rms(k) * attn.k_norm.weight
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-2, -1) / 2.0).masked_fill(~torch.ones(8, 8, dtype=torch.bool).tril(), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 8, 16)
    torch.testing.assert_close(attn(x), attn.c_proj(y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("position", ["peri", "output"])
def test_peri_and_output_blocks_against_hand_wiring(position, small_model_config):
    config = small_model_config(norm="rmsnorm", norm_position=position, output_norm="layernorm", n_layer=1)
    block = GPT(config).transformer.h[0]
    randomize_gains(block)
    assert type(block.ln_1_out).__name__ == "LayerNorm" and type(block.ln_2_out).__name__ == "LayerNorm"
    assert (block.ln_1 is None) == (position == "output")
    x = torch.randn(2, 5, 16)
    inp = (lambda n, h: h) if position == "output" else (lambda n, h: n(h))
    x1 = x + block.ln_1_out(block.attn(inp(block.ln_1, x)))
    expected = x1 + block.ln_2_out(block.mlp(inp(block.ln_2, x1)))
    torch.testing.assert_close(block(x), expected)


def test_block_positions_mix_post_and_pre(small_model_config):
    config = small_model_config(n_layer=3, block_positions="post*2,pre", norm="rmsnorm")
    model = GPT(config)
    assert [b.position for b in model.transformer.h] == ["post", "post", "pre"]
    block, x = model.transformer.h[0], torch.randn(1, 4, 16)
    x1 = block.ln_1(x + block.attn(x))
    torch.testing.assert_close(block(x), block.ln_2(x1 + block.mlp(x1)))
    text = model.describe_norms()
    assert "per-block positions" in text and "block 0: attn=rmsnorm mlp=rmsnorm (post)" in text


def test_default_model_keeps_its_parameter_names(small_model_config):
    names = set(GPT(small_model_config()).state_dict())
    assert not any("_out" in n or "q_norm" in n or "k_norm" in n for n in names)
    assert {"transformer.h.0.ln_1.weight", "transformer.h.0.ln_2.weight", "transformer.ln_f.weight"} <= names


def test_new_sites_appear_in_the_norm_stack_log(small_model_config):
    config = small_model_config(norm="dyt", qk_norm="layernorm", norm_position="peri", output_norm="rmsnorm", z_loss=1e-4)
    text = GPT(config).describe_norms()
    assert "block 0: attn=dyt mlp=dyt attn_out=rmsnorm mlp_out=rmsnorm q,k=layernorm" in text
    assert "peri-norm" in text and "dyt: alpha initialised to 0.5" in text and "z_loss: 0.0001" in text


@pytest.mark.parametrize("overrides", [
    dict(qk_norm="rmsnorm", norm="layernorm"),
    dict(norm_position="peri", norm="rmsnorm", qk_norm="scalenorm"),
    dict(norm_position="output", norm="dyt", output_norm="rmsnorm"),
    dict(block_positions="post,peri", block_norms="layernorm,rmsnorm/dyt", qk_norm="prmsnorm"),
])
def test_greedy_generation_is_identical_with_and_without_kv_cache(overrides, small_model_config):
    torch.manual_seed(0)
    model = GPT(small_model_config(block_size=16, **overrides)).eval()
    randomize_gains(model)
    prompt = torch.randint(0, 300, (2, 5))
    with_cache = model.generate(prompt, 30, temperature=0, use_cache=True)
    assert torch.equal(with_cache, model.generate(prompt, 30, temperature=0, use_cache=False))


def test_z_loss_is_the_mean_squared_log_normaliser():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # Z = 2 and 4
    assert z_loss(logits).item() == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2)
    logits = torch.randn(2, 3, 7)
    expected = logits.exp().sum(-1).log().pow(2).mean()
    torch.testing.assert_close(z_loss(logits), expected)


@pytest.mark.slow
def test_z_loss_is_logged_apart_and_val_loss_stays_cross_entropy(tiny_config):
    from training.runlog import read_metrics
    from train import train
    plain = tiny_config(out_dir=tiny_config().out_dir + "_plain", max_steps=5, eval_interval=5)
    with_z = tiny_config(max_steps=5, eval_interval=5, z_loss=1e-2)
    train(plain, log=lambda *_: None), train(with_z, log=lambda *_: None)
    a, b = read_metrics(plain.out_dir), read_metrics(with_z.out_dir)
    assert a[0]["val_loss"] == b[0]["val_loss"]  # step 0: same weights, and val loss is pure cross-entropy
    assert "train_z_loss" not in a[-1] and b[-1]["train_z_loss"] > 0
    # the untrained model's log Z is about log(vocab_size): the logged term is z_loss * log(Z)^2
    assert b[-1]["train_z_loss"] == pytest.approx(1e-2 * math.log(with_z.vocab_size) ** 2, rel=0.2)
    assert a[1]["train_loss"] != b[1]["train_loss"]  # the auxiliary gradient changed training


@pytest.mark.parametrize("overrides, message", [
    (dict(qk_norm="batchnorm"), "unknown norm 'batchnorm' in qk_norm"),
    (dict(output_norm="rmsnorm"), "output_norm = 'rmsnorm' has no site"),
    (dict(block_positions="pre,middle"), "block_positions entry 'middle' is not a position"),
    (dict(block_positions="pre*3"), "block_positions describes 3 blocks but n_layer is 2"),
    (dict(norm="rmsnorm", norm_position="peri", fused_add_norm=True), "norm_position is 'peri'"),
    (dict(norm="rmsnorm", block_positions="pre,output", fused_add_norm=True), "block_positions has output"),
])
def test_sites_that_cannot_apply_are_refused_in_one_line(overrides, message, small_model_config):
    with pytest.raises(UserError, match=message) as e:
        check_model_config(small_model_config(**overrides))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides, message", [
    (dict(norm_position="sandwich"), "norm_position = 'sandwich' is not valid"),
    (dict(dyt_alpha=0.0), "dyt_alpha = 0.0 is out of range"),
    (dict(dyt_alpha_attn=-0.1), "dyt_alpha_attn = -0.1 is out of range"),
    (dict(embed_scale=-1.0), "embed_scale = -1.0 is out of range"),
    (dict(z_loss=-1e-4), "z_loss = -0.0001 is out of range"),
])
def test_bad_values_are_one_line_errors(overrides, message, small_model_config):
    with pytest.raises(UserError, match=message):
        small_model_config(**overrides)


@pytest.mark.parametrize("change", [dict(qk_norm="rmsnorm"), dict(block_positions="post,pre"),
                                    dict(norm_position="peri", output_norm="rmsnorm"), dict(dyt_alpha=0.2),
                                    dict(dyt_alpha_attn=0.8), dict(embed_scale=50.0)])
def test_resume_that_changes_a_new_site_is_refused(change, small_model_config, tmp_path):
    save_config(small_model_config(), tmp_path / "config.json")
    (tmp_path / "meta.json").write_text(json.dumps({"tokenizer_hash": "h", "num_processes": 1}))
    check_resumable(tmp_path, small_model_config(max_steps=7), "h", 1)  # a schedule setting may change
    with pytest.raises(UserError, match=f"cannot resume .*: {next(iter(change))} .* would change the model"):
        check_resumable(tmp_path, small_model_config(**change), "h", 1)


@pytest.mark.parametrize("name", list(NORMS))
def test_every_registry_norm_works_as_qk_and_output_norm(name, small_model_config):
    """Each registry norm sits at the q, k and output sites and the loss's gradient reaches every
    parameter, those norms' own gains included."""
    torch.manual_seed(0)
    model = GPT(small_model_config(qk_norm=name, norm_position="peri", output_norm=name))
    for block in model.transformer.h:
        assert all(type(norm) is NORMS[name] for norm in (block.attn.q_norm, block.attn.k_norm, block.ln_1_out, block.ln_2_out))
    with torch.no_grad():  # SeeDNorm starts with beta = 0, where alpha's gradient is 0 by design: move off it
        for module in model.modules():
            if isinstance(getattr(module, "beta", None), torch.nn.Parameter):
                module.beta.normal_(0, 0.1)
    idx = torch.randint(0, 300, (2, 6))
    logits, loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(logits).all()
    for param_name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), param_name
        assert p.grad.abs().sum() > 0, f"{param_name}: the loss does not depend on it"
