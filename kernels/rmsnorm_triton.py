"""RMSNorm and residual-add + RMSNorm as torch ops, backed by the Triton kernels of rmsnorm_triton_kernels.py.

    triton_rms_norm(x, weight, eps)               -> x / sqrt(mean(x^2) + eps) * weight
    triton_add_rms_norm(x, residual, weight, eps) -> (y, s) with s = x + residual and y = rms_norm(s)

Each is a `torch.library.triton_op` with a registered autograd formula, so torch.compile sees one op
(no graph break) and can still place the kernels in its graph. The kernels compute in fp32 for fp32,
bf16 and fp16 inputs; fp64 inputs go to kernels/rmsnorm.py's `rms_norm` and are computed in fp64 (a
gradcheck stays exact). Where Triton cannot run (a CPU tensor without TRITON_INTERPRET=1, or triton
not installed) both fall back to that same `rms_norm`, with one warning.

Launches: launch_config() picks the rows per program, the warps and the backward's programs per SM
from the row width alone; candidate_configs() is that choice with its neighbours, which
benchmarks/bench_norms.py --tune times on a GPU to name the fastest at each shape. run_forward and
run_backward launch the kernels with either.
"""
import warnings
from typing import NamedTuple, Optional

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


# --- launch parameters -------------------------------------------------------------------------

class LaunchConfig(NamedTuple):
    """How a kernel is launched: rows per program, warps per program and, for the backward's
    persistent grid, programs per SM (0 for the forward)."""
    block_m: int
    num_warps: int
    programs_per_sm: int = 0

    def __str__(self):
        per_sm = f" programs/SM={self.programs_per_sm}" if self.programs_per_sm else ""
        return f"BLOCK_M={self.block_m} warps={self.num_warps}{per_sm}"


def _block_n(n: int) -> int:
    return min(max(triton.next_power_of_2(n), 16), MAX_ONE_BLOCK)  # tiny rows: a masked 16-wide block


