"""Fused Triton kernels for normalization.

rmsnorm_kernels.py holds the Triton code (RMSNorm forward/backward, optionally fused with the residual
add); rmsnorm.py wraps it as torch ops (`rms_norm`, `add_rms_norm`) with autograd, and falls back to
model/norms.py's math where Triton cannot run. The registry entry is `triton_rmsnorm` in model/norms.py;
the fused add is config.fused_add_norm.
"""
