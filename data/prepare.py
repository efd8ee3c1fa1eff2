"""Turn documents into a tokenizer and token memmaps, cached by (source manifest, vocab size, ...).

    python -m data.prepare configs/default.toml [--key=value ...] [--workers N]

builds the cache for a config's data and prints its folder; train.py calls the same code when the
cache is missing. The tokenizer is byte-level BPE trained on a bounded sample of the training split
(or an existing tokenizer.json), with an end-of-document token after every document. Documents are
streamed in chunks, tokenized by worker processes and appended to train.bin / val.bin as they come,
so memory does not grow with the corpus. Tokens are uint16 when the vocabulary fits, else uint32.
"""
import fcntl
import hashlib
import json
import os
import resource
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
from tqdm import tqdm

from config import UserError
from data.corpus import (CorpusHash, cut_by_lines, goes_to_val, iter_documents, manifest_bytes,
                         manifest_digest, source_manifest, split_mode)
from data.encode import EncoderPool
from data.tokenizer import END_OF_DOCUMENT, load_tokenizer_file, train_tokenizer, training_sample

CACHE_FORMAT = 2  # bump when the files a cache folder holds change meaning
CHUNK_BYTES = 1 << 20  # text per chunk sent to a worker: large enough to amortize the pickling


@dataclass
class PreparedData:
    directory: str  # the cache folder holding tokenizer.json, train.bin, val.bin
    dtype: str
    corpus_hash: str  # sha256 of every document, computed while preparing
    tokenizer_hash: str
    n_train_tokens: int
    n_val_tokens: int
    n_train_documents: int
    n_val_documents: int
    unigram_entropy: float  # nats/token of the training split's token frequencies
    eod_token: str = END_OF_DOCUMENT
    stats: dict = field(default_factory=dict)  # how it was built: bytes, seconds, workers

    @property
    def tokenizer_path(self):
        return str(Path(self.directory) / "tokenizer.json")

    def load_tokenizer(self):
        from tokenizers import Tokenizer
        return Tokenizer.from_file(self.tokenizer_path)

    def tokens(self, split):
        """A read-only memmap of the "train" or "val" tokens."""
        return np.memmap(Path(self.directory) / f"{split}.bin", dtype=self.dtype, mode="r")


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def unigram_entropy(counts):
    counts = counts.astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def cache_folder(config):
    """The cache folder for config's data, named without reading the corpus: a hash of the source
    manifest (files' path, size and mtime; a hub dataset's coordinates) and of how it is tokenized."""
    recipe = {"format": CACHE_FORMAT, "source": source_manifest(config),
              "vocab_size": config.vocab_size, "val_fraction": config.val_fraction}
    if config.tokenizer:
        if not os.path.isfile(config.tokenizer):
            raise UserError(f"tokenizer file {config.tokenizer!r} does not exist (tokenizer = path to a tokenizer.json)")
        st = os.stat(config.tokenizer)
        recipe["tokenizer"] = [os.path.abspath(config.tokenizer), st.st_size, st.st_mtime_ns, config.eod_token]
    else:
        recipe["tokenizer_train_bytes"] = config.tokenizer_train_bytes
    key = manifest_digest(recipe)[:16]
    return Path(config.cache_dir) / f"{key}-vocab{config.vocab_size}-val{config.val_fraction:g}", recipe


def read_prepared(folder):
    meta = folder / "meta.json"
    if not meta.is_file():
        return None
    known = {f.name for f in fields(PreparedData)}
    values = {k: v for k, v in json.loads(meta.read_text()).items() if k in known}
    return PreparedData(**{**values, "directory": str(folder)})


@contextmanager
def file_lock(path, log, what):
    """Hold an exclusive lock on path; while another process holds it, say so every 30 s."""
    with open(path, "a") as f:
        start = last = time.time()
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.time() - last >= 30:
                    log(f"data: waiting for another process to {what} ({time.time() - start:.0f}s)")
                    last = time.time()
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_data(config, log=print, build=True):
    """The tokenizer and token files for config's data: from the cache when they are there, else
    built here. Several processes may call it at once: one builds (holding a lock file), the others
    wait for it. With build=False this process never builds, it polls until the cache is ready
    (the non-main ranks of a multi-process launch)."""
    folder, recipe = cache_folder(config)
    prepared = read_prepared(folder)
    if prepared is None and not build:
        prepared = wait_for(folder, log)
    if prepared is None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(folder.with_name(folder.name + ".lock"), log, f"prepare {folder}"):
            prepared = read_prepared(folder)  # another process may have built it meanwhile
            if prepared is None:
                return build_cache(config, folder, recipe, log)
    log(f"data: {config.data} (corpus {prepared.corpus_hash[:12]}) from cache {folder}")
    return prepared


