"""Fused Triton kernels for normalization.

rmsnorm_kernels.py holds the Triton code (RMSNorm forward/backward, optionally fused with the residual
add); rmsnorm.py wraps it as torch ops (`rms_norm`, `add_rms_norm`) with autograd, and falls back to
model/norms.py's math where Triton cannot run. The registry entry is `triton_rmsnorm` in model/norms.py;
the fused add is config.fused_add_norm.

rmsnorm_cpu.cpp is RMSNorm for CPU tensors in C++ (torch has no fused CPU RMSNorm); rmsnorm_cpu.py builds
it on first use, and model/norms.py's `rmsnorm` and `prmsnorm` call it there.
"""
