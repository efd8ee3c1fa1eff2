"""The norm registry: every normalization a block can use, by name.

Adding a norm is one class here plus one line in NORMS. Each class is built as `cls(dim, config)` and
reads what it needs from the config (eps, whether it has a gain, ...). Whatever the input dtype, the
statistics are computed in fp32 and the output is cast back to the input's dtype.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.rmsnorm_cpu import cpu_ops


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


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm (see rms_norm below) with a closed-form backward that saves only x and 1/rms (one value
    per row). Autograd through the composite formula keeps every intermediate, and on CPU it ran ~4x
    slower than F.layer_norm's fused kernel (figures in benchmarks/results_cpu.md).

    With y = x * r * g, r = (mean(x[:k]^2) + eps)^-1/2 and k the features the statistics use:
        dx = r * g * dy - [j < k] * x * r^3 * sum(g * dy * x) / k,   dg = sum_rows(dy * x * r)
    CPU tensors go to the one-pass C++ kernel of kernels/rmsnorm_cpu.cpp, which computes exactly this.
    Elsewhere (or where that kernel cannot be built) it is computed from ATen ops: full-width
    statistics in x's own dtype reuse LayerNorm's fused backward; otherwise both sums come from one
    product p = dy * x, as matrix-vector products.
    """

    @staticmethod
    def forward(ctx, x, weight, eps, k):
        k = x.shape[-1] if k is None else k
        ops = cpu_ops() if x.device.type == "cpu" else None
        if ops is not None:
            y, rstd = ops.rms_norm_forward(x, weight, eps, k)
        else:
            # ||x||^2 without materialising x^2 (or an fp32 copy of a bf16 x)
            part = x[..., :k]
            rstd = torch.linalg.vector_norm(part, dim=-1, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
            rstd = rstd.square_().div_(k).add_(eps).rsqrt_()
            y = x * rstd  # in the statistics' dtype
            if weight is not None:
                y.mul_(weight)
            y = y.to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        ctx.k, ctx.cpu_ops = k, ops  # the backward follows the forward's path, whatever the switch says by then
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        n, k = x.shape[-1], ctx.k
        want_dw = weight is not None and ctx.needs_input_grad[1]
        if ctx.cpu_ops is not None:
            dx, dw = ctx.cpu_ops.rms_norm_backward(dy, x, weight, rstd, k, want_dw)
            return dx, dw, None, None
        if k == n and x.dtype == rstd.dtype and (weight is None or weight.dtype == x.dtype):
            # LayerNorm's fused backward given mean 0 computes r * (g - mean(g) - x_hat * mean(g * x_hat))
            # with g = dy * weight: RMSNorm's dx less r * mean(g), which one matrix-vector product adds
            dx, dw, _ = torch.ops.aten.native_layer_norm_backward(
                dy, x, [n], torch.zeros_like(rstd), rstd, weight, None, [True, want_dw, False])
            mean_g = (dy @ weight if weight is not None else dy.sum(-1)).unsqueeze(-1).div_(n)
            return dx.add_(mean_g.mul_(rstd)), dw, None, None
        xf, dyf, r = x.reshape(-1, n).to(rstd.dtype), dy.reshape(-1, n).to(rstd.dtype), rstd.reshape(-1, 1)
        p = dyf * xf
        s = p @ weight.to(p.dtype) if weight is not None else p.sum(-1)
        dw = (p.T @ r.squeeze(1)).to(weight.dtype) if want_dw else None
        dx = torch.mul(dyf, r, out=p)  # p is spent: reuse its memory
        if weight is not None:
            dx.mul_(weight)
        dx[:, :k].addcmul_(xf[:, :k], r.pow(3).squeeze(1).mul_(s).div_(k).unsqueeze(1), value=-1)
        return dx.view(x.shape).to(x.dtype), dw, None, None


def rms_norm(x, weight, eps, stats_features=None):
    """x / sqrt(mean(x[..., :k]^2) + eps) * weight, k = stats_features (default: all features); the
    statistics in fp32 (fp64 for fp64 inputs), the output in x's dtype."""
    return _RMSNormFunction.apply(x, weight, eps, stats_features)


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

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps, self.stats_features)

    def add_norm(self, x, residual):
        """(norm(residual + x), residual + x) in one fused Triton kernel where Triton runs
        (config.fused_add_norm; see model/gpt.py), else the same math unfused."""
        from kernels.rmsnorm import add_rms_norm
        return add_rms_norm(x, residual, self.weight, self.eps)


class PartialRMSNorm(RMSNorm):
    """pRMSNorm (same paper): the RMS is estimated from the first ceil(p*d) features only
    (p = config.prms_fraction) and applied to all of them."""

    def __init__(self, dim, config):
        super().__init__(dim, config)
        self.stats_features = max(1, math.ceil(config.prms_fraction * dim))

    add_norm = None  # the fused kernel computes full-width statistics


class TritonRMSNorm(RMSNorm):
    """rmsnorm computed by the fused Triton kernel (kernels/rmsnorm.py). Same parameters, hence
    the same checkpoint keys, as rmsnorm: a run can switch between the two. Where Triton cannot run
    it falls back to rmsnorm's math with one warning."""

    def forward(self, x):
        from kernels.rmsnorm import rms_norm as triton_rms_norm
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


class Identity(nn.Module):
    """No normalization at all, for ablations."""

    def __init__(self, dim, config):
        super().__init__()

    def forward(self, x):
        return x


NORMS = {
    "layernorm": LayerNorm,
    "rmsnorm": RMSNorm,
    "triton_rmsnorm": TritonRMSNorm,
    "prmsnorm": PartialRMSNorm,
    "scalenorm": ScaleNorm,
    "none": Identity,
}


def check_norm_name(name, where):
    if name not in NORMS:
        from config import UserError
        raise UserError(f"unknown norm {name!r} in {where}; valid norms: {', '.join(NORMS)}")
    return name


def make_norm(name, dim, config):
    return NORMS[check_norm_name(name, "norm")](dim, config)


def parse_block_norms(spec, n_layer):
    """Expand block_norms into one (attn_norm, mlp_norm) pair per block.

    Accepts a compact string "layernorm*2,rmsnorm*2" (a "/" pairs the attention and MLP norms:
    "layernorm/rmsnorm") or a TOML list whose entries are names or [attn, mlp] pairs.
    """
    from config import UserError
    entries = []
    items = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else spec
    for item in items:
        count = 1
        if isinstance(item, str) and "*" in item:
            item, _, times = item.partition("*")
            if not times.strip().isdigit() or int(times) < 1:
                raise UserError(f"block_norms entry {item}*{times}: the repeat count must be a positive integer")
            count = int(times)
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
        pair = tuple(check_norm_name(p, "block_norms") for p in parts)
        entries.extend([pair] * count)
    if len(entries) != n_layer:
        raise UserError(f"block_norms describes {len(entries)} blocks but n_layer is {n_layer}; give one entry per block")
    return entries


def resolve_norm_stack(config):
    """The norm at every site: ([(attn_norm, mlp_norm) per block], final_norm).

    Precedence: block_norms (per block) > attn_norm / mlp_norm (every block) > norm (default).
    """
    check_norm_name(config.norm, "norm")
    attn = check_norm_name(config.attn_norm or config.norm, "attn_norm")
    mlp = check_norm_name(config.mlp_norm or config.norm, "mlp_norm")
    final = check_norm_name(config.final_norm or config.norm, "final_norm")
    if config.block_norms:
        blocks = parse_block_norms(config.block_norms, config.n_layer)
    else:
        blocks = [(attn, mlp)] * config.n_layer
    return blocks, final
