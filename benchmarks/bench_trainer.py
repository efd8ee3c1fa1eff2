"""Trainer benchmark: ms/step and tokens/s of train.py's own loop (accelerate, gradient accumulation,
the non-finite check, logging), for the current step and for the step before it stopped syncing.

    current   fused AdamW skips a non-finite step on the device; the host reads values only at log
              steps; batches come from pinned memory, copied without blocking, the next one gathered
              during the forward
    synced    the step as it was before: AdamW for-each, so the finite check is an .item() on every
              step; each batch gathered when needed and copied from pageable memory

Each round trains a fresh run per variant (in a new random order) for --steps optimizer steps, logging
every --log-interval; the first log interval (warm-up, compilation) is dropped and the rest give the
median ms/step of that round. Reported: the median over rounds (min-max). The data cache is prepared
once, before the first round.

    python benchmarks/bench_trainer.py [--config configs/gpt2_124m.toml] [--rounds 3] [--steps 60]
    python benchmarks/bench_trainer.py --config configs/default.toml --set device=cpu   # on this CPU
"""
import argparse
import dataclasses
import json
import random
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data.batches as batches  # noqa: E402
import train  # noqa: E402
import training.optimizer as optimizer  # noqa: E402
from config import load_config  # noqa: E402
from data.prepare import prepare_data  # noqa: E402
from study.report import device_name, machine  # noqa: E402
from training.runlog import read_metrics  # noqa: E402


def pageable_windows(tokens, offsets, block_size, device="cpu"):
    """data.batches.windows as it was: a blocking copy from pageable memory."""
    rows = np.stack([np.asarray(tokens[o:o + block_size + 1], dtype=np.int64) for o in offsets])
    batch = torch.from_numpy(rows).to(device)
    return batch[:, :-1], batch[:, 1:]


@contextmanager
def synced_step():
    """The trainer with the step it had before: swapped in for one run, then restored."""
    saved = optimizer.FUSED_ADAMW_DEVICES, batches.TrainBatches.prefetch, batches.windows
    optimizer.FUSED_ADAMW_DEVICES = ()  # unfused AdamW: NonFiniteSteps asks the host every step
    batches.TrainBatches.prefetch = lambda self, device="cpu": None
    batches.windows = pageable_windows
    try:
        yield
    finally:
        optimizer.FUSED_ADAMW_DEVICES, batches.TrainBatches.prefetch, batches.windows = saved


VARIANTS = {"current": nullcontext, "synced": synced_step}


def time_one_run(config):
    """Median ms per optimizer step over the log intervals after the first."""
    train.train(config, log=lambda *_: None)
    intervals = [r for r in read_metrics(config.out_dir) if r["tokens_per_s"] is not None][1:]
    tokens_per_step = config.batch_size * config.block_size * config.grad_accum
    return statistics.median(tokens_per_step / r["tokens_per_s"] * 1e3 for r in intervals)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "gpt2_124m.toml"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set grad_accum=1 --set compile=false")
    parser.add_argument("--max-seconds", type=float, default=0, help="start no run past this (0: no limit)")
    parser.add_argument("--json", help="also write the measurements to this JSON file")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    if args.steps < 3 * args.log_interval:
        parser.error(f"--steps must be at least 3 x --log-interval ({3 * args.log_interval}): the first interval is dropped")
    began = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench_trainer_"))
    base = load_config(args.config, [f"--{item}" for item in args.set] + [
        f"--max_steps={args.steps}", f"--log_interval={args.log_interval}", f"--eval_interval={args.steps}",
        "--eval_windows=8", f"--out_dir={work / 'run'}"])
    prepare_data(base, log=lambda *a: print(*a, file=sys.stderr))

    ms = {name: [] for name in names}
    for round_index in range(args.rounds):
        order = list(names)
        random.Random(round_index).shuffle(order)
        for name in order:
            if args.max_seconds and time.perf_counter() - began > args.max_seconds:
                print(f"time budget spent: round {round_index + 1} {name} not run", file=sys.stderr)
                continue
            config = dataclasses.replace(base, out_dir=str(work / f"{name}{round_index}"))
            with VARIANTS[name]():
                ms[name].append(time_one_run(config))
            print(f"round {round_index + 1} {name}: {ms[name][-1]:.2f} ms/step", file=sys.stderr)

    device = device_name() if base.device != "cpu" else machine()
    tokens_per_step = base.batch_size * base.block_size * base.grad_accum
    print(f"command: python {' '.join(sys.argv)}")
    print(f"# {device} | torch {torch.__version__} | {Path(args.config).name}, batch {base.batch_size} x "
          f"{base.block_size} x grad_accum {base.grad_accum}, {base.mixed_precision}, compile {base.compile}")
    print(f"# median over {args.rounds} rounds of {args.steps} steps (first {args.log_interval} dropped), "
          f"variants in a new random order each round (min-max)\n")
    print("| step | ms/step | tokens/s | vs synced |\n|---|---|---|---|")
    rows = []
    ms = {name: times for name, times in ms.items() if times}
    for name, times in ms.items():
        med = statistics.median(times)
        rel = f"{med / statistics.median(ms['synced']) - 1:+.1%}" if "synced" in ms else ""
        print(f"| {name} | {med:.2f} ({min(times):.2f}-{max(times):.2f}) | {tokens_per_step / med * 1e3:,.0f} | {rel} |")
        rows.append({"step": name, "ms_per_step": med, "tok_per_s": tokens_per_step / med * 1e3, "ms_all": times,
                     "device": device, "config": Path(args.config).name})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
