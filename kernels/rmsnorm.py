"""RMSNorm as one autograd op: the C++ kernel on CPU tensors, ATen ops elsewhere.

    rms_norm(x, weight, eps, stats_features=None) -> x / sqrt(mean(x[..., :k]^2) + eps) * weight

k = stats_features (default: every feature; pRMSNorm passes fewer). The statistics are computed in
fp32 (fp64 for fp64 inputs) and the output is in x's dtype. This is what the registry's `rmsnorm` and
`prmsnorm` run; the Triton kernels (rmsnorm_triton.py) are `triton_rmsnorm`.

Autograd through the composite formula keeps every intermediate, so the backward is written out and
saves only x and 1/rms (one value per row). With y = x * r * g and r = (mean(x[:k]^2) + eps)^-1/2:
    dx = r * g * dy - [j < k] * x * r^3 * sum(g * dy * x) / k,   dg = sum_rows(dy * x * r)
"""
from typing import Optional

import torch
from torch import Tensor

from kernels.rmsnorm_cpu import cpu_ops


def check_inputs(op, x, weight, residual=None):
    """A ValueError in one line for inputs the norm kernels cannot handle (a gain of another length
    would be read past its end by a kernel; an integer x would come back as integers)."""
    if not x.is_floating_point():
        raise ValueError(f"{op}: x must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have a feature dimension, got a 0-dim tensor")
    if x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have at least one feature, got shape {tuple(x.shape)}")
    if weight is not None:
        if not weight.is_floating_point():
            raise ValueError(f"{op}: weight must be a floating-point tensor, got {weight.dtype}")
        if tuple(weight.shape) != (x.shape[-1],):
            raise ValueError(f"{op}: weight shape {tuple(weight.shape)} must be ({x.shape[-1]},), "
                             f"the size of x's last dimension")
        if weight.device != x.device:
            raise ValueError(f"{op}: weight is on {weight.device} but x is on {x.device}")
    if residual is not None:
        if not residual.is_floating_point():
            raise ValueError(f"{op}: residual must be a floating-point tensor, got {residual.dtype}")
        if residual.shape != x.shape:
            raise ValueError(f"{op}: residual shape {tuple(residual.shape)} must equal x's {tuple(x.shape)}")
        if residual.device != x.device:
            raise ValueError(f"{op}: residual is on {residual.device} but x is on {x.device}")


class RMSNormFunction(torch.autograd.Function):
    """The closed-form forward and backward of the module docstring. CPU tensors go to the one-pass
    C++ kernel of rmsnorm_cpu.cpp, which computes exactly this; elsewhere (or where that kernel cannot
    be built) it is computed from ATen ops, both sums of the backward from one product p = dy * x."""

    @staticmethod
    def forward(ctx, x, weight, eps, k):
        k = x.shape[-1] if k is None else k
        ops = cpu_ops() if x.device.type == "cpu" else None
        if ops is not None:
            y, rstd = ops.rms_norm_forward(x, weight, eps, k)
        else:
            # ||x||^2 without materialising x^2 (or an fp32 copy of a bf16 x)
            rstd = torch.linalg.vector_norm(x[..., :k], dim=-1, keepdim=True,
                                            dtype=torch.promote_types(x.dtype, torch.float32))
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
        xf, dyf, r = x.reshape(-1, n).to(rstd.dtype), dy.reshape(-1, n).to(rstd.dtype), rstd.reshape(-1, 1)
        p = dyf * xf
        s = p @ weight.to(p.dtype) if weight is not None else p.sum(-1)
        dw = (p.T @ r.squeeze(1)).to(weight.dtype) if want_dw else None
        dx = torch.mul(dyf, r, out=p)  # p is spent: reuse its memory
        if weight is not None:
            dx.mul_(weight)
        dx[:, :k].addcmul_(xf[:, :k], r.pow(3).squeeze(1).mul_(s).div_(k).unsqueeze(1), value=-1)
        return dx.view(x.shape).to(x.dtype), dw, None, None


def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float, stats_features: Optional[int] = None) -> Tensor:
    """x / sqrt(mean(x[..., :k]^2) + eps) * weight, k = stats_features (default: all features)."""
    check_inputs("rms_norm", x, weight)
    if stats_features is not None and not 1 <= stats_features <= x.shape[-1]:
        raise ValueError(f"rms_norm: stats_features must be in [1, {x.shape[-1]}], got {stats_features}")
    return RMSNormFunction.apply(x, weight, eps, stats_features)
