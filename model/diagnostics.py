"""Per-layer diagnostics of the norms: how big is what each norm sees, and how much of it is mean.

Measured at eval steps when `config.diagnostics` is on; train.py writes one JSON line per eval to
<out_dir>/diagnostics.jsonl (runlog.py) with:

    sites        ["block0.attn", "block0.mlp", ..., "final"]   every norm site, in forward order
    input_rms    per site: RMS of the norm's input, sqrt(mean(x^2)) over features, averaged over tokens
    offset_ratio per site: |mean(x)| / rms(x) per token, averaged over tokens (1 = all mean, 0 = none)
    mean_share   per site: mean(x)^2 / mean(x^2) per token, averaged: the share of the input's energy
                 that a LayerNorm's re-centering removes and an RMSNorm keeps
    resid_rms    per block: RMS of the residual stream after the block (does it grow with depth?)
    grad_norm    per block: L2 norm of the block's parameter gradients at the latest optimizer step,
                 as the optimizer saw them (after clipping; clipping scales every block alike, so the
                 profile over depth is unchanged), null before the first step

The statistics are pure functions of a tensor (tested on hand-made inputs); the collector runs ONE
extra forward pass in eval mode on a batch the caller gives (train.py: the first batch of the fixed
validation windows), with hooks that exist only for that pass, so training itself is untouched (no
RNG is drawn, no hook slows the training steps).
"""
import torch


def token_stats(x):
    """(rms, offset_ratio, mean_share) of x (..., features), each averaged over all tokens.

    Computed in fp64 so that hand-made inputs give exact answers (a constant vector: 1 and 1)."""
    x = x.detach().double().reshape(-1, x.shape[-1])
    mean = x.mean(-1)
    second_moment = x.pow(2).mean(-1)
    rms = second_moment.sqrt()
    tiny = torch.finfo(torch.float64).tiny  # an all-zero token counts as having no offset
    offset_ratio = mean.abs() / rms.clamp_min(tiny)
    mean_share = mean.pow(2) / second_moment.clamp_min(tiny)
    return rms.mean().item(), offset_ratio.mean().item(), mean_share.mean().item()


def grad_norm(parameters):
    """L2 norm of all gradients of `parameters` together, as a 0-dim tensor (None without gradients).

    It runs before every optimizer step, so it reads each gradient once (no full-size fp64 copy) and
    leaves the tensor on its device: the host waits for it only when a diagnostics line is written."""
    norms = [torch.linalg.vector_norm(p.grad.detach()).double() for p in parameters if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else None


def norm_sites(model):
    """[(site name, norm module)] for every norm site of a GPT, in forward order."""
    sites = []
    for i, block in enumerate(model.transformer.h):
        sites += [(f"block{i}.attn", block.ln_1), (f"block{i}.mlp", block.ln_2)]
    return sites + [("final", model.transformer.ln_f)]


@torch.no_grad()
def collect(model, x):
    """Norm-input statistics and residual RMS for one forward pass of `model` on tokens x."""
    inputs, resid = {}, []
    hooks = [module.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, token_stats(args[0])))
             for name, module in norm_sites(model)]
    hooks += [block.register_forward_hook(lambda m, args, out: resid.append(token_stats(out)[0]))
              for block in model.transformer.h]
    was_training, fused = model.training, getattr(model.config, "fused_add_norm", False)
    model.eval()  # no dropout: the statistics describe the model, not one dropout mask
    model.config.fused_add_norm = False  # the fused path bypasses the hooks; unfused is the same math
    try:
        model(x)
    finally:
        model.train(was_training)
        model.config.fused_add_norm = fused
        for h in hooks:
            h.remove()
    names = [name for name, _ in norm_sites(model)]
    return {"sites": names,
            "input_rms": [inputs[n][0] for n in names],
            "offset_ratio": [inputs[n][1] for n in names],
            "mean_share": [inputs[n][2] for n in names],
            "resid_rms": resid}


class Diagnostics:
    """Hooked into train(): `Diagnostics(model, optimizer, x)` once, with `model` the unwrapped GPT and
    x the token batch every measurement uses, then `measure(step)` at every eval -> one log entry."""

    def __init__(self, model, optimizer, x):
        self.model = getattr(model, "_orig_mod", model)  # hooks on the plain module, not a torch.compile wrapper
        self.x, self.grad_norms = x, None
        # gradients are gone after optimizer.zero_grad(), so read them just before each real step
        # (accelerate's wrapper only calls the inner optimizer's step when gradients are synced)
        getattr(optimizer, "optimizer", optimizer).register_step_pre_hook(self._read_grads)

    def _read_grads(self, optimizer, args, kwargs):
        self.grad_norms = [grad_norm(block.parameters()) for block in self.model.transformer.h]

    def measure(self, step):
        grads = None if self.grad_norms is None else [None if g is None else g.item() for g in self.grad_norms]
        return {"step": step, **collect(self.model, self.x), "grad_norm": grads}
