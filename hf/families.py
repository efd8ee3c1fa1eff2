"""What maps to what between transformers' model families and our GPT: configs and weights, both ways.

    ours (model/gpt.py)           GPT2LMHeadModel ("gpt2")          LlamaForCausalLM, Qwen3ForCausalLM
    transformer.wte               transformer.wte                   model.embed_tokens
    transformer.wpe (learned)     transformer.wpe                   - (RoPE, the same half-split layout)
    h.i.ln_1                      h.i.ln_1 (LayerNorm + bias)       model.layers.i.input_layernorm (RMSNorm)
    h.i.attn.c_attn (q | k | v)   h.i.attn.c_attn (Conv1D: .T)      self_attn.q_proj | k_proj | v_proj
    h.i.attn.q_norm, k_norm       -                                 self_attn.q_norm, k_norm (Qwen3 only)
    h.i.attn.c_proj               h.i.attn.c_proj (Conv1D: .T)      self_attn.o_proj
    h.i.ln_2                      h.i.ln_2                          post_attention_layernorm
    h.i.mlp.c_fc, c_up, c_proj    h.i.mlp.c_fc, -, c_proj (.T)      mlp.gate_proj, up_proj, down_proj
    transformer.ln_f              transformer.ln_f                  model.norm
    lm_head (untied only)         lm_head                           lm_head

Gemma3ForCausalLM ("gemma3_text") is Llama's layout with peri norms: input_layernorm is ln_1,
post_attention_layernorm ln_1_out, pre_feedforward_layernorm ln_2, post_feedforward_layernorm ln_2_out.
Its RMSNorms multiply by (1 + w), in fp32: our gain is 1 + w, computed in fp32 as Gemma computes it,
and exports as gain - 1 (exact for gains >= 0.5: Sterbenz), which Gemma turns back into the same gain.

This module knows no file and imports no transformers: it reads a transformers config object's
attributes and renames tensors. hf/load.py and hf/export.py do the loading and saving.
"""
import re

import torch

from config import UserError
from model.layers import head_size, mlp_hidden_size
from model.stack import resolve_block_attention, resolve_block_positions, resolve_norm_stack

CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
           "gemma3_text": "Gemma3ForCausalLM"}
REFUSED = {  # families that look close but have no exact counterpart here
    "gemma3": "it is Gemma 3 with a vision tower (Gemma3ForConditionalGeneration); its text-only form, "
              "Gemma3ForCausalLM (model_type gemma3_text), maps",
    "qwen2": "Qwen2 has biases on the q, k and v projections but not on o_proj or the MLP, which no single "
             "`bias` key gives",
    "olmo2": "OLMo 2 normalises q and k over all heads at once (a norm of width heads * head_dim), not per head "
             "as qk_norm does",
}
GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
CONV1D = re.compile(r"\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")  # GPT-2 stores them (in, out)
LLAMA_LAYER = [("self_attn.o_proj", "attn.c_proj"), ("self_attn.q_norm", "attn.q_norm"), ("self_attn.k_norm", "attn.k_norm"),
               ("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2"), ("mlp.gate_proj", "mlp.c_fc"),
               ("mlp.up_proj", "mlp.c_up"), ("mlp.down_proj", "mlp.c_proj")]  # (theirs, ours) within layer i
GEMMA_LAYER = [("self_attn.o_proj", "attn.c_proj"), ("self_attn.q_norm", "attn.q_norm"), ("self_attn.k_norm", "attn.k_norm"),
               ("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_1_out"), ("pre_feedforward_layernorm", "ln_2"),
               ("post_feedforward_layernorm", "ln_2_out"), ("mlp.gate_proj", "mlp.c_fc"), ("mlp.up_proj", "mlp.c_up"),
               ("mlp.down_proj", "mlp.c_proj")]
GEMMA_GAIN = re.compile(r"(ln_1|ln_1_out|ln_2|ln_2_out|q_norm|k_norm|ln_f)\.weight$")  # our names of Gemma's (1 + w) gains
GEMMA_ATTENTION = {"sliding_attention": "local", "full_attention": "global"}
LLAMA_GLOBAL = [("model.embed_tokens.weight", "transformer.wte.weight"), ("model.norm.weight", "transformer.ln_f.weight"),
                ("lm_head.weight", "lm_head.weight")]


