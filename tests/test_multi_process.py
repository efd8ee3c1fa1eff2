"""Two real processes (gloo on this CPU), as DDP and as FSDP2 through accelerate's own FSDP plugin:
uneven evaluation, diagnostics and kill -9 resume; and a run folder that a process cannot see."""
import os
import subprocess

import pytest

from training.checkpoint import list_checkpoints
from repo import ROOT, accelerate_command, accelerate_launch, assert_same_metrics, kill_launch, wait_for
from training.runlog import read_diagnostics, read_metrics as metrics

pytestmark = pytest.mark.slow

MODES = ["ddp", "fsdp"]


def run_args(out_dir, cache):
    # 20 validation windows in batches of 4 are 5 batches: a split into 3 and 2 per process would hang
    # FSDP's evaluation (each forward is a collective), as would a diagnostics forward on rank 0 only
    return [str(ROOT / "configs" / "tiny.toml"), f"--out_dir={out_dir}", f"--cache_dir={cache}", "--batch_size=4",
            "--eval_windows=20", "--dropout=0.1", "--max_steps=30", "--eval_interval=10", "--diagnostics=true"]


def launch(mode, *args, script="train.py", env=None):
    return accelerate_launch(script, *args, mode=mode, env_overrides=env)


@pytest.fixture(scope="module")
def references(tmp_path_factory, shared_cache):
    """An uninterrupted 2-process run per mode."""
    folder = tmp_path_factory.mktemp("two_processes")
    runs = {}
    for mode in MODES:
        proc = launch(mode, *run_args(folder / mode, shared_cache))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[mode] = (folder / mode, proc.stdout)
    return runs


def test_fsdp_shards_and_trains_as_ddp_does(references):
    (ddp, ddp_out), (fsdp, fsdp_out) = references["ddp"], references["fsdp"]
    assert "sharding: FSDP2" in fsdp_out and "sharding: none" in ddp_out
    assert_same_metrics(metrics(ddp), metrics(fsdp), tol=1e-4)
    ddp_diag, fsdp_diag = read_diagnostics(ddp), read_diagnostics(fsdp)
    assert [d["step"] for d in fsdp_diag] == [0, 10, 20, 30]
    for a, b in zip(ddp_diag, fsdp_diag):  # the gradient norms are summed over the shards
        for key in ("input_rms", "resid_rms", "attn_max_logit", "grad_norm"):
            assert b[key] == (None if a[key] is None else pytest.approx(a[key], rel=1e-4)), (a["step"], key)
    state = list_checkpoints(fsdp)[-1] / "state"
    assert sorted(p.name for p in (state / "pytorch_model_fsdp_0").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


def test_a_resume_that_changes_the_sharding_is_one_line(references, shared_cache):
    fsdp, _ = references["fsdp"]
    before = sorted(p for p in fsdp.rglob("*") if p.is_file() and p.name != "run.lock")
    proc = launch("ddp", *run_args(fsdp, shared_cache), "--max_steps=40", "--resume")
    assert proc.returncode != 0
    message = (f"error: cannot resume {str(list_checkpoints(fsdp)[-1])!r} with sharding none: it was saved with "
               f"sharding FSDP2; launch it with the same accelerate settings (FSDP or not)")
    assert proc.stderr.count(message) == 2, proc.stderr[-3000:]
    assert sorted(p for p in fsdp.rglob("*") if p.is_file() and p.name != "run.lock") == before


@pytest.mark.parametrize("mode", MODES)
def test_kill_9_of_two_processes_then_resume_is_exact(mode, references, tmp_path, shared_cache):
    reference, _ = references[mode]
    out_dir = tmp_path / "killed"
    proc = subprocess.Popen(accelerate_command("tests/slow_train.py", *run_args(out_dir, shared_cache), mode=mode),
                            cwd=ROOT, env={**os.environ, "TEST_STEP_DELAY": "0.05"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: list_checkpoints(out_dir) and any(r["step"] >= 15 for r in metrics(out_dir)), proc, timeout=240)
    kill_launch(proc)  # the launcher and both workers
    assert [p.name for p in list_checkpoints(out_dir)] == ["step_0000010"]
    resumed = launch(mode, *run_args(out_dir, shared_cache), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert_same_metrics(metrics(reference), metrics(out_dir), tol=0)  # every metric equal, bit for bit
    assert read_diagnostics(out_dir) == read_diagnostics(reference)


def test_a_process_that_cannot_see_the_run_folder_fails_in_one_line(tmp_path, shared_cache):
    """As on nodes without a shared filesystem: each process resolves the relative out_dir in its own folder."""
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node0.mkdir(), node1.mkdir()
    proc = launch("ddp", *run_args("run", shared_cache), script="tests/slow_train.py",
                  env={"TEST_CWD_BY_RANK": f"{node0},{node1}"})
    assert proc.returncode != 0
    # each process says it in one line (the two may interleave) and exits 2; the traceback after them
    # is the launcher's own report
    message = ("error: processes [1] cannot see the run folder 'run': with several nodes, out_dir must be on a "
               "filesystem every node shares (e.g. NFS or Lustre), at the same path")
    assert proc.stderr.count(message) == 2, proc.stderr[-3000:]
    assert "exitcode: 2" in proc.stderr and 'train.py", line' not in proc.stderr
    assert not list_checkpoints(node0 / "run") and not (node0 / "run" / "metrics.jsonl").exists()
