"""RMSNorm and residual-add + RMSNorm as torch ops, backed by the Triton kernels of rmsnorm_triton_kernels.py.

    triton_rms_norm(x, weight, eps)               -> x / sqrt(mean(x^2) + eps) * weight
    triton_add_rms_norm(x, residual, weight, eps) -> (y, s) with s = x + residual and y = rms_norm(s)

Each is a `torch.library.triton_op` with a registered autograd formula, so torch.compile sees one op
(no graph break) and can still place the kernels in its graph. The kernels compute in fp32 for fp32,
bf16 and fp16 inputs; fp64 inputs go to kernels/rmsnorm.py's `rms_norm` and are computed in fp64 (a
gradcheck stays exact). Where Triton cannot run (a CPU tensor without TRITON_INTERPRET=1, or triton
not installed) both fall back to that same `rms_norm`, with one warning.
"""
import warnings
from typing import Optional

import torch
from torch import Tensor

from kernels.rmsnorm import check_inputs, rms_norm

try:
    import triton
    from triton.runtime.jit import JITFunction

    from kernels.rmsnorm_triton_kernels import rmsnorm_bwd_kernel, rmsnorm_fwd_kernel
except ImportError:  # e.g. macOS or Windows, where there is no triton wheel
    triton = None

# TRITON_INTERPRET=1 at import made @triton.jit build interpreted kernels, which run on CPU tensors only
INTERPRETED = triton is not None and not isinstance(rmsnorm_fwd_kernel, JITFunction)
MAX_ONE_BLOCK = 8192  # widest row kept in registers; wider rows are processed in chunks this wide
_warned = False


def triton_runs_on(t: Tensor) -> bool:
    if triton is None:
        return False
    return (t.device.type == "cuda" and not INTERPRETED) or (t.device.type == "cpu" and INTERPRETED)


def _use_kernels(x: Tensor, dtype: torch.dtype) -> bool:
    """Whether the Triton kernels take x, computing in `dtype`; else rms_norm does (fp64, or Triton
    cannot run here)."""
    if dtype == torch.float64:
        return False
    if triton_runs_on(x):
        return True
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"Triton cannot run on {x.device.type} tensors here (set TRITON_INTERPRET=1 to "
                      "run its CPU interpreter); using the reference RMSNorm instead", stacklevel=3)
    return False


