"""The benchmarks run end to end at tiny sizes (their numbers are not checked, only that every
variant produced one): a benchmark that has rotted is found here, not on a lent GPU."""
import json

import pytest

from repo import run_cli

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
