"""Hugging Face interop (hf/) against transformers itself, on small random checkpoints built here:
imported logits and greedy generation equal transformers', import -> export gives the same tensors,
the tokenizer survives the trip, and what does not map is refused in one line."""
import json

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

import hf
from hf_checkpoints import TEXT, build, save_tokenizer
from repo import one_line_error
from model import GPT
from study.probe import Uncentered, set_site

transformers = pytest.importorskip("transformers", reason="the interop tests check against transformers")

FAMILIES = {  # id -> (family, config values): each mapping the import knows
    "gpt2": ("gpt2", {}),
    "gpt2-untied-gelu": ("gpt2", {"tie_word_embeddings": False, "activation_function": "gelu", "n_inner": 48}),
    "llama-gqa-untied": ("llama", {}),
    "llama-tied-biases": ("llama", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True,
                                    "num_key_value_heads": 4}),
    "qwen3": ("qwen3", {}),
    "qwen3-tied-mqa": ("qwen3", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
    "qwen3-head16": ("qwen3", {"head_dim": 16}),  # heads of 16 on a 32-wide stream (head_dim)
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_path):
    """checkpoint(name, family=None, **values): a saved random checkpoint, built once per name."""
    built = {}

    def make(name, family=None, **values):
        if name not in built:
            family, defaults = (family, {}) if family else FAMILIES[name]
            built[name] = build(family, tmp_path_factory.mktemp(name), tokenizer_path, **{**defaults, **values})
        return built[name]
    return make


