"""The prepare step at scale: the same tokens as the whole-corpus reference pipeline, whatever the number
of workers; a cache key that does not read the corpus but notices a changed file; existing tokenizer
files; streaming that stops at hf_max_documents."""
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

import data.prepare
from config import UserError
from data.prepare import prepare_data
from data.tokenizer import train_tokenizer
from repo import ROOT, config_for

QUIET = dict(log=lambda *_: None)


def write_corpus(folder, n=40):
    """Files with code, prose, CRLF line ends, non-ASCII text, and an empty file."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        text = f"# file {i}\ndef f{i}(x):\n    return x * {i}  # état {i % 7}\n" * (1 + i % 4)
        if i % 5 == 0:
            text += "Some prose, for a change: the quick brown fox.\r\n" * (i % 3 + 1)
        (folder / f"doc{i:02d}.txt").write_bytes(text.encode("utf-8"))
    (folder / "empty.txt").write_text("  \n")
    return folder


def reference_pipeline(paths, vocab_size, val_fraction):
    """The data pipeline without streaming, in a few lines: every document in a list (loaded through
    datasets' text builder), split by the hash of each whole document, BPE trained on the whole
    training split, encode_batch, one concatenation."""
    import datasets
    docs = [d for d in datasets.load_dataset("text", data_files=paths, sample_by="document",
                                             split="train")["text"] if d.strip()]
    def to_val(d):
        return int.from_bytes(hashlib.sha1(d.encode()).digest()[:8], "big") / 2**64 < val_fraction
    train, val = [d for d in docs if not to_val(d)], [d for d in docs if to_val(d)]
    tokenizer = train_tokenizer(train, vocab_size)
    eod = tokenizer.token_to_id("<|endoftext|>")
    def encode(split):
        return np.concatenate([np.asarray(e.ids + [eod], dtype=np.uint16)
                               for e in tokenizer.encode_batch(split, add_special_tokens=False)])
    return tokenizer.to_str(), encode(train).tobytes(), encode(val).tobytes()


def files_of(prepared):
    folder = Path(prepared.directory)
    return [(folder / name).read_bytes() for name in ("tokenizer.json", "train.bin", "val.bin")]


def test_same_tokens_as_the_reference_pipeline(tmp_path, monkeypatch):
    folder = write_corpus(tmp_path / "docs")
    monkeypatch.setattr(data.prepare, "CHUNK_BYTES", 300)  # many chunks, several in flight at once
    prepared = prepare_data(config_for(tmp_path, str(folder / "*.txt"), prepare_workers=2, val_fraction=0.2), **QUIET)
    tokenizer_json, train, val = files_of(prepared)
    expected = reference_pipeline(sorted(str(p) for p in folder.glob("*.txt")), 300, 0.2)
    assert Tokenizer.from_str(tokenizer_json.decode()).to_str() == expected[0]
    assert train == expected[1] and val == expected[2] and len(val) > 0


def test_the_number_of_workers_does_not_change_the_output(tmp_path, monkeypatch):
    folder = write_corpus(tmp_path / "docs")
    monkeypatch.setattr(data.prepare, "CHUNK_BYTES", 200)
    outputs = [prepare_data(config_for(tmp_path / str(n), str(folder / "*.txt"), prepare_workers=n), **QUIET)
               for n in (1, 2)]
    assert files_of(outputs[0]) == files_of(outputs[1])
    assert outputs[0].unigram_entropy == outputs[1].unigram_entropy
    assert outputs[0].corpus_hash == outputs[1].corpus_hash


def test_a_warm_start_reads_no_document_and_a_changed_file_is_noticed(tmp_path, monkeypatch):
    folder = write_corpus(tmp_path / "docs", n=10)
    config = config_for(tmp_path, str(folder / "*.txt"))
    first = prepare_data(config, **QUIET)
    with monkeypatch.context() as m:  # the cache is found without reading any document
        m.setattr(data.prepare, "iter_documents", lambda *_: pytest.fail("a warm start read the corpus"))
        messages = []
        assert prepare_data(config, log=messages.append).directory == first.directory
        assert "from cache" in messages[0]
    path = folder / "doc03.txt"
    stat = path.stat()
    path.write_bytes(path.read_bytes().upper())  # same size ...
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # ... a later mtime
    changed = prepare_data(config, **QUIET)
    assert changed.directory != first.directory and changed.corpus_hash != first.corpus_hash
    path.write_text("shorter\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same mtime, another size
    assert prepare_data(config, **QUIET).directory not in (first.directory, changed.directory)


@pytest.mark.slow
def test_several_processes_prepare_once(tmp_path):
    """Three processes start on a missing cache at once: one builds it, the others wait on the lock
    (or poll, with build=False) and read the same folder."""
    folder = write_corpus(tmp_path / "docs", n=20)
    code = f"""
import sys
from config import load_config
from data.prepare import prepare_data
config = load_config(None, {{"data": {str(folder / '*.txt')!r}, "cache_dir": {str(tmp_path / 'cache')!r},
                            "vocab_size": 300, "n_layer": 1, "n_head": 1, "n_embd": 8}})
print(prepare_data(config, log=lambda m: print(m.split(":")[0], "from cache" in m), build=sys.argv[1] == "1").directory)
"""
    procs = [subprocess.Popen([sys.executable, "-c", code, str(int(i < 2))], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-1000:] for _, err in outs]
    assert len({out.split()[-1] for out, _ in outs}) == 1
    assert sum("data False" in out for out, _ in outs) == 1  # built once
    assert not list((tmp_path / "cache").glob("*.tmp*"))


def save_tokenizer(path, special_tokens, vocab_size=280):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["hello world, " * 20, "def f(x): return x\n" * 20], trainer=trainer)
    tokenizer.save(str(path))
    return path


def test_a_tokenizer_file_is_used_as_given(tmp_path):
    path = save_tokenizer(tmp_path / "tok.json", ["<pad>", "</s>"])
    folder = write_corpus(tmp_path / "docs")
    prepared = prepare_data(config_for(tmp_path, str(folder / "*.txt"), tokenizer=str(path), val_fraction=0.2), **QUIET)
    assert Path(prepared.tokenizer_path).read_bytes() == path.read_bytes()
    assert prepared.eod_token == "</s>"
    tokenizer = Tokenizer.from_file(str(path))
    eod = tokenizer.token_to_id("</s>")
    tokens = np.asarray(prepared.tokens("train"))
    docs = tokenizer.decode(tokens.tolist(), skip_special_tokens=False).split("</s>")
    assert docs[-1] == "" and len(docs) - 1 == prepared.n_train_documents == np.count_nonzero(tokens == eod)
    originals = {p.read_text() for p in folder.glob("doc*.txt")}
    assert set(docs[:-1]) <= originals  # each document round-trips through the given tokenizer
    named = prepare_data(config_for(tmp_path, str(folder / "*.txt"), tokenizer=str(path), val_fraction=0.2,
                                    eod_token="<pad>"), **QUIET)
    assert named.eod_token == "<pad>" and named.directory != prepared.directory


@pytest.mark.parametrize("specials, extra, message", [
    (["<pad>"], {}, r"has no end-of-document token among its special tokens \(<pad>\); name one with eod_token"),
    (["</s>"], {"eod_token": "<eos>"}, r"has no token '<eos>' \(eod_token\)"),
    (["</s>"], {"vocab_size": 260}, r"has 2\d\d tokens, more than vocab_size 260; set vocab_size to at least 2\d\d$"),
    (None, {}, r"tokenizer file '.*missing.json' does not exist"),
])
def test_bad_tokenizer_files_are_one_line(tmp_path, specials, extra, message):
    path = save_tokenizer(tmp_path / "tok.json", specials) if specials else tmp_path / "missing.json"
    write_corpus(tmp_path / "docs", n=5)
    config = config_for(tmp_path, str(tmp_path / "docs" / "*.txt"), tokenizer=str(path), **extra)
    with pytest.raises(UserError, match=message) as error:
        prepare_data(config, **QUIET)
    assert "\n" not in str(error.value)


def test_streaming_stops_at_hf_max_documents(tmp_path, caplog):
    """A local dataset folder whose later files are not JSON: streaming that reads past the first
    hf_max_documents rows would fail on them, and a non-streaming load does."""
    folder = tmp_path / "dataset"
    folder.mkdir()
    rows = [{"text": f"# doc {i}\nx = {i}\n"} for i in range(50)]
    (folder / "train-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for i in range(1, 4):
        (folder / f"train-{i:05d}.jsonl").write_text("this is not JSON {\n" * 100)
    config = config_for(tmp_path, f"hf:{folder}", hf_streaming=True, hf_max_documents=30)
    prepared = prepare_data(config, **QUIET)
    assert prepared.n_train_documents + prepared.n_val_documents == 30
    # without streaming, datasets builds its cache of every file first and fails on the first that is
    # not JSON (its log names the file)
    failed = rf"could not load dataset {re.escape(repr(str(folder)))} \(split 'train'\): An error occurred while generating the dataset$"
    with pytest.raises(UserError, match=failed):
        prepare_data(config_for(tmp_path / "not_streamed", f"hf:{folder}", hf_max_documents=30), **QUIET)
    assert any("Failed to load JSON" in r.getMessage() and "train-00001.jsonl" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_the_prepare_command_and_a_warm_start_without_datasets(tmp_path):
    """python -m data.prepare prints the cache folder; a second start finds it in well under 2 s
    without importing datasets, even for a dataset folder."""
    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": f"row {i}\n" * 5}) + "\n" for i in range(60)))
    args = [sys.executable, "-m", "data.prepare", str(ROOT / "configs" / "tiny.toml"), f"--data=hf:{folder}",
            f"--cache_dir={tmp_path / 'cache'}", "--vocab_size=300", "--workers", "1"]
    first = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert Path(first.stdout.strip().splitlines()[-1], "meta.json").is_file()
    code = f"""
import sys, time
from config import load_config
from data.prepare import prepare_data
config = load_config({str(ROOT / 'configs' / 'tiny.toml')!r}, {{"data": "hf:{folder}", "cache_dir": {str(tmp_path / 'cache')!r}, "vocab_size": 300}})
start = time.time()
prepared = prepare_data(config, log=lambda *a: None)
print(time.time() - start, "datasets" in sys.modules, prepared.directory)
"""
    warm = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    seconds, imported, directory = warm.stdout.split()
    assert float(seconds) < 2 and imported == "False" and directory == first.stdout.strip().splitlines()[-1]
    bad = subprocess.run(args[:4] + ["--workers=-1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --workers must be >= 0, got -1"
