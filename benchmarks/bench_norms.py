"""Kernel benchmark: our Triton RMSNorm (and residual-add + RMSNorm) against torch and Liger.

GPU (default): measures device copy bandwidth first, then forward and forward+backward medians
(triton.testing.do_bench) in bf16 at 16384x768, 8192x4096 and 4096x8192, and reports each as a share
of copy bandwidth, counting the fewest bytes the op must move: forward reads x and writes y (2 passes
of the tensor), forward+backward also reads x and dy and writes dx (5); with the residual add, 4 and 8.

    python benchmarks/bench_norms.py [--json results.json]
    python benchmarks/bench_norms.py --tune [--json launches.json]
    python benchmarks/bench_norms.py --cpu [--shape 8192x768] [--json results.json]

--tune times each of our kernels alone (forward, backward, with and without the residual add) with
every candidate launch of kernels/rmsnorm_triton.py (rows per program, warps, backward programs per SM)
and names the fastest at each shape beside the launch the heuristic picks. --smoke runs either on CPU
tensors at 64x96 under Triton's interpreter (TRITON_INTERPRET=1): it checks the script, not the speed.

--cpu times every norm of the registry (model/norms.py), fp32, forward and forward+backward, rounds
interleaved so that a busy machine slows all of them alike; medians with their min-max. rmsnorm runs
its C++ kernel there (kernels/rmsnorm_cpu.cpp); the row "(rmsnorm from ATen ops)" times the formula it
falls back to without that kernel.
"""
import argparse
import json
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from config import Config  # noqa: E402
from model.norms import NORMS, make_norm  # noqa: E402

EPS = 1e-5
GPU_SHAPES = [(16384, 768), (8192, 4096), (4096, 8192)]


def gpu_implementations(d, dtype, device, backend="inductor"):
    """name -> (kind, fn) with kind "norm" (fn(x)) or "add" (fn(x, residual) -> (y, new residual))."""
    from kernels.rmsnorm import rms_norm
    from kernels.rmsnorm_triton import triton_add_rms_norm, triton_rms_norm
    w = torch.ones(d, device=device, dtype=dtype, requires_grad=True)
    b = torch.zeros(d, device=device, dtype=dtype, requires_grad=True)

    def add_then_rms_norm(x, r):
        s = x + r
        return F.rms_norm(s, (d,), w, EPS), s
    impls = {
        "ours rmsnorm": ("norm", lambda x: triton_rms_norm(x, w, EPS)),
        # what `rmsnorm` runs on a GPU: the autograd Function of kernels/rmsnorm.py on ATen ops
        "ours rmsnorm (ATen Function)": ("norm", lambda x: rms_norm(x, w, EPS)),
        "torch F.rms_norm": ("norm", lambda x: F.rms_norm(x, (d,), w, EPS)),
        "torch F.layer_norm": ("norm", lambda x: F.layer_norm(x, (d,), w, b, EPS)),
        "compiled F.rms_norm": ("norm", torch.compile(lambda x: F.rms_norm(x, (d,), w, EPS), backend=backend)),
        "ours add+rmsnorm": ("add", lambda x, r: triton_add_rms_norm(x, r, w, EPS)),
        "torch add+F.rms_norm": ("add", add_then_rms_norm),
        "compiled add+F.rms_norm": ("add", torch.compile(add_then_rms_norm, backend=backend)),
    }
    try:
        from liger_kernel.transformers.rms_norm import LigerRMSNorm
        liger = LigerRMSNorm(d, eps=EPS).to(device, dtype)
        impls["liger rmsnorm"] = ("norm", liger)
    except ImportError:
        pass
    try:
        from liger_kernel.transformers.fused_add_rms_norm import LigerFusedAddRMSNorm
        liger_add = LigerFusedAddRMSNorm(d, eps=EPS).to(device, dtype)
        impls["liger add+rmsnorm"] = ("add", liger_add)
    except ImportError:
        pass
    return impls


