"""The files of a run folder beside its checkpoints (checkpoint.py owns those):

    config.json        the resolved config
    tokenizer.json     the tokenizer the run's tokens come from
    metrics.jsonl      one line per log step: losses, lr, tokens, time
    diagnostics.jsonl  one line per eval when config.diagnostics is on (model/diagnostics.py)

The logs are appended a line at a time while training. A resume cuts them back to its checkpoint's
step by writing the kept lines to a new file and renaming it over the old one, so at every instant
either the old or the new log is complete (a kill during the rewrite loses nothing).
"""
import json
import os
from pathlib import Path

from config import save_config

METRICS, DIAGNOSTICS = "metrics.jsonl", "diagnostics.jsonl"


def write_atomic(path, text):
    """Replace `path` by `text` so that a kill at any moment leaves the old or the new file whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def jsonl_lines_up_to(path, step):
    """The lines of a log for steps <= step. Later lines were written by a killed process after its
    last checkpoint and will be written again; a line torn by the kill does not parse and is dropped."""
    kept = []
    for line in Path(path).read_text().splitlines() if Path(path).exists() else []:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    return kept


class RunLog:
    """Writes a run folder's config, tokenizer and logs. Only the main process makes one."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)

    def start(self, config, tokenizer_path, from_step):
        """Write config.json and tokenizer.json; keep the log lines up to from_step (0: a new run)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, self.run_dir / "config.json")
        write_atomic(self.run_dir / "tokenizer.json", Path(tokenizer_path).read_text())
        for name in [METRICS] + ([DIAGNOSTICS] if config.diagnostics else []):
            kept = jsonl_lines_up_to(self.run_dir / name, from_step) if from_step else []
            write_atomic(self.run_dir / name, "".join(line + "\n" for line in kept))

    def _append(self, name, entry):
        with open(self.run_dir / name, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def metrics(self, entry):
        self._append(METRICS, entry)

    def diagnostics(self, entry):
        self._append(DIAGNOSTICS, entry)


def read_jsonl(path):
    path = Path(path)
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def read_metrics(run_dir):
    return read_jsonl(Path(run_dir) / METRICS)


def read_diagnostics(run_dir):
    return read_jsonl(Path(run_dir) / DIAGNOSTICS)