def families():
    return ", ".join(f"{kind} ({cls})" for kind, cls in CLASSES.items())


def rope_parameters(hf):
    """{"rope_type": ..., "rope_theta": ..., ...}: transformers 5 keeps them in rope_parameters,
    4.x in rope_theta and rope_scaling."""
    params = getattr(hf, "rope_parameters", None)
    if params is None:
        params = {**(getattr(hf, "rope_scaling", None) or {}), "rope_theta": getattr(hf, "rope_theta", 10000.0)}
    return params


def gemma_rope_parameters(hf):
    """(global, local) RoPE parameters of a Gemma 3 config: transformers 5 keeps them per layer type in
    rope_parameters, 4.x in rope_theta and rope_scaling (global) and rope_local_base_freq (local)."""
    params = getattr(hf, "rope_parameters", None) or {}
    if "full_attention" in params:
        return params["full_attention"], params.get("sliding_attention") or params["full_attention"]
    return ({**(getattr(hf, "rope_scaling", None) or {}), "rope_theta": getattr(hf, "rope_theta", 1e6)},
            {"rope_theta": getattr(hf, "rope_local_base_freq", 10000.0)})


def rope_problems(rope, which=""):
    """What in one set of RoPE parameters our plain rotary table does not compute."""
    problems = []
    if any(isinstance(v, dict) for v in rope.values()):
        problems.append("RoPE parameters per layer type")
    elif rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"{which}rope scaling {rope.get('rope_type', rope.get('type'))!r} (plain RoPE maps)")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"{which}partial_rotary_factor {rope['partial_rotary_factor']}")
    return problems


def compact(entries):
    """["local", "local", "global"] -> "local*2,global", the per-block form block_positions reads."""
    runs = []
    for entry in entries:
        if runs and runs[-1][0] == entry:
            runs[-1][1] += 1
        else:
            runs.append([entry, 1])
    return ",".join(entry if n == 1 else f"{entry}*{n}" for entry, n in runs)


def gemma_keys(hf, problems):
    """Our keys for what Gemma 3 adds to the Llama layout; what does not map goes to problems."""
    if hf.hidden_activation != "gelu_pytorch_tanh":
        problems.append(f"hidden_activation {hf.hidden_activation!r} (GeGLU here is gelu_pytorch_tanh)")
    if getattr(hf, "attn_logit_softcapping", None):
        problems.append(f"attn_logit_softcapping {hf.attn_logit_softcapping} (no attention soft-cap here)")
    if getattr(hf, "use_bidirectional_attention", False):
        problems.append("use_bidirectional_attention = true (attention here is causal)")
    if hf.query_pre_attn_scalar != int(hf.query_pre_attn_scalar):
        problems.append(f"query_pre_attn_scalar {hf.query_pre_attn_scalar} (an integer maps)")
    rope, local_rope = gemma_rope_parameters(hf)
    problems += rope_problems(rope, "global ") + rope_problems(local_rope, "local ")
    layer_types = list(hf.layer_types or ["full_attention"] * hf.num_hidden_layers)
    if set(layer_types) - set(GEMMA_ATTENTION):
        problems.append(f"layer types {', '.join(sorted(set(layer_types) - set(GEMMA_ATTENTION)))}")
    attention = [GEMMA_ATTENTION.get(t, t) for t in layer_types]
    window = (hf.sliding_window or 0) if "local" in attention else 0
    if "local" in attention and not window:
        problems.append("sliding_attention layers but no sliding_window")
    theta, local_theta = float(rope.get("rope_theta", 1e6)), float(local_rope.get("rope_theta", 10000.0))
    return dict(norm_position="peri", qk_norm="rmsnorm", mlp="geglu_tanh", scale_embedding=True,
                query_pre_attn_scalar=int(hf.query_pre_attn_scalar),
                logit_softcap=float(getattr(hf, "final_logit_softcapping", None) or 0.0),
                sliding_window=window, block_attention=compact(attention) if window else "", rope_theta=theta,
                rope_local_theta=local_theta if window and local_theta != theta else 0.0)


