"""Hugging Face interop end to end: export.py on runs trained here, a fine-tune from a transformers
checkpoint that survives kill -9, sample.py and analyze.py on a checkpoint without a run, and what a
machine without transformers (or without the hub) says."""
import io
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

import analyze
import sample
from config import load_config, run_main
from data.prepare import prepare_data
from hf_checkpoints import TEXT, build, documents, tokenizer_file
from repo import ROOT, assert_plotted, assert_same_metrics, run_cli, wait_for
from train import train
from training.checkpoint import list_checkpoints, load_model
from training.runlog import read_metrics

transformers = pytest.importorskip("transformers", reason="the interop tests check against transformers")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A random GPT-2 checkpoint and a small text file to fine-tune and evaluate it on."""
    folder = tmp_path_factory.mktemp("hf")
    data = folder / "data.txt"
    data.write_text("\n".join(documents()) * 2)
    return build("gpt2", folder / "gpt2", tokenizer_file(folder / "tokenizer")), data


@pytest.mark.slow
@pytest.mark.parametrize("style, overrides, family", [
    ("gpt2", {}, "GPT2LMHeadModel"),  # tiny.toml as it is: LayerNorm, exact GELU, learned positions, no biases
    ("gpt2-tanh-bias", {"mlp": "gelu_tanh", "bias": True}, "GPT2LMHeadModel"),
    ("llama", {"norm": "rmsnorm", "pos_emb": "rope", "mlp": "swiglu", "tie_embeddings": False, "n_kv_head": 1},
     "LlamaForCausalLM"),
    ("qwen3", {"norm": "rmsnorm", "pos_emb": "rope", "mlp": "swiglu", "qk_norm": "rmsnorm"}, "Qwen3ForCausalLM"),
])
def test_export_of_a_trained_run_gives_our_logits(tiny_config, tmp_path, style, overrides, family):
    config = tiny_config(max_steps=3, eval_interval=3, **overrides)
    train(config, log=lambda *_: None)
    done = run_cli("export.py", config.out_dir, str(tmp_path / "out"))
    assert done.returncode == 0 and f"as {family} ->" in done.stdout, done.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    ours, _, folder = load_model(config.out_dir)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    assert type(theirs).__name__ == family
    idx = torch.randint(0, config.vocab_size, (2, config.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        delta = (ours(idx)[0] - theirs(idx).logits).abs().max().item()
    print(f"max |Δ logit| export of a trained {style} run: {delta:.2e}")
    assert delta < 1e-5
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    expected = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(TEXT, add_special_tokens=False).ids
    assert tokenizer(TEXT, add_special_tokens=False)["input_ids"] == expected
    assert tokenizer.eos_token == "<|endoftext|>" == tokenizer.convert_ids_to_tokens(theirs.generation_config.eos_token_id)


@pytest.mark.slow
def test_export_of_an_unexportable_run_is_one_line_and_writes_nothing(tiny_config, tmp_path):
    config = tiny_config(max_steps=2, eval_interval=2, norm="dyt", logit_softcap=15.0)
    train(config, log=lambda *_: None)
    done = run_cli("export.py", config.out_dir, str(tmp_path / "out"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"error: cannot export {config.out_dir!r}: no transformers class represents "
                                  f"logit_softcap (of these classes only Gemma 3 soft-caps); norm dyt")
    assert not (tmp_path / "out").exists()


FINE_TUNE = """init_from = "{source}"
data = "{data}"
cache_dir = "{cache}"
block_size = 32
batch_size = 4
eval_windows = 8
dropout = 0.1
norm = "rmsnorm"            # a norm change from GPT-2's LayerNorm, in the blocks only
final_norm = "layernorm"
max_steps = 30
eval_interval = 10
log_interval = 5
learning_rate = 1e-3
min_lr = 1e-4
warmup_steps = 2
"""


@pytest.mark.slow
def test_a_fine_tune_resumes_exactly_after_kill_9(source, tmp_path):
    folder, data = source
    toml = tmp_path / "fine_tune.toml"
    toml.write_text(FINE_TUNE.format(source=folder, data=data, cache=tmp_path / "cache"))
    reference = load_config(toml, {"out_dir": str(tmp_path / "reference")})
    train(reference, log=lambda *_: None)
    expected = read_metrics(reference.out_dir)
    assert expected[0]["val_loss"] < 7 and expected[-1]["val_loss"] < expected[0]["val_loss"]

    config = load_config(toml, {"out_dir": str(tmp_path / "killed")})
    proc = subprocess.Popen([sys.executable, "tests/slow_train.py", str(toml), f"--out_dir={config.out_dir}"], cwd=ROOT,
                            env={**os.environ, "TEST_STEP_DELAY": "0.05"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for(lambda: bool(list_checkpoints(config.out_dir)) and any(r["step"] >= 15 for r in read_metrics(config.out_dir)),
             proc, timeout=300)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p.name for p in list_checkpoints(config.out_dir)] == ["step_0000010"]
    train(config, resume=True, log=lambda *_: None)  # resolves init_from again; weights come from the checkpoint
    assert_same_metrics(expected, read_metrics(config.out_dir))
    saved = json.loads((list_checkpoints(config.out_dir)[-1] / "config.json").read_text())
    assert saved["init_from"] == str(folder) and saved["n_layer"] == 2 and saved["tokenizer"] == str(folder / "tokenizer.json")


def run_analyze(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["analyze.py", *map(str, argv)])
    run_main(analyze.main)


def document_files(folder):
    """A few documents, one file each: the probe's windows start at document starts."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(documents()):
        (folder / f"doc{i}.txt").write_text(doc)
    return folder / "*.txt"


