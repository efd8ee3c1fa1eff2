"""The Triton RMSNorm kernels against fp64 references.

On CPU they run in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1; ~ms per row, so inputs
here have a few rows); benchmarks/gpu_check.sh runs this file compiled on a GPU (TRITON_INTERPRET=0).
"""
import warnings

import pytest
import torch

from config import Config, UserError, apply_overrides
from model.gpt import GPT
from model.norms import rms_norm
from norm_checks import EPS, TOL, assert_close, dx_scale

pytest.importorskip("triton")
from kernels import rmsnorm as K  # noqa: E402

DEVICE = "cpu" if K.INTERPRETED or not torch.cuda.is_available() else "cuda"
pytestmark = pytest.mark.skipif(not K.triton_runs_on(torch.empty(0, device=DEVICE)),
                                reason="Triton cannot run here (no GPU and TRITON_INTERPRET is not 1)")



@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN-filled floats, so an output element a kernel fails to write shows up."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", poisoned)


def reference(x, weight):
    x = x.double()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
    return y if weight is None else y * weight.double()


def make_input(shape, dtype, layout, scale=1.0):
    """x of `shape` in one of three layouts: contiguous; "row_slice": the first columns of wider
    rows (row stride != width); "transposed": a permuted view with a strided last dimension."""
    n = shape[-1]
    if layout == "contiguous":
        x = torch.randn(shape)
    elif layout == "row_slice":
        x = torch.randn(*shape[:-1], n + 5)[..., :n]
    else:
        x = torch.randn(n, *shape[:-1]).permute(*range(1, len(shape)), 0)
    return (x * scale + 0.3 * scale).to(device=DEVICE, dtype=dtype)  # an offset: RMS != std


def grads(y, inputs, dy):
    return torch.autograd.grad(y, [t for t in inputs if t is not None], dy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", [1, 7, 768, 1000, 4096, 8200])
@pytest.mark.parametrize("layout", ["contiguous", "row_slice", "transposed"])
@pytest.mark.parametrize("gain", [True, False])
def test_rms_norm_matches_fp64(dtype, width, layout, gain):
    torch.manual_seed(width)
    shape = (3, 5, width)
    x = make_input(shape, dtype, layout, scale=3.0).requires_grad_()
    w = (torch.randn(width) * 0.5 + 1).to(DEVICE, dtype).requires_grad_() if gain else None
    dy = make_input(shape, dtype, "transposed" if layout != "contiguous" else "contiguous")  # strided grads too
    y = K.rms_norm(x, w, EPS)
    assert y.dtype == dtype and y.shape == x.shape
    got = grads(y, (x, w), dy)
    xr = x.detach().double().requires_grad_()
    wr = w.detach().double().requires_grad_() if gain else None
    yr = reference(xr, wr)
    ref = grads(yr, (xr, wr), dy.double())
    assert_close(y, yr, dtype, "y")
    assert_close(got[0], ref[0], dtype, "dx", scale=dx_scale(x, w, dy))
    if gain:
        assert_close(got[1], ref[1], dtype, "dg")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", [7, 768, 8200])
def test_add_rms_norm_matches_fp64(dtype, width):
    """Both outputs and all three gradients, with a gradient arriving on the new residual too."""
    torch.manual_seed(width)
    shape = (2, 7, width)
    x = make_input(shape, dtype, "contiguous").requires_grad_()
    res = make_input(shape, dtype, "transposed", scale=2.0).requires_grad_()
    w = (torch.randn(width) * 0.5 + 1).to(DEVICE, dtype).requires_grad_()
    dy, ds = make_input(shape, dtype, "contiguous"), make_input(shape, dtype, "transposed")
    y, s = K.add_rms_norm(x, res, w, EPS)
    got = torch.autograd.grad((y, s), (x, res, w), (dy, ds))
    xr, rr, wr = (t.detach().double().requires_grad_() for t in (x, res, w))
    exact = xr + rr
    # the kernel normalizes the sum as stored, like `x = x + f(x)`, with the gradient of the sum
    sr = exact.detach().to(dtype).double() + (exact - exact.detach())
    yr = reference(sr, wr)
    ref = torch.autograd.grad((yr, sr), (xr, rr, wr), (dy.double(), ds.double()))
    assert_close(s, exact, dtype, "s")
    assert_close(y, yr, dtype, "y")
    scale = dx_scale(sr, w, dy) + ds.double().abs().max()
    for name, g, r in zip(("dx", "dresidual", "dg"), got, ref):
        assert_close(g, r, dtype, name, scale=scale if name != "dg" else None)


def test_add_rms_norm_mixed_dtypes_promote_like_torch():
    """A bf16 sublayer output added to an fp32 residual stream gives fp32, as `residual + x` does."""
    x = torch.randn(4, 64, device=DEVICE, dtype=torch.bfloat16)
    res = torch.randn(4, 64, device=DEVICE)
    y, s = K.add_rms_norm(x, res, None, EPS)
    assert s.dtype == y.dtype == torch.float32
    torch.testing.assert_close(s, res + x)
    torch.testing.assert_close(y, rms_norm(res + x, None, EPS))


def test_zero_rows_and_widest_rows():
    for shape in [(0, 768), (2, 0, 64)]:
        x = torch.randn(shape, device=DEVICE, requires_grad=True)
        w = torch.ones(shape[-1], device=DEVICE, requires_grad=True)
        K.rms_norm(x, w, EPS).sum().backward()
        assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))
    torch.manual_seed(0)
    x = make_input((2, 65536), torch.float32, "contiguous").requires_grad_()
    w = torch.randn(65536, device=DEVICE, requires_grad=True)
    dy = torch.randn_like(x)
    got = grads(K.rms_norm(x, w, EPS), (x, w), dy)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    for g, r in zip(got, grads(reference(xr, wr), (xr, wr), dy.double())):
        assert_close(g, r, torch.float32, "65536 wide")


