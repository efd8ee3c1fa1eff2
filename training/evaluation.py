"""The validation metrics every script reports, on the fixed validation windows, alike on every process:

    val_loss  mean cross-entropy per target token, in nats
    val_bpb   bits per byte: the summed cross-entropy of the target tokens that stand for text, over
              ln 2 times the UTF-8 bytes they stand for (special tokens such as end-of-document count
              in neither sum, nanochat's rule). Unlike val_loss it does not depend on the tokenizer,
              so runs with different tokenizers compare on it.

Both come from one per-token pass of the model (GPT.forward's per_token); window_losses gives each
window's mean from the same pass.
"""
import math

import torch

from data.batches import IGNORE, validation_batches
from data.tokenizer import window_start_token


def per_token_losses(model, val_tokens, config, accelerator):
    """This process's share of the fixed validation windows: (nats of each target (rows, T), y, n_real)
    per batch, from one per-token pass of the model (targets IGNORE cost 0)."""
    for x, y, n_real in validation_batches(val_tokens, config.block_size, config.batch_size, config.eval_windows,
                                           accelerator.process_index, accelerator.num_processes,
                                           accelerator.device, window_start_token(config)):
        _, nats = model(x, y, per_token=True)
        yield nats.float(), y, n_real


@torch.no_grad()
def evaluate_loss_and_bpb(model, val_tokens, config, accelerator, token_bytes=None):
    """(val_loss, val_bpb) summed over every process's share; val_bpb is None without token_bytes
    (data.tokenizer.token_byte_lengths as a tensor). Every process runs the same number of forwards
    (padded rows carry no loss; data/batches.py)."""
    model.eval()
    # (nats of every target, targets, nats of text-bearing targets, their bytes)
    total = torch.zeros(4, dtype=torch.float64, device=accelerator.device)
    if token_bytes is not None:
        token_bytes = token_bytes.to(accelerator.device)
    for nats, y, _ in per_token_losses(model, val_tokens, config, accelerator):
        counted = y != IGNORE
        total[:2] += torch.stack([nats.double().sum(), counted.sum().double()])
        if token_bytes is not None:
            nbytes = token_bytes[y.clamp_min(0)] * counted
            total[2:] += torch.stack([(nats.double() * (nbytes > 0)).sum(), nbytes.sum().double()])
    model.train()
    nats, n_targets, text_nats, nbytes = accelerator.reduce(total, reduction="sum").tolist()
    val_loss = nats / n_targets
    if token_bytes is None:
        return val_loss, None
    return val_loss, (text_nats / (math.log(2) * nbytes) if nbytes else None)


@torch.no_grad()
def window_losses(model, val_tokens, config, accelerator):
    """The mean cross-entropy of each fixed validation window, in window order (gathered from every
    process), as a float64 tensor of eval_windows values: paired comparisons of two models on the
    same windows. Their mean is val_loss (every window has block_size targets)."""
    model.eval()
    losses = []
    for nats, y, n_real in per_token_losses(model, val_tokens, config, accelerator):
        rows = nats.double().sum(1) / (y != IGNORE).sum(1).clamp_min(1)
        real = (torch.arange(len(rows), device=rows.device) < n_real).double()  # padded rows are 0
        # round r gives process k the windows after process k-1's, so rank order is window order
        rows, real = accelerator.gather(rows), accelerator.gather(real)
        losses.append(rows[real > 0])
    model.train()
    return torch.cat(losses).cpu()


def evaluate(model, val_tokens, config, accelerator):
    """Mean loss per token over the fixed validation windows (val_loss alone, as the probe needs)."""
    return evaluate_loss_and_bpb(model, val_tokens, config, accelerator)[0]
