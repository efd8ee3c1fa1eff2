"""Training-step benchmark: ms/step and tokens/s of the GPT-2-124M-shaped model (configs/gpt2_124m.toml,
batch 16 x 1024 tokens, bf16 autocast, fused AdamW, random tokens) for each norm variant, eager and
torch.compile'd. The identity-norm variant bounds what any norm kernel can save.

Run-to-run spread is as large as the effect being measured (~2% on an H200), so the variants run
round-robin in a new random order each round, `--rounds` times `--steps` steps each; reported is the
median over rounds of the ms/step, with its min-max. Eager and compiled variants of a norm share one model and optimizer.

    python benchmarks/bench_train_step.py [--rounds 5] [--steps 5] [--modes eager,compiled] [--json out.json]
    python benchmarks/bench_train_step.py --tiny --device cpu --modes eager   # a seconds-long smoke run

On CPU the step runs in fp32 (as train.py does there), and the variant "rmsnorm_aten" times rmsnorm
without its C++ CPU kernel (kernels/rmsnorm_cpu.py), the ATen formula it falls back to. --config and
--batch time another model, e.g. the demo's (the norm comparison uses the same model with a shorter context):

    python benchmarks/bench_train_step.py --device cpu --modes eager --config configs/default.toml \
        --batch 16 --variants none,layernorm,rmsnorm,rmsnorm_aten --rounds 7 --steps 10
"""
import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from config import load_config  # noqa: E402
from kernels.rmsnorm_cpu import with_aten_rmsnorm  # noqa: E402
from model.gpt import GPT  # noqa: E402

VARIANTS = {
    "none": dict(norm="none"),
    "layernorm": dict(norm="layernorm"),
    "rmsnorm": dict(norm="rmsnorm"),
    "triton_rmsnorm": dict(norm="triton_rmsnorm"),
    "triton_rmsnorm+fused_add": dict(norm="triton_rmsnorm", fused_add_norm=True),
    "rmsnorm_aten": dict(norm="rmsnorm"),  # with kernels.rmsnorm_cpu.USE_CPU_KERNEL off (CPU only)
    # the presets' architectures (configs/llama_style.toml, nanochat_style.toml) at the benchmark's size
    "llama_style": dict(norm="rmsnorm", bias=False, pos_emb="rope", mlp="swiglu", tie_embeddings=False),
    "nanochat_style": dict(norm="rmsnorm", norm_gain=False, bias=False, embed_norm="rmsnorm", qk_norm="rmsnorm",
                           pos_emb="rope", mlp="relu2", tie_embeddings=False, logit_softcap=15.0),
}


def make_step(model, optimizer, device):
    def step(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            _, loss = model(x, targets=y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (compiles)")
    parser.add_argument("--modes", default="eager,compiled", help="eager, compiled or both")
    parser.add_argument("--variants", default=",".join(v for v in VARIANTS if v != "rmsnorm_aten"),
                        help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--tiny", action="store_true", help="configs/tiny.toml, batch 4 (smoke test)")
    parser.add_argument("--config", help="model config to time (default configs/gpt2_124m.toml)")
    parser.add_argument("--batch", type=int, help="sequences per step (default 16; 4 with --tiny)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-seconds", type=float, default=0, help="time budget (0: no limit): no variant "
                        "starts its warm-up past 3/4 of it (the rest are left out), no round starts past it")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend for --modes compiled")
    parser.add_argument("--json", help="also write the measurements to this JSON file")
    args = parser.parse_args()
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    began = time.perf_counter()
    device = torch.device(args.device)
    config_file = Path(args.config) if args.config else ROOT / "configs" / ("tiny.toml" if args.tiny else "gpt2_124m.toml")
    batch = args.batch or (4 if args.tiny else 16)

    torch.manual_seed(0)
    runs = {}  # (variant, mode) -> step function
    for name in args.variants.split(","):
        config = load_config(config_file, {**VARIANTS[name], "batch_size": batch, "dropout": 0.0})
        model = GPT(config).to(device)
        optimizer = torch.optim.AdamW(model.optimizer_groups(0.1), lr=1e-4, fused=device.type == "cuda")
        wrap = with_aten_rmsnorm if name == "rmsnorm_aten" else (lambda step: step)
        if "eager" in args.modes:
            runs[name, "eager"] = wrap(make_step(model, optimizer, device))
        if "compiled" in args.modes:
            runs[name, "compiled"] = wrap(make_step(torch.compile(model, backend=args.backend), optimizer, device))
    tokens = torch.randint(0, config.vocab_size, (batch, config.block_size + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    for key in list(runs):  # in the order given: the most wanted first, if the budget runs short
        if args.max_seconds and time.perf_counter() - began > 0.75 * args.max_seconds:
            print(f"time budget: {key[0]} {key[1]} left out (no warm-up started past 3/4 of --max-seconds)",
                  file=sys.stderr)
            del runs[key]
            continue
        start = time.perf_counter()
        for _ in range(args.warmup):
            runs[key](x, y)
        sync(device)
        print(f"warm-up {key[0]} {key[1]}: {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
    if not runs:
        sys.exit("time budget spent before the first warm-up: nothing measured")
    ms = {key: [] for key in runs}
    for round_index in range(args.rounds):
        if round_index and args.max_seconds and time.perf_counter() - began > args.max_seconds:
            print(f"time budget spent: {round_index} rounds", file=sys.stderr)
            break
        order = list(runs)  # a new order each round, so no variant always follows the same neighbour
        random.Random(round_index).shuffle(order)
        for key in order:
            step = runs[key]
            sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step(x, y)
            sync(device)
            ms[key].append((time.perf_counter() - start) / args.steps * 1e3)
            print(f"round {round_index + 1} {key[0]} {key[1]}: {ms[key][-1]:.2f} ms/step", file=sys.stderr, flush=True)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"command: python {' '.join(sys.argv)}")
    print(f"# {name} | torch {torch.__version__} | {config_file.name}, batch {batch} x {config.block_size}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}")
    print(f"# median over {len(next(iter(ms.values())))} rounds of {args.steps} steps, variants in a new random order each round (min-max)\n")
    print("| norm | mode | ms/step | tokens/s | vs none |\n|---|---|---|---|---|")
    rows = []
    for (variant, mode), times in ms.items():
        med = statistics.median(times)
        base = ms.get(("none", mode))
        rel = f"{med / statistics.median(base) - 1:+.1%}" if base else ""
        tok_s = batch * config.block_size / (med * 1e-3)
        print(f"| {variant} | {mode} | {med:.2f} ({min(times):.2f}-{max(times):.2f}) | {tok_s:,.0f} | {rel} |")
        rows.append({"part": "gpt", "norm": variant, "mode": mode, "ms_per_step": med, "tok_per_s": tok_s,
                     "ms_all": times, "device": name})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