@pytest.mark.skipif(DEVICE != "cuda", reason="needs > 2^31 elements on a GPU")
def test_offsets_past_2_pow_31():
    n = 4096
    rows = 2 ** 31 // n + 2
    x = torch.randn(rows, n, device=DEVICE, dtype=torch.bfloat16)
    w = torch.ones(n, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    y = K.rms_norm(x, w, EPS)
    torch.testing.assert_close(y[-2:], rms_norm(x[-2:], w, EPS))
    x.requires_grad_()
    y = K.rms_norm(x, w, EPS)
    y.backward(torch.ones_like(y))
    xr = x[-2:].detach().requires_grad_()
    rms_norm(xr, w.detach(), EPS).backward(torch.ones_like(xr))
    torch.testing.assert_close(x.grad[-2:], xr.grad)


def tiny_gpt_config(**overrides):
    values = dict(vocab_size=300, block_size=16, n_layer=2, n_head=2, n_embd=48, **overrides)
    return apply_overrides(Config(), values).validate()


@pytest.mark.parametrize("fused", [False, True])
def test_gpt_with_triton_rmsnorm_matches_rmsnorm(fused):
    idx = torch.randint(0, 300, (2, 16), device=DEVICE)
    results = []
    for config in (tiny_gpt_config(norm="rmsnorm"), tiny_gpt_config(norm="triton_rmsnorm", fused_add_norm=fused)):
        torch.manual_seed(0)
        model = GPT(config).to(DEVICE)
        with torch.no_grad():  # non-trivial gains, so a gain the kernel ignores would show
            for name, p in model.named_parameters():
                if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                    p.uniform_(0.5, 1.5)
        _, loss = model(idx, targets=idx)
        loss.backward()
        results.append((loss, {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert grads_a.keys() == grads_b.keys()  # same parameter names: checkpoints are interchangeable
    atol = 1e-5 if DEVICE == "cuda" else 1e-6  # CUDA attention kernels reduce in their own order
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=atol)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=atol, msg=name)


def test_fused_add_norm_config_is_validated():
    with pytest.raises(UserError, match="fused_add_norm"):
        tiny_gpt_config(norm="layernorm", fused_add_norm=True)
    with pytest.raises(UserError, match="post"):
        tiny_gpt_config(norm="rmsnorm", norm_position="post", fused_add_norm=True)
    tiny_gpt_config(norm="rmsnorm", final_norm="layernorm", fused_add_norm=True)  # the final norm may differ


def test_opcheck():
    x = torch.randn(3, 4, 40, device=DEVICE, requires_grad=True)
    res = torch.randn(3, 4, 40, device=DEVICE, requires_grad=True)
    w = torch.randn(40, device=DEVICE, requires_grad=True)
    # the autograd checks use tensors of their own, so the poisoned empty does not matter here
    torch.library.opcheck(torch.ops.normgpt.rms_norm_fwd, (x, w, EPS))
    torch.library.opcheck(torch.ops.normgpt.rms_norm_fwd, (x, None, EPS))
    torch.library.opcheck(torch.ops.normgpt.add_rms_norm_fwd, (x, res, w, EPS))


def test_compiles_without_graph_break():
    """fullgraph=True fails on any graph break. On CPU the interpreter's op is opaque to the
    compiler (aot_eager runs it as is); on a GPU Inductor sees the kernels themselves."""
    def f(x, res, w):
        y, s = K.add_rms_norm(x, res, w, EPS)
        return K.rms_norm(y * s, w, EPS).sum()
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    inputs = [torch.randn(6, 96, device=DEVICE, requires_grad=True) for _ in range(2)]
    inputs.append(torch.randn(96, device=DEVICE, requires_grad=True))
    eager_out = f(*inputs)
    eager_grads = torch.autograd.grad(eager_out, inputs)
    out = compiled(*inputs)
    torch.testing.assert_close(out, eager_out)
    for g, r in zip(torch.autograd.grad(out, inputs), eager_grads):
        torch.testing.assert_close(g, r)


def test_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(K, "INTERPRETED", False)  # as if TRITON_INTERPRET had been unset at import
    monkeypatch.setattr(K, "_warned", False)
    x = torch.randn(4, 32)  # a CPU tensor without the interpreter: Triton cannot run it
    w = torch.randn(32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = K.rms_norm(x, w, EPS)
        y2, s = K.add_rms_norm(x, x, w, EPS)
    assert len(caught) == 1 and "reference RMSNorm" in str(caught[0].message)
    torch.testing.assert_close(y, reference(x, w).float())
    torch.testing.assert_close(y2, reference(2 * x, w).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("stats_features", [None, 5])
def test_cpu_autograd_path_matches_fp64(dtype, stats_features):
    """model.norms.rms_norm, the closed-form autograd Function behind rmsnorm and prmsnorm."""
    torch.manual_seed(1)
    x = (torch.randn(4, 3, 24) * 2 + 0.5).to(dtype).requires_grad_()
    # an fp32 gain with bf16 activations, as under autocast
    w = (torch.randn(24) + 1).to(torch.promote_types(dtype, torch.float32)).requires_grad_()
    dy = torch.randn(4, 3, 24).to(dtype)
    y = rms_norm(x, w, EPS, stats_features)
    got = torch.autograd.grad(y, (x, w), dy)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    k = stats_features or 24
    yr = xr * torch.rsqrt(xr[..., :k].pow(2).mean(-1, keepdim=True) + EPS) * wr
    ref = torch.autograd.grad(yr, (xr, wr), dy.double())
    tol = TOL[dtype]
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), yr, rtol=tol[0], atol=tol[1] * yr.abs().max().item())
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r, rtol=tol[0], atol=tol[1] * r.abs().max().item())


def test_gpt_with_fused_add_norm_compiles_as_one_graph():
    config = tiny_gpt_config(norm="triton_rmsnorm", fused_add_norm=True)
    torch.manual_seed(0)
    model = GPT(config).to(DEVICE)
    idx = torch.randint(0, 300, (2, 16), device=DEVICE)
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    _, loss = torch.compile(model, backend=backend, fullgraph=True)(idx, targets=idx)
    loss.backward()
    torch.testing.assert_close(loss, model(idx, targets=idx)[1])


def test_cpu_autograd_path_compiles_as_one_graph():
    x = torch.randn(8, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    for k in (None, 5):
        compiled = torch.compile(lambda x, w: rms_norm(x, w, EPS, k), backend="aot_eager", fullgraph=True)
        got = torch.autograd.grad(compiled(x, w).sum(), (x, w))
        ref = torch.autograd.grad(rms_norm(x, w, EPS, k).sum(), (x, w))
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r)
