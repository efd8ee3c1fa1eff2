"""The benchmarks run end to end at tiny sizes (their numbers are not checked, only that every
variant produced one): a benchmark that has rotted is found here, not on a lent GPU."""
import json
import os
import statistics
import subprocess
import sys

import pytest

from repo import ROOT, run_cli

pytestmark = pytest.mark.slow  # every test here trains or starts subprocesses


def run_benchmark(*args, env_overrides=None):
    done = run_cli(*args, env_overrides=env_overrides)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_bench_norms_cpu_times_every_norm(tmp_path):
    out = run_benchmark("benchmarks/bench_norms.py", "--cpu", "--shape", "64x48", "--rounds", "1",
                        "--number", "1", "--json", str(tmp_path / "cpu.json"))
    rows = json.loads((tmp_path / "cpu.json").read_text())
    names = {row["impl"] for row in rows}
    assert {"layernorm", "rmsnorm", "prmsnorm", "scalenorm", "(rmsnorm from ATen ops)"} <= names
    assert all(row["fwd_ms"] > 0 and row["fwdbwd_ms"] > 0 for row in rows)
    assert "rmsnorm's C++ kernel: built" in out


def test_bench_train_step_cpu_runs_each_variant(tmp_path):
    run_benchmark("benchmarks/bench_train_step.py", "--tiny", "--device", "cpu", "--modes", "eager",
                  "--rounds", "1", "--steps", "1", "--warmup", "1", "--variants", "none,rmsnorm,rmsnorm_aten",
                  "--json", str(tmp_path / "step.json"))
    rows = json.loads((tmp_path / "step.json").read_text())
    assert [row["norm"] for row in rows] == ["none", "rmsnorm", "rmsnorm_aten"]
    assert all(row["ms_per_step"] > 0 for row in rows)


def test_bench_probe_times_both_ways(tmp_path):
    out = run_benchmark("benchmarks/bench_probe.py", "--tiny", "--n_layer", "2", "--block_size", "32", "--rounds", "2",
                        "--json", str(tmp_path / "probe.json"))
    row = json.loads((tmp_path / "probe.json").read_text())
    assert row["flips"] == 5 and row["full_s"] > 0 and row["reuse_s"] > 0 and 1 < row["arithmetic_ratio"] < 2
    assert row["peak_rss_mb_reuse"] >= row["peak_rss_mb_full"] > 0 and "| full recompute s |" in out


def test_bench_train_step_rejects_an_unknown_variant():
    done = run_cli("benchmarks/bench_train_step.py", "--variants", "rmsnrom")
    assert done.returncode == 2 and "unknown variant(s) rmsnrom; valid: none, layernorm" in done.stderr
    assert "Traceback" not in done.stderr


def test_bench_trainer_times_both_steps(tmp_path, shared_cache):
    out = run_benchmark("benchmarks/bench_trainer.py", "--config", "configs/tiny.toml", "--rounds", "1",
                        "--steps", "6", "--log-interval", "2", "--set", f"cache_dir={shared_cache}",
                        "--json", str(tmp_path / "trainer.json"))
    rows = json.loads((tmp_path / "trainer.json").read_text())
    assert [row["step"] for row in rows] == ["current", "synced"] and all(row["ms_per_step"] > 0 for row in rows)
    assert "| current |" in out and "| synced |" in out



def test_bench_trainer_compares_this_tree_with_a_commit_side_by_side(tmp_path, shared_cache):
    """--against: the other commit in a temporary worktree, alternated rounds, a ratio per round; the
    worktree is gone afterwards."""
    out = run_benchmark("benchmarks/bench_trainer.py", "--config", "configs/tiny.toml", "--rounds", "2",
                        "--steps", "6", "--log-interval", "2", "--threads", "1", "--against", "HEAD",
                        "--set", f"cache_dir={shared_cache}", "--json", str(tmp_path / "sides.json"))
    sides = json.loads((tmp_path / "sides.json").read_text())
    assert list(sides) == ["this", "HEAD"]
    assert all(len(runs) == 2 and all(r["tok_per_s"] > 0 and r["cpu_ms_per_step"] > 0 for r in runs)
               for runs in sides.values())
    row = next(line for line in out.splitlines() if line.startswith("| HEAD |"))
    ratio = float(row.split("|")[4].split()[0])
    assert ratio == pytest.approx(statistics.median(t["tok_per_s"] / h["tok_per_s"]
                                                    for t, h in zip(sides["this"], sides["HEAD"])), abs=1e-3)
    worktrees = subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True).stdout
    assert "bench_trainer_" not in worktrees

