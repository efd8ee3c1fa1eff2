"""Per-layer diagnostics of the norms: how big is what each norm sees, and how much of it is mean.

Measured at eval steps when `config.diagnostics` is on; train.py writes one JSON line per eval to
<out_dir>/diagnostics.jsonl (runlog.py) with:

    sites        ["embed", "block0.attn", "block0.mlp", ..., "final"]   every norm site, in forward order
    input_rms    per site: RMS of the norm's input, sqrt(mean(x^2)) over features, averaged over tokens
    offset_ratio per site: |mean(x)| / rms(x) per token, averaged over tokens (1 = all mean, 0 = none)
    mean_share   per site: mean(x)^2 / mean(x^2) per token, averaged: the share of the input's energy
                 that a LayerNorm's re-centering removes and an RMSNorm keeps
    mean_over_median, trimmed_offset_ratio, top_energy_share  per site: the same question asked so that a
                 few huge coordinates (Sun et al. 2024's massive activations) do not answer it: one
                 coordinate of size M among d small ones makes mean_share about 1/d and offset_ratio about
                 1/sqrt(d) whatever the rest holds. Per token, averaged: |mean(x)| / median |x| (the shift
                 re-centering applies, against a typical coordinate), |mean(x)| / rms of x without its
                 TOP_K largest |x|, and the share of x's energy in those TOP_K coordinates
    resid_rms    per block: RMS of the residual stream after the block (does it grow with depth?)
    grad_norm    per block: L2 norm of the block's parameter gradients at the latest optimizer step,
                 as the optimizer saw them (after clipping; clipping scales every block alike, so the
                 profile over depth is unchanged), null before the first step
    attn_max_logit  per block: the largest pre-softmax attention logit q.k/sqrt(head_dim) (or the block's own
                 softmax scale) over heads and positions, entries the causal mask (and a local block's
                 window) hides excluded (its growth is the high-LR instability
                 QK-norm stops: Wortsman et al. 2023, Dehghani et al. 2023)
    attn_entropy per block: mean over heads and query positions of the attention distribution's entropy
                 in nats (log k for uniform attention over k keys; 0 when each query sees one key)
    act_ratio    per block: max |x| / median |x| over the residual stream after the block (massive
                 activations, Sun et al. 2024)
    log_z        the output logits' log-normaliser logsumexp(logits), averaged over tokens (what z_loss
                 pulls towards 0)

Sites are "embed" (embed_norm), "blockN.attn", "blockN.mlp" (the sublayers' input norms, or their post-add norms in post-norm
blocks), "blockN.q", "blockN.k" (qk_norm), "blockN.attn_out", "blockN.mlp_out" (output norms of peri
and output blocks) and "final"; a block lists only the sites it has.

The statistics are pure functions of a tensor (tested on hand-made inputs); the collector runs ONE
extra forward pass in eval mode on a batch the caller gives (train.py: the first batch of the fixed
validation windows), with hooks that exist only for that pass, so training itself is untouched (no
RNG is drawn, no hook slows the training steps). The attention statistics need explicit scores, which
the fused attention kernel never forms: a hook takes each attention layer's input and the scores are
recomputed here from the layer's own queries and keys (CausalSelfAttention.queries_keys).
"""
import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from model.norms import upcast
from model.stack import site_name


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


ROBUST_STATISTICS = ("mean_over_median", "trimmed_offset_ratio", "top_energy_share")
TOP_K = 4  # coordinates set aside as "massive" (at most half of a vector's features)


