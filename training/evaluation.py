"""The validation loss every script reports: the fixed validation windows, alike on every process."""
import torch

from data.batches import validation_batches


@torch.no_grad()
def evaluate(model, val_tokens, config, accelerator):
    """Mean loss per token over the fixed validation windows, summed over every process's share.
    Every process runs the same number of forwards (padded rows carry no loss; data/batches.py)."""
    model.eval()
    total = torch.zeros(2, device=accelerator.device)  # (sum of window losses, number of windows)
    for x, y, n_real in validation_batches(val_tokens, config.block_size, config.batch_size, config.eval_windows,
                                           accelerator.process_index, accelerator.num_processes,
                                           accelerator.device):
        _, loss = model(x, y)  # the mean over the real windows' tokens
        if n_real:  # a batch of padding only gives 0/0
            total += torch.stack([loss.float() * n_real, torch.tensor(float(n_real), device=loss.device)])
    model.train()
    total = accelerator.reduce(total, reduction="sum")
    return (total[0] / total[1]).item()
