"""Look inside a trained run or a pretrained transformers model, or convert a run.

    python analyze.py probe <run dir> [--budget_s S --screen 8 --max_windows 64 --delta_threshold 0.01 --alpha 0.05]
                                              re-centering probe: which norm sites depend on mean subtraction?
    python analyze.py diagnostics <run dir>   heatmaps of the run's diagnostics.jsonl (config.diagnostics)
    python analyze.py probe gpt2 [--block_size=512 --eval_windows=8 --data=stdlib --out_dir=...]
    python analyze.py probe smollm2-135m-instruct-q4     a .gguf file or a packaged model (hf/gguf.py)
    python analyze.py diagnostics <transformers folder or hub id> [--key=value ...]
    python analyze.py convert <run dir, checkpoint, transformers folder or hub id> --to rmsnorm --out <new run dir>
                                              the exact LayerNorm -> RMSNorm conversion (study/convert.py)
    python analyze.py recentering <comparison dir> [--delta_threshold 0.01] [--jobs 2]
                                              do norm-input statistics predict the probe's Δ? (study/recentering.py)
    python analyze.py recentering gpt2 [--key=value ...]   the same for one pretrained model
    python analyze.py transfer <A> <B> [...] --out DIR     the predictor fitted on one set of sites, tested on
                                              another (study/transfer.py); A, B: folders with recentering.json
    python analyze.py pairs <comparison dir>  each <x>_ln / <x>_rms pair, paired by seed (study/pairs.py)
    python analyze.py gaps <comparison dir> [--baseline V]   each variant's gap to the baseline at every eval
                                              step, paired by seed (study/gaps.py)
    python analyze.py to-target <comparison dir> [--baseline V] [--target LOSS]
                                              steps and seconds to the baseline's final val loss (study/to_target.py)

The probe (study/probe.py) flips ONE norm site at a time (LayerNorm loses its mean subtraction, any
other norm gains one) and removes each QK-norm and output norm, then evaluates the fixed validation
set: Δ val loss says how much the trained weights rely on each site. Outputs: <run dir>/probe.md (also
printed), probe.json, probe.png.

convert centers every writer of each LayerNorm's input so that it sees zero-mean vectors, where
LayerNorm and RMSNorm are one function (Jiang et al. 2023), and writes a run folder with the same
logits (checked on random tokens and the validation windows) that samples, probes and resumes.

A pretrained model (a transformers checkpoint folder, hub id, .gguf file or packaged model: hf/sources.py)
is evaluated on config's data (the embedded corpus unless --data says otherwise) encoded with its own
tokenizer; --key=value sets any config key: block_size (the context: 512 unless given, at most the
checkpoint's), eval_windows, batch_size, data, out_dir (the outputs; default runs/pretrained/<name>).
For a run, --eval_windows and --batch_size may be set. diagnostics measures a pretrained model once on
batch_size windows; for a run it redraws the diagnostics.jsonl its training wrote.
"""
import sys
from pathlib import Path

from config import ArgumentParser, UserError, parse_cli_overrides, run_main
from hf.sources import is_pretrained, load_source, output_name

SOURCE = "run dir, checkpoint, transformers folder, hub id, .gguf file or packaged model"
USAGE = (f"usage: python analyze.py probe|diagnostics <{SOURCE}> [probe options]  |  "
         f"python analyze.py convert <{SOURCE}> --to rmsnorm --out <new run dir>  |  "
         f"python analyze.py recentering <comparison dir or {SOURCE}> [--delta_threshold NATS] [--jobs N]  |  "
         "python analyze.py transfer <A> <B> [...] --out DIR  |  python analyze.py pairs|gaps <comparison dir>  |  "
         "python analyze.py to-target <comparison dir> [--baseline VARIANT] [--target LOSS]")
PRETRAINED_DEFAULTS = {"eval_windows": 8, "batch_size": 4}  # CPU-sized for a 100M+ model: GPT-2 124M in ~25-45 min


def load(source, args, defaults=PRETRAINED_DEFAULTS):
    """The Source of a run or pretrained model; a pretrained one's outputs go to runs/pretrained/<name>
    unless --out_dir says otherwise."""
    overrides = parse_cli_overrides(args)
    if is_pretrained(source):
        overrides = {**defaults, "out_dir": str(Path("runs") / "pretrained" / output_name(source)), **overrides}
    return load_source(source, overrides=overrides)


def add_probe_options(p):
    from study.probe import MAX_WINDOWS, SCREEN
    from study.recentering import DELTA_THRESHOLD
    from study.staged import ALPHA
    p.add_argument("--delta_threshold", type=float, default=DELTA_THRESHOLD,
                   help=f"|Δ val loss| above which a site needs its re-centering state (default {DELTA_THRESHOLD})")
    p.add_argument("--alpha", type=float, default=ALPHA, help=f"error rate of each site's decision (default {ALPHA})")
    p.add_argument("--screen", type=int, default=SCREEN, help=f"windows every flip is screened on (default {SCREEN})")
    p.add_argument("--max_windows", type=int, default=MAX_WINDOWS,
                   help=f"windows a flip gets at most (default {MAX_WINDOWS})")
    p.add_argument("--budget_s", type=float, default=None,
                   help="seconds after which no more windows are added (the screen always completes; default none)")
    p.add_argument("--centering_only", action="store_true",
                   help="flip each site's centering only; do not also remove the QK and output norms")