def reference(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()


def max_delta(name, ours, theirs):
    delta = (ours - theirs).abs().max().item()
    print(f"max |Δ logit| {name}: {delta:.2e}")  # pytest -s shows the figures docs/hf_interop.md quotes
    return delta


def tokens(config, shape=(2, 48), seed=1):
    return torch.randint(0, config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_imported_logits_equal_transformers(checkpoint, name):
    folder = checkpoint(name)
    model, config, _ = hf.load_pretrained(folder)
    idx = tokens(config)
    with torch.no_grad():
        assert max_delta(f"import {name}", model(idx)[0], reference(folder)(idx).logits) < 1e-5


@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_generation_with_kv_cache_equals_transformers_generate(checkpoint, name):
    folder = checkpoint(name)
    model, config, _ = hf.load_pretrained(folder)
    theirs = reference(folder)
    theirs.generation_config.eos_token_id = None  # 20 tokens whatever comes out, as ours gives
    prompt = tokens(config, (1, 6), seed=2)
    ours = model.generate(prompt, 20, temperature=0, use_cache=True)
    expected = theirs.generate(prompt, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(prompt),
                               pad_token_id=0)
    assert ours.shape == (1, 26) and torch.equal(ours, expected)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_import_then_export_gives_the_same_tensors(checkpoint, name, tmp_path):
    folder = checkpoint(name)
    model, config, tokenizer = hf.load_pretrained(folder)
    hf.export_model(model, config, tokenizer, tmp_path / "out")
    original, exported = load_file(folder / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[k], original[k]) for k in original)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["architectures"] == json.loads((folder / "config.json").read_text())["architectures"]


def test_tokenizer_round_trip_encodes_identically(checkpoint, tokenizer_path, tmp_path):
    folder = checkpoint("llama-gqa-untied")
    model, config, tokenizer = hf.load_pretrained(folder)
    assert tokenizer == str(folder / "tokenizer.json") and config.eod_token == "<|endoftext|>"
    hf.export_model(model, config, tokenizer, tmp_path / "out")
    ours = Tokenizer.from_file(str(tokenizer_path)).encode(TEXT, add_special_tokens=False).ids
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert theirs(TEXT, add_special_tokens=False)["input_ids"] == ours and len(ours) > 20
    assert theirs.decode(ours) == TEXT and theirs.eos_token == "<|endoftext|>"
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == theirs.eos_token_id


def test_the_eos_token_comes_from_the_checkpoint(checkpoint, tokenizer_path, tmp_path):
    folder = checkpoint("gpt2")
    copy = tmp_path / "renamed_eos"
    copy.mkdir()
    for f in ("config.json", "generation_config.json", "model.safetensors"):
        (copy / f).write_bytes((folder / f).read_bytes())
    # a name that data/tokenizer.py's list of end-of-document names does not know
    (copy / "tokenizer.json").write_text(tokenizer_path.read_text().replace('"<|endoftext|>"', '"<|my_eos|>"'))
    save_tokenizer(copy, copy / "tokenizer.json", eos="<|my_eos|>")
    assert hf.load_pretrained(copy)[1].eod_token == "<|my_eos|>"  # tokenizer_config.json's eos_token
    (copy / "tokenizer_config.json").unlink()
    assert hf.load_pretrained(copy)[1].eod_token == "<|my_eos|>"  # generation_config.json's eos_token_id


def test_a_shorter_context_keeps_the_first_positions(checkpoint):
    folder = checkpoint("gpt2")
    model, config, _ = hf.load_pretrained(folder, overrides={"block_size": 16})
    assert config.block_size == 16 and model.transformer.wpe.weight.shape[0] == 16
    idx = tokens(config, (1, 16))
    with torch.no_grad():
        assert max_delta("gpt2 at block_size 16", model(idx)[0], reference(folder)(idx).logits) < 1e-5


def test_a_layernorm_to_rmsnorm_change_keeps_the_gains_and_folds_the_bias(checkpoint):
    """GPT-2 with RMSNorm in its blocks starts as GPT-2 with its block LayerNorms' mean subtraction
    removed (the probe's Uncentered: same gain and bias): the bias moved into c_attn / c_fc exactly."""
    folder = checkpoint("gpt2")
    original, _, _ = hf.load_pretrained(folder)
    changed, config, _ = hf.load_pretrained(folder, overrides={"norm": "rmsnorm", "final_norm": "layernorm"})
    assert not [k for k in changed.state_dict() if ".ln_1.bias" in k or ".ln_2.bias" in k]
    assert torch.equal(changed.transformer.h[1].ln_2.weight, original.transformer.h[1].ln_2.weight)
    for i in range(config.n_layer):
        for site in ("attn", "mlp"):
            norm = getattr(original.transformer.h[i], "ln_1" if site == "attn" else "ln_2")
            set_site(original, f"block{i}.{site}", Uncentered(norm))
    idx = tokens(config)
    with torch.no_grad():
        assert max_delta("gpt2 LayerNorm -> RMSNorm vs uncentered", changed(idx)[0], original(idx)[0]) < 1e-5


def test_other_norm_changes_start_from_the_old_parameters(checkpoint):
    gpt2 = checkpoint("gpt2")
    original, _, _ = hf.load_pretrained(gpt2)
    dyt, _, _ = hf.load_pretrained(gpt2, overrides={"attn_norm": "dyt", "mlp_norm": "seednorm"})
    block, before = dyt.transformer.h[0], original.transformer.h[0]
    assert torch.equal(block.ln_1.weight, before.ln_1.weight) and torch.equal(block.ln_1.bias, before.ln_1.bias)
    assert block.ln_1.alpha.item() == 0.5  # DyT's own parameter starts where the config says
    assert torch.equal(block.ln_2.weight, before.ln_2.weight) and not block.ln_2.beta.any()
    qwen, _, _ = hf.load_pretrained(checkpoint("qwen3"))
    layer, config, _ = hf.load_pretrained(checkpoint("qwen3"), overrides={"qk_norm": "layernorm", "attn_norm": "layernorm"})
    assert type(layer.transformer.h[1].attn.q_norm).__name__ == "LayerNorm" and config.qk_norm == "layernorm"
    assert torch.equal(layer.transformer.h[1].attn.k_norm.weight, qwen.transformer.h[1].attn.k_norm.weight)
    assert torch.equal(layer.transformer.h[1].ln_1.weight, qwen.transformer.h[1].ln_1.weight)


REFUSED_IMPORTS = [  # (checkpoint family, its config values, what the one line says)
    ("mistral", {}, "is a 'mistral' model (MistralForCausalLM); the families that map are gpt2 (GPT2LMHeadModel), "
                    "llama (LlamaForCausalLM), qwen3 (Qwen3ForCausalLM)"),
    ("qwen2", {}, "Qwen2 has biases on the q, k and v projections but not on o_proj or the MLP"),
    ("olmo2", {}, "OLMo 2 normalises q and k over all heads at once"),
    ("llama", {"attention_bias": True}, "attention_bias = True but MLP biases = False"),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope scaling 'linear' (plain RoPE maps)"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act 'gelu' (SwiGLU is silu)"),
    ("gpt2", {"activation_function": "relu"}, "activation_function 'relu' (these map: gelu_new, gelu_pytorch_tanh, gelu)"),
]


