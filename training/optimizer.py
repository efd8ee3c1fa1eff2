"""The optimizer and its learning-rate schedule, built in one place: train.py and `analyze.py convert`
(which writes a checkpoint a resume must load) both call build_optimizer.

AdamW over the model's parameter groups (GPT.optimizer_groups: weight decay on matrices only). Each
group's rate is its own initial rate times the schedule's multiplier at that step, so a second group
with a rate of its own, or another optimizer, is a change here only.
"""
import math

import torch

FUSED_ADAMW_DEVICES = ("cuda", "cpu", "xpu", "mps")  # where torch.optim.AdamW(fused=True) has a kernel


def lr_multiplier(step, config):
    """Linear warmup to 1, then cosine decay to min_lr / learning_rate at max_steps."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
    floor = config.min_lr / config.learning_rate
    return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (1 - floor)


def learning_rate(step, config):
    """The rate of a group that starts at config.learning_rate (what metrics.jsonl logs as lr)."""
    return config.learning_rate * lr_multiplier(step, config)


class Optimizer:
    """A torch optimizer with its groups' initial rates.

    skips_on_device: the optimizer reads a `found_inf` flag (torch's protocol, the one its grad scaler
    uses) and leaves weights, moments and step count untouched when it is set, so a non-finite step is
    skipped without the host waiting for the device. Fused AdamW does; the for-each one does not, and
    under fp16 the grad scaler owns that flag."""

    def __init__(self, optimizer, initial_lrs, skips_on_device):
        self.optimizer, self.initial_lrs, self.skips_on_device = optimizer, initial_lrs, skips_on_device

    def set_step(self, step, config, optimizer=None):
        """Every group's rate for this step (optimizer: the wrapper accelerate returned, if any);
        returns the rate of the first group, the one metrics.jsonl logs."""
        multiplier = lr_multiplier(step, config)
        for group, initial in zip((optimizer or self.optimizer).param_groups, self.initial_lrs):
            group["lr"] = initial * multiplier
        return self.initial_lrs[0] * multiplier


def build_optimizer(model, config, device_type):
    """AdamW for `model` on a device of this type ("cpu", "cuda", ...), fused where a kernel exists.
    The rates are set each step by Optimizer.set_step; a resume loads moments and step counts only
    into groups built the same way."""
    fused = device_type in FUSED_ADAMW_DEVICES
    groups = model.optimizer_groups(config.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2), fused=fused)
    return Optimizer(optimizer, [config.learning_rate] * len(groups),
                     skips_on_device=fused and config.mixed_precision != "fp16")
