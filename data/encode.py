"""Tokenize chunks of documents in worker processes: in order, with few chunks in flight.

Each worker is one process running the tokenizer single-threaded, so N workers use N cores, and the
per-document Python work (turning ids into arrays) runs in parallel too instead of behind one GIL.
Results come back in the order the chunks went out, so the output is byte-identical whatever N is;
at most 2 * N chunks are in flight, so memory does not grow with the corpus.
"""
import collections
import multiprocessing
import os

import numpy as np
from tokenizers import Tokenizer

_worker = {}  # this worker process's tokenizer, loaded on its first chunk


def _encoder(tokenizer_path):
    if _worker.get("path") != tokenizer_path:
        tokenizer = Tokenizer.from_file(tokenizer_path)
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets, which are not needed
        _worker.update(path=tokenizer_path, encode=getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch))
    return _worker["encode"]


def encode_documents(documents, tokenizer_path, eod_id, dtype):
    """One array: each document's tokens followed by the end-of-document token."""
    ids = []
    for enc in _encoder(tokenizer_path)(documents, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eod_id)
    return np.array(ids, dtype=dtype)


def _encode_splits(splits, *tokenizer):
    return [encode_documents(docs, *tokenizer) for docs in splits]


class EncoderPool:
    """N tokenizer worker processes; each loads the tokenizer file on its first chunk."""
    def __init__(self, workers):
        self.workers = workers
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        # fork: workers start in milliseconds and do not re-import the caller's script (train.py
        # would pull in torch in each). The variable keeps each worker's tokenizer single-threaded
        # (the workers are the parallelism); it is restored once they exist.
        saved = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            self.pool = multiprocessing.get_context(method).Pool(workers)
        finally:
            if saved is None:
                os.environ.pop("TOKENIZERS_PARALLELISM")
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = saved

    def __enter__(self):
        return self

    def __exit__(self, error, *_):
        if error is None:
            self.pool.close()
        else:
            self.pool.terminate()  # stop busy workers
        self.pool.join()  # reaped workers' CPU time shows in RUSAGE_CHILDREN

    def encode(self, chunks, tokenizer_path, eod_id, dtype):
        """For each (splits, info) in chunks, where splits is a tuple of document lists, yield
        (info, [token array per split]) in the order of chunks."""
        pending = collections.deque()
        for splits, info in chunks:
            pending.append((info, self.pool.apply_async(_encode_splits, (splits, tokenizer_path, eod_id, dtype))))
            if len(pending) >= 2 * self.workers:  # Pool.imap would read the whole corpus ahead
                info, result = pending.popleft()
                yield info, result.get()
        while pending:
            info, result = pending.popleft()
            yield info, result.get()
