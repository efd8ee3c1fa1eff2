"""Look inside a trained run.

    python analyze.py probe <run dir>         re-centering probe: which norm sites depend on mean subtraction?
    python analyze.py diagnostics <run dir>   heatmaps of the run's diagnostics.jsonl (config.diagnostics)

The probe (study/probe.py) flips ONE norm site at a time (LayerNorm loses its mean subtraction, any
other norm gains one) and removes each QK-norm and output norm, then evaluates the fixed validation
set: Δ val loss says how much the trained weights rely on each site. Outputs: <run dir>/probe.md (also
printed), probe.json, probe.png.
"""
import sys

from config import UserError, run_main
from study.probe import run_diagnostics, run_probe


def main():
    commands = {"probe": run_probe, "diagnostics": run_diagnostics}
    if len(sys.argv) != 3 or sys.argv[1] not in commands:
        raise UserError(f"usage: python analyze.py {{{'|'.join(commands)}}} <run dir>")
    commands[sys.argv[1]](sys.argv[2])


if __name__ == "__main__":
    run_main(main)
