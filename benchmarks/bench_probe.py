"""The probe's cost with the prefix run once against the full recompute (study/probe.py's batch_nats).

Both evaluate every flip of the same model on the same windows: the full recompute runs the whole model
per flip; the reuse keeps the unchanged pass's stream entering each block and reruns only from the
flip's block on. The ratio the arithmetic allows counts matmul FLOPs: a block costs 2 * its weights per
token plus the attention's 4 * n_embd * (T + 1) / 2 (causal), the output layer 2 * n_embd * vocab per
token, and the output layer is paid once per flip whatever is reused:

    full  = (flips + 1) * (L * block + head)
    reuse = (L * block + head) + sum over flips of ((L - k) * block + head),  k = the flip's block

The model is random, with SmolLM2-135M's shapes (576 wide, 9 heads of which 3 key/value, SwiGLU 1536,
49152 tokens, tied head, pre-RMSNorm, RoPE) at --n_layer blocks (30 in SmolLM2); the loss does not
depend on the weights' values. Rounds alternate the two ways (which goes first changes each round);
medians with their min-max. Peak memory: the process's peak RSS after the first full recompute and
after the first reuse (the reuse's only extra memory is the kept stream, (L + 1) x windows x T x width).

    python benchmarks/bench_probe.py [--n_layer 8 --windows 2 --block_size 256 --rounds 3 --threads 1]
    python benchmarks/bench_probe.py --n_layer 30 --rounds 1        # SmolLM2's depth
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from config import Config, apply_overrides  # noqa: E402
from model import GPT  # noqa: E402
from model.layers import mlp_hidden_size  # noqa: E402
from study.probe import Windows, batch_nats, flips  # noqa: E402

SMOLLM2 = dict(n_embd=576, n_head=9, n_kv_head=3, mlp="swiglu", mlp_hidden=1536, vocab_size=49152, norm="rmsnorm",
               pos_emb="rope", rope_theta=100000.0, tie_embeddings=True, bias=False, dropout=0.0)


def flops_per_token(config, T):
    """(one block, the output layer) matmul FLOPs per token."""
    d, kv = config.n_embd, config.n_embd // config.n_head * (config.n_kv_head or config.n_head)
    attn = d * (d + 2 * kv) + d * d
    mlp = (3 if config.mlp == "swiglu" else 2) * d * mlp_hidden_size(config)
    return 2 * (attn + mlp) + 4 * d * (T + 1) / 2, 2 * d * config.vocab_size


def arithmetic_ratio(config, starts, T):
    block, head = flops_per_token(config, T)
    L = config.n_layer
    full = (len(starts) + 1) * (L * block + head)
    reuse = (L * block + head) + sum((L - (0 if k is None else k)) * block + head for k in starts)
    return full / reuse


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def load_average():
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def cpu_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n_layer", type=int, default=8)
    p.add_argument("--windows", type=int, default=2, help="windows per batch (one batch is timed)")
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="a 2-block, 64-wide model: checks the script, not the speed")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shape = dict(n_embd=64, n_head=4, n_kv_head=2, mlp_hidden=128, vocab_size=512) if args.tiny else {}
    config = apply_overrides(Config(), {**SMOLLM2, **shape, "n_layer": args.n_layer, "block_size": args.block_size,
                                        "device": "cpu"}).validate()
    torch.manual_seed(0)
    model = GPT(config).eval()
    rng = np.random.default_rng(0)
    docs = np.concatenate([np.append(rng.integers(1, config.vocab_size, args.block_size + 8), 0)
                           for _ in range(args.windows + 1)])
    windows = Windows({"val": docs}, 0, args.block_size, args.windows)
    x, y = windows.batch(range(len(windows)), "cpu")
    todo = flips(model)
    ratio = arithmetic_ratio(config, [f["start"] for f in todo], args.block_size)
    times, peaks = {"full": [], "reuse": []}, {}
    with torch.no_grad():
        model(x)  # warm up: the first call pays one-time costs (allocator, kernels) neither way should
    base_mb = peak_rss_mb()
    for r in range(args.rounds):
        order = ("full", "reuse") if r % 2 == 0 else ("reuse", "full")
        for how in order:
            start = time.perf_counter()
            out = dict(batch_nats(model, x, y, todo, reuse=how == "reuse"))
            times[how].append(time.perf_counter() - start)
            peaks.setdefault(how, peak_rss_mb())
            assert len(out) == len(todo) + 1
    stream_mb = (config.n_layer + 1) * x.numel() * config.n_embd * 4 / 2**20
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"n_layer": config.n_layer, "flips": len(todo), "windows": len(windows), "block_size": args.block_size,
           "threads": args.threads, "full_s": med["full"], "reuse_s": med["reuse"], "measured_ratio": med["full"] / med["reuse"],
           "arithmetic_ratio": ratio, "peak_rss_mb_before": base_mb, "peak_rss_mb_full": peaks["full"],
           "peak_rss_mb_reuse": peaks["reuse"], "stream_mb": stream_mb, "load_average": load_average()}
    span = {k: f"{min(v):.2f}-{max(v):.2f}" for k, v in times.items()}
    print(f"# CPU: {cpu_name()} | {args.threads} thread(s) | torch {torch.__version__} | load average {row['load_average']:.2f}")
    print(f"# SmolLM2-shaped model ({'tiny' if args.tiny else 'full width'}), {config.n_layer} blocks, {len(todo)} flips, "
          f"{len(windows)} windows x {args.block_size} tokens; median of {args.rounds} rounds (min-max)\n")
    print("| full recompute s | prefix reused s | measured ratio | arithmetic ratio | peak RSS MB (before / full / reuse) | kept stream MB |")
    print("|---|---|---|---|---|---|")
    print(f"| {med['full']:.2f} ({span['full']}) | {med['reuse']:.2f} ({span['reuse']}) | {row['measured_ratio']:.2f}x "
          f"| {ratio:.2f}x | {base_mb:.0f} / {peaks['full']:.0f} / {peaks['reuse']:.0f} | {stream_mb:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