def triton_rms_norm(x: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    check_inputs("triton_rms_norm", x, weight)
    if not _use_kernels(x, x.dtype):
        return rms_norm(x, weight, eps)
    return torch.ops.normgpt.rms_norm_fwd(x, weight, eps)[0]


def triton_add_rms_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    """(rms_norm(x + residual), x + residual): the sum is rounded to its dtype before the norm, as
    the unfused `residual = residual + x; y = norm(residual)` does."""
    check_inputs("triton_add_rms_norm", x, weight, residual)
    if not _use_kernels(x, torch.promote_types(x.dtype, residual.dtype)):
        s = residual + x
        return rms_norm(s, weight, eps), s
    y, s, _ = torch.ops.normgpt.add_rms_norm_fwd(x, residual, weight, eps)
    return y, s


# --- launch helpers ----------------------------------------------------------------------------

def _launch(kernel):
    if isinstance(kernel, JITFunction):
        return torch.library.wrap_triton(kernel)  # a launch torch.compile can trace
    return _InterpretedLaunch(kernel)


class _InterpretedLaunch:
    """The interpreter's kernels are plain Python that cannot be traced. When the op runs on fake
    tensors (opcheck, torch.compile tracing) only its output allocation matters: skip the launch."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if torch._guards.detect_fake_mode(args) is None:
                self.kernel[grid](*args, **kwargs)
        return launch


def _define(name):
    """Register fn as the op `normgpt::name`. With compiled kernels it is a triton_op: torch.compile
    sees the kernel launches inside it. Under the interpreter it is an opaque custom op (its body
    cannot be traced), with the same function as its fake implementation."""
    def register(fn):
        if triton is None:
            return fn  # never called: rms_norm() falls back before reaching the ops
        if not INTERPRETED:
            return torch.library.triton_op(f"normgpt::{name}", fn, mutates_args=())
        op = torch.library.custom_op(f"normgpt::{name}", fn, mutates_args=())
        op.register_fake(fn)
        return op
    return register


def _rows(t: Tensor, n: int) -> Tensor:
    """t as (rows, n) with unit stride along n: a view when the layout allows, else one copy
    (a strided last dimension would make every load uncoalesced, slower than the copy)."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _block(n: int):
    block = min(max(triton.next_power_of_2(n), 16), MAX_ONE_BLOCK)  # tiny rows: a masked 16-wide block
    num_warps = min(max(block // 256, 1), 16)  # ~8 fp32 values per thread per array
    return block, block >= n, num_warps


def _program_slots(device) -> int:
    """How many programs can be resident at once: the backward's grid, so that each program loops
    over many rows and keeps one dg partial (few partials: a cheap final reduction)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: any small number exercises the multi-program reduction


def _forward(x, residual, weight, eps):
    n = x.shape[-1]
    x2 = _rows(x, n)
    out_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    s = torch.empty(x.shape, dtype=out_dtype, device=x.device) if residual is not None else y
    rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    if x2.shape[0] == 0:
        return y, s, rstd
    res2 = x2 if residual is None else _rows(residual, n)  # unused when there is no residual
    w = x2 if weight is None else weight.contiguous()
    y2, s2 = y.view(-1, n), s.view(-1, n)
    block, one_block, num_warps = _block(n)
    _launch(rmsnorm_fwd_kernel)[(x2.shape[0],)](
        x2, res2, s2, y2, w, rstd, x2.stride(0), res2.stride(0), s2.stride(0), y2.stride(0), n, eps,
        HAS_WEIGHT=weight is not None, HAS_RESIDUAL=residual is not None,
        BLOCK_N=block, ONE_BLOCK=one_block, num_warps=num_warps)
    return y, s, rstd


@_define("rms_norm_fwd")
def rms_norm_fwd(x: Tensor, weight: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    y, _, rstd = _forward(x, None, weight, eps)
    return y, rstd


@_define("add_rms_norm_fwd")
def add_rms_norm_fwd(x: Tensor, residual: Tensor, weight: Optional[Tensor],
                     eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return _forward(x, residual, weight, eps)


@_define("rms_norm_bwd")
def rms_norm_bwd(dy: Tensor, s: Tensor, weight: Optional[Tensor], rstd: Tensor,
                 dres: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(ds, dweight) for y = rms_norm(s), plus dres (the gradient arriving on s itself) when given.
    dweight is an empty tensor when there is no weight (an op cannot return None)."""
    n = s.shape[-1]
    s2, dy2 = _rows(s, n), _rows(dy, n)
    ds = torch.empty(s.shape, dtype=s.dtype, device=s.device)
    ds2 = ds.view(-1, n)
    n_rows = s2.shape[0]
    block, one_block, num_warps = _block(n)
    programs = max(1, min(n_rows, _program_slots(s.device) * max(1, 32 // num_warps)))
    # fp32 partial sums of dy * x_hat, one row per program; zeroed when the kernel accumulates
    # into them chunk by chunk, and summed once below (never in the weight's dtype)
    alloc = torch.empty if one_block else torch.zeros
    dw_partial = alloc((programs, n) if weight is not None else (0,), dtype=torch.float32, device=s.device)
    if n_rows > 0:
        dres2 = s2 if dres is None else _rows(dres, n)
        w = s2 if weight is None else weight.contiguous()
        _launch(rmsnorm_bwd_kernel)[(programs,)](
            s2, w, rstd, dy2, dres2, ds2, dw_partial,
            s2.stride(0), dy2.stride(0), dres2.stride(0), ds2.stride(0), n_rows, n, triton.cdiv(n_rows, programs),
            HAS_WEIGHT=weight is not None, HAS_DRES=dres is not None,
            BLOCK_N=block, ONE_BLOCK=one_block, num_warps=num_warps)
    elif weight is not None:
        dw_partial.zero_()
    dw = dw_partial.sum(0).to(weight.dtype) if weight is not None else dw_partial
    return ds, dw


# --- autograd ----------------------------------------------------------------------------------

def _setup_rms(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _backward_rms(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = torch.ops.normgpt.rms_norm_bwd(dy, x, weight, rstd, None)
    return dx, (dw if weight is not None else None), None


def _setup_add(ctx, inputs, output):
    x, residual, weight, _ = inputs
    ctx.save_for_backward(output[1], weight, output[2])  # the sum s, not x and residual
    ctx.dtypes = x.dtype, residual.dtype


def _backward_add(ctx, dy, ds_out, _drstd):
    s, weight, rstd = ctx.saved_tensors
    ds, dw = torch.ops.normgpt.rms_norm_bwd(dy, s, weight, rstd, ds_out)
    # s = x + residual: both receive ds (autograd's own add does the same)
    return ds.to(ctx.dtypes[0]), ds.to(ctx.dtypes[1]), (dw if weight is not None else None), None


if triton is not None:
    rms_norm_fwd.register_autograd(_backward_rms, setup_context=_setup_rms)
    add_rms_norm_fwd.register_autograd(_backward_add, setup_context=_setup_add)
