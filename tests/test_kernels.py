"""The Triton RMSNorm kernels against fp64 references.

On CPU they run in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1; ~ms per row, so inputs
here have a few rows); benchmarks/gpu_check.sh runs this file compiled on a GPU (TRITON_INTERPRET=0).
"""
import warnings

import pytest
import torch

from kernels.rmsnorm import rms_norm
from model.gpt import GPT
from norm_checks import EPS, assert_close, check_add_rms_norm, dx_scale, rms_norm_fp64
from repo import run_cli

pytest.importorskip("triton")
from kernels import rmsnorm_triton as K  # noqa: E402

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
    y = K.triton_rms_norm(x, w, EPS)
    assert y.dtype == dtype and y.shape == x.shape
    got = grads(y, (x, w), dy)
    xr = x.detach().double().requires_grad_()
    wr = w.detach().double().requires_grad_() if gain else None
    yr = rms_norm_fp64(xr, wr)
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
    check_add_rms_norm(x, res, w, dy, ds, dtype)


def test_add_rms_norm_mixed_dtypes_promote_like_torch():
    """A bf16 sublayer output added to an fp32 residual stream gives fp32, as `residual + x` does."""
    x = torch.randn(4, 64, device=DEVICE, dtype=torch.bfloat16)
    res = torch.randn(4, 64, device=DEVICE)
    y, s = K.triton_add_rms_norm(x, res, None, EPS)
    assert s.dtype == y.dtype == torch.float32
    torch.testing.assert_close(s, res + x)
    torch.testing.assert_close(y, rms_norm(res + x, None, EPS))


def test_zero_rows_and_widest_rows():
    for shape in [(0, 768), (2, 0, 64)]:
        x = torch.randn(shape, device=DEVICE, requires_grad=True)
        w = torch.ones(shape[-1], device=DEVICE, requires_grad=True)
        K.triton_rms_norm(x, w, EPS).sum().backward()
        assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))
    torch.manual_seed(0)
    x = make_input((2, 65536), torch.float32, "contiguous").requires_grad_()
    w = torch.randn(65536, device=DEVICE, requires_grad=True)
    dy = torch.randn_like(x)
    got = grads(K.triton_rms_norm(x, w, EPS), (x, w), dy)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    for g, r in zip(got, grads(rms_norm_fp64(xr, wr), (xr, wr), dy.double())):
        assert_close(g, r, torch.float32, "65536 wide")


@pytest.mark.slow  # a child process each: importing torch and triton takes seconds
@pytest.mark.parametrize("case", ["forward", "backward", "add"])
def test_offsets_past_2_pow_31(case):
    """Rows that start past 2^31 elements: (3, 96) bf16 views with row stride 2^30 + 7 over one
    lazily allocated storage (tests/big_offsets.py). In a child process, so that an access at a
    wrapped offset fails this test instead of ending the whole run."""
    done = run_cli("tests/big_offsets.py", case)
    signal = f" (signal {-done.returncode})" if done.returncode < 0 else ""
    assert done.returncode == 0 and done.stdout.strip() == "ok", \
        f"{case}: exit {done.returncode}{signal}\n{done.stderr[-3000:]}"


