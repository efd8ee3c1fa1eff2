"""What a run measures, named once: each key of a metrics.jsonl line, its name in the experiment
trackers, and the keys of train()'s result that report it at the end of the run.

train.py's Recorder checks every line against this schema (a new metric must be added here, or the
run stops at its first log step: nothing is dropped from the trackers in silence); the trackers get
`tracker` names; compare.py copies RESULT_KEYS from train()'s result into each row, and
study/report.py's results.csv has them as columns.
"""
from typing import NamedTuple


class Metric(NamedTuple):
    name: str            # the key in metrics.jsonl
    tracker: str         # the scalar's name in the experiment trackers
    summary: tuple = ()  # train()'s result keys that report it at the end of the run


METRICS = {m.name: m for m in (
    Metric("train_loss", "train/loss", ("final_train_loss",)),
    Metric("train_z_loss", "train/z_loss"),  # only with config.z_loss: the auxiliary term, apart from the CE
    Metric("val_loss", "val/loss", ("final_val_loss", "best_val_loss")),
    Metric("val_bpb", "val/bpb", ("final_val_bpb",)),
    Metric("lr", "train/lr"),
    Metric("tokens_seen", "train/tokens_seen"),
    Metric("elapsed_s", "train/elapsed_s", ("wall_seconds",)),  # training seconds: evals and saving excluded
    Metric("tokens_per_s", "train/tokens_per_s", ("tokens_per_s",)),  # per log interval; the result's is the run's
    Metric("skipped_steps", "train/skipped_steps", ("skipped_steps",)),
)}
RUN_KEYS = ("steps", "n_params", "corpus_hash", "tokenizer_hash")  # what train()'s result says of the run itself, beside its metrics
RESULT_KEYS = tuple(key for m in METRICS.values() for key in m.summary) + RUN_KEYS  # compare.py's row copies these


def check_entry(entry):
    """A metrics.jsonl line holds a step and known metrics only; a ValueError names any other key."""
    unknown = sorted(set(entry) - set(METRICS) - {"step"})
    if unknown:
        raise ValueError(f"metric(s) {', '.join(unknown)} are not in training/metrics.py's METRICS; add each "
                         f"with its tracker name (and its result keys, if the summary reports it)")
    return entry


def tracker_scalars(entry):
    """A metrics.jsonl line as tracker scalars, e.g. {"val/loss": 5.1}; metrics not measured (None) left out."""
    return {METRICS[k].tracker: v for k, v in check_entry(entry).items() if k != "step" and v is not None}