def test_the_probe_of_a_transformers_checkpoint_evaluates_it_with_its_own_tokenizer(source, tmp_path, monkeypatch):
    from data.tokenizer import end_of_document
    from study.probe import Windows
    folder, _ = source
    data = document_files(tmp_path / "docs")
    run_analyze(monkeypatch, "probe", folder, f"--data={data}", f"--cache_dir={tmp_path / 'cache'}", "--block_size=32",
                "--screen=3", "--max_windows=6", f"--out_dir={tmp_path / 'probe'}")
    rows = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert [r["site"] for r in rows] == ["block0.attn", "block0.mlp", "block1.attn", "block1.mlp", "final"]
    assert all(r["change"] == "mean subtraction removed" and r["delta"] != 0 for r in rows)
    assert all(r["ci95"][0] <= r["delta"] <= r["ci95"][1] and 3 <= r["windows"] <= 6 for r in rows)
    # its reports name the model (its folder), not the path it was read from
    assert (tmp_path / "probe" / "probe.md").read_text().startswith(f"# Re-centering probe of {folder.name}\n")
    # the base loss is transformers' own on the same windows: documents of both splits, each from its start
    config = load_config(None, {"data": str(data), "cache_dir": str(tmp_path / "cache"), "block_size": 32,
                                "tokenizer": str(folder / "tokenizer.json"),
                                "vocab_size": Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()})
    prepared = prepare_data(config, log=lambda *_: None)
    windows = Windows({s: prepared.tokens(s) for s in ("val", "train")},
                      end_of_document(prepared.load_tokenizer(), prepared.eod_token)[1], 32, 6)
    assert {d.split(":")[0] for d in windows.docs} <= {"val", "train"}  # validation documents first
    x, y = windows.batch(range(rows[0]["windows"]), "cpu")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()
    with torch.no_grad():
        theirs = F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten(), ignore_index=-100).item()
    assert rows[0]["base_val_loss"] == pytest.approx(theirs, rel=1e-5)
    assert_plotted(tmp_path / "probe" / "probe.png")


