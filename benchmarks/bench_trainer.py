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

Side by side (--against COMMIT and/or --nanogpt PATH): this tree's train.py against another commit's
(checked out into a temporary git worktree) and/or nanoGPT's train.py (a checkout of
github.com/karpathy/nanoGPT at PATH; nothing of it is copied), each run a fresh process on the same
token files, the sides alternated (their order reversed every round), --threads intra-op threads.
Each round prints each side's tokens/s and CPU ms per step (the process's CPU time over the timed
steps: less sensitive to other processes than wall time) and the load average; the table gives the
median (min-max) of each side and of the per-round ratio this/other.

    python benchmarks/bench_trainer.py --config configs/default.toml --against b64e6e5 --nanogpt /tmp/nanoGPT \
        --rounds 5 --steps 200 --log-interval 20
"""
import argparse
import dataclasses
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
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


# --- side by side: each run is a fresh process that times its own steps and writes one JSON line

# In a normgpt tree (this one or another commit's): train.py's interval clock also notes the process's
# CPU time at each reading; the readings pair up as (start, end) of each log interval.
NORMGPT_CHILD = """
import json, sys, time
args = json.loads(sys.argv[1])
sys.path.insert(0, ".")
import train
from config import load_config
marks = []
class Clock:
    def __getattr__(self, name):
        return getattr(time, name)
    def perf_counter(self):
        marks.append((time.perf_counter(), time.process_time()))
        return marks[-1][0]
train.time = Clock()
train.train(load_config(args["config"], args["overrides"]), log=lambda *a: None)
timed = list(zip(marks[0::2], marks[1::2]))[1:]  # the first interval (warm-up) is dropped
json.dump({"steps": len(timed) * args["log_interval"], "wall": sum(e[0] - s[0] for s, e in timed),
           "cpu": sum(e[1] - s[1] for s, e in timed)}, open(args["result"], "w"))
"""

# In a nanoGPT checkout: with log_interval = 1 its train.py prints "iter N: ..." after every step.
NANOGPT_CHILD = """
import builtins, json, runpy, sys, time
args = json.loads(sys.argv[1])
marks, real_print = [], builtins.print
def print(*a, **k):
    if a and str(a[0]).startswith("iter "):
        marks.append((time.perf_counter(), time.process_time()))
    real_print(*a, **k)
builtins.print = print
sys.argv = ["train.py"] + args["overrides"]
runpy.run_path("train.py", run_name="__main__")
s, e = marks[args["log_interval"]], marks[-1]
json.dump({"steps": len(marks) - 1 - args["log_interval"], "wall": e[0] - s[0], "cpu": e[1] - s[1]},
          open(args["result"], "w"))
"""


def nanogpt_overrides(config, steps, data_dir, out_dir):
    """nanoGPT's train.py arguments for the same model, batch and schedule as config (eval once, at 0)."""
    dtype = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}[config.mixed_precision]
    device = "cpu" if config.device == "cpu" or not torch.cuda.is_available() else "cuda"
    values = dict(dataset=str(data_dir), out_dir=str(out_dir), n_layer=config.n_layer, n_head=config.n_head,
                  n_embd=config.n_embd, block_size=config.block_size, batch_size=config.batch_size,
                  gradient_accumulation_steps=config.grad_accum, dropout=float(config.dropout), bias=config.bias,
                  learning_rate=config.learning_rate, min_lr=config.min_lr, warmup_iters=config.warmup_steps,
                  lr_decay_iters=steps, max_iters=steps, weight_decay=config.weight_decay, beta1=config.beta1,
                  beta2=config.beta2, grad_clip=float(config.grad_clip), device=device, dtype=dtype,
                  compile=config.compile, eval_interval=10 ** 9, eval_iters=1, log_interval=1,
                  always_save_checkpoint=False)
    return [f"--{k}={v}" for k, v in values.items()]


