"""The data path: documents from files / a local datasets folder / the stdlib, tokenizer cache,
memmaps, and batches (seeded, resumable, split across processes, fixed for validation)."""
import json

import numpy as np
import pytest

from config import UserError
from data.batches import IGNORE, TrainBatches, validation_batches
from data.corpus import split_documents, stdlib_documents, stdlib_files
from data.prepare import END_OF_DOCUMENT, check_data_size, prepare_data
from repo import ROOT, config_for

CODE = "def f(x):\n    return x + 1\n\n\nclass A:\n    pass\n"


def write_docs(folder, n=30):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"doc{i:02d}.txt").write_text(f"# file {i}\n" + CODE * (1 + i % 3))
    return folder


def test_local_text_files_keep_newlines_and_round_trip(tmp_path):
    folder = write_docs(tmp_path / "docs")
    config = config_for(tmp_path, str(folder / "*.txt"))
    data = prepare_data(config, log=lambda *_: None)
    assert data.n_train_documents + data.n_val_documents == 30
    assert data.n_val_documents > 0 and data.dtype == "uint16"
    tokenizer = data.load_tokenizer()
    text = tokenizer.decode(data.tokens("train").tolist(), skip_special_tokens=False)
    assert "def f(x):\n    return x + 1\n" in text  # newlines survive (sample_by="document")
    eod = tokenizer.token_to_id(END_OF_DOCUMENT)
    assert np.count_nonzero(np.asarray(data.tokens("train")) == eod) == data.n_train_documents


def test_tokenizer_and_tokens_are_cached_by_corpus_and_vocab(tmp_path):
    folder = write_docs(tmp_path / "docs")
    first = prepare_data(config_for(tmp_path, str(folder)+"/*.txt"), log=lambda *_: None)
    messages = []
    again = prepare_data(config_for(tmp_path, str(folder)+"/*.txt"), log=messages.append)
    assert "from cache" in messages[0] and again.tokenizer_hash == first.tokenizer_hash
    other = prepare_data(config_for(tmp_path, str(folder)+"/*.txt", vocab_size=320), log=lambda *_: None)
    assert other.directory != first.directory
    (folder / "doc00.txt").write_text("changed\n" * 50)
    changed = prepare_data(config_for(tmp_path, str(folder)+"/*.txt"), log=lambda *_: None)
    assert changed.corpus_hash != first.corpus_hash


def test_local_datasets_folder_through_the_hub_code_path(tmp_path):
    """hf:<name> goes through datasets.load_dataset exactly as a hub name would; a local folder of
    JSON lines stands in for the hub, which this machine cannot reach."""
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    rows = [{"content": f"# doc {i}\n" + CODE, "id": i} for i in range(40)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for streaming in (False, True):
        config = config_for(tmp_path, f"hf:{folder}", hf_text_column="content",
                            hf_streaming=streaming, hf_max_documents=25)
        data = prepare_data(config, log=lambda *_: None)
        assert data.n_train_documents + data.n_val_documents == 25
    with pytest.raises(UserError, match="has no column 'text'; its columns are content, id"):
        prepare_data(config_for(tmp_path, f"hf:{folder}"), log=lambda *_: None)


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_text(""), "are empty"),
    (lambda p: p.write_bytes(b"caf\xe9 latin-1\n"), "is not UTF-8 text"),
])
def test_bad_data_files(tmp_path, setup, message):
    path = tmp_path / "input.txt"
    setup(path)
    with pytest.raises(UserError, match=message):
        prepare_data(config_for(tmp_path, str(path)), log=lambda *_: None)


