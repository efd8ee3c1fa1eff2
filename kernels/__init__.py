"""Every norm implementation that is not plain torch: RMSNorm's C++ CPU kernel and Triton kernels.

Standalone: nothing here imports model/, data/ or the training scripts, and each op checks its
inputs (a ValueError in one line).

rmsnorm.py            rms_norm: RMSNorm (and pRMSNorm's partial statistics) as one autograd op, run by
                      the C++ kernel on CPU tensors and by ATen ops elsewhere (registry: rmsnorm, prmsnorm)
rmsnorm_cpu.py/.cpp   that C++ kernel (torch has no fused CPU RMSNorm), built on first use
rmsnorm_triton.py     triton_rms_norm and triton_add_rms_norm (residual add + RMSNorm in one kernel) as
                      torch ops with autograd (registry: triton_rmsnorm; config.fused_add_norm)
rmsnorm_triton_kernels.py   their Triton code

Which RMSNorm runs where (the registry's classes are in model/norms.py):

    norm             tensor, dtype                                runs
    rmsnorm,         CPU; fp32, bf16, fp16, fp64                  the C++ kernel
    prmsnorm         CPU, the kernel switched off or not built    ATen ops (rms_norm's own formula)
                     any other device                             ATen ops
    triton_rmsnorm   CUDA, interpreter off; fp32, bf16, fp16      Triton, compiled
                     CPU, TRITON_INTERPRET=1; fp32, bf16, fp16    Triton's interpreter
                     fp64, anywhere                               rms_norm, as the rows above
                     where Triton cannot run                      rms_norm, after one warning

Why: torch has a fused CPU LayerNorm but no fused CPU RMSNorm; built from ATen ops, RMSNorm costs
about 2x LayerNorm on CPU (benchmarks/README.md), so a CPU comparison would time the formula, not
the norm. Off CPU, rmsnorm stays the ATen formula (a closed-form backward that saves only x and
1/rms per row) and the Triton kernels are another name with the same parameters: a run chooses,
and the benchmarks time one against the other. The kernels compute in fp32, so fp64 goes to
rms_norm and stays exact. The interpreter runs the kernels' own code on CPU tensors: that is how the
tests check them without a GPU (tests/conftest.py sets TRITON_INTERPRET=1, benchmarks/gpu_check.sh
0). Triton cannot run without the triton package, on a CPU tensor without the interpreter, on a
CUDA tensor with it, or on any other device.

With fused_add_norm = true (pre-norm blocks of rmsnorm or triton_rmsnorm), each residual add and the
RMSNorm after it run as triton_add_rms_norm, chosen by the triton_rmsnorm rows above (dtype: that of
x + residual); where Triton cannot run, as the add followed by rms_norm. prmsnorm is never fused.

The switches: the config's norm keys and fused_add_norm; the device and dtype of the input;
NORMGPT_CPU_KERNEL=0 (read at import; also kernels.rmsnorm_cpu.USE_CPU_KERNEL and
with_aten_rmsnorm(fn)) turns the C++ kernel off; TRITON_INTERPRET=1, read when rmsnorm_triton is
first imported, makes the Triton kernels interpreted. Under torch.compile the C++ kernel and the
interpreted kernels are opaque ops (each with a fake implementation), the compiled Triton kernels
are triton_ops that Inductor sees into, and the ATen formula is traced like any torch code.

The modules are imported one by one (`from kernels.rmsnorm import rms_norm`), so that using rms_norm
never imports triton.
"""