def test_diagnostics_of_a_transformers_checkpoint(tmp_path, monkeypatch, source):
    _, data = source
    folder = build("qwen3", tmp_path / "qwen3", tokenizer_file(tmp_path / "tokenizer"))
    run_analyze(monkeypatch, "diagnostics", folder, f"--data={data}", f"--cache_dir={tmp_path / 'cache'}",
                "--block_size=16", "--batch_size=2", f"--out_dir={tmp_path / 'out'}")
    rows = [json.loads(line) for line in (tmp_path / "out" / "diagnostics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["sites"][:4] == ["block0.attn", "block0.q", "block0.k", "block0.mlp"]
    assert len(rows[0]["attn_entropy"]) == 2 and all(np.isfinite(rows[0]["input_rms"]))
    assert_plotted(tmp_path / "out" / "diagnostics.png", (1320, 512))


def test_the_recentering_predictor_runs_on_a_transformers_checkpoint(source, tmp_path, monkeypatch):
    """`analyze.py recentering gpt2`: one pretrained model's probe and input statistics, one record per
    LayerNorm site, each joined with the probe's Δ for that site."""
    folder, _ = source
    out = tmp_path / "out"
    run_analyze(monkeypatch, "recentering", folder, f"--data={document_files(tmp_path / 'docs')}",
                f"--cache_dir={tmp_path / 'cache'}", "--block_size=32", "--screen=3", "--max_windows=6", f"--out_dir={out}")
    report = json.loads((out / "recentering.json").read_text())
    probe_rows = {r["site"]: r for r in json.loads((out / "probe.json").read_text())}
    assert [r["site"] for r in report["records"]] == ["block0.attn", "block0.mlp", "block1.attn", "block1.mlp", "final"]
    for r in report["records"]:
        assert r["norm"] == "LayerNorm" and r["recenters"] is True and r["delta"] == probe_rows[r["site"]]["delta"]
        assert r["needs"] == (probe_rows[r["site"]]["decision"] == "above")  # one model: its probe's decisions
        assert 0 <= r["mean_share"] <= 1 and r["input_rms"] > 0
    assert report["n_runs"] == 1 and report["needs_rule"].startswith("decided above")
    assert_plotted(out / "recentering.png")


def test_sampling_a_transformers_checkpoint_is_its_greedy_continuation(source):
    folder, _ = source
    out = io.StringIO()
    texts = sample.generate_samples(sample.parse_args([str(folder), "--prompt", "def ", "--num_samples", "1",
                                                       "--max_new_tokens", "12", "--temperature", "0",
                                                       "--device", "cpu"]), out)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    prompt = torch.tensor([[tokenizer.token_to_id("<|endoftext|>"), *tokenizer.encode("def ").ids]])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()
    theirs.generation_config.eos_token_id = None
    greedy = theirs.generate(prompt, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(prompt),
                             pad_token_id=0)
    assert texts == ["def " + tokenizer.decode(greedy[0, prompt.size(1):].tolist(), skip_special_tokens=False)]
    assert "--- sample 1 ---" in out.getvalue()


WITHOUT_TRANSFORMERS = "import runpy, sys; sys.modules['transformers'] = None; sys.argv = sys.argv[1:]; " \
                       "runpy.run_path(sys.argv[0], run_name='__main__')"


@pytest.mark.slow
def test_without_transformers_the_interop_is_one_line_and_nothing_else_breaks(source, tiny_config, tmp_path):
    folder, _ = source
    config = tiny_config(max_steps=2, eval_interval=2)

    def run(*args, **env):
        return subprocess.run([sys.executable, "-c", WITHOUT_TRANSFORMERS, *map(str, args)], cwd=ROOT, text=True,
                              capture_output=True, timeout=300, env={**os.environ, **env})
    trained = run("train.py", "configs/tiny.toml", f"--out_dir={config.out_dir}", f"--cache_dir={config.cache_dir}",
                  "--max_steps=2", "--eval_interval=2")
    assert trained.returncode == 0 and "done: step 2" in trained.stdout, trained.stderr[-2000:]
    needs = "needs transformers: pip install normgpt[hf]"
    for args, message in [
        (["export.py", config.out_dir, tmp_path / "out"], f"error: export.py {needs}"),
        (["train.py", "configs/tiny.toml", f"--init_from={folder}", f"--out_dir={tmp_path / 'ft'}"],
         f"error: {str(folder)!r} is a transformers checkpoint: reading it {needs}"),
        (["sample.py", folder], f"error: {str(folder)!r} is a transformers checkpoint: reading it {needs}"),
        (["analyze.py", "probe", folder], f"error: {str(folder)!r} is a transformers checkpoint: reading it {needs}"),
    ]:
        done = run(*args)
        assert done.returncode == 2 and done.stderr.splitlines() == [message], done.stderr[-2000:]
    assert not (tmp_path / "out").exists() and not (tmp_path / "ft").exists()
    sampled = run("sample.py", config.out_dir, "--num_samples", "1", "--max_new_tokens", "5")
    assert sampled.returncode == 0 and "--- sample 1 ---" in sampled.stdout, sampled.stderr[-2000:]


@pytest.mark.slow
def test_a_hub_id_that_cannot_be_fetched_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "sample.py", "nobody-here/no-such-model"], cwd=ROOT, text=True,
                          capture_output=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr[-2000:]
    assert done.stderr.startswith("error: no folder 'nobody-here/no-such-model' here, and no hub to ask: as a hub id "
                                  "it needs the Hugging Face hub")
