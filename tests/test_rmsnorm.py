"""kernels.rmsnorm.rms_norm (what rmsnorm and prmsnorm run) and its C++ CPU kernel
(kernels/rmsnorm_cpu.cpp) against an fp64 reference; the ATen path it uses off CPU; its fallback.

On Linux the kernel must build (CI has g++): a test that silently skipped it would leave RMSNorm's CPU
speed, and the comparisons that rely on it, untested.
"""
import os
import subprocess
import sys
import warnings

import pytest
import torch

import kernels.rmsnorm_cpu as cpu_kernel
from kernels.rmsnorm import rms_norm
from norm_checks import EPS, TOL, assert_close, dx_scale, rms_norm_fp64
from repo import ROOT


@pytest.fixture(scope="module")
def ops():
    ops = cpu_kernel.cpu_ops()
    if ops is None and sys.platform.startswith("linux"):
        pytest.fail("the CPU RMSNorm kernel did not build (see the warning above)")
    if ops is None:
        pytest.skip("no C++ toolchain for the CPU RMSNorm kernel here")
    return ops


def reference(x, w, k):
    """fp64 RMSNorm with statistics from the first k features, and its gradients by autograd."""
    x64 = x.detach().double().requires_grad_()
    w64 = None if w is None else w.detach().double().requires_grad_()
    return rms_norm_fp64(x64, w64, k), x64, w64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("width", [1, 7, 768, 1000, 8200])
@pytest.mark.parametrize("layout", ["contiguous", "transposed_input", "strided_grad"])
@pytest.mark.parametrize("gain", [True, False])
def test_matches_fp64_reference(ops, dtype, width, layout, gain):
    g = torch.Generator().manual_seed(width)
    rows = 24
    if layout == "transposed_input":
        x = torch.randn(width, rows, generator=g).to(dtype).t()
    else:
        x = torch.randn(rows, width, generator=g).to(dtype)
    x = x.requires_grad_()
    w = (1 + 0.5 * torch.randn(width, generator=g)).requires_grad_() if gain else None
    dy = torch.randn(rows, 2 * width, generator=g).to(dtype)
    dy = dy[:, ::2] if layout == "strided_grad" else dy[:, :width].contiguous()

    y = rms_norm(x, w, EPS)
    y.backward(dy)
    ref, x64, w64 = reference(x, w, width)
    ref.backward(dy.double())
    assert y.dtype == x.grad.dtype == dtype
    assert_close(y, ref, dtype, "y")
    assert_close(x.grad, x64.grad, dtype, "dx", scale=dx_scale(x, w, dy))
    if gain:  # dg is summed in fp32 and cast to the gain's dtype (fp32 here) once
        assert w.grad.dtype == torch.float32
        assert_close(w.grad, w64.grad, torch.float32, "dg")


@pytest.mark.parametrize("k", [1, 5, 48])
def test_partial_statistics(ops, k):
    """pRMSNorm: the RMS of the first k features scales all of them; gradients flow to all of them."""
    x = torch.randn(3, 5, 48, dtype=torch.float64, requires_grad=True)
    w = torch.randn(48, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 5, 48, dtype=torch.float64)
    y = rms_norm(x, w, EPS, stats_features=k)
    y.backward(dy)
    ref, x64, w64 = reference(x, w, k)
    ref.backward(dy)
    assert y.dtype == x.grad.dtype == w.grad.dtype == torch.float64
    assert_close(y, ref, torch.float64, "y")
    assert_close(x.grad, x64.grad, torch.float64, "dx")
    assert_close(w.grad, w64.grad, torch.float64, "dg")


def test_gradcheck_fp64(ops):
    x = torch.randn(2, 3, 10, dtype=torch.float64, requires_grad=True)
    w = torch.randn(10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, EPS), (x, w))
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, EPS, stats_features=4), (x, w))
    assert torch.autograd.gradcheck(lambda x: rms_norm(x, None, EPS), (x,))


def test_gain_gradient_over_many_rows_is_summed_in_fp32(ops):
    """8192 bf16 rows: summed in bf16, dg is off by ~18 (on values up to ~130), in fp32 by ~3e-4;
    2e-3 separates the two."""
    torch.manual_seed(0)
    x = torch.randn(8192, 16).bfloat16().requires_grad_()
    w = torch.ones(16, requires_grad=True)
    dy = torch.randn(8192, 16).bfloat16()
    rms_norm(x, w, EPS).backward(dy)
    ref, _, w64 = reference(x, w, 16)
    ref.backward(dy.double())
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=0, atol=2e-3)


