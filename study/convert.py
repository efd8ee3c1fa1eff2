"""The exact Pre-LN -> Pre-RMSNorm conversion (Jiang et al. 2023, arXiv 2305.14858).

LayerNorm(x) = RMSNorm(x - mean(x)) with the same gain g (and bias b), eps inside the root in both. So
a LayerNorm whose input is zero-mean can become an RMSNorm without changing the function, and its
input can be made zero-mean without changing anything else wherever every reader of that input is a
LayerNorm (which ignores the input's mean anyway):

  - the residual stream (read by the pre-norm blocks' input norms and by ln_f): center every writer,
    i.e. each token and position embedding over its features, and each attention and MLP output
    projection's weight columns and bias over their output features. The tied head reads ln_f's
    output, not the stream, but it IS the token embedding: centering wte would change the logits,
    so the converted model gets an untied head holding the original matrix (tie_embeddings = false);
  - queries and keys (QK-norm): center the rows of c_attn (and its bias) within each head;
  - a sublayer's output (the output norms of peri/output blocks): center that sublayer's c_proj;
  - the token + position embedding (an embedding norm): center wte and wpe.

Where a LayerNorm's input cannot be centered that way, the conversion is refused in one line naming
the sites: post-norm (the norm's output is the stream), and a stream that a norm's output writes to
(peri/output blocks' output norms, an embedding norm: g * x_hat + b is not zero-mean) or that a
non-LayerNorm site reads (RMSNorm, ScaleNorm, DyT, none: it would see the stream's mean vanish).
Either every LayerNorm converts or nothing is written, so the converted config is the source's with
every "layernorm" replaced: by rmsnorm, or with bias = true by rmsnorm_bias (LayerNorm's bias kept on
the norm: ln_f's bias feeds the bias-free head and a QK-norm's bias the attention dot product, so
there is no linear layer to fold them into; keeping every site's g and b also keeps the probe and
the diagnostics comparable site by site).

The centering is done in fp64 and stored in the source's dtype; `exactness` measures the result.
"""
import copy
import dataclasses

import torch

from config import UserError, keys_tagged
from model.diagnostics import norm_sites
from model.layers import head_size
from model.norms import NORMS, LayerNorm
from model.stack import (parse_block_norms, parse_site, parse_site_norms, refuse_normalized,
                         resolve_block_positions, site_name)

NORM_KEYS = keys_tagged("norm")  # every key that names a norm


def target_norm(config):
    """The registry name every LayerNorm becomes."""
    return "rmsnorm_bias" if config.bias else "rmsnorm"


def is_layernorm(module):
    return isinstance(module, LayerNorm)


def compact(sites):
    """["block0.attn", "block1.attn", "final"] -> "block0-1.attn, final": one entry per site kind."""
    blocks, other = {}, []
    for site in sites:
        block, kind = parse_site(site)
        if block is not None:
            blocks.setdefault(kind, []).append(block)
        else:
            other.append(site)
    parts = []
    for kind, ids in blocks.items():
        runs, start = [], ids[0]
        for a, b in zip(ids, ids[1:] + [None]):
            if b != a + 1:
                runs.append(f"{start}" if start == a else f"{start}-{a}")
                start = b
        parts.append(f"block{','.join(runs)}.{kind}")
    return ", ".join(parts + other)


def describe(sites, modules):
    """compact(sites) per norm class: "block2-3.attn, final (RMSNorm)"."""
    by_type = {}
    for s in sites:
        by_type.setdefault(type(modules[s]).__name__, []).append(s)
    return "; ".join(f"{compact(group)} ({name})" for name, group in by_type.items())


def plan(model):
    """What to center for a GPT: {"stream": bool, "qk": [blocks], "out": [(block, sublayer)], "embed": bool},
    or a UserError naming the LayerNorm sites that cannot convert exactly and why."""
    modules = dict(norm_sites(model))
    layernorms = [s for s, m in modules.items() if is_layernorm(m)]
    if not layernorms:
        raise UserError("nothing to convert: the model has no LayerNorm site "
                        f"({describe(list(modules), modules)})")
    positions = resolve_block_positions(model.config)
    problems = []
    post_sites = [site_name(i, s) for i, p in enumerate(positions) if p == "post" for s in ("attn", "mlp")]
    post = [s for s in post_sites if is_layernorm(modules[s])]
    if post:
        problems.append(f"{compact(post)} are post-norm: the norm's output is the stream itself, so its input "
                        f"x + f(x) cannot be centered")
    readers = [site_name(i, s) for i, p in enumerate(positions) if p in ("pre", "peri") for s in ("attn", "mlp")]
    readers.append("final")
    stream = any(is_layernorm(modules[s]) for s in readers)
    if stream:
        other = [s for s in readers if not is_layernorm(modules[s])]
        if other:
            problems.append(f"{describe(other, modules)} read the residual stream without mean subtraction and "
                            f"would see its mean vanish")
        writers = [s for s in modules if s.endswith("_out") or s == "embed"] + post_sites
        if writers:
            problems.append(f"the LayerNorms reading the stream ({compact([s for s in readers if s not in other])}) "
                            f"cannot see it zero-mean: {compact(writers)} write to it with a norm's output "
                            f"(g * x_hat + b is not zero-mean)")
    if problems:
        raise UserError("cannot convert exactly to RMSNorm: " + "; ".join(problems) + "; nothing was written")
    n_blocks = len(model.transformer.h)
    return {"stream": stream,
            "qk": [i for i in range(n_blocks) if is_layernorm(modules.get(site_name(i, "q")))],
            "out": [(i, s) for i in range(n_blocks) for s in ("attn", "mlp") if is_layernorm(modules.get(site_name(i, f"{s}_out")))],
            "embed": is_layernorm(modules.get("embed"))}


