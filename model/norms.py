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
