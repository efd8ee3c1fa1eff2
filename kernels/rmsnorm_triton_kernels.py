"""Triton kernels for RMSNorm, optionally fused with the residual add before it.

One forward and one backward kernel; the variants (gain or not, residual add or not, a row that
fits in registers or not) are compile-time flags, so each launch compiles only the code it runs.

    forward:   s = x (+ residual);  rstd = 1 / sqrt(mean(s^2) + eps);  y = s * rstd * g
    backward:  with x_hat = s * rstd and dy_g = dy * g,
               ds = rstd * (dy_g - x_hat * mean(dy_g * x_hat))  (+ the gradient arriving on the new residual)
               dg = sum over rows of dy * x_hat

How the work is laid out (the layout QuACK, flash-attention's Triton layer norm and Liger's block
kernels share; the launch parameters are chosen in rmsnorm_triton.py):
- A program owns a tile of BLOCK_M rows x BLOCK_N columns. Narrow rows get several rows per tile,
  so that every thread still moves a few 16-byte vectors and a program is worth its launch.
- A row of up to BLOCK_N (ONE_BLOCK) stays in registers between the passes: the forward reads x once
  for the statistics and the output, the backward reads s and dy once for mean(dy_g * x_hat) and ds.
  Wider rows go in BLOCK_N chunks, one row per tile, the second pass mostly from L2.
- The backward's grid is a few programs per SM (persistent): each program strides over the tiles
  and keeps its partial dg in fp32, written once to its own row of DW_PARTIAL, which the caller
  sums. No atomics, so dg is the same from run to run.

Indices: every row index is int64 before it meets a stride, so offsets past 2^31 elements are right.
A loop variable cannot carry that type: compiled, `for i in range(a, b)` takes the type of its
bounds, but the interpreter runs it with Python ints, which an int32 stride turns into an int32
product that wraps. So each row index is cast to int64 where it is formed. Column offsets stay below
2^31 (a row is far narrower than that) and stay int32.
"""
import triton
import triton.language as tl


@triton.jit
def rmsnorm_fwd_kernel(
    X, RES, S, Y, W, RSTD,  # S: the new residual x + RES (only written with HAS_RESIDUAL)
    stride_x, stride_res, stride_s, stride_y, n_rows, N, eps,
    HAS_WEIGHT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    r = rows[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    if ONE_BLOCK:
        mask = row_ok[:, None] & (cols < N)
        s = tl.load(X + r * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            s += tl.load(RES + r * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(S + r * stride_s + cols, s.to(S.dtype.element_ty), mask=mask)
            # normalize the sum as stored (rounded to its dtype), exactly as the unfused
            # "x = x + f(x); norm(x)" does
            s = s.to(S.dtype.element_ty).to(tl.float32)
        # fp32 even when eps comes as fp64 (Inductor passes it so): rstd multiplies whole tiles
        rstd = (1.0 / tl.sqrt(tl.sum(s * s, axis=1) / N + eps)).to(tl.float32)
        y = s * rstd[:, None]
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
        tl.store(Y + r * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:  # wide rows: a pass for the statistics, a second (mostly from L2) for the output
        sum_sq = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            mask = row_ok[:, None] & (start + cols < N)
            s = tl.load(X + r * stride_x + start + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                s += tl.load(RES + r * stride_res + start + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(S + r * stride_s + start + cols, s.to(S.dtype.element_ty), mask=mask)
                s = s.to(S.dtype.element_ty).to(tl.float32)
            sum_sq += s * s
        rstd = (1.0 / tl.sqrt(tl.sum(sum_sq, axis=1) / N + eps)).to(tl.float32)  # fp32: as above
        for start in range(0, N, BLOCK_N):
            mask = row_ok[:, None] & (start + cols < N)
            if HAS_RESIDUAL:  # each thread re-reads what it stored itself: no barrier needed
                s = tl.load(S + r * stride_s + start + cols, mask=mask, other=0.0).to(tl.float32)
            else:
                s = tl.load(X + r * stride_x + start + cols, mask=mask, other=0.0).to(tl.float32)
            y = s * rstd[:, None]
            if HAS_WEIGHT:
                y = y * tl.load(W + start + cols, mask=start + cols < N, other=0.0).to(tl.float32)
            tl.store(Y + r * stride_y + start + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def rmsnorm_bwd_kernel(
    S, W, RSTD, DY, DRES, DS, DW_PARTIAL,
    stride_s, stride_dy, stride_dres, stride_ds, n_rows, n_tiles, N,
    HAS_WEIGHT: tl.constexpr, HAS_DRES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    step = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    DW_PARTIAL += pid.to(tl.int64) * N  # this program's own row: no atomics
    if ONE_BLOCK:
        c = cols[None, :]
        if HAS_WEIGHT:
            w = tl.load(W + c, mask=c < N, other=0.0).to(tl.float32)
        # dg summed over the tile's rows only once, at the end: no cross-warp reduction per tile
        dw = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for tile in range(pid, n_tiles, step):
            rows = (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: see the docstring
            row_ok = rows < n_rows
            r = rows[:, None]
            mask = row_ok[:, None] & (c < N)
            s = tl.load(S + r * stride_s + c, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + r * stride_dy + c, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)[:, None]
            x_hat = s * rstd
            if HAS_WEIGHT:
                dw += dy * x_hat
                dy = dy * w
            ds = (dy - x_hat * (tl.sum(dy * x_hat, axis=1) / N)[:, None]) * rstd
            if HAS_DRES:
                ds += tl.load(DRES + r * stride_dres + c, mask=mask, other=0.0).to(tl.float32)
            tl.store(DS + r * stride_ds + c, ds.to(DS.dtype.element_ty), mask=mask)
        if HAS_WEIGHT:
            tl.store(DW_PARTIAL + cols, tl.sum(dw, axis=0), mask=cols < N)
    else:  # wide rows, one per tile (BLOCK_M is 1): a pass for mean(dy_g * x_hat), a second for ds
        if HAS_WEIGHT:  # the partial lives in memory; zeroed here, so a repeated launch is exact
            for start in range(0, N, BLOCK_N):
                tl.store(DW_PARTIAL + start + cols, tl.zeros([BLOCK_N], dtype=tl.float32), mask=start + cols < N)
        for tile in range(pid, n_tiles, step):
            row = tl.cast(tile, tl.int64)  # int64: see the docstring
            rstd = tl.load(RSTD + row)
            S_row, DY_row = S + row * stride_s, DY + row * stride_dy
            dot = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                mask = start + cols < N
                s = tl.load(S_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_WEIGHT:
                    dy = dy * tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
                dot += dy * s * rstd
            mean_dot = tl.sum(dot, axis=0) / N
            for start in range(0, N, BLOCK_N):
                mask = start + cols < N
                s = tl.load(S_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY_row + start + cols, mask=mask, other=0.0).to(tl.float32)
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