def test_bench_norms_tune_times_every_candidate_launch(tmp_path):
    out = run_benchmark("benchmarks/bench_norms.py", "--smoke", "--tune", "--json", str(tmp_path / "launches.json"),
                        env_overrides={"TRITON_INTERPRET": "1", "NORMGPT_CPU_KERNEL": "0"})
    rows = json.loads((tmp_path / "launches.json").read_text())
    timed = [r for r in rows if r["part"] == "launch"]
    winners = [r for r in rows if r["part"] == "winner"]
    assert {r["kernel"] for r in winners} == {"fwd", "bwd", "add fwd", "add bwd"}
    for w in winners:  # the winner is the fastest of its kernel's candidates, and the heuristic was timed too
        mine = [r for r in timed if r["kernel"] == w["kernel"]]
        assert w["ms"] == min(r["ms"] for r in mine) and sum(r["heuristic"] for r in mine) == 1
    assert "| fwd | 64x96 |" in out and "(heuristic)" in out


def test_check_machine_names_a_missing_package_in_one_line():
    code = ("import runpy, sys; sys.modules['scipy'] = None; sys.argv = ['check_machine.py', '--dry-run']; "
            "runpy.run_path('benchmarks/check_machine.py', run_name='__main__')")
    done = run_cli("-c", code, env_overrides={"TRITON_INTERPRET": "1"})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "check_machine: missing on this machine: scipy (needed by the check; bring them along as wheels)"]


def test_check_machine_imports_the_check_without_datasets(tmp_path):
    """A module that needs `datasets` at import time is caught before a GPU is spent on it."""
    (tmp_path / "needs_datasets.py").write_text("import datasets\n")
    code = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); sys.path.insert(0, 'benchmarks'); "
            "sys.argv = ['check_machine.py', '--dry-run']; import check_machine; "
            "check_machine.CHECK_MODULES.insert(0, 'needs_datasets'); check_machine.main()")
    done = run_cli("-c", code, env_overrides={"TRITON_INTERPRET": "1"})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "importing needs_datasets failed without datasets and liger_kernel" in done.stderr


def test_gpu_check_dry_run_writes_every_table(tmp_path, shared_cache):
    """benchmarks/gpu_check.sh --dry-run: every step of the GPU check on this CPU at toy shapes."""
    out = tmp_path / "check"
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", str(out)], cwd=ROOT, text=True,
                          capture_output=True, timeout=1800,
                          env={**os.environ, "PYTHON": sys.executable, "CHECK_CACHE_DIR": shared_cache})
    assert done.returncode == 0, (done.stderr[-3000:], (out / "log.txt").read_text()[-3000:])
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bench_launches.json", "bench_norms.json", "bench_train_step_compiled.json",
                     "bench_train_step_eager.json", "bench_trainer.json", "log.txt", "summary.md"]
    summary = (out / "summary.md").read_text()
    for step in ("tests", "bench_norms", "bench_launches", "step_eager", "step_compiled", "trainer"):
        assert f"_{step}: exit 0 after" in summary, step
    assert "dry run: CPU only" in summary and "passed" in summary
    norms = json.loads((out / "bench_norms.json").read_text())
    assert norms[0]["part"] == "copy" and all("fwdbwd_frac" in r for r in norms[1:]) and len(norms) > 5
    launches = json.loads((out / "bench_launches.json").read_text())
    assert len([r for r in launches if r["part"] == "winner"]) == 4
    compiled = json.loads((out / "bench_train_step_compiled.json").read_text())
    assert [r["norm"] for r in compiled] == ["triton_rmsnorm+fused_add", "triton_rmsnorm", "rmsnorm", "layernorm", "none"]
    assert [r["step"] for r in json.loads((out / "bench_trainer.json").read_text())] == ["current", "synced"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_gpu_check_without_a_gpu_stops_in_one_line(tmp_path):
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path)], cwd=ROOT, text=True, capture_output=True,
                          timeout=300, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert (tmp_path / "summary.md").read_text().splitlines()[-1].startswith("check_machine: torch ")
    assert "sees no CUDA device" in done.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["log.txt", "summary.md"]