def test_zero_rows(ops):
    x = torch.randn(0, 32, requires_grad=True)
    w = torch.ones(32, requires_grad=True)
    y = rms_norm(x, w, EPS)
    y.sum().backward()
    assert y.shape == (0, 32) and x.grad.shape == (0, 32) and torch.all(w.grad == 0)


def test_thread_count_changes_only_rounding(ops):
    """Rows are split across threads and dg is reduced once per chunk: 1 and 2 threads agree."""
    x = torch.randn(512, 96)
    w = torch.randn(96)
    dy = torch.randn(512, 96)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y, rstd = ops.rms_norm_forward(x, w, EPS, 96)
            results.append((y, *ops.rms_norm_backward(dy, x, w, rstd, 96, True)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_ops_pass_opcheck(ops):
    x = torch.randn(4, 3, 20)
    w = torch.randn(20)
    y, rstd = ops.rms_norm_forward(x, w, EPS, 20)
    torch.library.opcheck(ops.rms_norm_forward, (x, w, EPS, 20))
    torch.library.opcheck(ops.rms_norm_forward, (x, None, EPS, 6))
    torch.library.opcheck(ops.rms_norm_backward, (torch.randn_like(x), x, w, rstd, 20, True))
    torch.library.opcheck(ops.rms_norm_backward, (torch.randn_like(x), x, None, rstd, 20, False))
    xt = torch.randn(20, 6).t()  # strided input: outputs are still contiguous, in the fake too
    torch.library.opcheck(ops.rms_norm_forward, (xt, w, EPS, 20))
    torch.library.opcheck(ops.rms_norm_backward, (xt, xt, w, ops.rms_norm_forward(xt, w, EPS, 20)[1], 20, True))


def test_compiles_without_graph_break(ops):
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward without inductor's C++ build."""
    x = torch.randn(6, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)

    def loss(x, w):
        return rms_norm(x, w, EPS).square().sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(x, w), (x, w))
    want = torch.autograd.grad(loss(x, w), (x, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("stats_features", [None, 40])
def test_kernel_and_aten_formula_agree(ops, monkeypatch, dtype, stats_features):
    """NORMGPT_CPU_KERNEL=0 (USE_CPU_KERNEL) selects the ATen formula; both compute the same RMSNorm,
    including bf16 activations with an fp32 gain, as under autocast."""
    torch.manual_seed(0)
    x = torch.randn(16, 64).to(dtype).requires_grad_()
    w = torch.randn(64).to(torch.promote_types(dtype, torch.float32)).requires_grad_()
    outputs = []
    for use_kernel in (True, False):
        monkeypatch.setattr(cpu_kernel, "USE_CPU_KERNEL", use_kernel)
        y = rms_norm(x, w, EPS, stats_features=stats_features)
        outputs.append((y, *torch.autograd.grad(y.float().square().sum(), (x, w))))
    rtol, atol = TOL[dtype]
    for a, b in zip(*outputs):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * b.abs().max().item())


def test_backward_follows_the_forwards_path(ops, monkeypatch):
    """Switching the kernel off between forward and backward (as a benchmark wrapper around the
    forward does) must not leave the backward without its ops."""
    x = torch.randn(4, 8, requires_grad=True)
    y = rms_norm(x, None, EPS)
    monkeypatch.setattr(cpu_kernel, "USE_CPU_KERNEL", False)
    y.backward(torch.ones_like(y))
    ref, x64, _ = reference(x, None, 8)
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)


def test_with_aten_rmsnorm_switches_the_kernel_off_and_restores_the_switch(ops, monkeypatch):
    assert cpu_kernel.with_aten_rmsnorm(cpu_kernel.cpu_ops)() is None
    assert cpu_kernel.cpu_ops() is ops
    monkeypatch.setattr(cpu_kernel, "USE_CPU_KERNEL", False)  # as NORMGPT_CPU_KERNEL=0 leaves it
    cpu_kernel.with_aten_rmsnorm(lambda: None)()
    assert cpu_kernel.USE_CPU_KERNEL is False  # restored, not switched on


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    def no_compiler():
        raise OSError("g++: command not found")

    monkeypatch.setattr(cpu_kernel, "_ops", None)
    monkeypatch.setattr(cpu_kernel, "_failed", False)
    monkeypatch.setattr(cpu_kernel, "_build", no_compiler)
    x = torch.randn(4, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1 = rms_norm(x, None, EPS)
        y2 = rms_norm(x, None, EPS)
    messages = [str(w.message) for w in caught if "CPU RMSNorm kernel" in str(w.message)]
    assert len(messages) == 1 and "g++: command not found" in messages[0]
    torch.testing.assert_close(y1, x * (x.pow(2).mean(-1, keepdim=True) + EPS).rsqrt())
    torch.testing.assert_close(y1, y2)


@pytest.mark.slow
def test_a_build_killed_midway_does_not_hang_the_next(ops, tmp_path):
    """torch's builder waits, forever, while a file named "lock" sits in the build folder; one left by
    a killed build must be cleared (a fresh TORCH_EXTENSIONS_DIR: this builds the kernel again, ~10 s)."""
    script = ("import kernels.rmsnorm_cpu as k\n"
              "folder = k.build_directory(); folder.mkdir(parents=True); (folder / 'lock').touch()\n"
              "assert k.cpu_ops() is not None\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT,
                          env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "built the CPU RMSNorm kernel" in done.stderr


@pytest.mark.parametrize("use_kernel", [True, False], ids=["cpu_kernel", "aten"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("stats_features", [None, 5])
def test_both_paths_match_fp64(monkeypatch, use_kernel, dtype, stats_features):
    """Both of rms_norm's paths (the C++ kernel, and the ATen formula GPUs use) against fp64,
    with an fp32 gain on bf16 activations as under autocast."""
    monkeypatch.setattr(cpu_kernel, "USE_CPU_KERNEL", use_kernel)
    torch.manual_seed(1)
    x = (torch.randn(4, 3, 24) * 2 + 0.5).to(dtype).requires_grad_()
    w = (torch.randn(24) + 1).to(torch.promote_types(dtype, torch.float32)).requires_grad_()
    dy = torch.randn(4, 3, 24).to(dtype)
    y = rms_norm(x, w, EPS, stats_features)
    got = torch.autograd.grad(y, (x, w), dy)
    ref, x64, w64 = reference(x, w, stats_features or 24)
    want = torch.autograd.grad(ref, (x64, w64), dy.double())
    assert y.dtype == dtype
    assert_close(y, ref, dtype, "y")
    assert_close(got[0], want[0], dtype, "dx", scale=dx_scale(x, w, dy))
    assert_close(got[1], want[1], torch.promote_types(dtype, torch.float32), "dg")


@pytest.mark.parametrize("use_kernel", [True, False], ids=["cpu_kernel", "aten"])
def test_both_paths_compile_as_one_graph(monkeypatch, use_kernel):
    monkeypatch.setattr(cpu_kernel, "USE_CPU_KERNEL", use_kernel)
    x = torch.randn(8, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    for k in (None, 5):
        compiled = torch.compile(lambda x, w: rms_norm(x, w, EPS, k), backend="aot_eager", fullgraph=True)
        got = torch.autograd.grad(compiled(x, w).sum(), (x, w))
        want = torch.autograd.grad(rms_norm(x, w, EPS, k).sum(), (x, w))
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r)


@pytest.mark.parametrize("x, weight, stats_features, message", [
    (torch.randn(2, 16), torch.ones(8), None, r"weight shape \(8,\) must be \(16,\)"),
    (torch.randn(2, 16), torch.ones(32), None, r"weight shape \(32,\) must be \(16,\)"),
    (torch.randn(2, 16), torch.ones(2, 16), None, r"weight shape \(2, 16\) must be \(16,\)"),
    (torch.ones(2, 16, dtype=torch.int32), None, None, "x must be a floating-point tensor, got torch.int32"),
    (torch.randn(2, 16), torch.ones(16, dtype=torch.int64), None, "weight must be a floating-point tensor"),
    (torch.randn(2, 16), torch.ones(16, device="meta"), None, "weight is on meta but x is on cpu"),
    (torch.tensor(1.0), None, None, "0-dim"),
    (torch.randn(3, 0), None, None, r"x must have at least one feature, got shape \(3, 0\)"),  # named, not a reshape error
    (torch.randn(2, 16), None, 17, r"stats_features must be in \[1, 16\], got 17"),
    (torch.randn(2, 16), None, 0, r"stats_features must be in \[1, 16\], got 0"),
])
def test_bad_inputs_are_refused_in_one_line(x, weight, stats_features, message):
    with pytest.raises(ValueError, match=message):
        rms_norm(x, weight, EPS, stats_features)
