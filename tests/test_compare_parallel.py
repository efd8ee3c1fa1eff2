"""Comparisons spread over workers and shards give the sequential comparison's results; run folders
are never trained twice at once; experiment trackers log what metrics.jsonl holds."""
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import compare
from config import UserError, run_main
from repo import ROOT, write_comparison
from training.metrics import METRICS
from training.runlog import read_diagnostics, read_metrics

VARIANTS = {"layernorm": {"norm": "layernorm"}, "rmsnorm": {"norm": "rmsnorm"}}
TIMING = {"tokens_per_s", "time_to_target_s"}  # the only summary fields allowed to differ


def same_summary(a, b):
    assert [e["variant"] for e in a] == [e["variant"] for e in b]
    for ea, eb in zip(a, b):
        for key in ea:
            if key not in TIMING:
                assert eb[key] == pytest.approx(ea[key], rel=1e-9, abs=1e-12) if isinstance(ea[key], float) \
                    else eb[key] == ea[key], (ea["variant"], key)


@pytest.fixture(scope="module")
def sequential(tmp_path_factory, shared_cache):
    """The sequential comparison, with one intra-op thread as every worker below has: RMSNorm's CPU
    kernel sums over rows in thread order, so another thread count changes the last bits of a loss."""
    folder = tmp_path_factory.mktemp("sequential")
    with one_thread():
        _, summary = compare.compare(write_comparison(folder, shared_cache, VARIANTS), log=lambda *a: None)
    return summary


@contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_two_shards_then_report_equal_the_sequential_summary(sequential, tmp_path, shared_cache):
    path = write_comparison(tmp_path, shared_cache, VARIANTS)
    out = tmp_path / "out"
    with one_thread():
        shard_rows = [compare.compare(path, shard=(i, 2), log=lambda *a: None)[0] for i in range(2)]
    assert [len(rows) for rows in shard_rows] == [2, 2]  # runs 0, 2 and 1, 3 of the four
    assert {r["worker"] for r in shard_rows[1]} == {"shard 1/2"}
    assert sorted(p.name for p in out.iterdir()) == ["runs"]  # shards write nothing shared
    rows, summary = compare.compare(path, report_only=True, log=lambda *a: None)
    same_summary(sequential, summary)
    assert (out / "summary.md").is_file() and all(r["status"] == "ok" for r in rows)


