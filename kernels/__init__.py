"""Fused Triton kernels for normalization (RMSNorm, residual-add + RMSNorm).

Each kernel registers itself in model/norms.py's NORMS under its own name, falling back to the
reference math where Triton cannot run. See the kernel issue; this package is where they live.
"""
