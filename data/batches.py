"""Training batches from a seeded, resumable generator; validation batches from a fixed set.

Every process draws the SAME global batch (world_size * batch_size windows) from the same seeded
generator and keeps its own slice, so N processes at batch b see exactly the data that one process
at batch N*b sees, and the generator's state is one small dict to save and restore for a resume.

On a GPU a batch is copied from pinned memory without blocking, and the trainer asks for the next
batch (prefetch) while the current step runs, so the host gathers and copies it during the step.
"""
import numpy as np
import torch


class TrainBatches:
    def __init__(self, tokens, block_size, batch_size, seed, rank=0, world_size=1):
        if len(tokens) < block_size + 1:
            raise ValueError("fewer tokens than one context window")
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.rank, self.world_size = rank, world_size
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.ready, self.state_before_ready = None, None  # a prefetched batch, and the state that drew it

    def next_offsets(self):
        """Start offsets of this process's windows in the next global batch."""
        high = len(self.tokens) - self.block_size  # exclusive: the last window needs block_size + 1 tokens
        offsets = self.rng.integers(0, high, size=self.world_size * self.batch_size)
        return offsets[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def next(self, device="cpu"):
        """The next batch (x, y): the prefetched one if there is one."""
        if self.ready is None:
            return windows(self.tokens, self.next_offsets(), self.block_size, device)
        batch, self.ready, self.state_before_ready = self.ready, None, None
        return batch

    def prefetch(self, device="cpu"):
        """Draw and copy the next batch now; next() returns it."""
        if self.ready is None:
            self.state_before_ready = self.rng.bit_generator.state
            self.ready = windows(self.tokens, self.next_offsets(), self.block_size, device)

    def state_dict(self):
        """The generator as of the next batch to hand out: a prefetched batch is drawn again on resume."""
        return self.state_before_ready if self.ready is not None else self.rng.bit_generator.state

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state
        self.ready, self.state_before_ready = None, None


def windows(tokens, offsets, block_size, device="cpu"):
    """Inputs x and next-token targets y for windows starting at `offsets`."""
    rows = np.stack([np.asarray(tokens[o:o + block_size + 1], dtype=np.int64) for o in offsets])
    batch = torch.from_numpy(rows)
    if torch.device(device).type != "cpu":  # pinned: the copy runs asynchronously, the host goes on
        batch = batch.pin_memory().to(device, non_blocking=True)
    return batch[:, :-1], batch[:, 1:]


def validation_offsets(tokens, block_size, n_windows, start_token=None):
    """A FIXED set of window starts spread evenly over the validation tokens: the same every eval
    and in every run on the same data, whatever the seed. With start_token (config.doc_windows), the
    starts are spread evenly over the positions of that token instead, so that each window starts
    with it and the document it begins (where the tokens hold none, evenly as without)."""
    high = len(tokens) - block_size - 1
    if start_token is not None:
        starts = np.flatnonzero(np.asarray(tokens[:max(high, 0) + 1]) == start_token)
        if len(starts):
            return starts[np.linspace(0, len(starts) - 1, n_windows).round().astype(np.int64)]
    return np.linspace(0, max(high, 0), n_windows).round().astype(np.int64)


IGNORE = -100  # a target that cross_entropy leaves out of the loss (its default ignore_index)


def validation_batches(tokens, block_size, batch_size, n_windows, rank=0, world_size=1, device="cpu", start_token=None):
    """This process's share of the fixed validation windows, as (x, y, n_real) batches.

    Every process gets the same number of batches of the same shape, whatever n_windows and
    world_size (under FSDP each forward is a collective: a process with one batch fewer would leave
    the others waiting). Round r hands each process `rows` consecutive windows, at most batch_size;
    the last round may leave a process short, so its batch is padded with copies of the first window
    whose targets are IGNORE, and n_real says how many rows are real. The windows do not depend on
    batch size or process count. start_token: see validation_offsets."""
    offsets = validation_offsets(tokens, block_size, n_windows, start_token)
    start = 0
    while start < n_windows:
        rows = min(batch_size, -(-(n_windows - start) // world_size))  # ceil: no process idles early
        mine = offsets[start + rank * rows:start + (rank + 1) * rows]
        n_real = len(mine)
        x, y = windows(tokens, np.concatenate([mine, np.repeat(offsets[:1], rows - n_real)]), block_size, device)
        if n_real < rows:  # y is a view into x's rows: clone before masking
            y = y.clone()
            y[n_real:] = IGNORE
        yield x, y, n_real
        start += rows * world_size


def diagnostics_batch(tokens, block_size, batch_size, device="cpu", start_token=None):
    """The inputs every per-layer measurement of a run uses (the trainer's diagnostics, the probe's
    once-off measurement): the first batch_size fixed validation windows, spread over the split
    (start_token: see validation_offsets)."""
    x, _, _ = next(validation_batches(tokens, block_size, batch_size, batch_size, device=device,
                                      start_token=start_token))
    return x


def document_windows(tokens, separator, block_size):
    """(starts, n_targets): one window per document, starting at the separator token before it (the
    end-of-document token of a corpus whose documents end with one, or the <bos> of one whose documents
    start with it), so that the model sees a document start as it did in training. The split's first
    document has no separator before it: its start is -1, a separator put in front (document_batch).
    A window's targets are its document's own tokens, at most block_size. A model's probe draws these
    (study/probe.py)."""
    tokens = np.asarray(tokens)
    seps = np.flatnonzero(tokens == separator)
    starts = seps if len(tokens) and tokens[0] == separator else np.concatenate([[-1], seps])
    ends = np.append(starts[1:], len(tokens))  # each document runs to the next separator
    n_targets = np.minimum(ends - starts - 1, block_size)
    return starts[n_targets > 0], n_targets[n_targets > 0]


def document_batch(tokens, starts, n_targets, separator, block_size, device="cpu"):
    """Inputs x and targets y of document_windows' windows: y is IGNORE past each window's n_targets
    (the next document's tokens, or padding at the end of the split)."""
    rows = np.full((len(starts), block_size + 1), separator, dtype=np.int64)
    for row, start in zip(rows, starts):
        offset = 1 if start < 0 else 0  # the split's first document: after the separator put in front
        part = tokens[max(start, 0):start + block_size + 1]
        row[offset:offset + len(part)] = part
    batch = torch.from_numpy(rows).to(device)
    x, y = batch[:, :-1], batch[:, 1:].clone()
    y[torch.arange(block_size, device=device)[None, :] >= torch.as_tensor(n_targets, device=device)[:, None]] = IGNORE
    return x, y
