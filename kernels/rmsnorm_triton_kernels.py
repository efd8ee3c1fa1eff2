"""Triton kernels for RMSNorm, optionally fused with the residual add before it.

One forward and one backward kernel; the variants (gain or not, residual add or not, a row that
fits in registers or not) are compile-time flags, so each launch compiles only the code it runs.

Forward, one program per row:   s = x (+ residual);  rstd = 1 / sqrt(mean(s^2) + eps);  y = s * rstd * g
Backward, a few rows per program, with x_hat = s * rstd and dy_g = dy * g:
    ds = rstd * (dy_g - x_hat * mean(dy_g * x_hat))  (+ the gradient arriving on the new residual)
    dg = sum over rows of dy * x_hat                  (fp32 partial sum per program, reduced by the caller)

Addresses are row * row_stride in int64, so tensors past 2^31 elements index correctly; within a
row, column offsets stay below 65536 and int32 is enough. A loop variable cannot carry that type:
compiled, `for row in range(a, b)` takes the type of its bounds (int64 here), but the interpreter runs
the loop with Python ints, which an int32 stride turns into an int32 product that wraps past 2^31.
So each row index is cast to int64 inside the loop.
"""
import triton
import triton.language as tl


@triton.jit
def rmsnorm_fwd_kernel(
    X, RES, S, Y, W, RSTD,  # S: the new residual x + RES (only written with HAS_RESIDUAL)
    stride_x, stride_res, stride_s, stride_y, N, eps,
    HAS_WEIGHT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    Y += row * stride_y
    RES += row * stride_res
    S += row * stride_s
    cols = tl.arange(0, BLOCK_N)
    if ONE_BLOCK:  # the whole row stays in registers between the statistics and the output
        mask = cols < N
        s = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            s += tl.load(RES + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(S + cols, s.to(S.dtype.element_ty), mask=mask)
            # normalize the sum as stored (rounded to its dtype), exactly as the unfused
            # "x = x + f(x); norm(x)" does
            s = s.to(S.dtype.element_ty).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / N + eps)
        y = s * rstd
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:  # wide rows: a pass for the statistics, a second (mostly from L2) for the output
        sum_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            s = tl.load(X + start + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                s += tl.load(RES + start + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(S + start + cols, s.to(S.dtype.element_ty), mask=mask)
                s = s.to(S.dtype.element_ty).to(tl.float32)
            sum_sq += s * s
        rstd = 1.0 / tl.sqrt(tl.sum(sum_sq, axis=0) / N + eps)
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            if HAS_RESIDUAL:  # each thread re-reads what it stored itself: no barrier needed
                s = tl.load(S + start + cols, mask=mask, other=0.0).to(tl.float32)
            else:
                s = tl.load(X + start + cols, mask=mask, other=0.0).to(tl.float32)
            y = s * rstd
            if HAS_WEIGHT:
                y = y * tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + start + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def rmsnorm_bwd_kernel(
    S, W, RSTD, DY, DRES, DS, DW_PARTIAL,
    stride_s, stride_dy, stride_dres, stride_ds, n_rows, N, rows_per_program,
    HAS_WEIGHT: tl.constexpr, HAS_DRES: tl.constexpr,
    BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program  # int64; the loop index is cast again (see the docstring)
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK_N)
    # each program owns row `pid` of DW_PARTIAL (fp32): no atomics, and one reduction at the end
    DW_PARTIAL += pid * N
    if ONE_BLOCK:
        mask = cols < N
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        for row in range(row_start, row_end):
            row = tl.cast(row, tl.int64)  # see the docstring
            s = tl.load(S + row * stride_s + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            x_hat = s * rstd
            if HAS_WEIGHT:
                dw += dy * x_hat
                dy = dy * w
            ds = (dy - x_hat * (tl.sum(dy * x_hat, axis=0) / N)) * rstd
            if HAS_DRES:
                ds += tl.load(DRES + row * stride_dres + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DS + row * stride_ds + cols, ds.to(DS.dtype.element_ty), mask=mask)
        if HAS_WEIGHT:
            tl.store(DW_PARTIAL + cols, dw, mask=mask)
    else:  # wide rows: a pass for mean(dy_g * x_hat), a second for ds; dg partials live in memory
        for row in range(row_start, row_end):
            row = tl.cast(row, tl.int64)  # see the docstring
            rstd = tl.load(RSTD + row)
            dot = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                mask = start + cols < N
                s = tl.load(S + row * stride_s + start + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + row * stride_dy + start + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_WEIGHT:
                    dy = dy * tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
                dot += dy * s * rstd
            mean_dot = tl.sum(dot, axis=0) / N
            for start in range(0, N, BLOCK_N):
                mask = start + cols < N
                s = tl.load(S + row * stride_s + start + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + row * stride_dy + start + cols, mask=mask, other=0.0).to(tl.float32)
                x_hat = s * rstd
                if HAS_WEIGHT:
                    # the same thread updates the same elements every row: program order suffices
                    acc = tl.load(DW_PARTIAL + start + cols, mask=mask, other=0.0)
                    tl.store(DW_PARTIAL + start + cols, acc + dy * x_hat, mask=mask)
                    dy = dy * tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
                ds = (dy - x_hat * mean_dot) * rstd
                if HAS_DRES:
                    ds += tl.load(DRES + row * stride_dres + start + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DS + row * stride_ds + start + cols, ds.to(DS.dtype.element_ty), mask=mask)