def config_from_hf(hf, where):
    """(family, {our config key: value}) for a transformers config object; a UserError naming
    everything in it that our GPT does not represent exactly."""
    kind = getattr(hf, "model_type", None)
    if kind in REFUSED:
        raise UserError(f"{where} is a {kind} model: {REFUSED[kind]}; the families that map are {families()}")
    if kind not in CLASSES:
        named = f" ({', '.join(hf.architectures)})" if getattr(hf, "architectures", None) else ""
        raise UserError(f"{where} is a {kind!r} model{named}; the families that map are {families()}")
    keys = dict(norm_position="pre", block_positions="", output_norm="", embed_norm="", embed_scale=0.0, norm_scaling="none",
                norm_gain=True, logit_softcap=0.0, qk_norm="", tie_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
                head_dim=0, query_pre_attn_scalar=0, scale_embedding=False, sliding_window=0, block_attention="",
                rope_local_theta=0.0)
    problems = []
    if kind == "gpt2":
        act = hf.activation_function
        if act not in GPT2_ACTIVATIONS:
            problems.append(f"activation_function {act!r} (these map: {', '.join(GPT2_ACTIVATIONS)})")
        if not getattr(hf, "scale_attn_weights", True):
            problems.append("scale_attn_weights = false")
        if getattr(hf, "scale_attn_by_inverse_layer_idx", False):
            problems.append("scale_attn_by_inverse_layer_idx = true")
        if getattr(hf, "add_cross_attention", False):
            problems.append("cross-attention")
        keys.update(vocab_size=hf.vocab_size, block_size=hf.n_positions, n_layer=hf.n_layer, n_head=hf.n_head,
                    n_embd=hf.n_embd, n_kv_head=0, bias=True, norm="layernorm", norm_eps=float(hf.layer_norm_epsilon),
                    pos_emb="learned", mlp=GPT2_ACTIVATIONS.get(act, act), mlp_hidden=hf.n_inner or 4 * hf.n_embd)
    else:
        heads, width = hf.num_attention_heads, hf.hidden_size
        head_dim = getattr(hf, "head_dim", None) or width // heads
        attention_bias, mlp_bias = bool(getattr(hf, "attention_bias", False)), bool(getattr(hf, "mlp_bias", False))
        if attention_bias != mlp_bias:
            problems.append(f"attention_bias = {attention_bias} but MLP biases = {mlp_bias} (one `bias` key gives both)")
        kv_heads = getattr(hf, "num_key_value_heads", None) or heads
        keys.update(vocab_size=hf.vocab_size, block_size=hf.max_position_embeddings, n_layer=hf.num_hidden_layers,
                    n_head=heads, n_embd=width, n_kv_head=0 if kv_heads == heads else kv_heads, bias=attention_bias,
                    head_dim=0 if head_dim * heads == width else head_dim, norm="rmsnorm",
                    norm_eps=float(hf.rms_norm_eps), pos_emb="rope", mlp_hidden=hf.intermediate_size)
        if kind == "gemma3_text":
            keys.update(gemma_keys(hf, problems))
        else:
            rope = rope_parameters(hf)
            problems += rope_problems(rope)
            if hf.hidden_act != "silu":
                problems.append(f"hidden_act {hf.hidden_act!r} (SwiGLU is silu)")
            if getattr(hf, "use_sliding_window", False):
                problems.append("sliding-window attention")
            keys.update(rope_theta=float(rope.get("rope_theta", 10000.0)), mlp="swiglu",
                        qk_norm="rmsnorm" if kind == "qwen3" else "")
    if problems:
        raise UserError(f"{where} ({CLASSES[kind]}) does not map to this GPT: {'; '.join(problems)}")
    return kind, keys