def converted_config(config, untie):
    """The source config with every "layernorm" replaced by the target norm (and an untied head)."""
    target = target_norm(config)
    swap = {k: target for k in NORM_KEYS if getattr(config, k, "") == "layernorm"}
    if config.block_norms:
        swap["block_norms"] = [[target if n == "layernorm" else n for n in pair]
                               for pair in parse_block_norms(config.block_norms, config.n_layer)]
    if config.site_norms:
        swap["site_norms"] = ",".join(f"{site}={target if name == 'layernorm' else name}"
                                      for site, name in parse_site_norms(config.site_norms).items())
    if untie:
        swap["tie_embeddings"] = False
    return dataclasses.replace(config, **swap)


def center_rows(t):
    """Each row (one vector over features) minus its mean, in fp64."""
    return t - t.mean(-1, keepdim=True)


def center_outputs(t):
    """A linear weight (out, in) or bias (out,) centered over its output features, in fp64."""
    return t - t.mean(0, keepdim=True)


@torch.no_grad()
def convert_state(model, the_plan):
    """The converted state dict of a GPT (fp64 arithmetic, the source's dtype out); lm_head.weight is
    the original token embedding, so the head is unchanged when wte is centered."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = model.config
    out = {}

    def put(key, fn):
        out[key] = fn(state[key].double()).to(state[key].dtype)

    if the_plan["stream"] or the_plan["embed"]:
        state["lm_head.weight"] = model.lm_head.weight.detach().clone()  # the head keeps the original
        for key in ("transformer.wte.weight", "transformer.wpe.weight"):
            if key in state:  # no wpe with rotary or no position embedding
                put(key, center_rows)
    blocks = []
    if the_plan["stream"]:
        blocks += [(i, s) for i, p in enumerate(resolve_block_positions(config)) if p == "pre" for s in ("attn", "mlp")]
    blocks += the_plan["out"]
    for i, sublayer in blocks:
        for name in ("weight", "bias"):
            key = f"transformer.h.{i}.{sublayer}.c_proj.{name}"
            if key in state:
                put(key, center_outputs)
    heads, head_dim, kv_heads = config.n_head, head_size(config), config.n_kv_head or config.n_head
    C = heads * head_dim  # the queries' width
    for i in the_plan["qk"]:
        for name in ("weight", "bias"):
            key = f"transformer.h.{i}.attn.c_attn.{name}"
            if key not in state:
                continue
            t = state[key].double()
            if t.shape[0] != C + 2 * kv_heads * head_dim:
                raise UserError(f"{key} has {t.shape[0]} rows; expected q, k, v stacked ({C + 2 * kv_heads * head_dim})")
            qk = t[:C + kv_heads * head_dim]  # q heads, then k heads, each head_dim rows
            grouped = qk.reshape(heads + kv_heads, head_dim, *t.shape[1:])
            t = torch.cat([(grouped - grouped.mean(1, keepdim=True)).reshape(qk.shape), t[C + kv_heads * head_dim:]])
            out[key] = t.to(state[key].dtype)
    state.update(out)
    return state


def convert_model(model):
    """(converted GPT in eval mode, its config, the plan) for a GPT: the same function, every
    LayerNorm an RMSNorm; a UserError where that is not exact."""
    from model import GPT
    refuse_normalized(model.config, "the LayerNorm-to-RMSNorm conversion")
    the_plan = plan(model)
    untie = (the_plan["stream"] or the_plan["embed"]) and model.config.tie_embeddings
    the_plan["untied_head"] = untie
    config = converted_config(model.config, untie)
    converted = GPT(config).to(dtype=next(model.parameters()).dtype)
    converted.load_state_dict(convert_state(model, the_plan))
    before, after = dict(norm_sites(model)), dict(norm_sites(converted))
    target = NORMS[target_norm(config)]
    wrong = [s for s, m in before.items() if type(after[s]) is not (target if is_layernorm(m) else type(m))]
    if wrong:  # a config the replacement could not express: a site kept LayerNorm or changed type
        raise UserError(f"the converted config does not convert {describe(wrong, after)} as planned; nothing was written")
    return converted.eval(), config, the_plan


@torch.no_grad()
def max_logit_diff(a, b, batches):
    """max |logits of a - logits of b| over token batches x (B, T), computed in fp64."""
    return max(((a(x)[0].double() - b(x)[0].double()).abs().max().item() for x in batches), default=0.0)


@torch.no_grad()
def exactness(model, converted, batches):
    """How equal the two functions are on `batches`: max |Δ logit| in fp32 (the stored weights as they
    run), in fp64 (the same weights, fp64 arithmetic), and the source's own fp32 rounding (its fp32
    logits against its fp64 ones): the precision floor a Δ in fp32 is measured against. Four
    forwards per batch: each model once in fp32 and once in fp64."""
    source64, converted64 = copy.deepcopy(model).double(), copy.deepcopy(converted).double()
    worst = dict.fromkeys(("fp32", "fp64", "source_fp32_rounding", "max_abs_logit"), 0.0)
    for x in batches:
        source, target = model(x)[0].double(), converted(x)[0].double()
        source_64 = source64(x)[0]
        for key, diff in (("fp32", source - target), ("fp64", source_64 - converted64(x)[0]),
                          ("source_fp32_rounding", source - source_64), ("max_abs_logit", source)):
            worst[key] = max(worst[key], diff.abs().max().item())
    return worst
