"""The norm registry: every normalization a block can use, by name.

Adding a norm is one class here plus one line in NORMS. Each class is built as `cls(dim, config)` and
reads what it needs from the config (eps, whether it has a gain, ...). Whatever the input dtype, the
statistics are computed in fp32 and the output is cast back to the input's dtype.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import UserError
from kernels.rmsnorm import rms_norm


def upcast(x):
    """x in at least fp32: statistics of fp16/bf16 inputs are computed in fp32 (fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * g (+ b when config.bias). Re-centers and re-scales."""

    def __init__(self, dim, config):
        super().__init__()
        self.eps = config.norm_eps
        self.weight = nn.Parameter(torch.ones(dim)) if config.norm_gain else None
        self.bias = nn.Parameter(torch.zeros(dim)) if config.bias else None

    def forward(self, x):
        xf = upcast(x)
        weight = None if self.weight is None else self.weight.to(xf.dtype)
        bias = None if self.bias is None else self.bias.to(xf.dtype)
        y = F.layer_norm(xf, x.shape[-1:], weight, bias, self.eps)
        return y.to(x.dtype)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * g: re-scales without re-centering (Zhang & Sennrich, 2019).

    eps sits inside the square root, as in torch.nn.RMSNorm. The paper's own PyTorch code adds eps
    outside the root (x / (rms + eps)); putting it inside is our choice, and the two agree except
    for inputs whose RMS is comparable to sqrt(eps).
    """

    def __init__(self, dim, config):
        super().__init__()
        self.eps = config.norm_eps
        self.weight = nn.Parameter(torch.ones(dim)) if config.norm_gain else None
        self.stats_features = None  # all features; PartialRMSNorm estimates from fewer

    def forward(self, x):  # the C++ kernel on CPU, ATen ops elsewhere (kernels/rmsnorm.py)
        return rms_norm(x, self.weight, self.eps, self.stats_features)

    def add_norm(self, x, residual):
        """(norm(residual + x), residual + x) in one fused Triton kernel where Triton runs
        (config.fused_add_norm; see model/gpt.py), else the same math unfused."""
        from kernels.rmsnorm_triton import triton_add_rms_norm  # imports triton: only when asked for
        return triton_add_rms_norm(x, residual, self.weight, self.eps)


class BiasRMSNorm(RMSNorm):
    """rmsnorm plus LayerNorm's bias: x / sqrt(mean(x^2) + eps) * g (+ b when config.bias), the same
    parameters as layernorm. On a zero-mean input it IS layernorm, which is what `analyze.py convert`
    (study/convert.py) makes every converted site see: the image of a biased LayerNorm there, since
    ln_f's bias feeds the bias-free head and a QK-norm's feeds a dot product (no linear to fold into).
    With bias = false it is rmsnorm."""

    def __init__(self, dim, config):
        super().__init__(dim, config)
        self.bias = nn.Parameter(torch.zeros(dim)) if config.bias else None

    def forward(self, x):
        y = super().forward(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    add_norm = None  # the fused kernel has no bias


class PartialRMSNorm(RMSNorm):
    """pRMSNorm (same paper): the RMS is estimated from the first ceil(p*d) features only
    (p = config.prms_fraction) and applied to all of them."""

    def __init__(self, dim, config):
        super().__init__(dim, config)
        self.stats_features = max(1, math.ceil(config.prms_fraction * dim))

    add_norm = None  # the fused kernel computes full-width statistics


class TritonRMSNorm(RMSNorm):
    """rmsnorm computed by the fused Triton kernel (kernels/rmsnorm_triton.py). Same parameters, hence
    the same checkpoint keys, as rmsnorm: a run can switch between the two. Where Triton cannot run
    it falls back to rmsnorm's math with one warning."""

    def forward(self, x):
        from kernels.rmsnorm_triton import triton_rms_norm
        return triton_rms_norm(x, self.weight, self.eps)


class ScaleNorm(nn.Module):
    """g * x / max(||x||_2, eps) with ONE learned scalar g initialised to sqrt(d) (Nguyen & Salazar,
    2019). With norm_gain = false, g stays fixed at sqrt(d)."""

    def __init__(self, dim, config):
        super().__init__()
        self.eps = config.norm_eps
        g = torch.tensor(math.sqrt(dim))
        if config.norm_gain:
            self.scale = nn.Parameter(g)
        else:
            self.register_buffer("scale", g)

    def forward(self, x):
        xf = upcast(x)
        # scale / norm is one value per row: multiplying x once by it (not by g, then dividing by the
        # norm) keeps autograd to one full-size product: 1.6-2x faster fwd+bwd on CPU (8192x768 fp32)
        factor = self.scale.to(xf.dtype) / torch.linalg.vector_norm(xf, dim=-1, keepdim=True).clamp_min(self.eps)
        return (xf * factor).to(x.dtype)


class DyT(nn.Module):
    """Dynamic Tanh (Zhu et al. 2025): gamma * tanh(alpha * x) + beta, with ONE learned scalar alpha
    (initialised to config.dyt_alpha) and gamma, beta per feature. No statistics at all: it bounds its
    output without normalizing it, the "no norm, but bounded" control. With norm_gain = false it learns
    nothing, as the other norms then do: tanh(alpha * x) with alpha fixed, no gamma, no beta."""

    def __init__(self, dim, config):
        super().__init__()
        alpha = torch.tensor(float(config.dyt_alpha))
        if config.norm_gain:
            self.alpha = nn.Parameter(alpha)
            self.weight, self.bias = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))
        else:
            self.register_buffer("alpha", alpha)
            self.weight = self.bias = None

    def forward(self, x):
        xf = upcast(x)
        y = torch.tanh(self.alpha.to(xf.dtype) * xf)
        if self.weight is not None:
            y = y * self.weight.to(xf.dtype) + self.bias.to(xf.dtype)
        return y.to(x.dtype)


