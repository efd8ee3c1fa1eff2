"""The validation metrics every script reports, on the fixed validation windows, alike on every process:

    val_loss  mean cross-entropy per target token, in nats
    val_bpb   bits per byte: the summed cross-entropy of the target tokens that stand for text, over
              ln 2 times the UTF-8 bytes they stand for (special tokens such as end-of-document count
              in neither sum, nanochat's rule). Unlike val_loss it does not depend on the tokenizer,
              so runs with different tokenizers compare on it.
"""
import math

import torch
import torch.nn.functional as F

from data.batches import IGNORE, validation_batches
from data.tokenizer import window_start_token


@torch.no_grad()
def evaluate_loss_and_bpb(model, val_tokens, config, accelerator, token_bytes=None):
    """(val_loss, val_bpb) summed over every process's share; val_bpb is None without token_bytes
    (data.tokenizer.token_byte_lengths as a tensor). Every process runs the same number of forwards
    (padded rows carry no loss; data/batches.py)."""
    model.eval()
    total = torch.zeros(2, device=accelerator.device)  # (sum of window losses, number of windows)
    text = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # (nats of text-bearing targets, their bytes)
    if token_bytes is not None:
        token_bytes = token_bytes.to(accelerator.device)
    for x, y, n_real in validation_batches(val_tokens, config.block_size, config.batch_size, config.eval_windows,
                                           accelerator.process_index, accelerator.num_processes,
                                           accelerator.device, window_start_token(config)):
        logits, loss = model(x, y)  # the mean over the real windows' tokens
        if not n_real:  # a batch of padding only gives 0/0
            continue
        total += torch.stack([loss.float() * n_real, torch.tensor(float(n_real), device=loss.device)])
        if token_bytes is not None:
            targets = y.reshape(-1)
            nats = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets, reduction="none",
                                   ignore_index=IGNORE)
            nbytes = token_bytes[targets.clamp_min(0)] * (targets != IGNORE)
            text += torch.stack([(nats.double() * (nbytes > 0)).sum(), nbytes.sum().double()])
    model.train()
    total = accelerator.reduce(total, reduction="sum")
    val_loss = (total[0] / total[1]).item()
    if token_bytes is None:
        return val_loss, None
    nats, nbytes = accelerator.reduce(text, reduction="sum").tolist()
    return val_loss, (nats / (math.log(2) * nbytes) if nbytes else None)


def evaluate(model, val_tokens, config, accelerator):
    """Mean loss per token over the fixed validation windows (val_loss alone, as the probe needs)."""
    return evaluate_loss_and_bpb(model, val_tokens, config, accelerator)[0]