@pytest.mark.parametrize("family, values, message", REFUSED_IMPORTS)
def test_a_checkpoint_that_does_not_map_is_refused_in_one_line(checkpoint, family, values, message):
    folder = checkpoint("-".join([family, *values]), family, **values)
    assert message in one_line_error(lambda: hf.load_pretrained(folder))


@pytest.mark.parametrize("overrides, message", [
    ({"n_layer": 3}, "the config contradicts the checkpoint: n_layer = 3 (the checkpoint's: 2); leave these keys out"),
    ({"vocab_size": 512, "n_embd": 64}, "vocab_size = 512 (the checkpoint's: 320), n_embd = 64 (the checkpoint's: 32)"),
    ({"block_size": 256}, "block_size = 256 (the checkpoint's: 64)"),
    ({"tie_embeddings": False}, "tie_embeddings = False (the checkpoint's: True)"),
    ({"qk_norm": "rmsnorm"}, "qk_norm = 'rmsnorm' (the checkpoint's: '')"),
    ({"norm_eps": 1e-6}, "norm_eps = 1e-06 (the checkpoint's: 1e-05)"),
    ({"pos_emb": "rope"}, "pos_emb = 'rope' (the checkpoint's: 'learned')"),
    ({"tokenizer": "other.json"}, "tokenizer = 'other.json'"),
    ({"norm": "rmsnorm"}, "final: rmsnorm has no bias, and no Linear with a bias reads this site"),
    ({"mlp_norm": "scalenorm"}, "block0.mlp: scalenorm has no per-feature gain to start from the layernorm's gains"),
    ({"norm": "none"}, "block0.attn: none has no per-feature gain"),
])
def test_a_config_that_contradicts_the_checkpoint_is_refused_in_one_line(checkpoint, overrides, message):
    assert message in one_line_error(lambda: hf.load_pretrained(checkpoint("gpt2"), overrides=overrides))


@pytest.mark.parametrize("source, message", [
    ("{run}", "is a normgpt run or checkpoint: resume it with --resume, or export it with export.py first"),
    ("{file}", "is a file; give a transformers checkpoint folder, a hub id or a .gguf file"),
    ("{tmp}/nowhere", "does not exist; give a run dir, a checkpoint folder, a transformers folder, a hub id, a .gguf"),
    ("{empty}", "is not a transformers checkpoint (no config.json with a model_type)"),
])
def test_a_source_that_is_no_transformers_checkpoint_is_one_line(tmp_path, source, message):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    fill = {"tmp": tmp_path, "run": tmp_path / "run", "file": tmp_path / "file", "empty": tmp_path / "empty"}
    assert message in one_line_error(lambda: hf.load_pretrained(source.format(**fill)))


def test_a_checkpoint_without_tokenizer_json_is_one_line(checkpoint, tmp_path):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((checkpoint("gpt2") / name).read_bytes())
    assert f"{str(tmp_path)!r} has no tokenizer.json; data is encoded with it" in one_line_error(
        lambda: hf.load_pretrained(tmp_path))


