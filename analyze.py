"""Look inside a trained run, or a pretrained transformers model.

    python analyze.py probe <run dir>         re-centering probe: which norm sites depend on mean subtraction?
    python analyze.py diagnostics <run dir>   heatmaps of the run's diagnostics.jsonl (config.diagnostics)
    python analyze.py probe gpt2 [--block_size=1024 --eval_windows=8 --data=stdlib --out_dir=...]
    python analyze.py diagnostics <transformers folder or hub id> [--key=value ...]

The probe (study/probe.py) flips ONE norm site at a time (LayerNorm loses its mean subtraction, any
other norm gains one) and removes each QK-norm and output norm, then evaluates the fixed validation
set: Δ val loss says how much the trained weights rely on each site. Outputs: <run dir>/probe.md (also
printed), probe.json, probe.png.

A transformers checkpoint folder or hub id (hf/) is evaluated on config's data (the embedded corpus
unless --data says otherwise) encoded with the checkpoint's own tokenizer; --key=value sets any config
key: block_size (the context, at most the checkpoint's), eval_windows, batch_size, data, out_dir (the
outputs; default runs/pretrained/<name>). diagnostics measures the model once on batch_size windows.
"""
import sys
from pathlib import Path

import hf
from config import UserError, parse_cli_overrides, run_main
from study.probe import measure_diagnostics, probe_model, run_diagnostics, run_probe

PRETRAINED_DEFAULTS = {"eval_windows": 8, "batch_size": 4}  # CPU-sized for a 100M+ model: GPT-2 124M in ~25-45 min


def pretrained(command, source, args):
    """`command` on a transformers checkpoint, without a training run."""
    name = Path(source).name if Path(source).exists() else source.replace("/", "--")
    overrides = {**PRETRAINED_DEFAULTS, "out_dir": str(Path("runs") / "pretrained" / name), **parse_cli_overrides(args)}
    model, config, _ = hf.load_pretrained(source, overrides=overrides)
    run = probe_model if command == "probe" else measure_diagnostics
    run(model, config, config.out_dir, source)


def main():
    commands = {"probe": run_probe, "diagnostics": run_diagnostics}
    if len(sys.argv) >= 3 and sys.argv[1] in commands and hf.is_transformers_source(sys.argv[2]):
        return pretrained(sys.argv[1], sys.argv[2], sys.argv[3:])  # a transformers checkpoint folder or hub id
    if len(sys.argv) != 3 or sys.argv[1] not in commands:
        raise UserError(f"usage: python analyze.py {{{'|'.join(commands)}}} <run dir>")
    commands[sys.argv[1]](sys.argv[2])


if __name__ == "__main__":
    run_main(main)
