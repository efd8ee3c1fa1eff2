"""Gemma 3 in our GPT: random Gemma3ForCausalLM checkpoints built here (hf_checkpoints.py: heads of 12
on a 32-wide stream, a softmax scale of 1/sqrt(10), local blocks of 8 tokens with their own RoPE base,
all shorter than the tests' 48-token context, so the mask matters) import with transformers' logits and
greedy choices, the KV cache included; the export round trip gives the same tensors; what does not map
is refused in one line; and a sliding-window run trains from scratch and resumes exactly after kill -9."""
import dataclasses
import json
import math
import re
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import hf
from config import Config, UserError, apply_overrides, save_config
from hf_checkpoints import build
from model import GPT
from model.diagnostics import attention_stats, norm_sites
from repo import ROOT, accelerate_launch, assert_same_metrics, tiny_run_config, wait_for, one_line_error
from training.checkpoint import check_resumable, list_checkpoints

transformers = pytest.importorskip("transformers", reason="the Gemma 3 tests check against transformers")

VARIANTS = {  # id -> Gemma3TextConfig values on top of hf_checkpoints.build's Gemma 3 shape
    "gemma3": {},
    "gemma3-softcap-untied-mha": {"final_logit_softcapping": 3.0, "tie_word_embeddings": False, "num_key_value_heads": 4},
}


@pytest.fixture(scope="module")
def gemma(tmp_path_factory, tokenizer_path):
    """gemma(name, **values): a saved random Gemma3ForCausalLM checkpoint, built once per name."""
    built = {}

    def make(name="gemma3", **values):
        if name not in built:
            built[name] = build("gemma3", tmp_path_factory.mktemp(name), tokenizer_path,
                                **{**VARIANTS.get(name, {}), **values})
        return built[name]
    return make


