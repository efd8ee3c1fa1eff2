"""Failure injection: kill -9 mid-run and mid-save, non-finite steps, resumes that must be refused,
and 2-process training that must match 1-process training."""
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train as train_module
from training.checkpoint import list_checkpoints, load_model
from training.runlog import read_diagnostics, read_metrics as metrics
from config import UserError
from model import GPT
from train import TrainingDiverged, train
from repo import ROOT, accelerate_launch, assert_same_metrics, tiny_run_config, wait_for

pytestmark = pytest.mark.slow  # every test here trains or starts subprocesses

def run_args(config):
    return ["configs/tiny.toml", f"--out_dir={config.out_dir}", f"--cache_dir={config.cache_dir}",
            f"--dropout={config.dropout}", f"--max_steps={config.max_steps}", f"--eval_interval={config.eval_interval}"]


def start_slow_run(config, *extra_args, **env):
    env = {**os.environ, **{k: str(v) for k, v in env.items()}}
    return subprocess.Popen([sys.executable, "tests/slow_train.py", *run_args(config), *extra_args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shared_cache):
    """An uninterrupted fp32 run with dropout: what every interrupted run must reproduce."""
    config = tiny_run_config(tmp_path_factory.mktemp("reference") / "run", shared_cache, dropout=0.1,
                             max_steps=30, eval_interval=10)
    train(config, log=lambda *_: None)
    return config, metrics(config.out_dir)


def kill_after_checkpoint_10(config):
    """Start the run and SIGKILL it after step 10 was saved and step 15 logged."""
    proc = start_slow_run(config, TEST_STEP_DELAY=0.05)
    wait_for(lambda: any(r["step"] >= 15 for r in metrics(config.out_dir)) if list_checkpoints(config.out_dir) else False, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_kill_9_mid_training_then_resume_is_exact(reference, tmp_path):
    ref_config, ref_metrics = reference
    config = dataclasses.replace(ref_config, out_dir=str(tmp_path / "killed"))
    kill_after_checkpoint_10(config)  # between checkpoints
    assert [p.name for p in list_checkpoints(config.out_dir)] == ["step_0000010"]
    with open(Path(config.out_dir) / "metrics.jsonl", "a") as f:
        f.write('{"step": 16, "train_lo')  # as if the kill had torn a line in half
    train(config, resume=True, log=lambda *_: None)
    assert_same_metrics(ref_metrics, metrics(config.out_dir))


def test_kill_9_inside_a_save_keeps_the_previous_checkpoint(reference, tmp_path):
    ref_config, ref_metrics = reference
    config = dataclasses.replace(ref_config, out_dir=str(tmp_path / "killed_in_save"))
    proc = start_slow_run(config, TEST_HANG_SAVE_AT_STEP=20)
    half_written = Path(config.out_dir) / "checkpoints" / ".tmp_step_0000020"
    wait_for(lambda: (half_written / "meta.json").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p.name for p in list_checkpoints(config.out_dir)] == ["step_0000010"]  # the half-written one is not listed
    model, _, folder = load_model(config.out_dir)
    assert folder.name == "step_0000010"
    train(config, resume=True, log=lambda *_: None)
    assert not half_written.exists()  # cleaned up by the next save
    assert_same_metrics(ref_metrics, metrics(config.out_dir))


def test_kill_9_inside_the_log_rewrite_of_a_resume_loses_no_history(reference, tmp_path):
    """A resume cuts metrics.jsonl back to its checkpoint; killed halfway through writing the cut
    version, the log must still hold every line (the old version), and the next resume is exact."""
    ref_config, ref_metrics = reference
    config = dataclasses.replace(ref_config, out_dir=str(tmp_path / "killed_twice"))
    kill_after_checkpoint_10(config)
    history = metrics(config.out_dir)
    proc = start_slow_run(config, "--resume", TEST_KILL_IN_REWRITE="metrics")
    assert proc.wait(timeout=300) == -signal.SIGKILL, proc.stderr.read()[-2000:]
    assert metrics(config.out_dir) == history  # every line is still there
    train(config, resume=True, log=lambda *_: None)
    assert_same_metrics(ref_metrics, metrics(config.out_dir))


def test_a_second_process_on_the_same_run_folder_is_refused(reference, tmp_path):
    ref_config, ref_metrics = reference
    config = dataclasses.replace(ref_config, out_dir=str(tmp_path / "shared"))
    first = start_slow_run(config, TEST_STEP_DELAY=1.0)  # 30 s: alive while two more processes start
    lock = Path(config.out_dir) / "run.lock"
    wait_for(lambda: lock.exists() and lock.read_text().strip() == str(first.pid), first)
    for resume in (False, True):  # a new run on the same folder, and a resume of it
        second = subprocess.run([sys.executable, "train.py", *run_args(config), *(["--resume"] if resume else [])],
                                cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        assert second.stderr.strip().splitlines() == [
            f"error: {str(config.out_dir)!r} is in use by another process (PID {first.pid}); "
            f"wait for it to finish or choose another out_dir"]
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    assert_same_metrics(ref_metrics, metrics(config.out_dir))  # the first run, untouched by the second


DAMAGE = {
    "optimizer missing": lambda f: (f / "state" / "optimizer.bin").unlink(),
    "optimizer truncated": lambda f: (f / "state" / "optimizer.bin").write_bytes((f / "state" / "optimizer.bin").read_bytes()[:100]),
    "rng missing": lambda f: (f / "state" / "random_states_0.pkl").unlink(),
    "rng truncated": lambda f: (f / "state" / "random_states_0.pkl").write_bytes(b""),
    "counters missing": lambda f: (f / "state" / "custom_checkpoint_1.pkl").unlink(),
    "meta empty": lambda f: (f / "meta.json").write_text(""),
    "config garbage": lambda f: (f / "config.json").write_text("{not json"),
    "weights changed": lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:-4] + b"\0\0\0\0"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_latest_checkpoint_is_skipped_and_kept(reference, tmp_path, damage):
    ref_config, ref_metrics = reference
    config = dataclasses.replace(ref_config, out_dir=str(tmp_path / "damaged"))
    shutil.copytree(ref_config.out_dir, config.out_dir)
    latest = Path(config.out_dir) / "checkpoints" / "step_0000030"
    DAMAGE[damage](latest)
    damaged_files = {p.relative_to(latest): p.read_bytes() for p in latest.rglob("*") if p.is_file()}
    lines = []
    # sampling takes the newest intact checkpoint, and names the one it skipped
    if damage not in ("optimizer missing", "optimizer truncated", "rng missing", "rng truncated", "counters missing"):
        _, _, folder = load_model(config.out_dir, log=lines.append)
        assert folder.name == "step_0000020" and len(lines) == 1 and "skipping checkpoint" in lines[0]
    else:  # what sampling needs is intact
        assert load_model(config.out_dir, log=lines.append)[2].name == "step_0000030" and not lines
    # a resume starts from step 20, retraces the reference run exactly, and keeps the damaged folder
    lines.clear()
    train(config, resume=True, log=lines.append)
    skipped = [l for l in lines if l.startswith("skipping checkpoint")]
    assert len(skipped) == 1 and "step_0000030" in skipped[0], lines
    assert_same_metrics(ref_metrics, metrics(config.out_dir))
    kept = Path(config.out_dir) / "checkpoints" / "corrupt_step_0000030.1"
    assert {p.relative_to(kept): p.read_bytes() for p in kept.rglob("*") if p.is_file()} == damaged_files
    assert [p.name for p in list_checkpoints(config.out_dir)] == ["step_0000020", "step_0000030"]


def as_old_format(folder):
    """Turn a checkpoint into the older layout (train_state.pt and rng_rank0.pt beside the weights
    instead of state/, no manifest): the files that format check and sampling look at."""
    shutil.rmtree(folder / "state")
    (folder / "manifest.json").unlink()
    torch.save({"optimizer": {}, "batches": {}, "counters": {}, "scaler": None}, folder / "train_state.pt")
    torch.save({}, folder / "rng_rank0.pt")


def test_checkpoints_of_the_old_format_sample_and_refuse_to_resume_in_one_line(reference, tmp_path):
    ref_config, _ = reference
    config = dataclasses.replace(ref_config, out_dir=str(tmp_path / "old_format"))
    shutil.copytree(ref_config.out_dir, config.out_dir)
    for folder in list_checkpoints(config.out_dir):
        as_old_format(folder)
    assert load_model(config.out_dir)[2].name == "step_0000030"  # sampling and analysis still work
    before = {p: p.read_bytes() for p in Path(config.out_dir).rglob("*") if p.is_file() and p.name != "run.lock"}
    with pytest.raises(UserError) as refused:
        train(config, resume=True, log=lambda *_: None)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"no intact checkpoint in {str(config.out_dir)!r}")
    assert "step_0000030: it is in the older format (train_state.pt instead of state/); " \
           "it can be sampled but not resumed here" in message
    assert {p: p.read_bytes() for p in Path(config.out_dir).rglob("*") if p.is_file() and p.name != "run.lock"} == before


def test_no_intact_checkpoint_is_one_line_and_deletes_nothing(reference, tmp_path):
    ref_config, _ = reference
    config = dataclasses.replace(ref_config, out_dir=str(tmp_path / "all_damaged"))
    shutil.copytree(ref_config.out_dir, config.out_dir)
    for folder in list_checkpoints(config.out_dir):
        (folder / "meta.json").write_text("")
    before = {p: p.read_bytes() for p in Path(config.out_dir).rglob("*") if p.is_file()}
    with pytest.raises(UserError, match=r"no intact checkpoint in .*step_0000030: meta.json is not readable JSON; step_0000020: .*; nothing was deleted"):
        train(config, resume=True, log=lambda *_: None)
    with pytest.raises(UserError, match="no intact checkpoint"):
        load_model(config.out_dir, log=lambda *_: None)
    after = {p: p.read_bytes() for p in Path(config.out_dir).rglob("*") if p.is_file() and p.name != "run.lock"}
    assert after == {p: b for p, b in before.items() if p.name != "run.lock"}


def test_checkpoint_holds_everything_a_resume_needs(reference):
    config, _ = reference
    folder = list_checkpoints(config.out_dir)[-1]
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == ["config.json", "manifest.json", "meta.json", "model.safetensors", "state/custom_checkpoint_0.pkl",
                     "state/custom_checkpoint_1.pkl", "state/optimizer.bin", "state/random_states_0.pkl", "tokenizer.json"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(manifest) == [f for f in files if f != "manifest.json"]
    assert manifest["meta.json"]["size"] == (folder / "meta.json").stat().st_size
    counters = torch.load(folder / "state" / "custom_checkpoint_1.pkl", weights_only=True)
    assert counters["step"] == 30 and counters["skipped_steps"] == 0
    assert torch.load(folder / "state" / "optimizer.bin", weights_only=True)["state"]  # AdamW moments are there
    assert {"random_state", "numpy_random_seed", "torch_manual_seed"} <= set(
        torch.load(folder / "state" / "random_states_0.pkl", weights_only=False))
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["step"] == 30 and len(meta["tokenizer_hash"]) == 64 and len(meta["corpus_hash"]) == 64
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in load_file(folder / "model.safetensors"))


@pytest.mark.parametrize("change, message", [
    ({"n_embd": 64}, "n_embd 32 -> 64 would change the model"),
    ({"norm": "rmsnorm"}, "norm 'layernorm' -> 'rmsnorm'"),
    ({"val_fraction": 0.2}, "val_fraction 0.05 -> 0.2 would change the data and what is measured"),
])
def test_resume_that_changes_the_model_or_tokenizer_is_refused(reference, change, message):
    config, _ = reference
    with pytest.raises(UserError, match=message):
        train(dataclasses.replace(config, **change), resume=True, log=lambda *_: None)


class InjectNonFinite(GPT):
    """A GPT whose training loss is inf on chosen training steps (1-based), as a diverging run's is."""
    bad_steps = set()

    def __init__(self, config):
        super().__init__(config)
        self.calls = 0

    def forward(self, idx, targets=None, kv_caches=None, fused_add_norm=None, per_token=False):
        logits, loss = super().forward(idx, targets, kv_caches, fused_add_norm, per_token)
        if self.training:
            self.calls += 1
            if self.calls in self.bad_steps:
                loss = loss * float("inf")
        return logits, loss


def test_non_finite_steps_are_skipped_and_counted(tiny_config, monkeypatch):
    monkeypatch.setattr(train_module, "make_model", InjectNonFinite)
    monkeypatch.setattr(InjectNonFinite, "bad_steps", {3, 4, 12})
    config = tiny_config(max_steps=20, eval_interval=10)
    result = train(config, log=lambda *_: None)
    assert result["skipped_steps"] == 3 and metrics(config.out_dir)[-1]["skipped_steps"] == 3
    model, _, _ = load_model(config.out_dir)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_diagnostics_after_a_skipped_step_show_the_last_step_taken(tiny_config, monkeypatch):
    monkeypatch.setattr(train_module, "make_model", InjectNonFinite)
    monkeypatch.setattr(InjectNonFinite, "bad_steps", {10})
    train(tiny_config(max_steps=10, eval_interval=5, diagnostics=True), log=lambda *_: None)
    at_5, at_10 = read_diagnostics(tiny_config().out_dir)[1:]
    assert all(math.isfinite(g) and g > 0 for g in at_10["grad_norm"])  # step 9's, not step 10's inf
    assert at_10["grad_norm"] != at_5["grad_norm"]


def test_too_many_non_finite_steps_stop_the_run_and_keep_the_good_checkpoint(tiny_config, monkeypatch):
    monkeypatch.setattr(train_module, "make_model", InjectNonFinite)
    monkeypatch.setattr(InjectNonFinite, "bad_steps", set(range(13, 100)))
    config = tiny_config(max_steps=30, eval_interval=10, max_bad_steps=3)
    with pytest.raises(TrainingDiverged, match="training stopped at step 15: 3 non-finite steps in a row; "
                                               "last good checkpoint: .*step_0000010"):
        train(config, log=lambda *_: None)
    assert [p.name for p in list_checkpoints(config.out_dir)] == ["step_0000010"]
    model, _, _ = load_model(config.out_dir)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def launch(n_processes, *args):
    proc = accelerate_launch("train.py", "configs/tiny.toml", *args, processes=n_processes)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_processes_match_one_process_and_resume(tmp_path, shared_cache):
    common = [f"--cache_dir={shared_cache}", "--max_steps=20", "--eval_interval=10", "--log_interval=5",
              "--eval_windows=20"]  # 8+8+4 windows for one process, 4+4, 4+4, 2+2 for two
    single = launch(1, f"--out_dir={tmp_path / 'one'}", "--batch_size=8", *common)
    double = launch(2, f"--out_dir={tmp_path / 'two'}", "--batch_size=4", *common)
    assert "processes: 2" in double.stdout and "processes: 1" in single.stdout
    # same global batch, gradients averaged over processes, val loss summed over both processes' shares
    assert_same_metrics(metrics(tmp_path / "one"), metrics(tmp_path / "two"), tol=1e-4)
    # a 2-process run resumes exactly: a copy of the run that lost everything after step 10's
    # checkpoint (as a kill at step 15 would leave it) is resumed and must retrace the original
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_0000020")
    assert sorted(p.name for p in (resumed / "checkpoints" / "step_0000010" / "state").glob("random_states_*")) == \
        ["random_states_0.pkl", "random_states_1.pkl"]
    launch(2, f"--out_dir={resumed}", "--batch_size=4", *common, "--resume")
    assert_same_metrics(metrics(tmp_path / "two"), metrics(resumed), tol=1e-6)
