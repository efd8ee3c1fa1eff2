"""End to end: a tiny run trains, checkpoints, samples and resumes; entry points fail with one line."""
import json
import re
import resource
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.checkpoint import list_checkpoints, load_model
from training.host_memory import keep_freed_memory
from training.metrics import METRICS, RESULT_KEYS
from training.runlog import read_metrics as metrics
from config import UserError
from sample import generate_samples, parse_args
from train import learning_rate, train
from repo import ROOT, assert_plotted, run_cli, tiny_run_config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, shared_cache):
    config = tiny_run_config(tmp_path_factory.mktemp("tiny") / "run", shared_cache, max_steps=40, eval_interval=20)
    return config, train(config, log=lambda *_: None)


@pytest.mark.slow
def test_tiny_run_learns_and_records_metrics(tiny_run):
    config, result = tiny_run
    rows = metrics(config.out_dir)
    evals = [r for r in rows if r["val_loss"] is not None]
    assert [r["step"] for r in evals] == [0, 20, 40]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    assert result["final_val_loss"] == pytest.approx(evals[-1]["val_loss"])
    assert result["final_val_loss"] < result["unigram_entropy"] + 0.5
    assert {"step", "train_loss", "val_loss", "lr", "tokens_seen", "elapsed_s", "tokens_per_s"} <= set(rows[-1])
    assert rows[-1]["tokens_seen"] == 40 * config.batch_size * config.block_size
    assert len(result["corpus_hash"]) == 64 and result["n_params"] > 0
    # the tokenizer the run trained with, as its checkpoint records it (a comparison ranks by it)
    meta = json.loads(next((Path(config.out_dir) / "checkpoints").glob("*/meta.json")).read_text())
    assert len(result["tokenizer_hash"]) == 64 and result["tokenizer_hash"] == meta["tokenizer_hash"]
    assert set(RESULT_KEYS) <= set(result)  # compare.py copies these into its rows
    assert {k for r in rows for k in r} <= {"step", *METRICS}


@pytest.mark.slow
def test_run_folder_holds_its_curves_and_its_log(tiny_run):
    config, _ = tiny_run
    run_dir = Path(config.out_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "config.json", "curves.png", "metrics.jsonl",
                                                         "run.lock", "tokenizer.json", "train.log"]
    assert_plotted(run_dir / "curves.png", size=(640, 500))
    log = (run_dir / "train.log").read_text()
    assert log.startswith("--- ") and "norm stack (pre-norm" in log and "parameters: " in log
    assert "done: step 40, val loss" in log.splitlines()[-1]
    assert ("cpu memory: freed tensors stay in the heap" in log) == keep_freed_memory()  # it says what it did


def test_a_freed_large_tensor_is_reused_without_page_faults():
    """What keep_freed_memory is for: a 64 MB tensor freed and requested again (as each training step
    does with its logits) comes back from the heap, not as fresh pages from the kernel. Without it,
    glibc maps it anew every time and each fill faults in all 16,384 of its 4 KiB pages; with it, the
    heap grows for the first few (aligned requests do not fit the chunk just freed) and then holds it."""
    if not keep_freed_memory():  # called here, not at collection: it sets the whole test process's malloc
        pytest.skip("glibc's mallopt: Linux with glibc only")
    def faults_filling(n):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(n).fill_(1.0)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    n = 16 * 2 ** 20  # fp32: 64 MB, above glibc's largest default mmap threshold (32 MB)
    faults = [faults_filling(n) for _ in range(20)]
    assert sum(faults[-5:]) < 1000, faults


@pytest.mark.slow
def test_a_resume_appends_to_the_log_and_redraws_the_curves(tiny_config):
    config = tiny_config(max_steps=10, eval_interval=10)
    train(config, log=lambda *_: None)
    curves = Path(config.out_dir) / "curves.png"
    first = curves.read_bytes()
    import dataclasses
    train(dataclasses.replace(config, max_steps=20), resume=True, log=lambda *_: None)
    lines = (Path(config.out_dir) / "train.log").read_text().splitlines()
    assert sum(line.startswith("--- ") for line in lines) == 2
    assert "done: step 10" in "\n".join(lines) and "resumed from" in "\n".join(lines) and "done: step 20" in lines[-1]
    assert curves.read_bytes() != first
    assert_plotted(curves, size=(640, 500))


@pytest.mark.slow
def test_checkpoint_is_clean_and_loads_into_a_plain_model(tiny_run):
    config, _ = tiny_run
    folder = list_checkpoints(config.out_dir)[-1]
    assert folder.name == "step_0000040" and len(list_checkpoints(config.out_dir)) == config.keep_checkpoints
    keys = load_file(folder / "model.safetensors").keys()
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in keys)
    model, loaded_config, _ = load_model(config.out_dir)
    assert loaded_config == config
    assert (Path(config.out_dir) / "tokenizer.json").is_file() and (Path(config.out_dir) / "config.json").is_file()


