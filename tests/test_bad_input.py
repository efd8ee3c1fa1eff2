"""Bad input, table-driven: each case is one line on stderr naming the problem, exit status 2, no
traceback, and nothing that was saved is touched. Runs the real entry points in-process."""
import shutil
import sys
from pathlib import Path

import pytest

import sample
import train
from config import run_main
from repo import run_cli, tiny_run_config


def run_entry_point(module, argv, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *argv])
    main = train.main if module is train else (lambda: sample.generate_samples(sample.parse_args()))
    with pytest.raises(SystemExit) as exit_info:
        run_main(main)
    err = capsys.readouterr().err
    return exit_info.value.code, err


def data_file(tmp_path, kind):
    path = tmp_path / "data.txt"
    if kind == "empty":
        path.write_text("")
    elif kind == "latin1":
        path.write_bytes("# caf\xe9\n".encode("latin-1") * 100)
    elif kind == "small":
        path.write_text("x = 1\n")
    return str(path)


TRAIN_CASES = [
    (["--n_layers=2"], "unknown config key 'n_layers'; did you mean 'n_layer'?"),
    (["--max_steps=many"], "--max_steps expects int"),
    (["--norm=groupnorm"], "unknown norm 'groupnorm' in norm; valid norms: layernorm, rmsnorm,"),
    (["--block_norms=layernorm*3"], "block_norms describes 3 blocks but n_layer is 2"),
    (["--n_embd=30", "--n_head=4"], "n_embd (30) must be divisible by n_head (4)"),
    (["--max_steps=0"], "max_steps must be a positive integer, got 0"),
    (["--batch_size=-2"], "batch_size must be a positive integer, got -2"),
    (["--data={tmp}/missing.txt"], "does not exist (no file matches)"),
    (["--data={empty}"], "are empty"),
    (["--data={latin1}"], "is not UTF-8 text"),
    (["--data={small}"], "fewer than one context window"),
    (["--resume"], "--resume: '{tmp}/run' does not exist"),
    # paths that are files where folders are expected, empty strings, out-of-range numbers
    (["--cache_dir={small}"], "cache_dir '{small}' is a file; give a folder path"),
    (["--out_dir={small}"], "out_dir '{small}' is a file; give a folder path"),
    (["--out_dir={small}/run"], "out_dir '{small}/run' is under '{small}', which is a file; give a folder path"),
    (["--out_dir="], "out_dir is empty; give a folder path"),
    (["--cache_dir= "], "cache_dir is empty; give a folder path"),
    (["--learning_rate=0"], "learning_rate = 0.0 is out of range; valid: > 0"),
    (["--norm_eps=0"], "norm_eps = 0.0 is out of range; valid: > 0"),
    (["--seed=-1"], "seed = -1 is out of range; valid: [0, 2**31)"),
    (["--seed=4294967296"], "seed = 4294967296 is out of range"),
    (["--vocab_size=99999999999"], "vocab_size = 99999999999 is out of range; valid: [257, 2**32]"),
]


@pytest.mark.parametrize("overrides, message", TRAIN_CASES)
def test_train_rejects_bad_input_in_one_line(overrides, message, tmp_path, shared_cache, capsys, monkeypatch):
    fill = {"tmp": tmp_path, **{k: data_file(tmp_path, k) for k in ("empty", "latin1", "small") if any(k in o for o in overrides)}}
    if "{small}" in message:
        fill["small"] = data_file(tmp_path, "small")
    overrides = [o.format(**fill) for o in overrides]
    argv = ["configs/tiny.toml", f"--out_dir={tmp_path / 'run'}", f"--cache_dir={shared_cache}", *overrides]
    code, err = run_entry_point(train, argv, capsys, monkeypatch)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message.format(**fill) in err and "Traceback" not in err


def test_a_config_path_that_is_a_folder_is_one_line(capsys, monkeypatch):
    code, err = run_entry_point(train, ["configs"], capsys, monkeypatch)
    assert code == 2 and err == "error: config file 'configs' is a folder; give a .toml file in it (see configs/ for examples)\n"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, shared_cache):
    config = tiny_run_config(tmp_path_factory.mktemp("run") / "r", shared_cache, max_steps=10)
    train.train(config, log=lambda *_: None)
    return Path(config.out_dir)


