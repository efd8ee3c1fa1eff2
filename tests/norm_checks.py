"""The fp64 reference, tolerances and comparisons shared by the norm tests (test_norms.py: the
registry; test_kernels.py: Triton; test_rmsnorm.py: kernels.rmsnorm and its C++ CPU kernel)."""
import torch

EPS = 1e-5
# (rtol, atol as a fraction of the largest reference value): each output is rounded once to its
# dtype, so fp32 at ~1e-5 and the half types at their rounding (8 bits of mantissa for bf16, 11 for fp16)
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5),
       torch.bfloat16: (2 ** -7, 2 ** -7), torch.float16: (2 ** -10, 2 ** -10)}


def rms_norm_fp64(x, weight=None, k=None, eps=EPS):
    """x / sqrt(mean(x[..., :k]^2) + eps) * weight in fp64, written out (autograd flows through it)."""
    x = x.double()
    k = x.shape[-1] if k is None else k
    y = x * torch.rsqrt(x[..., :k].pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight.double()


def assert_close(got, ref, dtype, what, scale=None):
    """|got - ref| <= rtol * |ref| + atol * scale, with scale the largest |ref| unless given: dx is
    a difference of two terms that cancel (completely at width 1), so its scale is theirs."""
    rtol, atol = TOL[dtype]
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    scale = ref.abs().max() if scale is None else scale
    bound = rtol * ref.abs() + atol * max(float(scale), 1e-30)
    err = (got - ref).abs()
    assert torch.isfinite(got).all(), f"{what}: non-finite values (an unwritten output?)"
    assert (err <= bound).all(), f"{what}: max error {err.max():.3g}, worst excess {(err - bound).max():.3g}"


def dx_scale(x, weight, dy):
    """The size of dx's first term, dy * g / rms(x)."""
    x, dy = x.detach().double(), dy.double()
    g = dy if weight is None else dy * weight.detach().double()
    return (g * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)).abs().max()


def check_add_rms_norm(x, res, w, dy, ds, dtype):
    """triton_add_rms_norm's outputs (y, s) and its gradients for x, the residual and the gain
    against fp64, with a gradient arriving on both outputs. The kernel normalizes the sum as stored,
    like `x = x + f(x)`, with the gradient of the sum."""
    from kernels import rmsnorm_triton as K
    x, res, w = (t.detach().requires_grad_() for t in (x, res, w))
    y, s = K.triton_add_rms_norm(x, res, w, EPS)
    got = torch.autograd.grad((y, s), (x, res, w), (dy, ds))
    xr, rr, wr = (t.detach().double().requires_grad_() for t in (x, res, w))
    exact = xr + rr
    sr = exact.detach().to(dtype).double() + (exact - exact.detach())
    yr = rms_norm_fp64(sr, wr)
    ref = torch.autograd.grad((yr, sr), (xr, rr, wr), (dy.double(), ds.double()))
    assert_close(s, exact, dtype, "s")
    assert_close(y, yr, dtype, "y")
    scale = dx_scale(sr, w, dy) + ds.double().abs().max()
    for name, g, r in zip(("dx", "dresidual", "dg"), got, ref):
        assert_close(g, r, dtype, name, scale=scale if name != "dg" else None)
