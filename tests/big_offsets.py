"""Child process of test_kernels.py::test_offsets_past_2_pow_31: one case (forward, backward or add)
on rows that start past 2^31 elements. Prints "ok", fails an assertion, or crashes; the parent
runs it apart so that a crash fails one test instead of ending the whole run.

    python tests/big_offsets.py forward|backward|add     (TRITON_INTERPRET=1: on CPU tensors)
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kernels import rmsnorm_triton as K  # noqa: E402
from norm_checks import EPS, assert_close, check_add_rms_norm, dx_scale, rms_norm_fp64  # noqa: E402

ROWS, N, STRIDE = 3, 96, 2 ** 30 + 7  # the last row starts at element 2^31 + 14


def main(case):
    device = "cpu" if K.INTERPRETED else "cuda"
    torch.manual_seed(0)
    # ~2.1 G bf16 elements: on CPU torch.empty only reserves them, and just the pages the views touch
    # become memory (a few MB); on a GPU it takes 4.3 GB
    storage = torch.empty(2 * STRIDE + 4 * N, dtype=torch.bfloat16, device=device)

    def view(k):  # the k-th (ROWS, N) view: its row r starts at element r * STRIDE + k * N
        v = storage.as_strided((ROWS, N), (STRIDE, 1), k * N).detach()
        v.copy_(torch.randn(ROWS, N) + 0.3)
        return v
    x, res, dy, ds = (view(k) for k in range(4))
    w = (torch.randn(N) * 0.5 + 1).to(device, torch.bfloat16).requires_grad_()
    wr = w.detach().double().requires_grad_()
    dtype = torch.bfloat16
    if case == "forward":
        with torch.no_grad():
            assert_close(K.triton_rms_norm(x, w, EPS), rms_norm_fp64(x, w), dtype, "y")
    elif case == "backward":
        x.requires_grad_()
        got = torch.autograd.grad(K.triton_rms_norm(x, w, EPS), (x, w), dy)
        xr = x.detach().double().requires_grad_()
        ref = torch.autograd.grad(rms_norm_fp64(xr, wr), (xr, wr), dy.double())
        assert_close(got[0], ref[0], dtype, "dx", scale=dx_scale(x, w, dy))
        assert_close(got[1], ref[1], dtype, "dg")
    elif case == "add":
        check_add_rms_norm(x, res, w, dy, ds, dtype)
    else:
        sys.exit(f"unknown case {case!r}: forward, backward or add")
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1])