def bench(fn, grad_to_none=None, smoke=False, rep=100):
    """Median ms of fn: triton.testing.do_bench on the GPU; with --smoke one timed call."""
    if smoke:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench
    return do_bench(fn, grad_to_none=grad_to_none, warmup=max(rep // 4, 5), rep=rep, return_mode="median")


def copy_bandwidth(device, smoke):
    """Device-to-device copy of 2 GiB (bf16); bytes read + written per second."""
    src = torch.empty(2 ** (20 if smoke else 30), dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), smoke=smoke)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def budget_spent(args, began):
    return bool(args.max_seconds) and time.perf_counter() - began > args.max_seconds


def run_gpu(args):
    # --smoke: the same code on CPU tensors at a tiny shape (Triton's interpreter), to check the
    # script itself where there is no GPU; its timings mean nothing
    began = time.perf_counter()
    device, shapes = ("cpu", [(64, 96)]) if args.smoke else ("cuda", GPU_SHAPES)
    copy_gbps = copy_bandwidth(device, args.smoke)
    device_name = "CPU (smoke run)" if args.smoke else torch.cuda.get_device_name()
    print(f"# {device_name} | torch {torch.__version__} | copy bandwidth {copy_gbps:,.0f} GB/s (bytes read + written)")
    rows = [{"part": "copy", "GBps": copy_gbps, "device": device_name}]

    def record(row):  # the JSON is rewritten after every figure: a run cut short keeps what it measured
        rows.append(row)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    (tune if args.tune else compare)(args, device, shapes, copy_gbps, record, began)


def compare(args, device, shapes, copy_gbps, record, began):
    """Every implementation at every shape; the compiled baselines last (each compiles per shape,
    the slow part), so that a run cut short by --max-seconds loses those first."""
    from kernels.rmsnorm_triton import launch_config
    dtype = torch.bfloat16
    print("# bf16, inputs that require grad (the forward of a training step); % copy = the fewest bytes the op "
          "moves (fwd 2 passes of the tensor, fwd+bwd 5; with the residual add 4 and 8) per second, over the "
          "copy bandwidth above\n")
    print("| shape | implementation | fwd ms | fwd % copy | fwd+bwd ms | fwd+bwd % copy |\n|---|---|---|---|---|---|")
    impls = {d: gpu_implementations(d, dtype, device, args.backend) for _, d in shapes}
    for compiled in (False, True):
        for n, d in shapes:
            for name, (kind, fn) in impls[d].items():
                if name.startswith("compiled") != compiled:
                    continue
                if budget_spent(args, began):
                    print(f"| {n}x{d} | {name} | not run: --max-seconds {args.max_seconds:g} spent | | | |")
                    continue
                row = time_norm(args, fn, kind, n, d, dtype, device, copy_gbps, name)
                if row and name.startswith("ours"):
                    row["launch"] = {"fwd": str(launch_config(d, False)), "bwd": str(launch_config(d, True))}
                if row:
                    record(row)


def time_norm(args, fn, kind, n, d, dtype, device, copy_gbps, name):
    x = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    r = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(n, d, device=device, dtype=dtype)
    inputs = (x,) if kind == "norm" else (x, r)
    passes = (2, 5) if kind == "norm" else (4, 8)

    def fwd_bwd():  # with the residual add, a gradient arrives on the new residual too
        out = fn(*inputs)
        torch.autograd.backward(out, (dy, dy) if kind == "add" else dy)
    try:
        fwd_ms = bench(lambda: fn(*inputs), smoke=args.smoke)
        bwd_ms = bench(fwd_bwd, grad_to_none=list(inputs), smoke=args.smoke)
    except Exception as e:  # one failing baseline must not lose the other numbers
        print(f"| {n}x{d} | {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:200]} | | | |")
        return None
    nbytes = n * d * x.element_size()
    frac = [p * nbytes / (ms * 1e-3) / 1e9 / copy_gbps for p, ms in zip(passes, (fwd_ms, bwd_ms))]
    print(f"| {n}x{d} | {name} | {fwd_ms:.4f} | {frac[0]:.0%} | {bwd_ms:.4f} | {frac[1]:.0%} |", flush=True)
    return {"part": "norm", "shape": [n, d], "impl": name, "fwd_ms": fwd_ms, "fwdbwd_ms": bwd_ms,
            "fwd_frac": frac[0], "fwdbwd_frac": frac[1]}


# kernel -> (passes of the tensor it must move at least, backward?, residual?): forward reads x and
# writes y, + reads the residual and writes the sum; backward reads s and dy and writes ds, + reads dres
KERNELS = {"fwd": (2, False, False), "bwd": (3, True, False), "add fwd": (4, False, True), "add bwd": (4, True, True)}


def tune(args, device, shapes, copy_gbps, record, began):
    """Each kernel alone at each shape, with every launch of candidate_configs(); the fastest wins."""
    from kernels import rmsnorm_triton as K
    dtype = torch.bfloat16
    print("# bf16, each kernel alone (the backward with its dg reduction); % copy counts the fewest bytes it moves: "
          + ", ".join(f"{k} {p} passes" for k, (p, _, _) in KERNELS.items()) + "\n")
    print("| kernel | shape | launch | ms | % copy |\n|---|---|---|---|---|")
    winners = []
    for kernel, (passes, backward, residual) in KERNELS.items():
        for n, d in shapes:
            x, r, dy, dres = (torch.randn(n, d, device=device, dtype=dtype) for _ in range(4))
            w = torch.randn(d, device=device, dtype=dtype) * 0.5 + 1
            rstd = K.run_forward(x, None, w, EPS)[2]

            def run(config):
                if backward:
                    return K.run_backward(dy, x, w, rstd, dres if residual else None, config)
                return K.run_forward(x, r if residual else None, w, EPS, config)
            timed = []
            for config in K.candidate_configs(d, backward):
                if budget_spent(args, began):
                    print(f"| {kernel} | {n}x{d} | {config}: not run, --max-seconds {args.max_seconds:g} spent | | |")
                    break
                ms = bench(lambda: run(config), smoke=args.smoke, rep=40)
                frac = passes * n * d * x.element_size() / (ms * 1e-3) / 1e9 / copy_gbps
                heuristic = config == K.launch_config(d, backward)
                print(f"| {kernel} | {n}x{d} | {config}{' (heuristic)' if heuristic else ''} | {ms:.4f} | {frac:.0%} |",
                      flush=True)
                timed.append((ms, frac, config, heuristic))
                record({"part": "launch", "kernel": kernel, "shape": [n, d], "launch": str(config),
                        "config": config._asdict(), "heuristic": heuristic, "ms": ms, "frac": frac})
            if timed:
                winners.append((kernel, n, d, min(timed), next((t for t in timed if t[3]), None)))
    print("\nWinners: the fastest launch at each shape, beside the heuristic's choice\n")
    print("| kernel | shape | winner | ms | % copy | heuristic ms | heuristic % copy |\n|---|---|---|---|---|---|---|")
    for kernel, n, d, (ms, frac, config, _), heur in winners:
        h = f"{heur[0]:.4f} | {heur[1]:.0%}" if heur else "| "
        print(f"| {kernel} | {n}x{d} | {config} | {ms:.4f} | {frac:.0%} | {h} |")
        record({"part": "winner", "kernel": kernel, "shape": [n, d], "launch": str(config), "config": config._asdict(),
                "ms": ms, "frac": frac, "heuristic_ms": heur[0] if heur else None})


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def _cell(times):
    return f"{statistics.median(times):.2f} ({min(times):.2f}-{max(times):.2f})"


def run_cpu(args):
    from kernels.rmsnorm_triton import triton_runs_on
    from kernels.rmsnorm_cpu import cpu_ops, with_aten_rmsnorm
    n, d = map(int, args.shape.split("x"))
    config = Config(n_embd=d, norm_gain=True)
    torch.manual_seed(0)
    modules = {name: make_norm(name, d, config) for name in NORMS}
    w = torch.ones(d, requires_grad=True)
    fns = dict(modules)
    fns["(rmsnorm from ATen ops)"] = with_aten_rmsnorm(modules["rmsnorm"])
    fns["(torch F.rms_norm)"] = lambda x: F.rms_norm(x, (d,), w, EPS)
    fns["(torch F.layer_norm)"] = lambda x: F.layer_norm(x, (d,), w, None, EPS)
    x = torch.randn(n, d, requires_grad=True)
    dy = torch.randn(n, d)

    def fwd(fn):
        with torch.no_grad():
            fn(x)

    def fwd_bwd(fn):
        x.grad = None
        fn(x).backward(dy)
    times = {(name, mode): [] for name in fns for mode in ("fwd", "fwdbwd")}
    for name, fn in fns.items():  # warm-up (and the one fallback warning of triton_rmsnorm)
        fwd_bwd(fn)
    for round_index in range(args.rounds):
        # a new order each round: a variant's cost must not depend on which one ran before it (the
        # allocator's state after a neighbour's 25 MB tensors moved one norm's median by ~40% here)
        order = list(fns)
        random.Random(round_index).shuffle(order)
        for name in order:
            fn = fns[name]
            for mode, run in (("fwd", fwd), ("fwdbwd", fwd_bwd)):
                start = time.perf_counter()
                for _ in range(args.number):
                    run(fn)
                times[name, mode].append((time.perf_counter() - start) / args.number * 1e3)
    print(f"# CPU: {cpu_model()} | {torch.get_num_threads()} threads | torch {torch.__version__}"
          f" | rmsnorm's C++ kernel: {'built' if cpu_ops() is not None else 'NOT available, ATen formula'}")
    print(f"# {n}x{d} fp32; median of {args.rounds} rounds of {args.number} calls, variants in a new random order each round (min-max)\n")
    print("| norm | fwd ms | fwd+bwd ms |\n|---|---|---|")
    rows = []
    for name in fns:
        f, b = times[name, "fwd"], times[name, "fwdbwd"]
        label = name
        if name.startswith("triton") and not triton_runs_on(x):
            label += " (no Triton on CPU: rmsnorm's math)"
        print(f"| {label} | {_cell(f)} | {_cell(b)} |")
        rows.append({"part": "cpu_norm", "shape": [n, d], "impl": name, "fwd_ms": statistics.median(f),
                     "fwdbwd_ms": statistics.median(b), "fwd_ms_all": f, "fwdbwd_ms_all": b})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="time every registry norm on the CPU")
    parser.add_argument("--shape", default="8192x768", help="rows x width for --cpu")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds for --cpu")
    parser.add_argument("--number", type=int, default=5, help="calls per round for --cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads for --cpu (0: torch's default)")
    parser.add_argument("--smoke", action="store_true", help="run the GPU code path on CPU at a tiny shape "
                        "(with TRITON_INTERPRET=1): checks the script, not the speed")
    parser.add_argument("--tune", action="store_true", help="time each of our kernels with every candidate "
                        "launch (kernels/rmsnorm_triton.py: candidate_configs) and name the winner at each shape")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled baselines")
    parser.add_argument("--max-seconds", type=float, default=0, help="start no measurement past this (0: no limit)")
    parser.add_argument("--json", help="also write the measurements to this JSON file (rewritten as they come)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.cpu and not args.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --cpu for the CPU comparison")
    print(f"command: python {' '.join(sys.argv)}")
    if args.cpu:
        rows = run_cpu(args)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    else:
        run_gpu(args)


if __name__ == "__main__":
    main()