def snapshot(folder):
    return {p: p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_training_into_an_existing_run_is_refused_and_loses_nothing(finished_run, capsys, monkeypatch):
    before = snapshot(finished_run)
    code, err = run_entry_point(train, ["configs/tiny.toml", f"--out_dir={finished_run}",
                                        f"--cache_dir={finished_run.parent}/other_cache"], capsys, monkeypatch)
    assert code == 2 and "already holds a run; pass --resume" in err
    assert snapshot(finished_run) == before


SAMPLE_CASES = [
    (["{tmp}/no_such_run"], "does not exist; give a run dir"),
    (["{tmp}"], "is not a checkpoint and holds no checkpoints/step_* folders"),
    (["{run}", "--tokenizer", "{other_tokenizer}"], "is not the one checkpoint"),
    (["{run}", "--tokenizer", "{tmp}/missing.json"], "tokenizer '{tmp}/missing.json' does not exist"),
    (["{run}", "--top_p", "0"], "--top_p must be in (0, 1], got 0.0"),
    (["{run}", "--top_p", "1.5"], "--top_p must be in (0, 1], got 1.5"),
    (["{run}", "--temperature", "-0.5"], "--temperature must be >= 0 (0 = greedy), got -0.5"),
    (["{run}", "--num_samples", "0"], "--num_samples must be >= 1"),
    (["{run}", "--top_k", "x"], "argument --top_k: invalid int value: 'x'"),
    (["{run}", "--prompt_file", "{tmp}/nope.txt"], "prompt file '{tmp}/nope.txt' does not exist"),
    (["{broken}"], "cannot read weights"),
    (["{run}", "--prompt_file", "{tmp}"], "prompt file '{tmp}' is a folder; give a text file"),
    (["{run}", "--tokenizer", "{tmp}"], "tokenizer '{tmp}' is a folder; give a tokenizer.json file"),
    (["{run}", "--device", "gpu"], "--device 'gpu' is not a device name; use cpu, cuda or cuda:N"),
    (["{run}", "--device", "cuda:99"], "--device 'cuda:99'"),
    (["{no_meta}"], "no intact checkpoint in '{no_meta}' (step_0000010: meta.json is missing); nothing was deleted"),
    (["{bad_config}"], "step_0000010: config.json is not readable JSON"),
    (["{no_meta}/checkpoints/step_0000010"], "checkpoint '{no_meta}/checkpoints/step_0000010' cannot be used: meta.json is missing"),
    (["{run}/metrics.jsonl"], "is a file; give a run dir"),
]


@pytest.mark.slow
@pytest.mark.parametrize("argv, message", SAMPLE_CASES)
def test_sample_rejects_bad_input_in_one_line(argv, message, finished_run, tmp_path, capsys, monkeypatch):
    other = tmp_path / "other_tokenizer.json"
    other.write_text((finished_run / "tokenizer.json").read_text().replace('"<|endoftext|>"', '"<|eod|>"'))
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "meta.json", "tokenizer.json"):
        (broken / name).write_bytes((finished_run / "checkpoints" / "step_0000010" / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    damaged = {}
    for name, file, text in (("no_meta", "meta.json", None), ("bad_config", "config.json", "{garbage")):
        damaged[name] = tmp_path / name
        shutil.copytree(finished_run, damaged[name])
        for folder in (damaged[name] / "checkpoints").iterdir():
            (folder / file).unlink() if text is None else (folder / file).write_text(text)
    fill = {"tmp": tmp_path, "run": finished_run, "other_tokenizer": other, "broken": broken, **damaged}
    before = snapshot(finished_run)
    code, err = run_entry_point(sample, [a.format(**fill) for a in argv], capsys, monkeypatch)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message.format(**fill) in err and "Traceback" not in err
    assert snapshot(finished_run) == before


@pytest.mark.slow
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_sample_on_cuda_without_a_gpu_is_one_line(finished_run, capsys, monkeypatch):
    code, err = run_entry_point(sample, [str(finished_run), "--device", "cuda"], capsys, monkeypatch)
    assert code == 2 and err == "error: --device 'cuda': no CUDA GPU is available on this machine; use --device cpu\n"


@pytest.mark.slow
@pytest.mark.parametrize("script", [["compare.py"], ["sample.py"], ["-m", "data.prepare"],
                                    ["benchmarks/bench_trainer.py"], ["benchmarks/bench_train_step.py"],
                                    ["benchmarks/bench_norms.py"], ["benchmarks/check_machine.py"]])
def test_help_prints_usage(script):
    """--help runs each option's help text through %-formatting: a bare % in one would break it."""
    done = run_cli(*script, "--help", timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage:"), done.stderr[-2000:]