class Derf(nn.Module):
    """Dynamic erf (Chen et al. 2025, "Stronger Normalization-Free Transformers"): gamma * erf(alpha * x
    + s) + beta, with learned scalars alpha (initialised to config.derf_alpha; the paper's default 0.5)
    and s (initialised to 0), gamma and beta per feature (1 and 0), as in the authors' code. Like DyT,
    a point-wise function with no statistics; with norm_gain = false, erf(alpha * x) with alpha fixed."""

    def __init__(self, dim, config):
        super().__init__()
        alpha, shift = torch.tensor(float(config.derf_alpha)), torch.tensor(0.0)
        if config.norm_gain:
            self.alpha, self.shift = nn.Parameter(alpha), nn.Parameter(shift)
            self.weight, self.bias = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))
        else:
            self.register_buffer("alpha", alpha)
            self.register_buffer("shift", shift)
            self.weight = self.bias = None

    def forward(self, x):
        xf = upcast(x)
        y = torch.erf(self.alpha.to(xf.dtype) * xf + self.shift.to(xf.dtype))
        if self.weight is not None:
            y = y * self.weight.to(xf.dtype) + self.bias.to(xf.dtype)
        return y.to(x.dtype)


class SeeDNorm(nn.Module):
    """SeeDNorm (Cai et al. 2025, ByteDance Seed): (tanh(x . beta) * alpha + gamma) * x / sqrt(mean(x^2)
    + eps). x . beta is one scalar per token from the un-normalised input, so the gain depends on the
    input and its norm survives the division. beta starts at 0, alpha and gamma at 1 (the paper's
    language-model setting): at initialisation it is RMSNorm. The paper decays alpha and beta, so
    they are marked for weight decay (GPT.optimizer_groups). With norm_gain = false nothing is learned
    and beta stays 0: RMSNorm without a gain, so check_model_config refuses that combination."""

    def __init__(self, dim, config):
        super().__init__()
        self.eps = config.norm_eps
        gamma, alpha, beta = torch.ones(dim), torch.ones(dim), torch.zeros(dim)
        if config.norm_gain:
            self.weight, self.alpha, self.beta = nn.Parameter(gamma), nn.Parameter(alpha), nn.Parameter(beta)
            self.alpha.weight_decay = self.beta.weight_decay = True
        else:
            for name, value in (("weight", gamma), ("alpha", alpha), ("beta", beta)):
                self.register_buffer(name, value)

    def forward(self, x):
        xf = upcast(x)
        gain = torch.tanh(xf @ self.beta.to(xf.dtype)).unsqueeze(-1) * self.alpha.to(xf.dtype) + self.weight.to(xf.dtype)
        return (gain * xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Identity(nn.Module):
    """No normalization at all, for ablations."""

    def __init__(self, dim, config):
        super().__init__()

    def forward(self, x):
        return x


NORMS = {
    "layernorm": LayerNorm,
    "rmsnorm": RMSNorm,
    "rmsnorm_bias": BiasRMSNorm,
    "triton_rmsnorm": TritonRMSNorm,
    "prmsnorm": PartialRMSNorm,
    "scalenorm": ScaleNorm,
    "dyt": DyT,
    "derf": Derf,
    "seednorm": SeeDNorm,
    "none": Identity,
}


def check_norm_name(name, where):
    if name not in NORMS:
        raise UserError(f"unknown norm {name!r} in {where}; valid norms: {', '.join(NORMS)}")
    return name


def make_norm(name, dim, config):
    return NORMS[check_norm_name(name, "norm")](dim, config)


def expand_per_block(spec, n_layer, key):
    """Expand a per-block spec into one entry per block: a compact string "a*2,b*2" or a TOML list.
    Entries are returned as given (strings, or lists for block_norms' [attn, mlp] pairs)."""
    entries = []
    items = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else spec
    for item in items:
        count = 1
        if isinstance(item, str) and "*" in item:
            item, _, times = item.partition("*")
            if not times.strip().isdigit() or int(times) < 1:
                raise UserError(f"{key} entry {item}*{times}: the repeat count must be a positive integer")
            count = int(times)
        entries.extend([item.strip() if isinstance(item, str) else item] * count)
    if len(entries) != n_layer:
        raise UserError(f"{key} describes {len(entries)} blocks but n_layer is {n_layer}; give one entry per block")
    return entries


def parse_block_norms(spec, n_layer):
    """Expand block_norms into one (attn_norm, mlp_norm) pair per block.

    Accepts a compact string "layernorm*2,rmsnorm*2" (a "/" pairs the attention and MLP norms:
    "layernorm/rmsnorm") or a TOML list whose entries are names or [attn, mlp] pairs.
    """
    pairs = []
    for item in expand_per_block(spec, n_layer, "block_norms"):
        if isinstance(item, str):
            parts = [p.strip() for p in item.split("/")]
        elif isinstance(item, list) and all(isinstance(p, str) for p in item):
            parts = item
        else:
            raise UserError(f"block_norms entry {item!r} must be a norm name or an [attn, mlp] pair of names")
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2:
            raise UserError(f"block_norms entry {item!r} must name one norm or an attn/mlp pair")
        pairs.append(tuple(check_norm_name(p, "block_norms") for p in parts))
    return pairs


POSITIONS = ("pre", "post", "peri", "output")


def resolve_block_positions(config):
    """The norm position of every block: block_positions ("post*2,pre*2") > norm_position."""
    if not config.block_positions:
        return [config.norm_position] * config.n_layer
    positions = expand_per_block(config.block_positions, config.n_layer, "block_positions")
    for p in positions:
        if p not in POSITIONS:
            raise UserError(f"block_positions entry {p!r} is not a position; choose one of {', '.join(POSITIONS)}")
    return positions


ATTENTION = ("local", "global")


def resolve_block_attention(config):
    """Each block's attention, "local" (a sliding window of config.sliding_window tokens) or "global":
    block_attention ("local*5,global") > every block local where sliding_window > 0, else global."""
    if not config.block_attention:
        return ["local" if config.sliding_window else "global"] * config.n_layer
    kinds = expand_per_block(config.block_attention, config.n_layer, "block_attention")
    for kind in kinds:
        if kind not in ATTENTION:
            raise UserError(f"block_attention entry {kind!r} is not valid; choose local or global")
    if "local" in kinds and not config.sliding_window:
        raise UserError("block_attention has local blocks but sliding_window is 0; give the window's length "
                        "in tokens (sliding_window = 512)")
    return kinds


def site_name(block, kind):
    """A norm site's name, the one spelling every report and module uses: (3, "attn") -> "block3.attn";
    (None, "final") -> "final" (sites outside the blocks: "embed", "final")."""
    return kind if block is None else f"block{block}.{kind}"


def parse_site(name):
    """site_name's inverse: "block3.attn" -> (3, "attn"), "final" -> (None, "final")."""
    head, dot, kind = name.partition(".")
    if dot and head.startswith("block") and head[5:].isdigit():
        return int(head[5:]), kind
    return None, name


SITE_KINDS = ("attn", "q", "k", "attn_out", "mlp", "mlp_out")  # a block's norm sites (model/diagnostics.py)


def parse_site_norms(spec):
    """site_norms -> {site name: norm name}: "block3.q=layernorm,final=layernorm", or a TOML list of such entries."""
    items = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else spec
    out = {}
    for item in items:
        site, sep, name = item.partition("=") if isinstance(item, str) else ("", "", "")
        block, kind = parse_site(site.strip())
        if not sep or not (kind in SITE_KINDS if block is not None else kind in ("final", "embed")):
            raise UserError(f"site_norms entry {item!r} must be site=norm with a site named as the diagnostics name it "
                            f"(blockN.{', blockN.'.join(SITE_KINDS)}, final, embed), e.g. 'block3.q=layernorm'")
        if site.strip() in out:
            raise UserError(f"site_norms names {site.strip()!r} twice")
        out[site.strip()] = check_norm_name(name.strip(), "site_norms")
    return out


def site_norm(config, site, default):
    """The norm at one site: its site_norms entry, else `default` (what the other keys put there)."""
    return parse_site_norms(config.site_norms).get(site, default) if config.site_norms else default


def block_norm_names(config, index):
    """{site kind: norm name} of every site of block `index` the keys can set, site_norms applied. An
    output norm defaults to its sublayer's input norm as the other keys set it, not as site_norms does
    (one site changes at a time). The block's position decides which sites exist; q and k are "" without
    qk_norm."""
    attn, mlp = stack_without_site_norms(config)[0][index]

    def at(kind, default):
        return site_norm(config, site_name(index, kind), default)
    qk = config.qk_norm
    return {"attn": at("attn", attn), "mlp": at("mlp", mlp), "attn_out": at("attn_out", config.output_norm or attn),
            "mlp_out": at("mlp_out", config.output_norm or mlp), "q": at("q", qk) if qk else "",
            "k": at("k", qk) if qk else ""}


def stack_without_site_norms(config):
    check_norm_name(config.norm, "norm")
    attn = check_norm_name(config.attn_norm or config.norm, "attn_norm")
    mlp = check_norm_name(config.mlp_norm or config.norm, "mlp_norm")
    final = check_norm_name(config.final_norm or config.norm, "final_norm")
    if config.block_norms:
        return parse_block_norms(config.block_norms, config.n_layer), final
    return [(attn, mlp)] * config.n_layer, final


def resolve_norm_stack(config):
    """The norm at every site: ([(attn_norm, mlp_norm) per block], final_norm).

    Precedence: site_norms (per site) > block_norms (per block) > attn_norm / mlp_norm (every block) > norm
    (default).
    """
    blocks, final = stack_without_site_norms(config)
    blocks = [(site_norm(config, site_name(i, "attn"), a), site_norm(config, site_name(i, "mlp"), m))
              for i, (a, m) in enumerate(blocks)]
    return blocks, site_norm(config, "final", final)


FUSABLE_NORMS = ("rmsnorm", "triton_rmsnorm")  # the norms with add_norm: fused_add_norm's residual add + norm kernel


def norm_names_used(config, blocks, final):
    """Every norm name the stack puts at some site ("" for an absent optional site)."""
    return ({n for pair in blocks for n in pair} | {final, config.qk_norm, config.output_norm, config.embed_norm}
            | set(parse_site_norms(config.site_norms).values()))


def check_site_norms(config, positions):
    """Every site_norms entry names a site this stack has (it changes a norm, it does not add a site)."""
    for site in parse_site_norms(config.site_norms):
        block, kind = parse_site(site)
        missing = None
        if block is not None and block >= config.n_layer:
            missing = f"there are {config.n_layer} blocks (block0..block{config.n_layer - 1})"
        elif kind in ("q", "k") and not config.qk_norm:
            missing = "qk_norm is off"
        elif kind in ("attn_out", "mlp_out") and positions[block] not in ("peri", "output"):
            missing = f"block {block} is a {positions[block]}-norm block (output norms are in peri and output blocks)"
        elif kind in ("attn", "mlp") and positions[block] == "output":
            missing = f"block {block} is an output-norm block (no input norms)"
        elif kind == "embed" and not config.embed_norm:
            missing = "embed_norm is off"
        if missing:
            raise UserError(f"site_norms: this model has no site {site!r}: {missing}")


def check_model_config(config):
    """The checks of a config that need the registry (config.py imports no project module). Call it
    before any data is prepared, so that a bad norm stack fails in the first second."""
    if config.block_type == "normalized":
        return check_normalized(config)
    blocks, final = resolve_norm_stack(config)
    positions = resolve_block_positions(config)
    resolve_block_attention(config)  # not a norm, but per block as positions are: a bad entry fails here too
    if config.qk_norm:
        check_norm_name(config.qk_norm, "qk_norm")
    check_site_norms(config, positions)
    if config.embed_norm:
        check_norm_name(config.embed_norm, "embed_norm")
    used = norm_names_used(config, blocks, final)
    if "seednorm" in used and not config.norm_gain:
        raise UserError("seednorm with norm_gain = false learns nothing and is rmsnorm without a gain; "
                        "use norm_gain = true, or rmsnorm")
    if config.norm_scaling == "layer" and set(positions) - {"pre", "peri"}:
        raise UserError(f"norm_scaling = 'layer' scales the input norms of pre and peri blocks; blocks here are "
                        f"{', '.join(sorted(set(positions) - {'pre', 'peri'}))} (set norm_position or block_positions)")
    if config.output_norm:
        check_norm_name(config.output_norm, "output_norm")
        if not {"peri", "output"} & set(positions):
            raise UserError(f"output_norm = {config.output_norm!r} has no site: no block has norm position "
                            f"'peri' or 'output' (set norm_position or block_positions)")
    if config.fused_add_norm:
        other = sorted({n for pair in blocks for n in pair} - set(FUSABLE_NORMS))
        not_pre = sorted(set(positions) - {"pre"})
        if not_pre or other:
            where = f"norm_position is {config.norm_position!r}" if not config.block_positions else \
                f"block_positions has {', '.join(not_pre)}"
            why = where if not_pre else f"blocks use {', '.join(other)}"
            raise UserError(f"fused_add_norm needs pre-norm blocks whose norms are all rmsnorm or triton_rmsnorm; {why}")
    return config


# keys of the standard block that nGPT has no place for: it has no norm layer and no norm position
NOT_NORMALIZED = ("norm", "attn_norm", "mlp_norm", "final_norm", "block_norms", "site_norms", "norm_position",
                  "block_positions", "output_norm", "qk_norm", "embed_norm", "embed_scale", "norm_scaling",
                  "fused_add_norm", "norm_gain", "dyt_alpha", "dyt_alpha_attn", "derf_alpha", "prms_fraction",
                  "logit_softcap", "bias", "init_from")


def check_normalized(config):
    """block_type = "normalized" (model/normalized.py): refuse every key it would silently ignore."""
    defaults = type(config)()
    changed = [k for k in NOT_NORMALIZED if getattr(config, k) != getattr(defaults, k)]
    if changed:
        raise UserError(f"block_type = 'normalized' (nGPT) has no norm layers, norm positions, biases or soft-cap "
                        f"and starts from no checkpoint; remove {', '.join(f'{k} = {getattr(config, k)!r}' for k in changed)}")
    if config.pos_emb not in ("rope", "none"):
        raise UserError(f"block_type = 'normalized' needs pos_emb = 'rope' or 'none', got {config.pos_emb!r}: "
                        f"a learned position vector added to a unit-norm token embedding leaves the sphere")
    if config.mlp != "swiglu":
        raise UserError(f"block_type = 'normalized' needs mlp = 'swiglu' (the paper's MLP, with its s_u and s_v), "
                        f"got {config.mlp!r}")
    return config


def refuse_normalized(config, what):
    """A one-line refusal of `what` (a tool that needs the standard block's norm sites) for nGPT."""
    if config.block_type == "normalized":
        raise UserError(f"{what} needs the standard block's norm sites; a block_type = 'normalized' (nGPT) "
                        f"model has none (its hidden states are renormalized functionally)")
