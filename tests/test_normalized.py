"""nGPT (block_type = "normalized", model/normalized.py): the forward pass against the paper's equations
re-derived here in fp64, the unit sphere after optimizer steps, the KV cache, no weight decay, the
refusals; slow: the trainer's renormalization, kill -9 resume, and FSDP2 across two processes."""
import dataclasses
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from config import Config, UserError, apply_overrides
from model import NormalizedGPT, make_model
from model.stack import check_model_config
from repo import ROOT, assert_same_metrics, tiny_run_config, wait_for
from training.checkpoint import list_checkpoints, load_model
from training.runlog import read_diagnostics, read_metrics

NGPT = dict(block_type="normalized", pos_emb="rope", mlp="swiglu")


@pytest.fixture
def ngpt_config(small_model_config):
    def make(**overrides):
        return small_model_config(**{**NGPT, "n_head": 4, "n_kv_head": 2, "tie_embeddings": False, **overrides})
    return make


def perturbed(model, seed=0):
    """The model with every learned scale moved off its initial value (a reference that ignored one
    of them, or read it without the paper's reparametrisation, would then disagree)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.mul_(0.5 + torch.rand(p.shape, generator=g))
    return model


# --- the paper's equations, written out independently (arXiv 2410.01131, sections 2.2-2.6) ----------

def norm(x):
    return x / x.norm(dim=-1, keepdim=True)


def rope(x, theta):
    """Rotary positions, Llama's half-split layout: feature i turns with feature i + d/2 by angle
    pos * theta^(-2i/d). x (T, d)."""
    T, d = x.shape
    freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * freq[None, :]
    a, b = x[:, :d // 2], x[:, d // 2:]
    return torch.cat([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()], dim=-1)


def reference_block(block, h, c):
    """One nGPT block on h (T, d), one sequence, fp64, from the paper's equations."""
    d, heads, kv_heads = c.n_embd, c.n_head, c.n_kv_head
    dk = d // heads
    T = h.shape[0]
    base = 1 / math.sqrt(d)  # the paper's scale of the eigen learning rates, s_qk and s_z: 1/sqrt(d_model)
    alpha_a = block.alpha_attn.weight * (0.05 / base)  # alpha_init = 0.05
    alpha_m = block.alpha_mlp.weight * (0.05 / base)
    s_qk = (block.attn.s_qk.weight * (1.0 / base)).view(heads, dk)
    w = block.attn.c_attn.weight
    wq, wk, wv = w[:d], w[d:d + kv_heads * dk], w[d + kv_heads * dk:]
    q, k, v = h @ wq.T, h @ wk.T, h @ wv.T
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    outs = []
    for i in range(heads):
        g = i // (heads // kv_heads)  # the key/value head this query head reads
        qi = s_qk[i] * norm(rope(q[:, i * dk:(i + 1) * dk], c.rope_theta))
        ki = s_qk[i] * norm(rope(k[:, g * dk:(g + 1) * dk], c.rope_theta))
        scores = (qi @ ki.T) * math.sqrt(dk)  # softmax scale sqrt(d_k): q, k are unit vectors
        attn = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        outs.append(attn @ v[:, g * dk:(g + 1) * dk])
    h_a = norm(torch.cat(outs, dim=-1) @ block.attn.c_proj.weight.T)
    h = norm(h + alpha_a * (h_a - h))
    s_u, s_v = block.mlp.s_u.weight, block.mlp.s_v.weight  # init 1, scale 1
    u = (h @ block.mlp.c_up.weight.T) * s_u
    v = (h @ block.mlp.c_fc.weight.T) * s_v * math.sqrt(d)
    h_m = norm((u * torch.nn.functional.silu(v)) @ block.mlp.c_proj.weight.T)
    return norm(h + alpha_m * (h_m - h))