def import_state(kind, theirs, config):
    """Our state dict from a transformers model's parameters (named as its state_dict names them), for
    config (the checkpoint's architecture; block_size may be shorter). Every tensor must find a place."""
    theirs = dict(theirs)
    if config.tie_embeddings:
        theirs.pop("lm_head.weight", None)  # the embedding, under a second name
    ours = {}
    if kind == "gpt2":
        for key, value in theirs.items():
            ours[key] = value.t() if CONV1D.search(key) else value
        if "transformer.wpe.weight" in ours:  # a shorter context keeps the first positions
            ours["transformer.wpe.weight"] = ours["transformer.wpe.weight"][:config.block_size]
        return ours
    layer = GEMMA_LAYER if kind == "gemma3_text" else LLAMA_LAYER
    for i in range(config.n_layer):
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        for part in ("weight", "bias"):
            qkv = [theirs.pop(f"{src}self_attn.{p}_proj.{part}", None) for p in "qkv"]
            if any(t is not None for t in qkv):
                ours[f"{dst}attn.c_attn.{part}"] = torch.cat(qkv)  # q rows first, then k, then v
            for their_name, our_name in layer:
                if f"{src}{their_name}.{part}" in theirs:
                    ours[f"{dst}{our_name}.{part}"] = theirs.pop(f"{src}{their_name}.{part}")
    for their_name, our_name in LLAMA_GLOBAL:
        if their_name in theirs:
            ours[our_name] = theirs.pop(their_name)
    if theirs:
        raise UserError(f"the checkpoint has weights this GPT has no place for: {', '.join(sorted(theirs)[:3])}")
    if kind == "gemma3_text":  # Gemma's norms multiply by 1 + w, computed in fp32 (Gemma3RMSNorm): our gain
        ours = {k: 1.0 + v.float() if GEMMA_GAIN.search(k) else v for k, v in ours.items()}
    return ours


def export_family(config, where):
    """"gpt2", "llama", "qwen3" or "gemma3_text": the family whose transformers class represents config's
    stack exactly; else a UserError naming each thing that does not map."""
    blocks, final = resolve_norm_stack(config)
    norms = {n for pair in blocks for n in pair} | {final} | ({config.output_norm} - {""})
    positions = set(resolve_block_positions(config))
    rms = {"rmsnorm", "triton_rmsnorm"}
    problems = []
    if config.embed_norm:
        problems.append("embed_norm")
    if config.site_norms:
        problems.append("site_norms (a transformers class has one norm per kind of site)")
    if config.embed_scale:
        problems.append("embed_scale")
    if config.norm_scaling != "none":
        problems.append(f"norm_scaling = {config.norm_scaling!r}")
    if positions == {"peri"}:  # Gemma 3's four norms per block
        kind, wanted, mlps = "gemma3_text", rms, ("geglu_tanh",)
        if config.pos_emb != "rope":
            problems.append(f"pos_emb = {config.pos_emb!r} (Gemma 3 has RoPE)")
        if config.qk_norm not in rms:
            problems.append(f"qk_norm = {config.qk_norm!r} (Gemma 3 has rmsnorm on q and k)")
        if not config.scale_embedding:
            problems.append("scale_embedding = false (Gemma 3 multiplies its embedding by sqrt(n_embd))")
        if config.bias:
            problems.append("bias = true (Gemma 3's MLP has no biases)")
    else:
        if positions != {"pre"}:
            problems.append(f"norm positions {', '.join(sorted(positions - {'pre'}))} (the classes are pre-norm, "
                            f"or peri in every block: Gemma 3)")
        if config.logit_softcap:
            problems.append("logit_softcap (of these classes only Gemma 3 soft-caps)")
        if config.scale_embedding:
            problems.append("scale_embedding (of these classes only Gemma 3 scales its embedding)")
        if config.query_pre_attn_scalar not in (0, head_size(config)):
            problems.append("query_pre_attn_scalar (of these classes only Gemma 3 has its own softmax scale)")
        if "local" in resolve_block_attention(config):
            problems.append("local blocks (of these classes only Gemma 3 has sliding-window attention)")
        if config.pos_emb == "learned":
            kind, wanted, mlps = "gpt2", {"layernorm"}, ("gelu_tanh", "gelu")
            if config.qk_norm:
                problems.append("qk_norm (GPT-2 has none)")
            if config.n_kv_head not in (0, config.n_head):
                problems.append("grouped-query attention (GPT-2 has none)")
            if config.head_dim not in (0, config.n_embd // config.n_head):
                problems.append("head_dim (GPT-2's heads are n_embd / n_head wide)")
        elif config.pos_emb == "rope":
            kind, wanted, mlps = ("qwen3" if config.qk_norm else "llama"), rms, ("swiglu",)
            if config.qk_norm and config.qk_norm not in wanted:
                problems.append(f"qk_norm {config.qk_norm!r} (Qwen3's is rmsnorm)")
            if config.qk_norm and config.bias:
                problems.append("bias = true with qk_norm (Qwen3 has no MLP biases)")
        else:
            kind, wanted, mlps = None, set(), ()
            problems.append(f"pos_emb = {config.pos_emb!r} (GPT-2 has learned positions, the Llama family RoPE)")
    if kind == "gpt2" and norms <= rms:  # an RMSNorm stack has its class (Llama): the blockers are elsewhere
        blockers = ["learned positions (Llama has RoPE: pos_emb = 'rope')"]
        if config.mlp != "swiglu":
            blockers.append(f"mlp = {config.mlp!r} (Llama's is 'swiglu')")
        problems.append(f"norm {', '.join(sorted(norms))} with {' and '.join(blockers)}; LlamaForCausalLM has "
                        f"RMSNorm, GPT2LMHeadModel LayerNorm only")
    elif kind is not None:
        if norms - wanted:
            problems.append(f"norm {', '.join(sorted(norms - wanted))} ({CLASSES[kind]} has {sorted(wanted)[0]} only)")
        if config.mlp not in mlps:
            problems.append(f"mlp = {config.mlp!r} ({CLASSES[kind]} has {' or '.join(mlps)})")
    if problems:
        raise UserError(f"cannot export {where}: no transformers class represents {'; '.join(problems)}")
    return kind


def hf_config_values(kind, config, eod_id):
    """The keyword arguments of kind's transformers config class for our config."""
    common = dict(vocab_size=config.vocab_size, tie_word_embeddings=config.tie_embeddings, bos_token_id=eod_id,
                  eos_token_id=eod_id)
    if kind == "gpt2":
        return dict(common, n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer,
                    n_head=config.n_head, n_inner=mlp_hidden_size(config), layer_norm_epsilon=config.norm_eps,
                    activation_function="gelu_new" if config.mlp == "gelu_tanh" else "gelu",
                    resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout)
    values = dict(common, hidden_size=config.n_embd, intermediate_size=mlp_hidden_size(config),
                  num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
                  num_key_value_heads=config.n_kv_head or config.n_head, head_dim=head_size(config),
                  max_position_embeddings=config.block_size, rms_norm_eps=config.norm_eps, attention_bias=config.bias,
                  attention_dropout=config.dropout)  # these classes have no residual dropout: inference is exact
    if kind == "gemma3_text":
        types = {"local": "sliding_attention", "global": "full_attention"}
        return dict(values, hidden_activation="gelu_pytorch_tanh", pad_token_id=None,  # no row kept from training
                    query_pre_attn_scalar=config.query_pre_attn_scalar or head_size(config),
                    sliding_window=config.sliding_window or config.block_size,
                    layer_types=[types[a] for a in resolve_block_attention(config)],
                    final_logit_softcapping=config.logit_softcap or None, attn_logit_softcapping=None,
                    rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": config.rope_theta},
                                     "sliding_attention": {"rope_type": "default",
                                                           "rope_theta": config.rope_local_theta or config.rope_theta}})
    values.update(rope_theta=config.rope_theta, hidden_act="silu")
    if kind == "llama":
        values["mlp_bias"] = config.bias
    return values


