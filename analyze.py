"""Look inside a trained run or a pretrained transformers model, or convert a run.

    python analyze.py probe <run dir> [--budget_s S --screen 8 --max_windows 64 --delta_threshold 0.01 --alpha 0.05]
                                              re-centering probe: which norm sites depend on mean subtraction?
    python analyze.py diagnostics <run dir>   heatmaps of the run's diagnostics.jsonl (config.diagnostics)
    python analyze.py probe gpt2 [probe options] [--block_size=1024 --batch_size=4 --data=stdlib --out_dir=...]
    python analyze.py diagnostics <transformers folder or hub id> [--key=value ...]
    python analyze.py convert <run dir, checkpoint, transformers folder or hub id> --to rmsnorm --out <new run dir>
                                              the exact LayerNorm -> RMSNorm conversion (study/convert.py)
    python analyze.py recentering <comparison dir> [--delta_threshold 0.01] [--jobs 2]
                                              do norm-input statistics predict the probe's Δ? (study/recentering.py)
    python analyze.py recentering gpt2 [--key=value ...]   the same for one pretrained model
    python analyze.py pairs <comparison dir>  each <x>_ln / <x>_rms pair, paired by seed (study/pairs.py)

The probe (study/probe.py) flips ONE norm site at a time (LayerNorm loses its mean subtraction, any
other norm gains one) and removes each QK-norm and output norm, on windows that start at document
starts: Δ val loss says how much the trained weights rely on each site. Every flip gets a 95% interval
(a bootstrap over documents) and a decision against --delta_threshold: screened on --screen windows,
then only undecided flips get more (doubling, up to --max_windows) while --budget_s lasts (study/staged.py).
A run's probe draws from its validation split, a pretrained model's from both splits. Outputs:
<run dir>/probe.md (also printed), probe.json, probe.png, probe_windows.jsonl (each window's result:
a stopped probe resumes from it).

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

USAGE = ("usage: python analyze.py probe|diagnostics <run dir, transformers folder or hub id> [probe options]  |  "
         "python analyze.py convert <run dir, checkpoint, transformers folder or hub id> --to rmsnorm --out <new run dir>  |  "
         "python analyze.py recentering <comparison dir, run dir, transformers folder or hub id> [--delta_threshold NATS] [--jobs N]  |  "
         "python analyze.py pairs <comparison dir>")
PRETRAINED_DEFAULTS = {"eval_windows": 8, "batch_size": 4}  # CPU-sized for a 100M+ model: GPT-2 124M in ~25-45 min


def load_pretrained(source, args):
    """(model, config) of a transformers checkpoint; outputs go to runs/pretrained/<name> unless --out_dir."""
    name = model_name(source).replace("/", "--")
    overrides = {**PRETRAINED_DEFAULTS, "out_dir": str(Path("runs") / "pretrained" / name), **parse_cli_overrides(args)}
    model, config, _ = hf.load_pretrained(source, overrides=overrides)
    return model, config


def model_name(source):
    """What a pretrained model's reports call it: a hub id (or a packaged model's name) as given, else the
    name of its file or folder, never a path (a dequantized or downloaded copy lives in a temporary folder)."""
    path = Path(source)
    if not path.exists():
        return str(source)
    if path.is_dir():  # a folder dequantized from a GGUF file (hf/gguf.py) is named by a hash: name the file
        origin = hf.load.read_json(path / "gguf_source.json").get("file")
        if origin:
            return Path(origin).stem
    return path.stem if path.is_file() else path.resolve().name


def add_probe_options(p):
    from study.probe import MAX_WINDOWS, SCREEN
    from study.recentering import DELTA_THRESHOLD
    from study.staged import ALPHA
    p.add_argument("--delta_threshold", type=float, default=DELTA_THRESHOLD,
                   help=f"|Δ val loss| above which a site needs its re-centering state (default {DELTA_THRESHOLD})")
    p.add_argument("--alpha", type=float, default=ALPHA, help=f"error rate of each site's decision (default {ALPHA})")
    p.add_argument("--screen", type=int, default=SCREEN, help=f"windows every flip is screened on (default {SCREEN})")
    p.add_argument("--max_windows", type=int, default=MAX_WINDOWS, help=f"windows a flip gets at most (default {MAX_WINDOWS})")
    p.add_argument("--budget_s", type=float, default=None,
                   help="seconds after which no more windows are added (the screen always completes; default none)")


def probe_options(args):
    if not args.delta_threshold > 0 or not 0 < args.alpha < 1:
        raise UserError(f"--delta_threshold must be > 0 nats and --alpha in (0, 1); got {args.delta_threshold}, {args.alpha}")
    return dict(threshold=args.delta_threshold, alpha=args.alpha, screen=args.screen, max_windows=args.max_windows,
                budget_s=args.budget_s)


def probe(argv):
    from study.probe import probe_model, run_probe
    p = ArgumentParser(prog="analyze.py probe", hint="; " + USAGE)
    p.add_argument("source", help="a run dir, or a transformers checkpoint folder or hub id (then --key=value sets "
                                  "its config: block_size, batch_size, data, out_dir...)")
    add_probe_options(p)
    args, overrides = p.parse_known_args(argv)
    options = probe_options(args)
    if hf.is_transformers_source(args.source):  # it has seen none of our documents: both splits
        model, config = load_pretrained(args.source, overrides)
        return probe_model(model, config, config.out_dir, model_name(args.source), splits=("val", "train"), **options)
    if overrides:
        raise UserError(f"unrecognized arguments: {' '.join(overrides)}" + "; " + USAGE)
    run_probe(args.source, **options)


def diagnostics(source, args):
    """The diagnostics of a transformers checkpoint, without a training run."""
    from study.probe import measure_diagnostics
    model, config = load_pretrained(source, args)
    measure_diagnostics(model, config, config.out_dir, model_name(source))


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
    from study.recentering import run_recentering
    p = ArgumentParser(prog="analyze.py recentering", hint="; " + USAGE)
    p.add_argument("folder", help="a comparison's out_dir (compare.py), one run dir, or a transformers checkpoint "
                                  "folder or hub id (then --key=value sets its config, as for probe)")
    add_probe_options(p)
    p.add_argument("--jobs", type=int, default=1, help="worker processes for the probes still to run")
    args, overrides = p.parse_known_args(argv)
    options = probe_options(args)
    pretrained = None
    if hf.is_transformers_source(args.folder):  # e.g. gpt2: one model, probed and measured here
        model, config = load_pretrained(args.folder, overrides)
        pretrained = (model, config, model_name(args.folder))
    elif overrides:
        raise UserError(f"unrecognized arguments: {' '.join(overrides)}" + "; " + USAGE)
    run_recentering(args.folder, args.delta_threshold, args.jobs, pretrained=pretrained, probe_options=options)


def pairs(argv):
    from study.pairs import run_pairs
    p = ArgumentParser(prog="analyze.py pairs", hint="; " + USAGE)
    p.add_argument("folder", help="a comparison's out_dir whose variants come in <x>_ln / <x>_rms pairs")
    run_pairs(p.parse_args(argv).folder)


def main():
    from study.probe import run_diagnostics
    command, rest = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else (None, [])
    if command in ("probe", "convert", "recentering", "pairs") and rest:
        return {"probe": probe, "convert": convert, "recentering": recentering, "pairs": pairs}[command](rest)
    if command in ("-h", "--help") or any(a in ("-h", "--help") for a in rest):
        print(__doc__.strip() + "\n\n" + USAGE)
        return
    if command == "diagnostics" and rest and hf.is_transformers_source(rest[0]):
        return diagnostics(rest[0], rest[1:])  # a transformers checkpoint folder or hub id
    if command != "diagnostics" or len(rest) != 1:
        raise UserError(USAGE)
    run_diagnostics(rest[0])


if __name__ == "__main__":
    run_main(main)