@pytest.mark.skipif(DEVICE != "cuda", reason="needs > 2^31 elements on a GPU")
def test_whole_tensors_past_2_pow_31():
    n = 4096
    rows = 2 ** 31 // n + 2
    x = torch.randn(rows, n, device=DEVICE, dtype=torch.bfloat16)
    w = torch.ones(n, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    y = K.triton_rms_norm(x, w, EPS)
    torch.testing.assert_close(y[-2:], rms_norm(x[-2:], w, EPS))
    x.requires_grad_()
    y = K.triton_rms_norm(x, w, EPS)
    y.backward(torch.ones_like(y))
    xr = x[-2:].detach().requires_grad_()
    rms_norm(xr, w.detach(), EPS).backward(torch.ones_like(xr))
    torch.testing.assert_close(x.grad[-2:], xr.grad)


@pytest.mark.parametrize("width", [7, 768, 8200])
@pytest.mark.parametrize("backward", [False, True])
def test_every_candidate_launch_matches_fp64(width, backward):
    """Each launch the benchmark's sweep can choose (rows per program, warps, programs per SM)
    splits the work differently and computes the same function; with gain and residual."""
    torch.manual_seed(width)
    dtype, shape = torch.bfloat16, (3, 5, width)
    x = make_input(shape, dtype, "row_slice", scale=2.0)
    res, dy, dres = (make_input(shape, dtype, "contiguous") for _ in range(3))
    w = (torch.randn(width) * 0.5 + 1).to(DEVICE, dtype)
    if backward:  # x is the saved sum s; rstd as the forward stores it (fp32, one per row)
        rstd = torch.rsqrt(x.float().pow(2).mean(-1) + EPS).reshape(-1)
        sr, wr = x.double().requires_grad_(), w.double().requires_grad_()
        ref = torch.autograd.grad(rms_norm_fp64(sr, wr), (sr, wr), dy.double())
        want_ds = ref[0] + dres.double()
    else:
        exact = x.double() + res.double()
        want_y = rms_norm_fp64(exact.to(dtype), w)
    for config in K.candidate_configs(width, backward):
        if backward:
            ds, dw = K.run_backward(dy, x, w, rstd, dres, config)
            assert_close(ds, want_ds, dtype, f"ds, {config}", scale=dx_scale(x, w, dy) + dres.abs().max())
            assert_close(dw, ref[1], dtype, f"dg, {config}")
        else:
            y, s, _ = K.run_forward(x, res, w, EPS, config)
            assert_close(s, exact, dtype, f"s, {config}")
            assert_close(y, want_y, dtype, f"y, {config}")


def test_candidate_launches_surround_the_heuristic():
    for width in (7, 768, 4096, 8200):
        for backward in (False, True):
            configs = K.candidate_configs(width, backward)
            assert configs[0] == K.launch_config(width, backward) and len(set(configs)) == len(configs) >= 3
    assert K.launch_config(768, False).block_m > 1  # narrow rows: several per program
    assert K.launch_config(8200, True).block_m == 1  # wide rows: one at a time, in chunks


@pytest.mark.parametrize("fused", [False, True])
def test_gpt_with_triton_rmsnorm_matches_rmsnorm(fused, small_model_config):
    idx = torch.randint(0, 300, (2, 16), device=DEVICE)
    results = []
    for config in (small_model_config(n_embd=48, norm="rmsnorm"),
                   small_model_config(n_embd=48, norm="triton_rmsnorm", fused_add_norm=fused)):
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
        y, s = K.triton_add_rms_norm(x, res, w, EPS)
        return K.triton_rms_norm(y * s, w, EPS).sum()
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
        y = K.triton_rms_norm(x, w, EPS)
        y2, s = K.triton_add_rms_norm(x, x, w, EPS)
    assert len(caught) == 1 and "reference RMSNorm" in str(caught[0].message)
    torch.testing.assert_close(y, rms_norm_fp64(x, w).float())
    torch.testing.assert_close(y2, rms_norm_fp64(2 * x, w).float())


def test_gpt_with_fused_add_norm_compiles_as_one_graph(small_model_config):
    config = small_model_config(n_embd=48, norm="triton_rmsnorm", fused_add_norm=True)
    torch.manual_seed(0)
    model = GPT(config).to(DEVICE)
    idx = torch.randint(0, 300, (2, 16), device=DEVICE)
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    _, loss = torch.compile(model, backend=backend, fullgraph=True)(idx, targets=idx)
    loss.backward()
    torch.testing.assert_close(loss, model(idx, targets=idx)[1])


@pytest.mark.parametrize("op", ["triton_rms_norm", "triton_add_rms_norm"])
@pytest.mark.parametrize("make, message", [
    (lambda: (torch.randn(2, 16), torch.ones(8)), r"weight shape \(8,\) must be \(16,\)"),  # a kernel would read past its end
    (lambda: (torch.randn(2, 16), torch.ones(32)), r"weight shape \(32,\) must be \(16,\)"),  # would be cut silently
    (lambda: (torch.ones(2, 16, dtype=torch.int32), None), "x must be a floating-point tensor"),  # would give integers
    (lambda: (torch.randn(2, 16), torch.ones(16, device="meta")), "weight is on meta but x is on"),
    (lambda: (torch.randn(3, 0), None), r"x must have at least one feature, got shape \(3, 0\)"),  # named, not a reshape error
])
def test_bad_inputs_are_refused_in_one_line(op, make, message):
    x, w = make()
    x = x.to(DEVICE)
    w = w if w is None or w.device.type == "meta" else w.to(DEVICE)
    with pytest.raises(ValueError, match=message):
        if op == "triton_rms_norm":
            K.triton_rms_norm(x, w, EPS)
        else:
            K.triton_add_rms_norm(x, x.clone(), w, EPS)


def test_add_rms_norm_refuses_a_residual_of_another_shape():
    x = torch.randn(2, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"residual shape \(2, 8\) must equal x's \(2, 16\)"):
        K.triton_add_rms_norm(x, torch.randn(2, 8, device=DEVICE), None, EPS)
    with pytest.raises(ValueError, match="residual must be a floating-point tensor"):
        K.triton_add_rms_norm(x, torch.ones(2, 16, dtype=torch.int64, device=DEVICE), None, EPS)


def test_fp64_is_computed_in_fp64():
    """The kernels compute in fp32; fp64 inputs go to kernels.rmsnorm instead, so they are exact
    (to ~1e-15, where fp32 arithmetic would be off by ~1e-7) and a gradcheck passes."""
    torch.manual_seed(0)
    x = torch.randn(3, 40, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(40, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert_close(K.triton_rms_norm(x, w, EPS), rms_norm_fp64(x, w), torch.float64, "y")
    y, s = K.triton_add_rms_norm(x, 2 * x, w, EPS)
    assert y.dtype == s.dtype == torch.float64
    assert_close(y, rms_norm_fp64(3 * x, w), torch.float64, "add y")
    assert torch.autograd.gradcheck(lambda x, w: K.triton_rms_norm(x, w, EPS), (x, w))
    assert torch.autograd.gradcheck(lambda x, r, w: K.triton_add_rms_norm(x, r, w, EPS)[0],
                                    (x, torch.randn_like(x, requires_grad=True), w))
