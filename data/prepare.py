"""Turn documents into a trained tokenizer and token memmaps, cached by (corpus hash, vocab size).

The tokenizer is byte-level BPE trained on the training split only, with an end-of-document token
placed between documents. Tokens are stored as uint16 when the vocabulary fits, else uint32.
"""
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from config import UserError
from data.corpus import corpus_hash, load_documents, split_documents

END_OF_DOCUMENT = "<|endoftext|>"


@dataclass
class PreparedData:
    directory: str  # the cache folder holding tokenizer.json, train.bin, val.bin
    dtype: str
    corpus_hash: str
    tokenizer_hash: str
    n_train_tokens: int
    n_val_tokens: int
    n_train_documents: int
    n_val_documents: int
    unigram_entropy: float  # nats/token of the training split's token frequencies

    @property
    def tokenizer_path(self):
        return str(Path(self.directory) / "tokenizer.json")

    def load_tokenizer(self):
        return Tokenizer.from_file(self.tokenizer_path)

    def tokens(self, split):
        """A read-only memmap of the "train" or "val" tokens."""
        return np.memmap(Path(self.directory) / f"{split}.bin", dtype=self.dtype, mode="r")


def file_sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def train_tokenizer(documents, vocab_size):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_DOCUMENT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


def encode_documents(tokenizer, documents, dtype):
    """All documents' tokens, each followed by the end-of-document token. encode_batch per chunk of
    documents: one giant encode() of the whole corpus is slower and takes gigabytes."""
    eod = tokenizer.token_to_id(END_OF_DOCUMENT)
    pieces = []
    for start in range(0, len(documents), 256):
        for enc in tokenizer.encode_batch(documents[start:start + 256], add_special_tokens=False):
            pieces.append(np.asarray(enc.ids + [eod], dtype=dtype))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def unigram_entropy(tokens, vocab_size):
    counts = np.bincount(tokens, minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def prepare_data(config, log=print):
    """Build (or reuse from cache) the tokenizer and token files for config's data and vocab size."""
    t0 = time.time()
    docs = load_documents(config)
    digest = corpus_hash(docs)
    key = f"{digest[:16]}-vocab{config.vocab_size}-val{config.val_fraction:g}"
    cache = Path(config.cache_dir) / key
    meta_path = cache / "meta.json"
    if meta_path.is_file():
        prepared = PreparedData(**{**json.loads(meta_path.read_text()), "directory": str(cache)})
        log(f"data: {config.data} (corpus {digest[:12]}) from cache {cache}")
        return prepared

    train_docs, val_docs = split_documents(docs, config.val_fraction)
    tokenizer = train_tokenizer(train_docs, config.vocab_size)
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise UserError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, more than vocab_size {config.vocab_size}")
    dtype = "uint16" if config.vocab_size < 2**16 else "uint32"
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")  # built aside, renamed when complete
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer.save(str(tmp / "tokenizer.json"))
    splits = {}
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        tokens = encode_documents(tokenizer, split_docs, dtype)
        tokens.tofile(tmp / f"{split}.bin")
        splits[split] = tokens
    prepared = PreparedData(
        directory=str(cache), dtype=dtype, corpus_hash=digest,
        tokenizer_hash=file_sha256(tmp / "tokenizer.json"),
        n_train_tokens=len(splits["train"]), n_val_tokens=len(splits["val"]),
        n_train_documents=len(train_docs), n_val_documents=len(val_docs),
        unigram_entropy=unigram_entropy(splits["train"], config.vocab_size))
    (tmp / "meta.json").write_text(json.dumps(prepared.__dict__, indent=2) + "\n")
    if cache.exists():  # another process finished first; theirs is identical
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, cache)
    log(f"data: {config.data} (corpus {digest[:12]}): {len(train_docs)} train / {len(val_docs)} val "
        f"documents, {prepared.n_train_tokens:,} / {prepared.n_val_tokens:,} tokens, "
        f"prepared in {time.time() - t0:.1f}s -> {cache}")
    return prepared


def check_data_size(prepared, block_size):
    for split, n in (("train", prepared.n_train_tokens), ("val", prepared.n_val_tokens)):
        if n < block_size + 1:
            raise UserError(f"the {split} split has only {n} tokens, fewer than one context window "
                            f"(block_size + 1 = {block_size + 1}); give more data or a smaller block_size")
