"""`analyze.py convert`: a run folder (or checkpoint) in, a converted run folder out (study/convert.py
does the math).

The output is a run folder like any train() writes, so sample.py, `analyze.py probe` and
`train.py <out>/config.toml --resume` take it as it is: one checkpoint written by the trainer's own
save_checkpoint under a one-process CPU Accelerator, with the source's step counters and data
position (when the source checkpoint has them: a one-process run's state/), a FRESH optimizer (AdamW's
moments belong to the LayerNorm parametrization; centering is not a symmetry of Adam, so carrying
them over would not give the training the source would have had either), the source's tokenizer and
its log lines up to the checkpoint's step. Beside them: config.toml (the converted config, for
--resume), conversion.json and conversion.md (what was centered, and the logits' max |Δ| on random
tokens and on the validation windows).
"""
import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch

from config import UserError, check_folder, save_config
from data.prepare import file_sha256
from study import convert
from training.checkpoint import (CONFIG, STATE, TOKENIZER, Counters, list_checkpoints, read_meta,
                                 save_checkpoint, track_training_state)
from training.optimizer import build_optimizer
from training.runlog import DIAGNOSTICS, METRICS, jsonl_lines_up_to, run_folder_lock, write_atomic

TARGETS = ("rmsnorm",)
RANDOM_BATCHES = 4  # of batch_size sequences of block_size random tokens
# A conversion is written only when its fp32 logits are as close to the source's as fp32 arithmetic
# allows: within 1e-4 absolute, or within 10x the source's own fp32 rounding where that is larger
# (a GPT-2-sized model with logits in the hundreds). A wrong centering moves logits by O(0.1-1).
ROUNDING_FACTOR, ABSOLUTE = 10.0, 1e-4


def toml_value(value):
    """A config value as TOML: JSON's strings, numbers, booleans and arrays are valid TOML."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else "-inf" if value < 0 else "nan"
    return json.dumps(value)


def write_toml(config, path):
    lines = ["# Written by `analyze.py convert`; resume with: python train.py " + str(path) + " --resume"]
    lines += [f"{key} = {toml_value(value)}" for key, value in config.to_dict().items()]
    write_atomic(path, "\n".join(lines) + "\n")


def random_batches(config, n=RANDOM_BATCHES):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, config.vocab_size, (config.batch_size, config.block_size), generator=g) for _ in range(n)]


def validation_windows(config, windows):
    """The run's fixed validation windows (the first `windows` of them; 0 = all), as input batches."""
    from data.batches import validation_batches
    from data.prepare import prepare_data
    from data.tokenizer import window_start_token
    data = prepare_data(config, log=lambda *a: None)
    n = config.eval_windows if not windows else min(windows, config.eval_windows)
    return [x[:n_real] for x, _, n_real in validation_batches(data.tokens("val"), config.block_size, config.batch_size, n,
                                                              start_token=window_start_token(config)) if n_real]


def source_counters(folder, meta):
    """(Counters, data generator state or None) as the source checkpoint's state/ has them: its own
    only for a one-process run (every process of a larger run drew a slice of one global batch)."""
    counters = Counters(step=meta.get("step", 0))
    if folder is None:  # a transformers checkpoint: a new run from step 0
        return counters, None
    state = Path(folder) / STATE
    if meta.get("num_processes") != 1 or not (state / "custom_checkpoint_1.pkl").is_file():
        return counters, None
    from accelerate.checkpointing import load_custom_state

    class Holder(dict):
        def load_state_dict(self, saved):
            self["state"] = saved
    batches = Holder()
    load_custom_state(batches, str(state), 0)  # indices as train.py registers them: batches, then counters
    load_custom_state(counters, str(state), 1)
    return counters, batches["state"]


def write_checkpoint(out, model, config, folder, meta, tokenizer):
    """The converted model's checkpoint through the trainer's own save_checkpoint (CPU, one process)."""
    from accelerate import Accelerator
    from data.batches import TrainBatches
    from training.distributed import release_accelerator
    accelerator = Accelerator(cpu=True)
    try:
        counters, data_state = source_counters(folder, meta)  # accelerate's loader needs its state made
        # as train() builds it: a resume loads these param-group settings back
        prepared, _ = accelerator.prepare(model, build_optimizer(model, config, "cpu").optimizer)
        batches = TrainBatches(np.zeros(config.block_size + 1, dtype=np.int64), config.block_size, config.batch_size,
                               config.seed)
        if data_state is not None:
            batches.load_state_dict(data_state)
        track_training_state(accelerator, batches, counters)
        torch.manual_seed(config.seed + counters.step)  # the RNG states saved beside it: reproducible
        keep = {k: meta[k] for k in ("tokenizer_hash", "corpus_hash") if k in meta}
        return save_checkpoint(accelerator, out, counters.step, prepared, config,
                               {**keep, "sharding": "none", "converted_from": str(folder or config.init_from)},
                               tokenizer, keep=1)
    finally:
        release_accelerator(accelerator)