@pytest.mark.slow
def test_sampling_from_the_run_is_seeded(tiny_run, capsys):
    config, _ = tiny_run
    args = parse_args([config.out_dir, "--prompt", "def", "--num_samples", "2", "--max_new_tokens", "20"])
    first = generate_samples(args)
    captured = capsys.readouterr()
    streamed = captured.out
    # stderr names the checkpoint it loaded; stdout is the text alone
    assert captured.err == f"loaded checkpoint {Path(config.out_dir) / 'checkpoints' / 'step_0000040'} (step 40)\n"
    assert len(first) == 2 and all(s.startswith("def") for s in first)
    assert first[0] in streamed  # what was streamed is the sample
    assert generate_samples(args) == first
    assert generate_samples(parse_args([config.out_dir, "--seed", "7", "--prompt", "def"])) != first


@pytest.mark.slow
def test_existing_run_is_never_overwritten(tiny_run):
    config, _ = tiny_run
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        train(config, log=lambda *_: None)


@pytest.mark.slow
def test_resume_continues_to_a_longer_schedule(tiny_config):
    config = tiny_config(max_steps=20)
    train(config, log=lambda *_: None)
    import dataclasses
    longer = dataclasses.replace(config, max_steps=30)
    result = train(longer, resume=True, log=lambda *_: None)
    steps = [r["step"] for r in metrics(config.out_dir)]
    assert result["steps"] == 30 and steps == sorted(set(steps)) and steps[-1] == 30


def test_resume_without_checkpoint_is_an_error(tiny_config):
    config = tiny_config()
    with pytest.raises(UserError, match="does not exist; give the out_dir of the run to continue"):
        train(config, resume=True, log=lambda *_: None)
    Path(config.out_dir).mkdir(parents=True)
    with pytest.raises(UserError, match="has no checkpoint to resume from"):
        train(config, resume=True, log=lambda *_: None)


@pytest.mark.slow
def test_mixed_stack_trains_and_logs_its_stack(tiny_config):
    lines = []
    config = tiny_config(norm="rmsnorm", block_norms="layernorm,rmsnorm", max_steps=4, eval_interval=4)
    train(config, log=lines.append)
    text = "\n".join(lines)
    assert "block 0: attn=layernorm mlp=layernorm" in text and "block 1: attn=rmsnorm mlp=rmsnorm" in text


def test_learning_rate_schedule(tiny_config):
    c = tiny_config(max_steps=100, warmup_steps=10, learning_rate=1.0, min_lr=0.1)
    assert learning_rate(0, c) == pytest.approx(0.1) and learning_rate(9, c) == pytest.approx(1.0)
    assert learning_rate(55, c) == pytest.approx(0.55) and learning_rate(100, c) == pytest.approx(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [  # the full table of bad input is in test_bad_input.py
    (["train.py", "configs/tiny.toml", "--n_layers=3"], "unknown config key 'n_layers'; did you mean 'n_layer'?"),
    (["train.py"], "usage: python train.py"),
    (["sample.py", "configs", "--top_p", "1.5"], "--top_p must be in (0, 1]"),
])
def test_entry_points_fail_with_one_line(args, message):
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr


@pytest.mark.slow
def test_readme_demo_entry_points(tmp_path, shared_cache):
    """The demo's own commands (see the Makefile's demo target), shortened to a few steps."""
    makefile = (ROOT / "Makefile").read_text()
    assert "train.py configs/default.toml" in makefile and "sample.py runs/default" in makefile
    run_dir = tmp_path / "demo"
    proc = run_cli("train.py", "configs/default.toml", f"--out_dir={run_dir}", f"--cache_dir={shared_cache}",
                   "--max_steps=3", "--eval_interval=3", "--eval_windows=32")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"val loss [\d.]+ nats/token \(unigram entropy of the corpus: [\d.]+\)", proc.stdout)
    proc = run_cli("sample.py", str(run_dir), "--num_samples", "1", "--max_new_tokens", "10")
    assert proc.returncode == 0 and "--- sample 1 ---" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.slow
def test_gradient_accumulation_matches_the_larger_batch(tmp_path, tiny_config):
    """grad_accum micro-batches of b draw the same windows as one batch of grad_accum * b, and the
    accumulated gradient is their mean, so the runs must agree."""
    one = train(tiny_config(out_dir=str(tmp_path / "one"), batch_size=8, max_steps=10), log=lambda *_: None)
    two = train(tiny_config(out_dir=str(tmp_path / "two"), batch_size=4, grad_accum=2, max_steps=10),
                log=lambda *_: None)
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["tokens_seen"] for r in a] == [r["tokens_seen"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("train_loss", "val_loss"):
            if ra[key] is not None:
                assert rb[key] == pytest.approx(ra[key], abs=1e-5)
    assert two["final_val_loss"] == pytest.approx(one["final_val_loss"], abs=1e-5)


@pytest.mark.slow
def test_bf16_run_after_an_fp32_run_in_the_same_process(tmp_path, tiny_config):
    """compare.py trains variants one after another in one process; accelerate's process-wide state
    must not pin the first run's precision."""
    train(tiny_config(out_dir=str(tmp_path / "fp32"), max_steps=2, eval_interval=2), log=lambda *_: None)
    result = train(tiny_config(out_dir=str(tmp_path / "bf16"), mixed_precision="bf16", max_steps=10),
                   log=lambda *_: None)
    assert result["final_val_loss"] < metrics(result["run_dir"])[0]["val_loss"]
