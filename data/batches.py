"""Training batches from a seeded, resumable generator; validation batches from a fixed set.

Every process draws the SAME global batch (world_size * batch_size windows) from the same seeded
generator and keeps its own slice, so N processes at batch b see exactly the data that one process
at batch N*b sees, and the generator's state is one small dict to save and restore for a resume.
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

    def next_offsets(self):
        """Start offsets of this process's windows in the next global batch."""
        high = len(self.tokens) - self.block_size  # exclusive: the last window needs block_size + 1 tokens
        offsets = self.rng.integers(0, high, size=self.world_size * self.batch_size)
        return offsets[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def next(self, device="cpu"):
        return windows(self.tokens, self.next_offsets(), self.block_size, device)

    def state_dict(self):
        return self.rng.bit_generator.state

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state


def windows(tokens, offsets, block_size, device="cpu"):
    """Inputs x and next-token targets y for windows starting at `offsets`."""
    rows = np.stack([np.asarray(tokens[o:o + block_size + 1], dtype=np.int64) for o in offsets])
    batch = torch.from_numpy(rows).to(device)
    return batch[:, :-1], batch[:, 1:]


def validation_offsets(n_tokens, block_size, n_windows):
    """A FIXED set of window starts spread evenly over the validation tokens: the same every eval
    and in every run on the same data, whatever the seed."""
    high = n_tokens - block_size - 1
    return np.linspace(0, max(high, 0), n_windows).round().astype(np.int64)


def validation_batches(tokens, block_size, batch_size, n_windows, rank=0, world_size=1, device="cpu"):
    """This process's share of the fixed validation windows, in batches of up to batch_size
    (batch i goes to rank i % world_size). The windows do not depend on batch size or process count."""
    offsets = validation_offsets(len(tokens), block_size, n_windows)
    starts = range(0, n_windows, batch_size)
    for i in range(rank, len(starts), world_size):
        yield windows(tokens, offsets[starts[i]:starts[i] + batch_size], block_size, device)