@pytest.mark.slow
def test_two_workers_equal_the_sequential_summary(sequential, tmp_path, shared_cache, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one thread per worker, as in the sequential run
    path = write_comparison(tmp_path, shared_cache, VARIANTS)
    rows, summary = compare.compare(path, jobs=2, log=lambda *a: None)
    same_summary(sequential, summary)
    assert {r["worker"] for r in rows} <= {"worker 0", "worker 1"} and all(r["device"] for r in rows)


def hold_run_folder(run_dir):
    """Another process that holds run_dir's lock, as a second worker or shard training it would."""
    code = ("import sys, time; sys.path.insert(0, '.'); from training.runlog import run_folder_lock\n"
            f"with run_folder_lock({str(run_dir)!r}):\n    print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.slow
def test_a_run_held_by_another_process_is_skipped_then_trained_later(tmp_path, shared_cache):
    path = write_comparison(tmp_path, shared_cache, VARIANTS, seeds=(1,))
    held = tmp_path / "out" / "runs" / "rmsnorm" / "seed1"
    holder = hold_run_folder(held)
    try:
        rows, _ = compare.compare(path, log=lambda *a: None)
        assert [r["status"] for r in rows] == ["ok", "running elsewhere"]
        assert not (held / "result.json").exists() and not (held / "checkpoints").exists()
        report, _ = compare.compare(path, report_only=True, log=lambda *a: None)
        assert report[1]["status"] == "running elsewhere" and str(holder.pid) in report[1]["error"]
    finally:
        holder.kill()
        holder.wait()
    rows, _ = compare.compare(path, log=lambda *a: None)  # the holder is gone: the run is trained now
    assert [r["status"] for r in rows] == ["ok", "ok"]


@pytest.mark.slow
def test_report_lists_missing_runs(tmp_path, shared_cache):
    path = write_comparison(tmp_path, shared_cache, VARIANTS, seeds=(1,))
    compare.compare(path, shard=(0, 2), log=lambda *a: None)  # trains layernorm only
    rows, summary = compare.compare(path, report_only=True, log=lambda *a: None)
    assert [r["status"] for r in rows] == ["ok", "missing"]
    assert [e["n_ok"] for e in summary] == [1, 0]


@pytest.mark.slow
def test_a_killed_worker_leaves_runs_the_next_invocation_resumes(tmp_path, shared_cache):
    base = "max_steps = 80\neval_interval = 10"
    for name in ("reference", "killed"):
        (tmp_path / name).mkdir()
    reference = write_comparison(tmp_path / "reference", shared_cache, VARIANTS, seeds=(1,), extra_base=base)
    path = write_comparison(tmp_path / "killed", shared_cache, VARIANTS, seeds=(1,), extra_base=base)
    proc = subprocess.Popen([sys.executable, "compare.py", str(path), "--jobs", "2"], cwd=ROOT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},  # as in the runs below
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    runs = [tmp_path / "killed" / "out" / "runs" / v / "seed1" for v in VARIANTS]
    deadline = time.time() + 240
    while not any((r / "checkpoints" / "step_0000020").is_dir() for r in runs):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the parent and both workers, mid-run
    proc.wait()
    while True:  # the workers die a moment after the parent; their locks go with them
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.time() < deadline, "the workers did not die"
        time.sleep(0.05)
    assert not all((r / "result.json").exists() for r in runs)
    with one_thread():
        rows, summary = compare.compare(path, log=lambda *a: None)
        _, expected = compare.compare(reference, log=lambda *a: None)
    assert all(r["status"] == "ok" for r in rows), rows
    same_summary(expected, summary)


@pytest.mark.parametrize("argv, message", [
    (["--shard", "0/0"], "--shard '0/0': needs N >= 1 and 0 <= I < N"),
    (["--shard", "3/2"], "--shard '3/2': needs N >= 1 and 0 <= I < N"),
    (["--shard", "a/b"], "--shard 'a/b': expected I/N with integers"),
    (["--shard=-1/2"], "--shard '-1/2': needs N >= 1"),
    (["--jobs", "0"], "--jobs must be >= 1, got 0"),
    (["--jobs", "two"], "argument --jobs: invalid int value: 'two'"),
    (["--jobs", "2", "--report"], "--jobs, --shard and --report are used one at a time"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_command_lines_are_one_line(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["compare.py", str(ROOT / "configs" / "compare_tiny.toml"), *argv])
    with pytest.raises(SystemExit) as exit_info:
        run_main(compare.main)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_worker_environments_share_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    from study.workers import worker_environments
    envs = worker_environments(2)
    if "CUDA_VISIBLE_DEVICES" not in envs[0]:
        cores = len(os.sched_getaffinity(0))
        assert envs == [{"OMP_NUM_THREADS": str(max(1, cores // 2))}] * 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert worker_environments(2)[0].get("OMP_NUM_THREADS") is None  # the user's setting is kept


def read_tensorboard(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


@pytest.mark.slow
def test_tensorboard_holds_the_logged_scalars(tiny_config):
    config = tiny_config(trackers=["tensorboard"], diagnostics=True, tracker_run_name="x")
    from train import train
    train(config, log=lambda *a: None)
    logged = read_tensorboard(Path(config.out_dir) / Path(config.out_dir).name)
    metrics = read_metrics(config.out_dir)
    assert logged["train/loss"] == pytest.approx({r["step"]: r["train_loss"] for r in metrics if r["train_loss"] is not None})
    assert logged["val/loss"] == pytest.approx({r["step"]: r["val_loss"] for r in metrics if r["val_loss"] is not None})
    assert set(logged["train/lr"]) == {r["step"] for r in metrics}
    # every metric the run recorded reached the tracker, under the schema's name
    assert {METRICS[k].tracker for r in metrics for k, v in r.items() if k != "step" and v is not None} <= set(logged)
    diagnostics = read_diagnostics(config.out_dir)
    site = diagnostics[0]["sites"][0]
    assert logged[f"diagnostics/input_rms/{site}"] == pytest.approx({d["step"]: d["input_rms"][0] for d in diagnostics})


def test_a_comparison_names_its_runs_for_the_trackers(tmp_path, shared_cache):
    path = write_comparison(tmp_path, shared_cache, VARIANTS, seeds=(3,), extra_base='trackers = ["tensorboard"]')
    comparison = compare.load_comparison(path)
    assert [(c.tracker_project, c.tracker_run_name) for _, _, c in comparison.runs] == \
        [("comparison", "layernorm/seed3"), ("comparison", "rmsnorm/seed3")]


def test_a_tracker_that_is_not_installed_is_one_line(tiny_config, monkeypatch):
    from training import distributed
    import train
    monkeypatch.setitem(distributed.TRACKER_PACKAGES, "wandb", lambda: False)
    with pytest.raises(UserError, match="tracker 'wandb' is not installed here; pip install wandb"):
        train.train(tiny_config(trackers="wandb"), log=lambda *a: None)
    with pytest.raises(UserError, match="'tensorbored' is not a tracker; choose from tensorboard, wandb"):
        tiny_config(trackers=["tensorbored"])