def test_which_arguments_name_a_transformers_checkpoint(checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")
    (tmp_path / "runs").mkdir()
    assert hf.is_transformers_source(checkpoint("gpt2")) and hf.is_transformers_source("gpt2")
    assert hf.is_transformers_source("HuggingFaceTB/SmolLM2-135M")  # no local folder HuggingFaceTB here
    for local in (tmp_path, "file", tmp_path / "missing", "runs/mistyped", "./gpt2"):
        assert not hf.is_transformers_source(str(local)), local


def gpt(small_model_config, **overrides):
    config = small_model_config(**overrides)
    return GPT(config), config


UNEXPORTABLE = [  # (our config, what the one line names)
    (dict(norm="scalenorm"), "norm scalenorm (GPT2LMHeadModel has layernorm only)"),
    (dict(norm="dyt"), "norm dyt (GPT2LMHeadModel has layernorm only)"),
    (dict(norm="rmsnorm", pos_emb="rope", mlp="swiglu", attn_norm="derf"), "norm derf (LlamaForCausalLM has rmsnorm only)"),
    (dict(norm="seednorm", pos_emb="rope", mlp="swiglu"), "norm seednorm (LlamaForCausalLM has rmsnorm only)"),
    (dict(norm="prmsnorm", pos_emb="rope", mlp="swiglu"), "norm prmsnorm"),
    (dict(block_norms="layernorm,rmsnorm"), "norm rmsnorm (GPT2LMHeadModel has layernorm only)"),
    # a pure-RMSNorm stack has its class; what keeps a GPT-2-style one out of it is named
    (dict(norm="rmsnorm"), "norm rmsnorm with learned positions (Llama has RoPE: pos_emb = 'rope') and mlp = 'gelu' "
                           "(Llama's is 'swiglu'); LlamaForCausalLM has RMSNorm, GPT2LMHeadModel LayerNorm only"),
    (dict(norm="rmsnorm", mlp="swiglu"), "represents norm rmsnorm with learned positions (Llama has RoPE: "
                                         "pos_emb = 'rope'); LlamaForCausalLM"),
    (dict(block_positions="post,pre"), "norm positions post (the classes are pre-norm, or peri in every block"),
    (dict(block_positions="peri,pre"), "norm positions peri (the classes are pre-norm, or peri in every block: Gemma 3)"),
    (dict(logit_softcap=15.0), "logit_softcap (of these classes only Gemma 3 soft-caps)"),
    (dict(embed_norm="layernorm"), "embed_norm"),
    (dict(embed_scale=50.0), "embed_scale"),
    (dict(norm_scaling="layer"), "norm_scaling = 'layer'"),
    (dict(pos_emb="rope", mlp="swiglu"), "norm layernorm (LlamaForCausalLM has rmsnorm only)"),
    (dict(norm="rmsnorm", pos_emb="rope"), "mlp = 'gelu' (LlamaForCausalLM has swiglu)"),
    (dict(mlp="relu2"), "mlp = 'relu2' (GPT2LMHeadModel has gelu_tanh or gelu)"),
    (dict(pos_emb="none"), "pos_emb = 'none'"),
    (dict(n_kv_head=1), "grouped-query attention (GPT-2 has none)"),
    (dict(norm="rmsnorm", pos_emb="rope", mlp="swiglu", qk_norm="layernorm"), "qk_norm 'layernorm' (Qwen3's is rmsnorm)"),
    (dict(norm="rmsnorm", pos_emb="rope", mlp="swiglu", qk_norm="rmsnorm", bias=True), "Qwen3 has no MLP biases"),
]


@pytest.mark.parametrize("overrides, message", UNEXPORTABLE)
def test_a_stack_no_class_represents_is_refused_in_one_line(small_model_config, tokenizer_path, tmp_path, overrides, message):
    model, config = gpt(small_model_config, vocab_size=320, **overrides)
    error = one_line_error(lambda: hf.export_model(model, config, tokenizer_path, tmp_path / "out"))
    assert error.startswith("cannot export the model: no transformers class represents") and message in error, error
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp*"))


@pytest.mark.parametrize("overrides, family", [
    (dict(bias=False, norm_gain=False, mlp="gelu"), "GPT2LMHeadModel"),  # zero biases and unit gains: exact
    (dict(norm="rmsnorm", pos_emb="rope", mlp="swiglu", n_kv_head=1, tie_embeddings=False), "LlamaForCausalLM"),
    (dict(norm="triton_rmsnorm", pos_emb="rope", mlp="swiglu", bias=True), "LlamaForCausalLM"),
    (dict(norm="rmsnorm", pos_emb="rope", mlp="swiglu", qk_norm="rmsnorm", norm_gain=False), "Qwen3ForCausalLM"),
])
def test_exported_stacks_load_with_auto_classes_and_give_our_logits(small_model_config, tokenizer_path, tmp_path,
                                                                    overrides, family):
    model, config = gpt(small_model_config, vocab_size=320, **overrides)
    model.eval()
    with torch.no_grad():
        for p in model.parameters():  # away from the init: zero biases and unit gains would hide a wrong mapping
            p.add_(torch.randn_like(p) * 0.1)
    hf.export_model(model, config, tokenizer_path, tmp_path / "out")
    theirs = reference(tmp_path / "out")
    assert type(theirs).__name__ == family
    idx = tokens(config, (2, 16))
    with torch.no_grad():
        assert max_delta(f"export {family} {overrides}", model(idx)[0], theirs(idx).logits) < 1e-5


def test_export_into_a_folder_that_holds_files_is_refused(small_model_config, tokenizer_path, tmp_path):
    model, config = gpt(small_model_config, vocab_size=320)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert "is not empty; give a new folder (nothing is overwritten)" in one_line_error(
        lambda: hf.export_model(model, config, tokenizer_path, tmp_path / "out"))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]
