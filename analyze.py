"""Look inside a trained run or a pretrained transformers model, or convert a run.

    python analyze.py probe <run dir>         re-centering probe: which norm sites depend on mean subtraction?
    python analyze.py diagnostics <run dir>   heatmaps of the run's diagnostics.jsonl (config.diagnostics)
    python analyze.py probe gpt2 [--block_size=1024 --eval_windows=8 --data=stdlib --out_dir=...]
    python analyze.py diagnostics <transformers folder or hub id> [--key=value ...]
    python analyze.py convert <run dir, checkpoint, transformers folder or hub id> --to rmsnorm --out <new run dir>
                                              the exact LayerNorm -> RMSNorm conversion (study/convert.py)
    python analyze.py recentering <comparison dir> [--delta_threshold 0.01] [--jobs 2]
                                              do norm-input statistics predict the probe's Δ? (study/recentering.py)
    python analyze.py recentering gpt2 [--key=value ...]   the same for one pretrained model
    python analyze.py pairs <comparison dir>  each <x>_ln / <x>_rms pair, paired by seed (study/pairs.py)
    python analyze.py to-target <comparison dir> [--baseline V] [--target LOSS]
                                              steps and seconds to the baseline's final val loss (study/to_target.py)

The probe (study/probe.py) flips ONE norm site at a time (LayerNorm loses its mean subtraction, any
other norm gains one) and removes each QK-norm and output norm, then evaluates the fixed validation
set: Δ val loss says how much the trained weights rely on each site. Outputs: <run dir>/probe.md (also
printed), probe.json, probe.png.

convert centers every writer of each LayerNorm's input so that it sees zero-mean vectors, where
LayerNorm and RMSNorm are one function (Jiang et al. 2023), and writes a run folder with the same
logits (checked on random tokens and the validation windows) that samples, probes and resumes.

A transformers checkpoint folder or hub id (hf/) is evaluated on config's data (the embedded corpus
unless --data says otherwise) encoded with the checkpoint's own tokenizer; --key=value sets any config
key: block_size (the context, at most the checkpoint's), eval_windows, batch_size, data, out_dir (the
outputs; default runs/pretrained/<name>). diagnostics measures the model once on batch_size windows.
"""
import sys
from pathlib import Path

import hf
from config import ArgumentParser, UserError, parse_cli_overrides, run_main

USAGE = ("usage: python analyze.py probe|diagnostics <run dir, transformers folder or hub id>  |  "
         "python analyze.py convert <run dir, checkpoint, transformers folder or hub id> --to rmsnorm --out <new run dir>  |  "
         "python analyze.py recentering <comparison dir, run dir, transformers folder or hub id> [--delta_threshold NATS] [--jobs N]  |  "
         "python analyze.py pairs <comparison dir>  |  "
         "python analyze.py to-target <comparison dir> [--baseline VARIANT] [--target LOSS]")
PRETRAINED_DEFAULTS = {"eval_windows": 8, "batch_size": 4}  # CPU-sized for a 100M+ model: GPT-2 124M in ~25-45 min


def load_pretrained(source, args):
    """(model, config) of a transformers checkpoint; outputs go to runs/pretrained/<name> unless --out_dir."""
    name = Path(source).name if Path(source).exists() else source.replace("/", "--")
    overrides = {**PRETRAINED_DEFAULTS, "out_dir": str(Path("runs") / "pretrained" / name), **parse_cli_overrides(args)}
    model, config, _ = hf.load_pretrained(source, overrides=overrides)
    return model, config


def pretrained(command, source, args):
    """`command` on a transformers checkpoint, without a training run."""
    from study.probe import measure_diagnostics, probe_model
    model, config = load_pretrained(source, args)
    run = probe_model if command == "probe" else measure_diagnostics
    run(model, config, config.out_dir, source)


def convert(argv):
    from study.convert_run import run_convert
    p = ArgumentParser(prog="analyze.py convert", hint="; " + USAGE)
    p.add_argument("source", help="a run dir (its newest intact checkpoint), a checkpoint folder, or a transformers "
                                  "checkpoint folder or hub id (then --key=value sets its config: block_size, data...)")
    p.add_argument("--to", required=True, help="the norm every LayerNorm becomes: rmsnorm")
    p.add_argument("--out", required=True, help="the converted run folder (new)")
    p.add_argument("--windows", type=int, default=0, help="validation windows the logits are checked on (0 = all)")
    args, overrides = p.parse_known_args(argv)
    pretrained = None
    if hf.is_transformers_source(args.source):  # e.g. gpt2: its own LayerNorms, converted exactly
        pretrained = hf.load_pretrained(args.source, overrides={"eval_windows": 8, **parse_cli_overrides(overrides)})
    elif overrides:
        raise UserError(f"unrecognized arguments: {' '.join(overrides)}" + "; " + USAGE)
    run_convert(args.source, args.to, args.out, args.windows, pretrained=pretrained)


def recentering(argv):
    from study.recentering import DELTA_THRESHOLD, run_recentering
    p = ArgumentParser(prog="analyze.py recentering", hint="; " + USAGE)
    p.add_argument("folder", help="a comparison's out_dir (compare.py), one run dir, or a transformers checkpoint "
                                  "folder or hub id (then --key=value sets its config, as for probe)")
    p.add_argument("--delta_threshold", type=float, default=DELTA_THRESHOLD,
                   help=f"|Δ val loss| above which a site needs its re-centering state (default {DELTA_THRESHOLD})")
    p.add_argument("--jobs", type=int, default=1, help="worker processes for the probes still to run")
    args, overrides = p.parse_known_args(argv)
    pretrained = None
    if hf.is_transformers_source(args.folder):  # e.g. gpt2: one model, probed and measured here
        model, config = load_pretrained(args.folder, overrides)
        pretrained = (model, config, args.folder)
    elif overrides:
        raise UserError(f"unrecognized arguments: {' '.join(overrides)}" + "; " + USAGE)
    run_recentering(args.folder, args.delta_threshold, args.jobs, pretrained=pretrained)


def pairs(argv):
    from study.pairs import run_pairs
    p = ArgumentParser(prog="analyze.py pairs", hint="; " + USAGE)
    p.add_argument("folder", help="a comparison's out_dir whose variants come in <x>_ln / <x>_rms pairs")
    run_pairs(p.parse_args(argv).folder)


def to_target(argv):
    from study.to_target import run_to_target
    p = ArgumentParser(prog="analyze.py to-target", hint="; " + USAGE)
    p.add_argument("folder", help="a finished comparison's out_dir (compare.py)")
    p.add_argument("--baseline", help="the variant whose mean final val loss is the target (default: the comparison's)")
    p.add_argument("--target", type=float, help="a fixed target val loss instead")
    args = p.parse_args(argv)
    run_to_target(args.folder, args.baseline, args.target)


def main():
    from study.probe import run_diagnostics, run_probe
    one_folder = {"probe": run_probe, "diagnostics": run_diagnostics}
    command, rest = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else (None, [])
    if command in ("convert", "recentering", "pairs", "to-target"):
        return {"convert": convert, "recentering": recentering, "pairs": pairs, "to-target": to_target}[command](rest)
    if command in ("-h", "--help") or any(a in ("-h", "--help") for a in rest):
        print(__doc__.strip() + "\n\n" + USAGE)
        return
    if command in one_folder and rest and hf.is_transformers_source(rest[0]):
        return pretrained(command, rest[0], rest[1:])  # a transformers checkpoint folder or hub id
    if command not in one_folder or len(rest) != 1:
        raise UserError(USAGE)
    one_folder[command](rest[0])


if __name__ == "__main__":
    run_main(main)