def reference_logits(model, idx, c):
    h = model.transformer.wte.weight[idx]
    for block in model.transformer.h:
        h = reference_block(block, h, c)
    s_z = model.s_z.weight * (1.0 / (1 / math.sqrt(c.n_embd)))
    return (h @ model.lm_head.weight.T) * s_z


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_the_model_equals_the_papers_equations(ngpt_config, kv_heads):
    c = ngpt_config(n_kv_head=kv_heads)
    model = perturbed(make_model(c)).double()
    idx = torch.randint(0, c.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    logits, _ = model(idx)
    # fp64 throughout, but for the project's rotary tables, which are fp32: differences of ~1e-8
    with torch.no_grad():
        block_out = model.transformer.h[0](model.transformer.wte(idx))
        for b in range(2):
            expected = reference_block(model.transformer.h[0], model.transformer.wte.weight[idx[b]], c)
            assert torch.allclose(block_out[b], expected, rtol=0, atol=1e-7)
            assert torch.allclose(logits[b], reference_logits(model, idx[b], c), rtol=0, atol=1e-7)


def test_weights_and_hidden_states_stay_unit_norm_after_optimizer_steps(ngpt_config):
    c = ngpt_config()
    model = make_model(c)
    opt = torch.optim.AdamW(model.optimizer_groups(0.1), lr=0.05)
    idx = torch.randint(0, c.vocab_size, (4, c.block_size), generator=torch.Generator().manual_seed(0))
    for step in range(5):
        _, loss = model(idx, idx)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step == 0:  # without the renormalization the step leaves the sphere: the check below can fail
            assert max((w.norm(dim=d) - 1).abs().max().item() for w, d in model.unit_weights()) > 1e-3
        model.after_optimizer_step()
    assert_unit(model, idx)


def assert_unit(model, idx):
    """Every weight vector along the embedding dimension, and every hidden state entering a block or
    leaving the last one, has norm 1."""
    weights = model.unit_weights()
    assert len(weights) == 1 + (not model.config.tie_embeddings) + 5 * model.config.n_layer
    for w, dim in weights:
        assert torch.allclose(w.norm(dim=dim), torch.ones(()), atol=1e-5)
    states = []
    hooks = [b.register_forward_pre_hook(lambda m, args: states.append(args[0])) for b in model.transformer.h]
    hooks.append(model.transformer.h[-1].register_forward_hook(lambda m, args, out: states.append(out)))
    with torch.no_grad():
        model(idx)
    for h in hooks:
        h.remove()
    assert len(states) == model.config.n_layer + 1
    for s in states:
        assert torch.allclose(s.norm(dim=-1), torch.ones(()), atol=1e-5)


def test_kv_cache_decoding_equals_full_recompute(ngpt_config):
    c = ngpt_config()
    model = perturbed(make_model(c)).eval()
    idx = torch.randint(0, c.vocab_size, (2, 10), generator=torch.Generator().manual_seed(2))
    full, _ = model(idx)
    caches = [{} for _ in model.transformer.h]
    first, _ = model(idx[:, :6], kv_caches=caches)
    rest = [model(idx[:, t:t + 1], kv_caches=caches)[0] for t in range(6, 10)]
    assert torch.allclose(torch.cat([first, *rest], dim=1), full, atol=1e-5)
    prompt = idx[:, :3]
    assert torch.equal(model.generate(prompt, 20, temperature=0, use_cache=True),
                       model.generate(prompt, 20, temperature=0, use_cache=False))


def test_no_parameter_is_weight_decayed(ngpt_config):
    model = make_model(ngpt_config())
    groups = model.optimizer_groups(0.1)
    assert all(g["weight_decay"] == 0.0 for g in groups)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert "weight decay: none" in model.describe_norms()


def test_bf16_keeps_hidden_states_on_the_sphere(ngpt_config):
    model = make_model(ngpt_config())
    idx = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.transformer.h[0](model.transformer.wte(idx))
        logits, _ = model(idx)
    assert torch.allclose(out.float().norm(dim=-1), torch.ones(()), atol=1e-2)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("key, value", [
    ("norm", "rmsnorm"), ("attn_norm", "layernorm"), ("block_norms", "rmsnorm*2"), ("norm_position", "post"),
    ("block_positions", "post*2"), ("qk_norm", "rmsnorm"), ("fused_add_norm", True), ("embed_norm", "rmsnorm"),
    ("logit_softcap", 15.0), ("bias", True), ("norm_scaling", "layer")])
def test_keys_that_make_no_sense_in_ngpt_are_refused_in_one_line(key, value):
    config = apply_overrides(Config(), {**NGPT, key: value}).validate()
    with pytest.raises(UserError, match="block_type = 'normalized'") as e:
        check_model_config(config)
    assert str(e.value).endswith(f"remove {key} = {value!r}") and "\n" not in str(e.value)


@pytest.mark.parametrize("key, value, message", [("pos_emb", "learned", "needs pos_emb = 'rope' or 'none'"),
                                                 ("mlp", "gelu", "needs mlp = 'swiglu'")])
def test_a_position_embedding_or_mlp_it_lacks_is_refused(key, value, message):
    config = apply_overrides(Config(), {**NGPT, key: value}).validate()
    with pytest.raises(UserError, match=message):
        check_model_config(config)


def test_an_unknown_block_type_is_refused():
    with pytest.raises(UserError, match="block_type = 'ngpt' is not valid; choose one of standard, normalized"):
        apply_overrides(Config(), {"block_type": "ngpt"}).validate()


def test_the_probe_conversion_and_export_are_refused(ngpt_config, tmp_path):
    from hf.export import to_transformers
    from study.convert import convert_model
    from study.probe import probe_model
    model = make_model(ngpt_config())
    for call in (lambda: probe_model(model, model.config, tmp_path, "x"), lambda: convert_model(model),
                 lambda: to_transformers(model, model.config, 0)):
        with pytest.raises(UserError, match="block_type = 'normalized' \\(nGPT\\) model has none"):
            call()
    assert not any(tmp_path.iterdir())


def test_a_resume_cannot_change_the_block_type(ngpt_config, tmp_path):
    import json
    from config import save_config
    from training.checkpoint import check_resumable
    save_config(ngpt_config(), tmp_path / "config.json")
    (tmp_path / "meta.json").write_text(json.dumps({"tokenizer_hash": "h", "num_processes": 1}))
    standard = dataclasses.replace(ngpt_config(), block_type="standard")
    with pytest.raises(UserError, match="block_type "):
        check_resumable(tmp_path, standard, "h", 1)


def test_a_comparison_sweeps_an_ngpt_variant(tmp_path):
    import compare
    (tmp_path / "c.toml").write_text("\n".join([
        f'base_config = "{ROOT / "configs" / "tiny.toml"}"', f'out_dir = "{tmp_path / "out"}"', "seeds = [1]",
        'baseline = "rmsnorm"', "target_val_loss = 5.0", "[sweep]", "learning_rate = [0.01, 0.03]",
        "[variants.rmsnorm]", 'norm = "rmsnorm"', "[variants.ngpt]", 'block_type = "normalized"', 'pos_emb = "rope"',
        'mlp = "swiglu"', "warmup_steps = 0"]))
    comparison = compare.load_comparison(tmp_path / "c.toml")
    ngpt = {label: config for label, _, config in comparison.runs if config.block_type == "normalized"}
    assert sorted(ngpt) == ["ngpt@learning_rate=0.01", "ngpt@learning_rate=0.03"]
    assert [c.min_lr / c.learning_rate for c in ngpt.values()] == pytest.approx([0.1, 0.1])  # tiny.toml's ratio


# --- through the trainer ----------------------------------------------------------------------------

def ngpt_run_args(out_dir, cache):
    return [str(ROOT / "configs" / "tiny.toml"), f"--out_dir={out_dir}", f"--cache_dir={cache}", "--block_type=normalized",
            "--pos_emb=rope", "--mlp=swiglu", "--tie_embeddings=false", "--learning_rate=0.05", "--min_lr=0.005",
            "--warmup_steps=0", "--dropout=0.1", "--max_steps=30", "--eval_interval=10", "--diagnostics=true"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shared_cache):
    from train import train
    config = tiny_run_config(tmp_path_factory.mktemp("ngpt") / "run", shared_cache, **NGPT, tie_embeddings=False,
                             learning_rate=0.05, min_lr=0.005, warmup_steps=0, dropout=0.1, max_steps=30,
                             eval_interval=10, diagnostics=True)
    train(config, log=lambda *_: None)
    return config, read_metrics(config.out_dir)


@pytest.mark.slow
def test_the_trainer_keeps_the_model_on_the_sphere(reference):
    config, metrics = reference
    assert metrics[-1]["val_loss"] < metrics[0]["val_loss"] - 0.5  # it learns at nGPT's learning rate
    model, _, _ = load_model(config.out_dir)
    assert isinstance(model, NormalizedGPT)
    assert_unit(model, torch.randint(0, config.vocab_size, (2, config.block_size)))
    rows = read_diagnostics(config.out_dir)
    assert rows[-1]["sites"] == []  # no norm layer
    assert rows[-1]["resid_rms"] == pytest.approx([1 / math.sqrt(config.n_embd)] * config.n_layer, rel=1e-5)


@pytest.mark.slow
def test_kill_9_then_resume_is_exact(reference, tmp_path, shared_cache):
    from train import train
    ref_config, ref_metrics = reference
    config = dataclasses.replace(ref_config, out_dir=str(tmp_path / "killed"))
    proc = subprocess.Popen([sys.executable, "tests/slow_train.py", *ngpt_run_args(config.out_dir, shared_cache)],
                            cwd=ROOT, env={**os.environ, "TEST_STEP_DELAY": "0.05"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: bool(list_checkpoints(config.out_dir)) and any(r["step"] >= 15 for r in read_metrics(config.out_dir)),
             proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p.name for p in list_checkpoints(config.out_dir)] == ["step_0000010"]
    train(config, resume=True, log=lambda *_: None)
    assert_same_metrics(ref_metrics, read_metrics(config.out_dir))


@pytest.mark.slow
def test_fsdp2_renormalizes_across_shards_as_one_process_does(reference, tmp_path, shared_cache):
    """Two processes, FSDP2 sharding every matrix along dim 0: the output projections, unit along
    dim 0, need the squared norms of both shards. The run must match DDP's (replicated weights)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines=1", "--mixed_precision=no",
              "--dynamo_backend=no", "--num_processes=2"]
    modes = {"ddp": ["--multi_gpu"],
             "fsdp": ["--use_fsdp", "--fsdp_version=2", "--fsdp_auto_wrap_policy=TRANSFORMER_BASED_WRAP",
                      "--fsdp_transformer_layer_cls_to_wrap=NormalizedBlock", "--fsdp_state_dict_type=SHARDED_STATE_DICT"]}
    runs = {}
    for mode, flags in modes.items():
        out = tmp_path / mode
        proc = subprocess.run(launch + flags + ["train.py", *ngpt_run_args(out, shared_cache), "--batch_size=4",
                                                "--eval_windows=20"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"sharding: {'FSDP2' if mode == 'fsdp' else 'none'}" in proc.stdout
        runs[mode] = out
    assert_same_metrics(read_metrics(runs["ddp"]), read_metrics(runs["fsdp"]), tol=1e-4)
    model, config, _ = load_model(runs["fsdp"])
    assert_unit(model, torch.randint(0, config.vocab_size, (2, config.block_size)))


@pytest.mark.slow
def test_it_trains_compiled_in_bf16_and_samples_with_the_kv_cache(tiny_config):
    from train import train
    result = train(tiny_config(**NGPT, max_steps=6, eval_interval=6, log_interval=2, compile=True,
                               mixed_precision="bf16", learning_rate=0.05, warmup_steps=0), log=lambda *_: None)
    metrics = read_metrics(result["run_dir"])
    assert result["steps"] == 6 and all(math.isfinite(m["train_loss"]) for m in metrics[1:])
    assert metrics[-1]["val_loss"] < metrics[0]["val_loss"]
    model, config, _ = load_model(result["run_dir"])
    assert_unit(model, torch.randint(0, config.vocab_size, (2, config.block_size)))  # the renormalization ran
    texts = []
    for flags in ([], ["--no_cache"]):  # sample.py, greedy: the same text with and without the KV cache
        proc = subprocess.run([sys.executable, "sample.py", result["run_dir"], "--max_new_tokens=40", "--temperature=0",
                               "--seed=1", *flags], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        texts.append(proc.stdout)
    assert texts[0] == texts[1] and texts[0].strip()
