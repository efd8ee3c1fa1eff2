"""Hand-made corpora for the probe's tests: random documents, each followed by a separator token."""
import numpy as np

from study.probe import Windows

SEP = 0


def corpus(lengths, vocab=300, seed=0):
    """Random tokens: documents of the given lengths, each followed by SEP (a corpus whose documents end with it)."""
    rng = np.random.default_rng(seed)
    parts = []
    for n in lengths:
        parts += [rng.integers(1, vocab, n), [SEP]]
    return np.concatenate(parts).astype(np.int64)


def windows(n_documents, block_size, vocab=300, seed=0):
    """The probe's windows over n_documents random documents of a little more than block_size tokens."""
    return Windows({"val": corpus([block_size + 3] * (n_documents + 1), vocab, seed)}, SEP, block_size, n_documents)
