"""training/metrics.py, the one schema of what a run measures: the Recorder refuses a metric the
schema lacks (trackers or not), and the trackers get each metric under its schema name."""
import pytest

from train import Recorder, tracker_scalars
from training.metrics import METRICS, RESULT_KEYS, check_entry


def test_an_unknown_metric_stops_the_recorder_even_without_trackers():
    record = Recorder(runlog=None, diagnostics=None, accelerator=None, trackers=[])
    record(step=1, train_loss=5.0, val_loss=None)
    with pytest.raises(ValueError, match="metric\\(s\\) grad_norm are not in training/metrics.py's METRICS"):
        record(step=2, train_loss=5.0, val_loss=None, grad_norm=1.0)


def test_every_metric_reaches_the_trackers_under_its_schema_name():
    entry = {"step": 3, **{name: float(i) for i, name in enumerate(METRICS)}, "val_bpb": None}
    scalars = tracker_scalars(entry)
    assert scalars == {m.tracker: entry[m.name] for m in METRICS.values() if m.name != "val_bpb"}
    assert len({m.tracker for m in METRICS.values()}) == len(METRICS)  # no two metrics share a tracker name
    diagnostics = {"sites": ["block0.attn", "final"], "input_rms": [1.0, 2.0], "grad_norm": [0.5]}
    assert tracker_scalars({"step": 3}, diagnostics) == {"diagnostics/input_rms/block0.attn": 1.0,
                                                         "diagnostics/input_rms/final": 2.0,
                                                         "diagnostics/grad_norm/block0": 0.5}
    with pytest.raises(ValueError):
        check_entry({"step": 1, "typo_loss": 1.0})


def test_the_summary_keys_come_from_the_metrics():
    assert {"final_val_loss", "best_val_loss", "final_val_bpb", "final_train_loss", "tokens_per_s",
            "wall_seconds", "skipped_steps", "steps", "n_params", "corpus_hash", "tokenizer_hash"} == set(RESULT_KEYS)