def probe_options(args):
    if not args.delta_threshold > 0 or not 0 < args.alpha < 1:
        raise UserError(f"--delta_threshold must be > 0 nats and --alpha in (0, 1); got {args.delta_threshold}, "
                        f"{args.alpha}")
    return dict(threshold=args.delta_threshold, alpha=args.alpha, screen=args.screen, max_windows=args.max_windows,
                budget_s=args.budget_s, removals=not args.centering_only)


def probe(argv):
    from study.probe import probe_model
    p = ArgumentParser(prog="analyze.py probe", hint="; " + USAGE)
    p.add_argument("source", help=f"a {SOURCE} (for a pretrained source --key=value sets its config: block_size, "
                                  f"batch_size, data, out_dir...)")
    add_probe_options(p)
    args, overrides = p.parse_known_args(argv)
    options = probe_options(args)
    loaded = load(args.source, overrides)
    if loaded.origin == "pretrained":  # it has seen none of our documents: both splits
        return probe_model(loaded.model, loaded.config, loaded.config.out_dir, loaded.label, splits=("val", "train"),
                           **options)
    probe_model(loaded.model, loaded.config, args.source, loaded.label, **options)


def diagnostics(source, args):
    from study.probe import measure_diagnostics, run_diagnostics
    if not is_pretrained(source):
        if args:
            raise UserError(f"analyze.py diagnostics {source}: a run's diagnostics are redrawn from its "
                            f"diagnostics.jsonl; --key=value applies to a pretrained source")
        return run_diagnostics(source)  # what its training measured, redrawn
    loaded = load(source, args)
    measure_diagnostics(loaded.model, loaded.config, loaded.config.out_dir, loaded.label)


def convert(argv):
    from study.convert_run import check_target, run_convert
    p = ArgumentParser(prog="analyze.py convert", hint="; " + USAGE)
    p.add_argument("source", help="a run dir (its newest intact checkpoint), a checkpoint folder, or a pretrained model: "
                                  "transformers folder, hub id, .gguf file or packaged model (then --key=value sets "
                                  "its config: block_size, data...)")
    p.add_argument("--to", required=True, help="the norm every LayerNorm becomes: rmsnorm")
    p.add_argument("--out", required=True, help="the converted run folder (new)")
    p.add_argument("--windows", type=int, default=0, help="validation windows the logits are checked on (0 = all)")
    args, overrides = p.parse_known_args(argv)
    check_target(args.to)  # before the source is loaded
    run_convert(load(args.source, overrides, {"eval_windows": 8}), args.to, args.out, args.windows)


def recentering(argv):
    from study.recentering import run_recentering
    p = ArgumentParser(prog="analyze.py recentering", hint="; " + USAGE)
    p.add_argument("folder", help="a comparison's out_dir (compare.py), one run dir, or a transformers checkpoint "
                                  "folder or hub id (then --key=value sets its config, as for probe)")
    add_probe_options(p)
    p.add_argument("--jobs", type=int, default=1, help="worker processes for the probes still to run")
    p.add_argument("--save_records", help="also write every (run, site) record, compactly, to this JSON file (to "
                                          "commit: analyze.py transfer reads it without the runs)")
    args, overrides = p.parse_known_args(argv)
    options = probe_options(args)
    pretrained, out = None, Path(args.folder)
    if is_pretrained(args.folder):  # e.g. gpt2: one model, probed and measured here
        loaded = load(args.folder, overrides)
        pretrained, out = (loaded.model, loaded.config, loaded.label), Path(loaded.config.out_dir)
    elif overrides:
        raise UserError(f"unrecognized arguments: {' '.join(overrides)}" + "; " + USAGE)
    run_recentering(args.folder, args.delta_threshold, args.jobs, pretrained=pretrained, probe_options=options)
    if args.save_records:
        from study.transfer import read_records, save_records
        save_records(read_records(out)[1], args.save_records, out.name)


def transfer(argv):
    from study.transfer import run_transfer
    p = ArgumentParser(prog="analyze.py transfer", hint="; " + USAGE)
    p.add_argument("sets", nargs="+", help="two or more: a folder with recentering.json, or a records file "
                                           "(analyze.py recentering --save_records)")
    p.add_argument("--out", required=True, help="folder for transfer.md and transfer.json")
    p.add_argument("--delta_threshold", type=float, default=None, help="|Δ| above which a site needs its centering "
                                                                        "state (default: recentering.py's)")
    args = p.parse_args(argv)
    run_transfer(args.sets, args.out, **({} if args.delta_threshold is None else {"delta_threshold": args.delta_threshold}))


def gaps(argv):
    from study.gaps import run_gaps
    p = ArgumentParser(prog="analyze.py gaps", hint="; " + USAGE)
    p.add_argument("folder", help="a finished comparison's out_dir (compare.py)")
    p.add_argument("--baseline", help="the variant the gaps are taken to (default: the first variant, compare.py's)")
    args = p.parse_args(argv)
    run_gaps(args.folder, args.baseline)


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
    command, rest = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else (None, [])
    commands = {"convert": convert, "recentering": recentering, "transfer": transfer, "pairs": pairs, "gaps": gaps,
                "to-target": to_target}
    if command in commands:  # each parses its own arguments, --help too
        return commands[command](rest)
    if command in ("-h", "--help") or any(a in ("-h", "--help") for a in rest):
        print(USAGE + "\n\n" + __doc__.strip())
        return
    if command == "probe" and rest:
        return probe(rest)
    if command != "diagnostics" or not rest or rest[0].startswith("--"):
        raise UserError(USAGE)
    diagnostics(rest[0], rest[1:])


if __name__ == "__main__":
    run_main(main)