def reference(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()


def tokens(vocab_size, shape=(2, 48), seed=1):
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def max_delta(name, ours, theirs):
    delta = (ours - theirs).abs().max().item()
    print(f"max |Δ logit| {name}: {delta:.2e}")
    return delta


@pytest.mark.parametrize("name", list(VARIANTS))
def test_imported_logits_equal_transformers(gemma, name):
    folder = gemma(name)
    model, config, _ = hf.load_pretrained(folder)
    assert (config.head_dim, config.query_pre_attn_scalar, config.sliding_window) == (12, 10, 8)
    assert (config.block_attention, config.rope_theta, config.rope_local_theta) == ("local*2,global", 500.0, 50.0)
    assert config.norm_position == "peri" and config.mlp == "geglu_tanh" and config.scale_embedding
    idx = tokens(config.vocab_size)
    with torch.no_grad():
        assert max_delta(f"import {name}", model(idx)[0], reference(folder)(idx).logits) < 1e-5


def test_the_window_and_the_local_rope_base_change_the_logits(gemma):
    """Else the test above would pass without them: each, undone, moves the logits far from transformers'."""
    folder = gemma()
    idx = tokens(320)
    with torch.no_grad():
        expected = reference(folder)(idx).logits
        model, _, _ = hf.load_pretrained(folder)
        for block in model.transformer.h:
            block.attn.window = 0
        assert max_delta("without the window", model(idx)[0], expected) > 1e-2
        model, _, _ = hf.load_pretrained(folder)
        model.transformer.h[0].attn.rotary = model.transformer.h[2].attn.rotary  # the global base everywhere
        assert max_delta("without the local base", model(idx)[0], expected) > 1e-2


@pytest.mark.parametrize("name", list(VARIANTS))
def test_greedy_generation_past_the_window_equals_transformers_generate(gemma, name):
    folder = gemma(name)
    model, config, _ = hf.load_pretrained(folder)
    theirs = reference(folder)
    theirs.generation_config.eos_token_id = None  # 20 tokens whatever comes out, as ours gives
    prompt = tokens(config.vocab_size, (1, 6), seed=2)
    expected = theirs.generate(prompt, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(prompt),
                               pad_token_id=0)
    cached = model.generate(prompt, 20, temperature=0, use_cache=True)
    assert cached.shape == (1, 26) and torch.equal(cached, expected)
    assert torch.equal(model.generate(prompt, 20, temperature=0, use_cache=False), expected)


def test_the_kv_cache_past_the_window_gives_the_full_forward_logits(gemma):
    """A prompt longer than the window, then one token at a time: the local blocks keep their last
    window - 1 keys only, and every step's logits equal the full forward's."""
    model, config, _ = hf.load_pretrained(gemma())
    idx = tokens(config.vocab_size, (2, 40))
    caches = [{} for _ in model.transformer.h]
    with torch.no_grad():
        steps = [model(idx[:, :12], kv_caches=caches)[0]] + [model(idx[:, t:t + 1], kv_caches=caches)[0]
                                                             for t in range(12, 40)]
        assert max_delta("KV cache past the window", torch.cat(steps, 1), model(idx)[0]) < 1e-5
    assert [c["k"].size(2) for c in caches] == [7, 7, 40] and all(c["pos"] == 40 for c in caches)


def test_generation_past_the_context_is_the_same_with_and_without_the_cache(small_model_config):
    config = small_model_config(pos_emb="rope", sliding_window=4, block_attention="local,global", head_dim=6)
    torch.manual_seed(0)
    model = GPT(config).eval()
    prompt = tokens(config.vocab_size, (2, 5), seed=3)
    cached = model.generate(prompt, 30, temperature=0, use_cache=True)  # 35 tokens in a 16-token context
    assert torch.equal(cached, model.generate(prompt, 30, temperature=0, use_cache=False))


def test_import_then_export_gives_the_same_tensors_and_the_same_model(gemma, tmp_path):
    """Every tensor comes back equal, except the gains: w -> fp32(1 + w) -> fp32(1 + w) - 1 rounds w to
    2^-23, and Gemma, which computes 1 + w in fp32, computes the same gain from it: the same logits."""
    folder = gemma()
    model, config, tokenizer = hf.load_pretrained(folder)
    hf.export_model(model, config, tokenizer, tmp_path / "out")
    original, exported = load_file(folder / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(exported) == sorted(original)
    gains = [k for k in original if k.endswith("norm.weight")]
    assert len(gains) == 3 * 6 + 1
    for key in original:
        if key in gains:
            assert torch.equal(1 + exported[key], 1 + original[key]) and (exported[key] - original[key]).abs().max() <= 2 ** -23
        else:
            assert torch.equal(exported[key], original[key]), key
    saved, source = (json.loads((f / "config.json").read_text()) for f in (tmp_path / "out", folder))
    for key in ("architectures", "head_dim", "query_pre_attn_scalar", "sliding_window", "layer_types", "rope_parameters",
                "hidden_activation", "num_key_value_heads", "intermediate_size", "rms_norm_eps"):
        assert saved[key] == source[key], key
    idx = tokens(config.vocab_size)
    with torch.no_grad():
        assert torch.equal(reference(tmp_path / "out")(idx).logits, reference(folder)(idx).logits)


def gemma_stack(small_model_config, **overrides):
    """A GPT of Gemma 3's shape built from scratch, its weights (gains too) moved away from their init."""
    values = dict(vocab_size=320, n_layer=3, n_embd=32, n_head=4, n_kv_head=2, head_dim=12, pos_emb="rope",
                  norm="rmsnorm", norm_position="peri", qk_norm="rmsnorm", mlp="geglu_tanh", scale_embedding=True,
                  query_pre_attn_scalar=10, sliding_window=4, block_attention="local,global,local",
                  rope_local_theta=100.0, norm_eps=1e-6, block_size=24)
    config = small_model_config(**{**values, **overrides})
    torch.manual_seed(0)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model, config


@pytest.mark.parametrize("overrides", [{}, dict(tie_embeddings=False, logit_softcap=5.0, norm_gain=False)])
def test_a_gemma_shaped_run_exports_to_gemma3_and_comes_back_the_same(small_model_config, tokenizer_path, tmp_path,
                                                                      overrides):
    model, config = gemma_stack(small_model_config, **overrides)
    hf.export_model(model, config, tokenizer_path, tmp_path / "out")
    theirs = reference(tmp_path / "out")
    assert type(theirs).__name__ == "Gemma3ForCausalLM"
    idx = tokens(config.vocab_size, (2, 24))
    with torch.no_grad():
        assert max_delta(f"export {overrides}", model(idx)[0], theirs(idx).logits) < 1e-5
    back, back_config, _ = hf.load_pretrained(tmp_path / "out")
    ours, again = model.state_dict(), back.state_dict()
    assert all(torch.equal(again[k], ours[k]) for k in ours)
    gains = set(again) - set(ours)  # without gains (norm_gain = false) Gemma's w = 0 comes back as gain 1
    assert bool(gains) == (not config.norm_gain) and all(torch.equal(again[k], torch.ones_like(again[k])) for k in gains)
    for key in ("head_dim", "query_pre_attn_scalar", "sliding_window", "rope_local_theta", "scale_embedding",
                "logit_softcap", "mlp", "norm_position", "qk_norm"):
        assert getattr(back_config, key) == getattr(config, key), key
    assert back_config.block_attention == "local,global,local"


GEMMA3_270M = {  # Gemma 3 270M's config.json (transformers 4.x keys), so its shape is checked without its weights
    "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "vocab_size": 262144, "hidden_size": 640,
    "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1,
    "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
    "query_pre_attn_scalar": 256, "sliding_window": 512, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
    "rope_scaling": None, "final_logit_softcapping": None, "attn_logit_softcapping": None, "attention_bias": False,
    "layer_types": ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(18)],
    "use_bidirectional_attention": False, "tie_word_embeddings": True}


def test_gemma3_270m_maps_and_builds_with_transformers_parameter_count():
    """On the meta device (no memory, as FSDP's efficient loading builds it): every parameter of
    transformers' own model has a place, and the keys are the ones the issue names."""
    hf_config = transformers.Gemma3TextConfig.from_dict(GEMMA3_270M)
    kind, keys = hf.families.config_from_hf(hf_config, "gemma3-270m")
    assert kind == "gemma3_text" and keys["block_attention"] == "local*5,global,local*5,global,local*5,global"
    assert (keys["rope_theta"], keys["rope_local_theta"], keys["head_dim"], keys["sliding_window"]) == (1e6, 1e4, 256, 512)
    config = apply_overrides(Config(), {**keys, "block_size": 512}).validate()
    with torch.device("meta"):
        ours, theirs = GPT(config), transformers.Gemma3ForCausalLM(hf_config)
    assert ours.num_params() == sum(p.numel() for p in theirs.parameters()) == 268_098_176


REFUSED_IMPORTS = [  # (config values of the random checkpoint, what the one line says)
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping 50.0 (no attention soft-cap here)"),
    ({"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 500.0},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}}},
     "global rope scaling 'linear' (plain RoPE maps)"),
    ({"hidden_activation": "gelu"}, "hidden_activation 'gelu' (GeGLU here is gelu_pytorch_tanh)"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention = true (attention here is causal)"),
    ({"attention_bias": True}, "attention_bias = True but MLP biases = False"),
]


@pytest.mark.parametrize("values, message", REFUSED_IMPORTS)
def test_a_gemma_checkpoint_that_does_not_map_is_refused_in_one_line(gemma, values, message):
    folder = gemma("-".join(["gemma3", *values]), **values)
    error = one_line_error(lambda: hf.load_pretrained(folder))
    assert "(Gemma3ForCausalLM) does not map to this GPT" in error and message in error, error


def test_gemma3_with_a_vision_tower_is_refused_in_one_line(tmp_path):
    transformers.Gemma3Config().save_pretrained(tmp_path)
    assert "Gemma 3 with a vision tower (Gemma3ForConditionalGeneration); its text-only form" in one_line_error(
        lambda: hf.load_pretrained(tmp_path))


UNEXPORTABLE = [  # (changes to gemma_stack's config, what the one line names)
    (dict(pos_emb="learned"), "pos_emb = 'learned' (Gemma 3 has RoPE)"),
    (dict(qk_norm=""), "qk_norm = '' (Gemma 3 has rmsnorm on q and k)"),
    (dict(scale_embedding=False), "scale_embedding = false (Gemma 3 multiplies its embedding by sqrt(n_embd))"),
    (dict(mlp="swiglu"), "mlp = 'swiglu' (Gemma3ForCausalLM has geglu_tanh)"),
    (dict(norm="layernorm"), "norm layernorm (Gemma3ForCausalLM has rmsnorm only)"),
    (dict(output_norm="dyt"), "norm dyt (Gemma3ForCausalLM has rmsnorm only)"),
    (dict(bias=True), "bias = true (Gemma 3's MLP has no biases)"),
    (dict(norm_position="pre", qk_norm="", mlp="swiglu", scale_embedding=False, query_pre_attn_scalar=0),
     "local blocks (of these classes only Gemma 3 has sliding-window attention)"),
    (dict(norm_position="pre", qk_norm="", mlp="swiglu", sliding_window=0, block_attention=""),
     "scale_embedding (of these classes only Gemma 3 scales its embedding); query_pre_attn_scalar"),
    (dict(norm_position="pre", norm="layernorm", pos_emb="learned", qk_norm="", mlp="gelu", scale_embedding=False,
          query_pre_attn_scalar=0, sliding_window=0, block_attention="", n_kv_head=0), "head_dim (GPT-2's heads are"),
]


@pytest.mark.parametrize("overrides, message", UNEXPORTABLE)
def test_a_stack_gemma3_does_not_represent_is_refused_in_one_line(small_model_config, tokenizer_path, tmp_path,
                                                                  overrides, message):
    model, config = gemma_stack(small_model_config, **overrides)
    error = one_line_error(lambda: hf.export_model(model, config, tokenizer_path, tmp_path / "out"))
    assert error.startswith("cannot export the model: no transformers class represents") and message in error, error


@pytest.mark.parametrize("overrides, message", [
    (dict(block_attention="local,sliding"), "block_attention entry 'sliding' is not valid; choose local or global"),
    (dict(block_attention="local,global"), "block_attention has local blocks but sliding_window is 0"),
    (dict(block_attention="local*3", sliding_window=4), "block_attention describes 3 blocks but n_layer is 2"),
    (dict(sliding_window=-1), "sliding_window = -1 is out of range"),
    (dict(head_dim=-8), "head_dim = -8 is out of range"),
    (dict(head_dim=7, pos_emb="rope"), "pos_emb = 'rope' needs an even head size; the head size is 7"),
    (dict(n_embd=18, n_head=4), r"n_embd \(18\) must be divisible by n_head \(4\), or give head_dim"),
    (dict(mlp="geglu"), "mlp = 'geglu' is not valid; choose one of gelu, gelu_tanh, swiglu, geglu_tanh, relu2"),
])
def test_bad_gemma_keys_are_one_line(small_model_config, overrides, message):
    with pytest.raises(UserError, match=message):
        GPT(small_model_config(**overrides))


def test_a_head_size_of_its_own_and_a_local_block_build_as_asked(small_model_config):
    model = GPT(small_model_config(head_dim=12, n_kv_head=1, sliding_window=3, block_attention="global,local",
                                   pos_emb="rope", rope_local_theta=50.0))
    a = model.transformer.h[0].attn
    assert a.c_attn.weight.shape == (2 * 12 + 2 * 12, 16) and a.c_proj.weight.shape == (16, 24)
    assert [b.attn.window for b in model.transformer.h] == [0, 3]
    assert [b.attn.rotary.theta for b in model.transformer.h] == [10000.0, 50.0]


@pytest.mark.parametrize("change", [dict(head_dim=16), dict(query_pre_attn_scalar=16), dict(scale_embedding=True),
                                    dict(sliding_window=4), dict(block_attention="global,global"),
                                    dict(rope_local_theta=50.0), dict(mlp="geglu_tanh")])
def test_resume_that_changes_a_gemma_key_is_refused(change, small_model_config, tmp_path):
    save_config(small_model_config(), tmp_path / "config.json")
    (tmp_path / "meta.json").write_text(json.dumps({"tokenizer_hash": "h", "num_processes": 1}))
    check_resumable(tmp_path, small_model_config(max_steps=7), "h", 1)  # a schedule setting may change
    with pytest.raises(UserError, match=f"cannot resume .*: {next(iter(change))} .* would change the model"):
        check_resumable(tmp_path, small_model_config(**change), "h", 1)


def test_the_diagnostics_see_the_window_and_the_scale():
    """Equal scores: each query spreads over the keys it sees, log(min(i + 1, window)) nats."""
    q, k = torch.zeros(1, 1, 6, 4), torch.zeros(1, 1, 6, 4)
    _, entropy = attention_stats(q, k, window=2)
    assert entropy == pytest.approx(sum(math.log(min(i + 1, 2)) for i in range(6)) / 6)
    q, k = torch.ones(1, 1, 3, 4), torch.ones(1, 1, 3, 4)
    assert attention_stats(q, k, scale=0.5)[0] == pytest.approx(2.0) and attention_stats(q, k)[0] == pytest.approx(2.0)
    assert attention_stats(q, k, scale=1.0)[0] == pytest.approx(4.0)


def test_a_norm_change_on_gemma_starts_the_output_norms_from_the_old_gains(gemma):
    folder = gemma()
    original, _, _ = hf.load_pretrained(folder)
    changed, config, _ = hf.load_pretrained(folder, overrides={"norm": "dyt"})
    assert config.norm == "dyt" and type(changed.transformer.h[1].ln_2_out).__name__ == "DyT"
    for name in ("ln_1", "ln_1_out", "ln_2", "ln_2_out"):
        assert torch.equal(getattr(changed.transformer.h[1], name).weight, getattr(original.transformer.h[1], name).weight)


@pytest.mark.parametrize("site", ["block1.q", "block0.k", "block1.attn_out", "block0.mlp", "final"])
def test_one_site_changed_by_site_norms_is_the_probes_flip_of_that_site(gemma, site):
    """The need experiment's starting point: site_norms = "<site>=layernorm" puts a LayerNorm with the old
    gains at that one site, which computes what the probe's flip (mean subtraction added) computes."""
    from study.probe import flips, swapped
    folder = gemma()
    original, _, _ = hf.load_pretrained(folder)
    changed, config, _ = hf.load_pretrained(folder, overrides={"site_norms": f"{site}=layernorm"})
    changed_sites = {name: type(m).__name__ for name, m in norm_sites(changed)}
    assert changed_sites[site] == "LayerNorm"
    assert [n for n, kind in changed_sites.items() if kind == "LayerNorm"] == [site]
    assert torch.equal(dict(norm_sites(changed))[site].weight, dict(norm_sites(original))[site].weight)
    x = tokens(config.vocab_size)
    flip = next(f for f in flips(original) if f["key"] == site)
    with torch.no_grad():
        unflipped, _ = original(x)
        with swapped(original, flip["swaps"]):
            probed, _ = original(x)
        assert (probed - unflipped).abs().max() > 1e-4  # the flip changes the model
        assert max_delta(site, changed(x)[0], probed) < 1e-5


@pytest.mark.parametrize("spec, message", [
    ("block9.q=layernorm", "no site 'block9.q': there are 3 blocks (block0..block2)"),
    ("block0.qk=layernorm", "site_norms entry 'block0.qk=layernorm' must be site=norm"),
    ("final=batchnorm", "unknown norm 'batchnorm' in site_norms"),
    ("final=layernorm,final=rmsnorm", "site_norms names 'final' twice"),
])
def test_a_site_norms_entry_this_model_lacks_is_one_line(gemma, spec, message):
    with pytest.raises(UserError, match=re.escape(message)):
        hf.load_pretrained(gemma(), overrides={"site_norms": spec})


def test_site_norms_on_a_pre_norm_stack_without_qk_norm_names_what_is_missing(small_model_config):
    with pytest.raises(UserError, match="no site 'block0.q': qk_norm is off"):
        GPT(small_model_config(site_norms="block0.q=layernorm"))
    with pytest.raises(UserError, match="no site 'block0.attn_out': block 0 is a pre-norm block"):
        GPT(small_model_config(site_norms="block0.attn_out=layernorm"))
    model = GPT(small_model_config(norm="rmsnorm", site_norms=["block1.mlp=layernorm", "final=layernorm"]))
    kinds = {name: type(m).__name__ for name, m in norm_sites(model)}
    assert kinds["block1.mlp"] == kinds["final"] == "LayerNorm" and kinds["block1.attn"] == "RMSNorm"


# --- from scratch through train.py ------------------------------------------------------------------

SLIDING = dict(pos_emb="rope", norm="rmsnorm", norm_position="peri", qk_norm="rmsnorm", mlp="geglu_tanh",
               scale_embedding=True, head_dim=24, query_pre_attn_scalar=16, sliding_window=8,
               block_attention="local,global", rope_local_theta=100.0, dropout=0.1, max_steps=30, eval_interval=10)


@pytest.mark.slow
def test_a_sliding_window_run_trains_from_scratch_and_resumes_exactly_after_kill_9(tmp_path, shared_cache):
    from train import train
    from training.runlog import read_metrics
    reference = tiny_run_config(tmp_path / "reference", shared_cache, **SLIDING)
    assert reference.block_size > reference.sliding_window  # the window masks in training too
    train(reference, log=lambda *_: None)
    expected = read_metrics(reference.out_dir)
    losses = [r["val_loss"] for r in expected if "val_loss" in r]
    assert losses[-1] < losses[0] - 0.5, losses  # it learns

    killed = dataclasses.replace(reference, out_dir=str(tmp_path / "killed"))
    args = ["configs/tiny.toml", f"--out_dir={killed.out_dir}", f"--cache_dir={shared_cache}",
            *(f"--{k}={v}" for k, v in SLIDING.items())]
    proc = subprocess.Popen([sys.executable, "tests/slow_train.py", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "TEST_STEP_DELAY": "0.05"})
    wait_for(lambda: list_checkpoints(killed.out_dir) and any(r["step"] >= 15 for r in read_metrics(killed.out_dir)), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p.name for p in list_checkpoints(killed.out_dir)] == ["step_0000010"]
    train(killed, resume=True, log=lambda *_: None)
    assert_same_metrics(expected, read_metrics(killed.out_dir))


@pytest.mark.slow
def test_a_sliding_window_run_under_fsdp2_trains_as_under_ddp(tmp_path, shared_cache):
    from training.runlog import read_metrics
    args = ["configs/tiny.toml", f"--cache_dir={shared_cache}", "--batch_size=4", "--eval_windows=20",
            *(f"--{k}={v}" for k, v in SLIDING.items())]
    outputs = {}
    for mode in ("ddp", "fsdp"):
        proc = accelerate_launch("train.py", *args, f"--out_dir={tmp_path / mode}", mode=mode, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[mode] = proc.stdout
    assert "sharding: FSDP2" in outputs["fsdp"] and "local blocks 0 (window 8, theta 100)" in outputs["fsdp"]
    assert_same_metrics(read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "fsdp"), tol=1e-4)
