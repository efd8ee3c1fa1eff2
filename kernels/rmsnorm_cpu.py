"""RMSNorm's CPU path: the C++ kernel in rmsnorm_cpu.cpp, built on first use.

torch has a fused LayerNorm for CPU but no fused RMSNorm, so an RMSNorm built from ATen ops reads and
writes the tensor several times and came out about 2x slower than LayerNorm on CPU (benchmarks/results_cpu.md):
every CPU comparison would have reported RMSNorm as the slow norm for a reason unrelated to its math.

`cpu_ops()` builds the kernel with torch.utils.cpp_extension (about 10 s on 2 cores, once per machine and
source version; the library is cached under TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions) and
returns torch.ops.normgpt_cpu. Where it cannot be built (no C++ compiler, say) it warns once and returns
None, and kernels/rmsnorm.py keeps its ATen formula. NORMGPT_CPU_KERNEL=0 (or `USE_CPU_KERNEL = False`, or
`with_aten_rmsnorm(fn)`) skips the kernel: the benchmarks use that to time the ATen formula beside it.
"""
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

try:
    import fcntl  # POSIX only
except ImportError:
    fcntl = None

USE_CPU_KERNEL = os.environ.get("NORMGPT_CPU_KERNEL", "1") != "0"
SOURCE = Path(__file__).with_name("rmsnorm_cpu.cpp")
_ops = None
_failed = False


def _ninja_on_path():
    """torch's builder runs `ninja`; the PyPI ninja package puts it in the venv's bin, which is not on
    PATH when the venv's python is called without activating the venv."""
    if shutil.which("ninja") is None:
        try:
            import ninja
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass


def wants_avx2():
    """AVX2 + FMA wherever torch's own kernels use AVX2 or AVX-512 (they pick at run time; this library
    is built for one CPU): the backward ran 1.6x faster than the default SSE2 build at 1024x128, and
    AVX-512 gave no more."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def build_directory():
    """Where the library is built and cached: one folder per torch and Python version (the library is
    compiled against both) and per instruction set (a home directory shared by different machines
    keeps one build per kind of CPU)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return Path(root) / f"normgpt_rmsnorm_cpu-{python}-torch{torch.__version__}-{'avx2' if wants_avx2() else 'baseline'}"


def _build():
    from torch.utils import cpp_extension
    _ninja_on_path()
    folder = build_directory()
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(folder / "normgpt.lock", "w") as lock:
        # torch's builder marks a build in progress with a file named "lock" and waits, forever, while it
        # exists, so a build killed midway would hang every later run. An flock is released by the OS
        # when its process dies; whoever holds it is the only builder, so a "lock" file seen then is stale.
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
            (folder / "lock").unlink(missing_ok=True)
        # -fopenmp: at::parallel_for is an OpenMP loop compiled into this library, serial without it
        cpp_extension.load(name="normgpt_rmsnorm_cpu", sources=[str(SOURCE)], build_directory=str(folder),
                           extra_cflags=["-O3", "-fopenmp", *(["-mavx2", "-mfma"] if wants_avx2() else [])],
                           extra_ldflags=["-fopenmp"], is_python_module=False)
    seconds = time.perf_counter() - start
    if seconds > 2:  # a real build (or a wait for another process's), not a cache hit
        print(f"built the CPU RMSNorm kernel in {seconds:.0f} s (cached in {folder})", file=sys.stderr)


def _register_fakes():
    """Shapes and dtypes without running the kernel, so torch.compile can trace models that call it."""

    # outputs are contiguous whatever the input's strides (the kernel works on a contiguous copy)
    @torch.library.register_fake("normgpt_cpu::rms_norm_forward")
    def forward_fake(x, weight, eps, k):
        rows = x.numel() // x.shape[-1]
        return x.new_empty(x.shape), x.new_empty(rows, dtype=torch.promote_types(x.dtype, torch.float32))

    @torch.library.register_fake("normgpt_cpu::rms_norm_backward")
    def backward_fake(dy, x, weight, rstd, k, weight_grad):
        dw = weight.new_empty(weight.shape) if weight is not None and weight_grad else None
        return x.new_empty(x.shape), dw


def cpu_ops():
    """torch.ops.normgpt_cpu once the kernel is loaded, or None where it is switched off or cannot be built."""
    global _ops, _failed
    if _ops is None and USE_CPU_KERNEL and not _failed:
        try:
            _build()
            _register_fakes()
            _ops = torch.ops.normgpt_cpu
        except Exception as e:  # a missing compiler or ninja shows up as many exception types
            _failed = True
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            warnings.warn(f"could not build the CPU RMSNorm kernel ({first_line}); using RMSNorm built from "
                          "ATen ops, about 2x slower than LayerNorm on CPU", stacklevel=2)
    return _ops if USE_CPU_KERNEL else None


def with_aten_rmsnorm(fn):
    """fn, made to run its RMSNorms with the ATen formula instead of the kernel (their backward
    follows the forward's choice); the switch is restored afterwards."""
    def run(*args):
        global USE_CPU_KERNEL
        before, USE_CPU_KERNEL = USE_CPU_KERNEL, False
        try:
            return fn(*args)
        finally:
            USE_CPU_KERNEL = before
    return run