def launch_config(n: int, backward: bool) -> LaunchConfig:
    """The launch for rows of width n, before any GPU has measured it: ~32 fp32 values per thread
    per array in the forward (x, y), ~16 in the backward, which holds s, dy, ds and its dg partial
    at once (QuACK keeps 24-64 per thread); tiles of 4096 (forward) and 2048 (backward) elements for
    narrow rows. The backward's persistent grid has 16 warps per SM, so that all its programs are
    resident at once even at 128 registers per thread: a persistent grid larger than what fits runs
    in two waves, the second starting late. benchmarks/bench_norms.py --tune times these against
    candidate_configs() and records the winner at each shape."""
    block_n = _block_n(n)
    per_thread, tile = (16, 2048) if backward else (32, 4096)
    block_m = 1 if n > MAX_ONE_BLOCK else min(max(tile // block_n, 1), 64)
    num_warps = min(max(block_m * block_n // (32 * per_thread), 1), 16)
    return LaunchConfig(block_m, num_warps, max(1, 16 // num_warps) if backward else 0)


def candidate_configs(n: int, backward: bool) -> list[LaunchConfig]:
    """launch_config's choice first, then its neighbours: half and twice the rows per program (rows
    that fit in one block), the warps and, in the backward, the programs per SM."""
    base = launch_config(n, backward)
    found = [base]
    for factor in (2, 0.5):
        if n <= MAX_ONE_BLOCK:
            found.append(base._replace(block_m=int(base.block_m * factor)))
        found.append(base._replace(num_warps=int(base.num_warps * factor)))
        if backward:
            found.append(base._replace(programs_per_sm=int(base.programs_per_sm * factor)))
    valid = [c for c in found if 1 <= c.block_m <= 128 and 1 <= c.num_warps <= 16 and
             (not backward or 1 <= c.programs_per_sm <= 64)]
    return list(dict.fromkeys(valid))


def _sm_count(device) -> int:
    """SMs, for the backward's persistent grid. The interpreter has none: 2 lets a few programs
    each stride over several tiles and share the dg reduction, as on a GPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def run_forward(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], eps: float,
                config: Optional[LaunchConfig] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(y, s, rstd) from the forward kernel; s is y when there is no residual. `config` replaces
    launch_config's choice (the benchmark's sweep)."""
    n = x.shape[-1]
    x2 = _rows(x, n)
    out_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    s = torch.empty(x.shape, dtype=out_dtype, device=x.device) if residual is not None else y
    n_rows = x2.shape[0]
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, s, rstd
    res2 = x2 if residual is None else _rows(residual, n)  # unused when there is no residual
    w = x2 if weight is None else weight.contiguous()
    y2, s2 = y.view(-1, n), s.view(-1, n)
    config = config or launch_config(n, backward=False)
    block_n = _block_n(n)
    _launch(rmsnorm_fwd_kernel)[(triton.cdiv(n_rows, config.block_m),)](
        x2, res2, s2, y2, w, rstd, x2.stride(0), res2.stride(0), s2.stride(0), y2.stride(0), n_rows, n, eps,
        HAS_WEIGHT=weight is not None, HAS_RESIDUAL=residual is not None,
        BLOCK_M=config.block_m, BLOCK_N=block_n, ONE_BLOCK=n <= block_n, num_warps=config.num_warps)
    return y, s, rstd


def run_backward(dy: Tensor, s: Tensor, weight: Optional[Tensor], rstd: Tensor, dres: Optional[Tensor],
                 config: Optional[LaunchConfig] = None) -> tuple[Tensor, Tensor]:
    """(ds, dweight) from the backward kernel, dweight empty without a weight; `config` as in run_forward."""
    n = s.shape[-1]
    s2, dy2 = _rows(s, n), _rows(dy, n)
    ds = torch.empty(s.shape, dtype=s.dtype, device=s.device)
    ds2 = ds.view(-1, n)
    n_rows = s2.shape[0]
    config = config or launch_config(n, backward=True)
    block_n = _block_n(n)
    block_m = config.block_m if n <= block_n else 1  # wide rows go one at a time
    n_tiles = triton.cdiv(n_rows, block_m)
    programs = max(1, min(n_tiles, _sm_count(s.device) * config.programs_per_sm))
    # fp32 partial sums of dy * x_hat, one row per program, summed once below (never in the weight's dtype)
    dw_partial = torch.empty((programs, n) if weight is not None else (0,), dtype=torch.float32, device=s.device)
    if n_rows > 0:
        dres2 = s2 if dres is None else _rows(dres, n)
        w = s2 if weight is None else weight.contiguous()
        _launch(rmsnorm_bwd_kernel)[(programs,)](
            s2, w, rstd, dy2, dres2, ds2, dw_partial,
            s2.stride(0), dy2.stride(0), dres2.stride(0), ds2.stride(0), n_rows, n_tiles, n,
            HAS_WEIGHT=weight is not None, HAS_DRES=dres is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, ONE_BLOCK=n <= block_n, num_warps=config.num_warps)
    elif weight is not None:
        dw_partial.zero_()
    dw = dw_partial.sum(0).to(weight.dtype) if weight is not None else dw_partial
    return ds, dw


@_define("rms_norm_fwd")
def rms_norm_fwd(x: Tensor, weight: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    y, _, rstd = run_forward(x, None, weight, eps)
    return y, rstd


@_define("add_rms_norm_fwd")
def add_rms_norm_fwd(x: Tensor, residual: Tensor, weight: Optional[Tensor],
                     eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return run_forward(x, residual, weight, eps)


@_define("rms_norm_bwd")
def rms_norm_bwd(dy: Tensor, s: Tensor, weight: Optional[Tensor], rstd: Tensor,
                 dres: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(ds, dweight) for y = rms_norm(s), plus dres (the gradient arriving on s itself) when given.
    dweight is an empty tensor when there is no weight (an op cannot return None)."""
    return run_backward(dy, s, weight, rstd, dres)


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