def test_data_smaller_than_one_context_window(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("x = 1\ny = 2\n")
    data = prepare_data(config_for(tmp_path, str(path)), log=lambda *_: None)
    with pytest.raises(UserError, match="fewer than one context window"):
        check_data_size(data, block_size=16)


def test_single_document_is_split_by_lines():
    train, val = split_documents(["line\n" * 100], 0.1)
    assert train == ["line\n" * 90] and val == ["line\n" * 10]


def test_split_is_by_whole_documents_and_deterministic():
    docs = [f"doc {i}\n" for i in range(200)]
    train, val = split_documents(docs, 0.1)
    assert sorted(train + val) == sorted(docs) and 5 <= len(val) <= 40
    assert split_documents(list(reversed(docs)), 0.1)[1] == list(reversed(val))


def test_stdlib_corpus_excludes_tests_and_site_packages():
    files = stdlib_files()
    assert len(files) > 300 and all(f.suffix == ".py" for f in files)
    assert not any({"test", "tests", "idle_test", "site-packages"} & set(f.parts) for f in files)
    assert any(f.name == "functools.py" for f in files)
    assert sum(len(d) for d in stdlib_documents()) > 5_000_000


def test_train_batches_are_seeded_and_resumable():
    tokens = np.arange(1000, dtype=np.uint16)
    a, b = TrainBatches(tokens, 8, 4, seed=1), TrainBatches(tokens, 8, 4, seed=1)
    x1, y1 = a.next()
    assert np.array_equal(x1.numpy(), b.next()[0].numpy())
    assert np.array_equal(y1[:, :-1].numpy(), x1[:, 1:].numpy())  # targets are inputs shifted by one
    state = a.state_dict()
    expected = [a.next()[0] for _ in range(3)]
    c = TrainBatches(tokens, 8, 4, seed=999)
    c.load_state_dict(state)
    assert all(np.array_equal(e.numpy(), c.next()[0].numpy()) for e in expected)


def test_two_processes_see_the_batch_one_process_sees():
    tokens = np.arange(5000, dtype=np.uint16)
    single = TrainBatches(tokens, 8, 6, seed=3)
    ranks = [TrainBatches(tokens, 8, 3, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        whole = single.next()[0].numpy()
        parts = np.concatenate([r.next()[0].numpy() for r in ranks])
        assert np.array_equal(whole, parts)


def test_validation_windows_do_not_depend_on_batch_size_or_processes():
    tokens = np.arange(3000, dtype=np.uint16)
    def rows(batch_size, rank=0, world_size=1, n_windows=20):
        return [bytes(x[i].numpy()) for x, _, n_real in validation_batches(tokens, 16, batch_size, n_windows, rank, world_size)
                for i in range(n_real)]
    once = rows(4)
    assert len(once) == 20 and rows(4) == once
    assert rows(8) == once  # 3 batches (8, 8, 4) hold the same 20 windows
    assert sorted(rows(2, 0, 2) + rows(2, 1, 2)) == sorted(once)
    for world_size in (2, 3, 7):
        for batch_size in (1, 3, 16):
            for n_windows in (1, 5, 20):
                alone = rows(batch_size, n_windows=n_windows)
                shared = [r for rank in range(world_size) for r in rows(batch_size, rank, world_size, n_windows)]
                assert sorted(shared) == sorted(alone), (world_size, batch_size, n_windows)


def test_every_process_runs_the_same_validation_forwards_and_padding_carries_no_target():
    """Under FSDP a process that ran out of validation batches early would leave the others hanging."""
    tokens = np.arange(3000, dtype=np.uint16)
    for world_size, batch_size, n_windows in [(8, 16, 800), (2, 4, 5), (3, 2, 1), (4, 8, 33)]:
        shapes = []
        for rank in range(world_size):
            batches = list(validation_batches(tokens, 16, batch_size, n_windows, rank, world_size))
            shapes.append([tuple(x.shape) for x, _, _ in batches])
            for x, y, n_real in batches:
                assert (y[n_real:] == IGNORE).all() and (y[:n_real] != IGNORE).all()
                assert (x >= 0).all()  # the padding rows are real tokens (the first window), not IGNORE
        assert all(s == shapes[0] for s in shapes), (world_size, batch_size, n_windows, shapes)
    assert [n for _, _, n in validation_batches(tokens, 16, 4, 5, rank=1, world_size=2)] == [2]  # 3 + 2 windows
    assert [n for _, _, n in validation_batches(tokens, 16, 2, 1, rank=2, world_size=3)] == [0]  # padding only


@pytest.mark.slow
def test_the_embedded_corpus_does_not_need_datasets(shared_cache):
    """The GPU machines have no `datasets`: training on the stdlib corpus must never import it."""
    import subprocess
    import sys
    code = f"""
import sys
class BlockDatasets:
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] == 'datasets':
            raise ImportError('datasets is blocked in this test')
sys.meta_path.insert(0, BlockDatasets())
import train, sample, compare
from config import load_config
from data.prepare import prepare_data
prepare_data(load_config('configs/tiny.toml', {{'cache_dir': {shared_cache!r}}}), log=lambda *a: None)
print('ok')
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
