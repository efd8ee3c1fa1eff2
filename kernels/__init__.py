"""Every norm implementation that is not plain torch. Standalone: nothing here imports model/, data/
or the training scripts, and each op checks its inputs (a ValueError in one line).

rmsnorm.py            rms_norm: RMSNorm (and pRMSNorm's partial statistics) as one autograd op, run by
                      the C++ kernel on CPU tensors and by ATen ops elsewhere (registry: rmsnorm, prmsnorm)
rmsnorm_cpu.py/.cpp   that C++ kernel (torch has no fused CPU RMSNorm), built on first use
rmsnorm_triton.py     triton_rms_norm and triton_add_rms_norm (residual add + RMSNorm in one kernel) as
                      torch ops with autograd (registry: triton_rmsnorm; config.fused_add_norm)
rmsnorm_triton_kernels.py   their Triton code

The modules are imported one by one (`from kernels.rmsnorm import rms_norm`), so that using rms_norm
never imports triton.
"""