def wait_for(folder, log, poll_s=1.0):
    start = last = time.time()
    while (prepared := read_prepared(folder)) is None:
        if time.time() - last >= 60:
            log(f"data: waiting for the main process to prepare {folder} ({time.time() - start:.0f}s)")
            last = time.time()
        time.sleep(poll_s)
    return prepared


def split_chunks(documents, mode, val_fraction, corpus_hash):
    """Documents -> ((train docs, val docs), (n train docs, n val docs, bytes)) chunks of about
    CHUNK_BYTES of text, hashing every document on the way."""
    train, val, size = [], [], 0
    for doc in documents:
        raw = doc.encode("utf-8")
        corpus_hash.update(raw)
        size += len(raw)
        if mode == "documents":
            (val if goes_to_val(raw, val_fraction) else train).append(doc)
        else:
            train_part, val_part = cut_by_lines(doc, val_fraction)
            train.extend([train_part] if train_part else [])
            val.extend([val_part] if val_part else [])
        if size >= CHUNK_BYTES:
            yield (train, val), (len(train), len(val), size)
            train, val, size = [], [], 0
    if train or val:
        yield (train, val), (len(train), len(val), size)


def train_documents(config, mode):
    """The training split's documents, streamed (for the tokenizer's sample)."""
    for (train, _), _ in split_chunks(iter_documents(config), mode, config.val_fraction, CorpusHash()):
        yield from train


def cpu_seconds():
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def summary(manifest):
    files = manifest.get("stdlib") or manifest.get("files") or []
    return {**{k: v for k, v in manifest.items() if k not in ("stdlib", "files")},
            "files": len(files), "bytes": sum(size for _, size, _ in files)}


def build_cache(config, folder, recipe, log):
    t0 = time.time()
    mode = split_mode(iter_documents(config), config.val_fraction)
    if mode is None:
        raise UserError(f"data {config.data!r} holds no non-empty documents")
    tmp = folder.with_name(f"{folder.name}.tmp-{os.uname().nodename}-{os.getpid()}")  # renamed when complete
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        prepared = write_cache(config, tmp, mode, manifest_bytes(recipe["source"]), log)
        prepared.stats["seconds"] = round(time.time() - t0, 2)
        prepared.directory = str(folder)
        built_from = {**recipe, "source": summary(recipe["source"])}  # not every file's entry: meta.json stays small
        (tmp / "meta.json").write_text(json.dumps({**prepared.__dict__, "built_from": built_from}, indent=2) + "\n")
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "meta.json").is_file():
                raise
            # another machine sharing the cache folder (where the lock may not reach) finished first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"data: {config.data} (corpus {prepared.corpus_hash[:12]}): {prepared.n_train_documents} train / "
        f"{prepared.n_val_documents} val documents, {prepared.n_train_tokens:,} / {prepared.n_val_tokens:,} "
        f"tokens, prepared in {time.time() - t0:.1f}s -> {folder}")
    return prepared


def make_tokenizer(config, tmp, mode, log):
    """tokenizer.json in tmp: the given file as it is, or BPE trained on a sample of the training
    split. Returns its path and its end-of-document token's name and id."""
    path = str(tmp / "tokenizer.json")
    if config.tokenizer:
        _, eod_name, eod_id = load_tokenizer_file(config.tokenizer, config.eod_token, config.vocab_size)
        shutil.copyfile(config.tokenizer, path)  # used exactly as given
        return path, eod_name, eod_id
    t0 = time.time()
    sample = training_sample(train_documents(config, mode), config.tokenizer_train_bytes)
    tokenizer = train_tokenizer(tqdm(sample, desc="tokenizer sample", unit=" docs", disable=None), config.vocab_size)
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise UserError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, more than vocab_size {config.vocab_size}")
    tokenizer.save(path)
    log(f"data: tokenizer trained in {time.time() - t0:.1f}s")
    return path, END_OF_DOCUMENT, tokenizer.token_to_id(END_OF_DOCUMENT)


