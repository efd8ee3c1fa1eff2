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

_worker = {}  # this worker process's tokenizer, end-of-document id and token dtype


def _init_worker(tokenizer_path, eod_id, dtype):
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers are the parallelism
    tokenizer = Tokenizer.from_file(tokenizer_path)
    # encode_batch_fast (tokenizers >= 0.21) skips the character offsets, which are not needed
    _worker.update(encode=getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch),
                   eod=eod_id, dtype=dtype)


def encode_documents(documents):
    """One array: each document's tokens followed by the end-of-document token."""
    ids, eod = [], _worker["eod"]
    for enc in _worker["encode"](documents, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eod)
    return np.array(ids, dtype=_worker["dtype"])


def encode_splits(splits):
    return [encode_documents(docs) for docs in splits]


def encode_chunks(chunks, tokenizer_path, eod_id, dtype, workers):
    """For each (splits, info) in chunks, where splits is a tuple of document lists, yield
    (info, [token array per split]) in the order of chunks."""
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    # fork: workers start in milliseconds and do not re-import the caller's script (train.py would
    # pull in torch in each one). The variable keeps tokenizers from warning about its thread pool
    # in forked children; it is restored once the workers exist.
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = multiprocessing.get_context(method).Pool(workers, _init_worker, (tokenizer_path, eod_id, dtype))
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM")
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    finished = False
    try:
        pending = collections.deque()
        for splits, info in chunks:
            pending.append((info, pool.apply_async(encode_splits, (splits,))))
            if len(pending) >= 2 * workers:  # Pool.imap would read the whole corpus ahead
                info, result = pending.popleft()
                yield info, result.get()
        while pending:
            info, result = pending.popleft()
            yield info, result.get()
        finished = True
    finally:
        pool.close() if finished else pool.terminate()  # on an error (or a break), stop busy workers
        pool.join()
