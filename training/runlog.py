"""The files of a run folder beside its checkpoints (checkpoint.py owns those):

    run.lock           held (flock) by the process that trains the run; holds its PID
    config.json        the resolved config
    tokenizer.json     the tokenizer the run's tokens come from
    metrics.jsonl      one line per log step: losses, lr, tokens, time
    diagnostics.jsonl  one line per eval when config.diagnostics is on (model/diagnostics.py)
    curves.png         train and val loss and the learning rate against step, redrawn at each eval (curves.py)
    train.log          what train.py printed (the norm stack, parameters, resumes, the summary); a
                       resume appends to it

The logs are appended a line at a time while training. A resume cuts them back to its checkpoint's
step by writing the kept lines to a new file and renaming it over the old one, so at every instant
either the old or the new log is complete (a kill during the rewrite loses nothing).

A run folder has one owner: train() holds an OS lock (flock) on run.lock for the whole run, so a
second process on the same folder stops with one line naming the owner's PID. The OS releases the
lock when its process dies, so a killed run never leaves a stale lock behind.
"""
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

from config import UserError, save_config
from training.curves import CURVES, plot_run_curves

try:
    import fcntl  # POSIX only; elsewhere run folders are not locked
except ImportError:
    fcntl = None

METRICS, DIAGNOSTICS, LOG = "metrics.jsonl", "diagnostics.jsonl", "train.log"


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


class RunFolderBusy(UserError):
    """Another process holds the run folder."""


_held = {}  # resolved run folder -> [open lock file, depth]: the locks this process holds


@contextmanager
def run_folder_lock(run_dir, check=None):
    """Own run_dir while the block runs; RunFolderBusy if another process owns it. check(), if given,
    runs once the lock is held, before this process writes its PID: a start it refuses leaves
    run.lock as it was. Re-entrant in one process (compare.py holds a run's lock around train(),
    which takes it again)."""
    run_dir = Path(run_dir)
    key = run_dir.resolve()
    if key in _held:
        _held[key][1] += 1
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / "run.lock", "a+")
        try:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if check is not None:
                check()
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise RunFolderBusy(f"{str(run_dir)!r} is in use by another process (PID {owner}); "
                                f"wait for it to finish or choose another out_dir") from None
        except BaseException:
            handle.close()
            raise
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        _held[key] = [handle, 1]
    try:
        yield
    finally:
        _held[key][1] -= 1
        if _held[key][1] == 0:
            _held.pop(key)[0].close()  # closing the file releases the flock


def run_folder_owner(run_dir):
    """The PID written by the process that holds run_dir's lock now, or None if nobody holds it
    (asked without taking the lock for more than a moment, and without writing anything)."""
    path = Path(run_dir) / "run.lock"
    if fcntl is None or not path.exists() or Path(run_dir).resolve() in _held:
        return None
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "unknown"
    return None


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
        if entry.get("val_loss") is not None:  # at each eval
            plot_run_curves(read_metrics(self.run_dir), self.run_dir / CURVES, str(self.run_dir))

    def diagnostics(self, entry):
        self._append(DIAGNOSTICS, entry)


def append_log(run_dir, message):
    """One line onto run_dir/train.log, opened and closed each time: a kill loses nothing written before."""
    with open(Path(run_dir) / LOG, "a") as f:
        f.write(f"{message}\n")


class SavedLog:
    """`log`, each message also kept in run_dir/train.log. Messages wait in memory until keep(): a start
    that is refused (a resume that may not change a key, a damaged checkpoint) leaves the file as it was."""

    def __init__(self, run_dir, log):
        self.run_dir, self.log = run_dir, log
        self.pending = [f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} train.py, pid {os.getpid()}"]

    def __call__(self, message):
        self.log(message)
        if self.pending is None:
            append_log(self.run_dir, message)
        else:
            self.pending.append(message)

    def keep(self):
        for message in self.pending or []:
            append_log(self.run_dir, message)
        self.pending = None


def read_jsonl(path):
    path = Path(path)
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def read_metrics(run_dir):
    return read_jsonl(Path(run_dir) / METRICS)


def read_diagnostics(run_dir):
    return read_jsonl(Path(run_dir) / DIAGNOSTICS)