def robust_stats(x):
    """(mean_over_median, trimmed_offset_ratio, top_energy_share) of x (..., features), each averaged
    over all tokens, in fp64 (the module docstring says what each is)."""
    x = x.detach().double().reshape(-1, x.shape[-1])
    k = max(1, min(TOP_K, x.shape[-1] // 2))
    tiny = torch.finfo(torch.float64).tiny
    offset = x.mean(-1).abs()
    magnitude = x.abs()
    energy = x.pow(2)
    top = energy.topk(k, dim=-1).values.sum(-1)
    rest_rms = ((energy.sum(-1) - top).clamp_min(0) / (x.shape[-1] - k)).sqrt()
    return ((offset / magnitude.median(-1).values.clamp_min(tiny)).mean().item(),
            (offset / rest_rms.clamp_min(tiny)).mean().item(),
            (top / energy.sum(-1).clamp_min(tiny)).mean().item())


def grad_square_sum(parameters):
    """Sum of squares of all gradients of `parameters` held by this process, as a 0-dim fp64 tensor
    (None without gradients); under FSDP that is its shards' part, summed over processes later.

    It runs before every optimizer step, so it reads each gradient once (no full-size fp64 copy) and
    leaves the tensor on its device: the host waits for it only when a diagnostics line is written."""
    local = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in parameters if p.grad is not None]
    norms = [torch.linalg.vector_norm(g.detach()).double() for g in local]
    return torch.stack(norms).pow(2).sum() if norms else None


def attention_entropy(probs):
    """Mean entropy in nats of attention rows probs (..., queries, keys), each summing to 1; a 0
    probability adds 0 (the limit of p log p), so masked keys count for nothing."""
    probs = probs.double()
    plogp = torch.where(probs > 0, probs * probs.clamp_min(1e-300).log(), torch.zeros_like(probs))
    return (-plogp.sum(-1)).mean().item()


def attention_stats(q, k, scale=None, window=0):
    """(max logit, mean entropy) of causal self-attention with queries q and keys k (B, heads, T, head_dim),
    softmax scale `scale` (None: 1/sqrt(head_dim)); window > 0: each query sees the last `window` keys."""
    T, max_logit, entropies = q.size(-2), -math.inf, []
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if window:
        causal = causal.triu(1 - window)
    scale = 1 / math.sqrt(q.size(-1)) if scale is None else scale
    for qb, kb in zip(q, k):  # one sequence at a time: (heads, T, T) scores, not (B, heads, T, T)
        scores = upcast(qb) @ upcast(kb).transpose(-2, -1) * scale
        scores = scores.masked_fill(~causal, float("-inf"))
        max_logit = max(max_logit, scores.max().item())
        entropies.append(attention_entropy(scores.softmax(-1)))
    return max_logit, sum(entropies) / len(entropies)


def activation_ratio(x):
    """max |x| / median |x| over all entries of x: how far the largest activation stands out."""
    a = x.detach().double().abs().flatten()
    return (a.max() / a.median().clamp_min(torch.finfo(torch.float64).tiny)).item()


SITE_SLOTS = [("attn", "ln_1"), ("q", "attn.q_norm"), ("k", "attn.k_norm"), ("attn_out", "ln_1_out"),
              ("mlp", "ln_2"), ("mlp_out", "ln_2_out")]  # (site suffix, attribute path in a Block), forward order


def norm_sites(model):
    """[(site name, norm module)] for every norm site of a GPT, in forward order (none in nGPT, whose
    only "norms" are the functional renormalizations of model/normalized.py; there resid_rms, the
    blocks' outputs, reads 1/sqrt(n_embd): unit vectors)."""
    sites = [("embed", model.transformer.ln_e)] if "ln_e" in model.transformer else []
    for i, block in enumerate(model.transformer.h):
        for suffix, path in SITE_SLOTS:
            owner, attr = site_slot(block, path)
            if getattr(owner, attr, None) is not None:
                sites.append((site_name(i, suffix), getattr(owner, attr)))
    return sites + ([("final", model.transformer.ln_f)] if "ln_f" in model.transformer else [])


def site_slot(block, path):
    """(module, attribute) that holds the norm at `path` ("ln_1", "attn.q_norm") of a block."""
    owner, _, attr = path.rpartition(".")
    return (getattr(block, owner) if owner else block), attr


@torch.no_grad()
def collect(model, x):
    """Norm-input statistics and residual RMS for one forward pass of `model` on tokens x."""
    inputs, resid, ratios = {}, [], []
    hooks = [module.register_forward_pre_hook(
        lambda m, args, name=name: inputs.__setitem__(name, token_stats(args[0]) + robust_stats(args[0])))
        for name, module in norm_sites(model)]

    def residual_hook(module, args, out):  # returns None: a forward hook's return value replaces the output
        resid.append(token_stats(out)[0])
        ratios.append(activation_ratio(out))
    hooks += [block.register_forward_hook(residual_hook) for block in model.transformer.h]
    attention = []
    hooks += [block.attn.register_forward_pre_hook(
        lambda attn, args: attention.append(attention_stats(*attn.queries_keys(args[0]), attn.scale, attn.window)))
        for block in model.transformer.h]
    was_training = model.training
    model.eval()  # no dropout: the statistics describe the model, not one dropout mask
    try:
        # unfused: the fused add + norm kernel is called as add_norm, which the norms' hooks do not see
        logits, _ = model(x, fused_add_norm=False)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    names = [name for name, _ in norm_sites(model)]
    return {"sites": names,
            "input_rms": [inputs[n][0] for n in names],
            "offset_ratio": [inputs[n][1] for n in names],
            "mean_share": [inputs[n][2] for n in names],
            **{key: [inputs[n][3 + i] for n in names] for i, key in enumerate(ROBUST_STATISTICS)},
            "resid_rms": resid,
            "attn_max_logit": [a[0] for a in attention],
            "attn_entropy": [a[1] for a in attention],
            "act_ratio": ratios,
            "log_z": torch.logsumexp(logits.double(), -1).mean().item()}


class Diagnostics:
    """Hooked into train(): `Diagnostics(model, x)` once, with `model` the unwrapped GPT and x the token
    batch every measurement uses; `read_gradients(applied)` at every optimizer step, before the
    gradients are zeroed; `measure(step)` at every eval -> one log entry.
    Under FSDP (parameters are DTensors) every process must call measure: the forward gathers the
    sharded weights and the gradient norms are summed over the processes' shards."""

    def __init__(self, model, x):
        self.model = getattr(model, "_orig_mod", model)  # hooks on the plain module, not a torch.compile wrapper
        self.x, self.grad_squares = x, None
        self.sharded = any(isinstance(p, DTensor) for p in self.model.parameters())

    def read_gradients(self, applied):
        """Each block's gradient norm at this step, kept on the device. `applied` (a bool tensor on the
        device) says whether the optimizer takes the step; a step it skips keeps the norms of the last
        step taken (before any, the first step's), decided on the device too."""
        squares = [grad_square_sum(block.parameters()) for block in self.model.transformer.h]
        if self.grad_squares is not None:
            squares = [new if old is None or new is None else torch.where(applied, new, old)
                       for old, new in zip(self.grad_squares, squares)]
        self.grad_squares = squares

    def measure(self, step):
        grads = None
        if self.grad_squares is not None:  # after the first optimizer step
            have = [g is not None for g in self.grad_squares]
            squares = torch.stack([g for g in self.grad_squares if g is not None]) if any(have) else None
            if squares is not None and self.sharded:
                dist.all_reduce(squares)  # every process holds a shard of every block's gradients
            norms = iter(squares.sqrt().tolist() if squares is not None else [])
            grads = [next(norms) if h else None for h in have]
        return {"step": step, **collect(self.model, self.x), "grad_norm": grads}