def inexact(checks):
    """Why the measured logits (convert.exactness per batch set) are not equal to fp32 precision, or None."""
    for where, c in checks.items():
        allowed = max(ABSOLUTE, ROUNDING_FACTOR * c["source_fp32_rounding"])
        if not c["fp32"] <= allowed:  # a NaN is not equal either
            return (f"the converted model's logits differ from the source's by up to {c['fp32']:.3g} on {where} "
                    f"(allowed {allowed:.3g}): this architecture is not one the conversion knows; nothing was written")
    return None


def check_out(out, source_folder):
    out = check_folder(out, "--out")
    if list_checkpoints(out) or (out / CONFIG).exists():
        raise UserError(f"--out {str(out)!r} already holds a run; give a new folder")
    if source_folder is not None and out.resolve() in (Path(source_folder).resolve(), *Path(source_folder).resolve().parents):
        raise UserError(f"--out {str(out)!r} holds the source checkpoint; give a new folder")
    return out


def check_target(to):
    if to not in TARGETS:
        raise UserError(f"--to {to!r}: the exact conversion goes to {', '.join(TARGETS)}")


def run_convert(source, to, out, windows=0, log=print):
    """Convert `source` (hf/sources.py's Source: a run's checkpoint, or a pretrained model, which the
    converted run then stands on its own from, its tokenizer copied in and no init_from)."""
    check_target(to)
    model, config, tokenizer = source.model, source.config, source.tokenizer
    pretrained = source.origin == "pretrained"
    if pretrained:
        folder, meta = None, {"step": 0, "tokenizer_hash": file_sha256(tokenizer)}
    else:
        folder, meta = source.folder, read_meta(source.folder)
    out = check_out(out, folder)
    converted, new_config, plan = convert.convert_model(model)
    new_config = dataclasses.replace(new_config, out_dir=str(out))
    if pretrained:
        new_config = dataclasses.replace(new_config, init_from="", tokenizer=str(out / TOKENIZER))
    checks = {"random tokens": convert.exactness(model, converted, random_batches(config)),
              "validation windows": convert.exactness(model, converted, validation_windows(config, windows))}
    problem = inexact(checks)
    if problem:
        raise UserError(problem)
    with run_folder_lock(out):
        shutil.copyfile(tokenizer, out / TOKENIZER)
        checkpoint = write_checkpoint(out, converted, new_config, folder, meta, tokenizer)
        save_config(new_config, out / CONFIG)
        step = read_meta(checkpoint)["step"]
        for name in (METRICS, DIAGNOSTICS) if folder is not None else ():
            run_dir = folder.parent.parent  # a checkpoint of a run folder: carry its logs up to this step
            if folder.parent.name == "checkpoints" and (run_dir / name).is_file():
                write_atomic(out / name, "".join(line + "\n" for line in jsonl_lines_up_to(run_dir / name, step)))
        write_toml(new_config, out / "config.toml")
        record = {"source": str(folder or source.label), "checkpoint": str(checkpoint), "step": step, "to": to,
                  "norm": convert.target_norm(config), "centered": plan, "max_abs_logit_change": checks}
        (out / "conversion.json").write_text(json.dumps(record, indent=1))
        text = conversion_report(record, model, converted)
        (out / "conversion.md").write_text(text)
    log(text + f"\nwritten: {out} (sample.py, analyze.py probe, train.py {out / 'config.toml'} --resume)")
    return record


def conversion_report(record, model, converted):
    plan = record["centered"]
    centered = (["token and position embeddings, attention and MLP output projections (the residual stream)"]
                if plan["stream"] else [])
    centered += [f"q and k rows of c_attn per head in blocks {plan['qk']}"] if plan["qk"] else []
    centered += [f"c_proj of the sublayers whose output norms convert: {plan['out']}"] if plan["out"] else []
    centered += ["token and position embeddings (the embedding norm)"] if plan["embed"] and not plan["stream"] else []
    lines = [f"# Conversion of {record['source']} to {record['norm']}", "",
             f"Centered: {'; '.join(centered)}." + (" The output head is untied and keeps the original embedding "
                                                    "matrix." if plan["untied_head"] else ""), "",
             "| logits on | max abs Δ (fp32) | max abs Δ (fp64, same weights) | source's own fp32 rounding | max abs logit |",
             "|---|---|---|---|---|"]
    for where, c in record["max_abs_logit_change"].items():
        lines.append(f"| {where} | {c['fp32']:.3g} | {c['fp64']:.3g} | {c['source_fp32_rounding']:.3g} "
                     f"| {c['max_abs_logit']:.3g} |")
    lines += ["", "Source norm stack:", "", "```", model.describe_norms(), "```", "", "Converted:", "", "```",
              converted.describe_norms(), "```", ""]
    return "\n".join(lines)