def export_state(kind, ours, config):
    """A transformers model's state dict (its names) from our GPT's state_dict (lm_head.weight included)."""
    if kind == "gpt2":
        return {key: value.t().contiguous() if CONV1D.search(key) else value for key, value in ours.items()}
    if kind == "gemma3_text":  # our gain g is Gemma's 1 + w
        ours = {k: v - 1 if GEMMA_GAIN.search(k) else v for k, v in ours.items()}
    theirs = {}
    q_width = config.n_head * head_size(config)
    kv_width = (config.n_kv_head or config.n_head) * head_size(config)
    layer = GEMMA_LAYER if kind == "gemma3_text" else LLAMA_LAYER
    for i in range(config.n_layer):
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        for part in ("weight", "bias"):
            if f"{src}attn.c_attn.{part}" in ours:
                for p, t in zip("qkv", ours[f"{src}attn.c_attn.{part}"].split([q_width, kv_width, kv_width])):
                    theirs[f"{dst}self_attn.{p}_proj.{part}"] = t.contiguous()
            for their_name, our_name in layer:
                if f"{src}{our_name}.{part}" in ours:
                    theirs[f"{dst}{their_name}.{part}"] = ours[f"{src}{our_name}.{part}"]
    for their_name, our_name in LLAMA_GLOBAL:
        if our_name in ours:  # ln_f has no weight under norm_gain = false
            theirs[their_name] = ours[our_name]
    return theirs