def encode_corpus(config, tmp, mode, total_bytes, pool, tokenizer_path, eod_id, dtype):
    """train.bin and val.bin in tmp, appended chunk by chunk; returns the counts and hash."""
    counts = np.zeros(config.vocab_size, dtype=np.int64)  # unigram counts of the training tokens
    n_tokens, n_docs, n_bytes = [0, 0], [0, 0], 0
    digest = CorpusHash()
    chunks = split_chunks(iter_documents(config), mode, config.val_fraction, digest)
    with open(tmp / "train.bin", "wb") as train_file, open(tmp / "val.bin", "wb") as val_file, \
            tqdm(total=total_bytes, unit="B", unit_scale=True, desc="encode", disable=None) as bar:
        for (n_train, n_val, size), arrays in pool.encode(chunks, tokenizer_path, eod_id, dtype):
            for i, (out, tokens) in enumerate(zip((train_file, val_file), arrays)):
                tokens.tofile(out)
                n_tokens[i] += len(tokens)
            counts += np.bincount(arrays[0], minlength=config.vocab_size)
            n_docs[0] += n_train
            n_docs[1] += n_val
            n_bytes += size
            bar.update(size)
            bar.set_postfix(docs=f"{sum(n_docs):,}", refresh=False)
    return dict(corpus_hash=digest.hexdigest(), n_train_tokens=n_tokens[0], n_val_tokens=n_tokens[1],
                n_train_documents=n_docs[0], n_val_documents=n_docs[1],
                unigram_entropy=unigram_entropy(counts)), n_bytes


def write_cache(config, tmp, mode, total_bytes, log):
    """tokenizer.json, train.bin and val.bin into the folder tmp; returns their PreparedData."""
    dtype = "uint16" if config.vocab_size < 2**16 else "uint32"
    t0 = time.time()
    # the workers start before BPE training, while this process is small: forked workers
    # inherit (and are charged for) the memory their parent holds
    with EncoderPool(config.prepare_workers or os.cpu_count() or 1) as pool:
        tokenizer_path, eod_name, eod_id = make_tokenizer(config, tmp, mode, log)
        t1, cpu1 = time.time(), cpu_seconds()
        counted, n_bytes = encode_corpus(config, tmp, mode, total_bytes, pool, tokenizer_path, eod_id, dtype)
    encode_s, encode_cpu = time.time() - t1, cpu_seconds() - cpu1  # the workers' CPU counts once they exit
    log(f"data: encoded {n_bytes / 1e6:.1f} MB with {pool.workers} workers in {encode_s:.1f}s "
        f"({n_bytes / 1e6 / max(encode_s, 1e-9):.2f} MB/s, {encode_cpu:.1f} CPU-s)")
    return PreparedData(
        directory=str(tmp), dtype=dtype, tokenizer_hash=file_sha256(tokenizer_path), eod_token=eod_name,
        **counted, stats={"bytes": n_bytes, "workers": pool.workers, "tokenizer_seconds": round(t1 - t0, 2),
                          "encode_seconds": round(encode_s, 2), "encode_cpu_seconds": round(encode_cpu, 2)})


def check_data_size(prepared, block_size):
    for split, n in (("train", prepared.n_train_tokens), ("val", prepared.n_val_tokens)):
        if n < block_size + 1:
            raise UserError(f"the {split} split has only {n} tokens, fewer than one context window "
                            f"(block_size + 1 = {block_size + 1}); give more data or a smaller block_size")


def main():
    from dataclasses import replace

    from config import ArgumentParser, check_folder, load_config
    parser = ArgumentParser(prog="python -m data.prepare", description="Build the data cache (tokenizer, train.bin, val.bin) "
                                     "for a config's data and print its folder.")
    parser.add_argument("config", help="a TOML config, e.g. configs/default.toml; --key=value overrides follow it")
    parser.add_argument("--workers", type=int, help="tokenizer processes (default: prepare_workers, 0 = all CPUs)")
    args, overrides = parser.parse_known_args()
    config = load_config(args.config, overrides)
    if args.workers is not None:
        if args.workers < 0:
            raise UserError(f"--workers must be >= 0, got {args.workers}")
        config = replace(config, prepare_workers=args.workers)
    check_folder(config.cache_dir, "cache_dir")
    print(prepare_data(config).directory)


if __name__ == "__main__":
    from config import run_main
    run_main(main)