def nanogpt_data(data, config, folder):
    """nanoGPT's dataset layout (train.bin, val.bin as uint16, meta.pkl's vocab_size) over our token files."""
    import pickle
    if data.dtype != "uint16":
        sys.exit(f"nanoGPT reads uint16 tokens; vocab_size = {config.vocab_size} is stored as {data.dtype}")
    folder.mkdir(parents=True)
    for split in ("train", "val"):
        (folder / f"{split}.bin").symlink_to(Path(data.directory) / f"{split}.bin")
    (folder / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": config.vocab_size}))
    return folder


def run_side(kind, tree, payload, threads):
    """One run in a fresh process: (tokens/s, CPU ms per step) over its timed steps."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": ""}
    code = NORMGPT_CHILD if kind == "normgpt" else NANOGPT_CHILD
    done = subprocess.run([sys.executable, "-c", code, json.dumps(payload)], cwd=tree, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"{kind} run in {tree} failed:\n{done.stderr[-3000:]}")
    timed = json.loads(Path(payload["result"]).read_text())
    return payload["tokens_per_step"] * timed["steps"] / timed["wall"], timed["cpu"] / timed["steps"] * 1e3


def side_by_side(args, overrides, work):
    """This tree against --against's commit and/or --nanogpt's checkout, alternated; prints a table."""
    base = load_config(args.config, overrides)
    data = prepare_data(base, log=lambda *a: print(*a, file=sys.stderr))
    tokens_per_step = base.batch_size * base.block_size * base.grad_accum
    sides = {"this": ("normgpt", ROOT)}
    if args.against:
        tree = work / "against"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), args.against], check=True)
        sides[args.against] = ("normgpt", tree)
    if args.nanogpt:
        if not (Path(args.nanogpt) / "train.py").is_file():
            sys.exit(f"--nanogpt {args.nanogpt}: no train.py there; give a checkout of github.com/karpathy/nanoGPT")
        sides["nanoGPT"] = ("nanogpt", Path(args.nanogpt).resolve())
        nano_dir = nanogpt_data(data, base, work / "nanogpt_data")
    measured = {name: [] for name in sides}
    try:
        for round_index in range(args.rounds):
            order = list(sides) if round_index % 2 == 0 else list(sides)[::-1]
            for name in order:
                kind, tree = sides[name]
                run = work / f"{name}{round_index}".replace("/", "_")
                payload = {"result": str(run) + ".json", "log_interval": args.log_interval,
                           "tokens_per_step": tokens_per_step}
                if kind == "normgpt":
                    payload.update(config=str(Path(args.config).resolve()), overrides=overrides + [f"--out_dir={run}"])
                else:
                    payload.update(overrides=nanogpt_overrides(base, args.steps, nano_dir, run))
                load = os.getloadavg()[0]
                measured[name].append(run_side(kind, tree, payload, args.threads) + (load,))
                tok, cpu, _ = measured[name][-1]
                print(f"round {round_index + 1} {name}: {tok:,.0f} tokens/s, {cpu:.1f} CPU ms/step "
                      f"(load average {load:.2f} before, {os.getloadavg()[0]:.2f} after)", file=sys.stderr, flush=True)
    finally:
        if args.against:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(work / "against")])

    def span(values, fmt):
        return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"
    loads = [load for runs in measured.values() for _, _, load in runs]
    print(f"command: python {' '.join(sys.argv)}")
    print(f"# {device_name()}, {os.cpu_count()} CPU threads visible | torch {torch.__version__} | "
          f"{Path(args.config).name} {' '.join(args.set)}: "
          f"{base.n_layer} layers, {base.n_embd} wide, {base.n_head} heads, batch {base.batch_size} x {base.block_size}, "
          f"{base.mixed_precision}, {args.threads} threads")
    print(f"# {args.rounds} rounds of {args.steps} steps (first {args.log_interval} dropped), sides alternated; "
          f"median (min-max); 1-min load average before each run {min(loads):.2f}-{max(loads):.2f}\n")
    print("| side | tokens/s | CPU ms/step | this/side tokens/s | side/this CPU ms |\n|---|---|---|---|---|")
    this = measured["this"]
    for name, runs in measured.items():
        tok, cpu = [r[0] for r in runs], [r[1] for r in runs]
        ratios = "| |" if name == "this" else (f"| {span([t[0] / r[0] for t, r in zip(this, runs)], '{:.3f}')} "
                                               f"| {span([r[1] / t[1] for t, r in zip(this, runs)], '{:.3f}')} |")
        print(f"| {name} | {span(tok, '{:,.0f}')} | {span(cpu, '{:.1f}')} {ratios}")
    if args.json:
        Path(args.json).write_text(json.dumps({name: [dict(zip(("tok_per_s", "cpu_ms_per_step", "load"), r)) for r in runs]
                                               for name, runs in measured.items()}, indent=1) + "\n")


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
    parser.add_argument("--against", metavar="COMMIT", help="side by side with this commit's train.py")
    parser.add_argument("--nanogpt", metavar="PATH", help="side by side with nanoGPT's train.py in this checkout")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of each side-by-side run")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    if args.steps < 3 * args.log_interval:
        parser.error(f"--steps must be at least 3 x --log-interval ({3 * args.log_interval}): the first interval is dropped")
    began = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench_trainer_"))
    user = [f"--{item}" for item in args.set]
    overrides = user + [  # one absolute cache: every side, in its own folder, trains on the same tokens
        f"--max_steps={args.steps}", f"--log_interval={args.log_interval}", f"--eval_interval={args.steps}",
        "--eval_windows=8", f"--cache_dir={Path(load_config(args.config, user).cache_dir).resolve()}"]
    if args.against or args.nanogpt:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # still removes the worktree
        try:
            return side_by_side(args, overrides, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    base = load_config(args.config, overrides + [f"--out_dir={work / 'run'}"])
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
