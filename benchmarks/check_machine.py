"""The GPU check's first step: is everything it needs here, and what machine is this.

    python benchmarks/check_machine.py [--dry-run]

Prints the machine (GPU, driver, torch, triton, Python) for the summary. Exits 1 with one line on
stderr when a package the check needs is missing, when importing the check's own modules fails,
or, without --dry-run, when torch sees no CUDA device. It installs nothing: on the GPU machine the
check runs on that machine's own torch, and a missing package has to be brought along as a wheel.

The modules are imported as the GPU machine would import them: without `datasets` and
`liger-kernel`, which it does not have. A project module that needs either at import time fails
here, on any machine, before a GPU is spent on it.
"""
import argparse
import importlib
import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# every package the check's steps import (the tests: pytest; the trainer: accelerate, tokenizers,
# safetensors, tqdm, and scipy and matplotlib through study.report)
NEEDED = ["torch", "triton", "numpy", "pytest", "accelerate", "tokenizers", "safetensors", "tqdm", "scipy",
          "matplotlib"]
ABSENT_ON_GPU_MACHINE = ["datasets", "liger_kernel"]
CHECK_MODULES = ["bench_norms", "bench_train_step", "bench_trainer", "kernels.rmsnorm_triton"]


def fail(message):
    print(f"check_machine: {message}", file=sys.stderr)
    sys.exit(1)


def import_check_modules():
    """Import the benchmark scripts (their imports only: main() is guarded) with the packages the
    GPU machine lacks made absent, as a missing package is: `import` fails, find_spec says None."""
    for name in ABSENT_ON_GPU_MACHINE:
        sys.modules[name] = None
    sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]
    for module in CHECK_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as e:
            fail(f"importing {module} failed without {' and '.join(ABSENT_ON_GPU_MACHINE)} "
                 f"(the GPU machine has neither): {e}")


def gpu_lines():
    import torch
    if not torch.cuda.is_available():
        fail(f"torch {torch.__version__} ({sys.executable}) sees no CUDA device: run this on the GPU machine "
             "with its own python3, or pass --dry-run")
    props = torch.cuda.get_device_properties(0)
    lines = [f"GPU: {props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, "
             f"compute capability {props.major}.{props.minor}, CUDA {torch.version.cuda}"]
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        lines.append(f"nvidia-smi: {smi.stdout.strip() or smi.stderr.strip()}")
    except (OSError, subprocess.TimeoutExpired) as e:
        lines.append(f"nvidia-smi: not run ({e})")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="on a CPU machine: no GPU expected, Triton's "
                        "interpreter instead (TRITON_INTERPRET=1)")
    args = parser.parse_args()
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        fail(f"missing on this machine: {', '.join(missing)} (needed by the check; bring them along as wheels)")
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        fail("--dry-run needs TRITON_INTERPRET=1 (Triton's interpreter, on CPU tensors)")
    import_check_modules()
    import torch
    import triton
    lines = [] if args.dry_run else gpu_lines()
    lines.append(f"torch {torch.__version__} | triton {triton.__version__} | Python {platform.python_version()} "
                 f"({sys.executable}) | {os.cpu_count()} CPUs | {platform.processor() or platform.machine()}")
    if args.dry_run:
        lines.append("dry run: CPU only, Triton's interpreter, toy shapes; no timing here means anything")
    print("\n".join(f"- {line}" for line in lines))


if __name__ == "__main__":
    main()
