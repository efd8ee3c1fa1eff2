"""The normalized transformer, nGPT (Loshchilov, Hsieh, Sun, Ginsburg, ICLR 2025, arXiv 2410.01131):
block_type = "normalized". Every hidden state, the token embeddings and every weight vector along the
embedding dimension lie on the unit sphere; there is no norm layer. With Norm(x) = x / ||x||:

    h <- Norm(h + alpha_A * (Norm(attn(h)) - h))      (paper eq. 10-11: a step from h towards the
    h <- Norm(h + alpha_M * (Norm(mlp(h)) - h))        sublayer's suggestion, per feature)

    attention: q, k rotated (RoPE), then Norm per head, times s_qk; softmax(q.k * sqrt(head_dim))
    MLP (SwiGLU): u = W_u h * s_u, v = W_v h * s_v * sqrt(d); out = W_o (u * silu(v))
    logits = (E_out h) * s_z

alpha, s_qk, s_u, s_v and s_z are learned per feature and stored as the paper's reparametrisation
(ScaledVector). After every optimizer step the trainer calls after_optimizer_step, which renormalizes
the embedding and every matrix along the embedding dimension (under FSDP2 across the shards).

Two choices the paper leaves open, taken as NVIDIA's reference code takes them: q and k are rotated
before they are normalized, and the initial weights are normalized once at construction. One differs:
the reference uses |alpha|; here alpha is used as the paper's equations write it.
"""
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from model.gpt import GPT
from model.layers import MLP, CausalSelfAttention, Rotary, mlp_hidden_size
from model.norms import upcast
from model.stack import check_model_config

ALPHA_INIT = 0.05  # the eigen learning rates' initial value (paper section 2.6: of order 1 / n_layer)
TINY = 1e-12       # a zero vector stays zero instead of becoming NaN


def unit(x, dim=-1):
    """x / ||x|| along dim, computed in at least fp32, returned in x's dtype."""
    xf = upcast(x)
    return (xf / xf.norm(dim=dim, keepdim=True).clamp_min(TINY)).to(x.dtype)


class ScaledVector(nn.Module):
    """A learned per-feature vector in the paper's reparametrisation: the parameter starts at `scale`
    and is read as parameter * (init / scale), so its value starts at `init`, while Adam's steps, of
    about the learning rate whatever the parameter's size, move the value init / scale times faster."""

    def __init__(self, size, init, scale):
        super().__init__()
        self.init, self.scale = init, scale
        self.weight = nn.Parameter(torch.full((size,), float(scale)))

    def forward(self):
        return self.weight * (self.init / self.scale)


class NormalizedAttention(CausalSelfAttention):
    """The project's attention (one qkv matrix, RoPE, grouped-query heads, the KV cache) with unit-norm
    queries and keys. s_qk scales both q and k in the paper; the scores q.k then carry s_qk^2, which
    here multiplies q alone, so that the KV cache holds plain unit keys and grouped key heads need no
    scale of their own (the same scores; tests/test_normalized.py checks it against the paper's form)."""

    def __init__(self, config, rotary):
        super().__init__(config, rotary)
        self.s_qk = ScaledVector(config.n_embd, 1.0, 1 / math.sqrt(config.n_embd))  # (n_head, head_dim) flattened
        self.scale = math.sqrt(self.head_dim)  # the softmax scale: q.k of unit vectors is in [-1, 1], scale it up

    def project(self, x, past=0):
        q, k, v = super().project(x, past)  # rotated: Norm commutes with the rotation, s_qk does not
        s2 = self.s_qk().view(1, self.n_head, 1, self.head_dim).square()
        return unit(q) * s2.to(q.dtype), unit(k), v


class NormalizedMLP(MLP):
    """SwiGLU with the paper's scales: c_up is u (times s_u), c_fc the gate v (times s_v * sqrt(d),
    so that silu sees inputs of order 1 although v's weight rows are unit-norm)."""

    def __init__(self, config):
        super().__init__(config)
        hidden = mlp_hidden_size(config)
        self.s_u = ScaledVector(hidden, 1.0, 1.0)
        self.s_v = ScaledVector(hidden, 1.0, 1.0)
        self.v_scale = math.sqrt(config.n_embd)

    def forward(self, x):
        u = self.c_up(x) * self.s_u().to(x.dtype)
        v = self.c_fc(x) * (self.s_v() * self.v_scale).to(x.dtype)
        return self.dropout(self.c_proj(u * F.silu(v)))


class NormalizedBlock(nn.Module):
    def __init__(self, config, rotary):
        super().__init__()
        scale = 1 / math.sqrt(config.n_embd)
        self.attn = NormalizedAttention(config, rotary)
        self.alpha_attn = ScaledVector(config.n_embd, ALPHA_INIT, scale)
        self.mlp = NormalizedMLP(config)
        self.alpha_mlp = ScaledVector(config.n_embd, ALPHA_INIT, scale)

    def forward(self, h, kv_cache=None):
        """h: unit vectors (B, T, n_embd) -> unit vectors."""
        h = unit(h + self.alpha_attn() * (unit(self.attn(h, kv_cache)) - h))
        return unit(h + self.alpha_mlp() * (unit(self.mlp(h)) - h))


class NormalizedGPT(GPT):
    """nGPT; generate() and the weight tying are the standard GPT's."""

    def __init__(self, config):
        nn.Module.__init__(self)
        self.config = check_model_config(config)
        rotary = Rotary(config.n_embd // config.n_head, config.block_size, config.rope_theta) \
            if config.pos_emb == "rope" else None
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([NormalizedBlock(config, rotary) for _ in range(config.n_layer)])))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.s_z = ScaledVector(config.vocab_size, 1.0, 1 / math.sqrt(config.n_embd))
        self.tie_weights()
        self.apply(self._init_weights)  # random directions; their length is set by the line below
        self.after_optimizer_step()

    def unit_weights(self):
        """[(weight, dim)]: every matrix and the dimension along which it is a unit vector, the
        embedding dimension (nn.Linear stores (out, in): inputs from the stream are rows, dim 1;
        outputs into the stream are columns, dim 0)."""
        pairs = [(self.transformer.wte.weight, 1)]
        if not self.config.tie_embeddings:
            pairs.append((self.lm_head.weight, 1))
        for block in self.transformer.h:
            pairs += [(block.attn.c_attn.weight, 1), (block.attn.c_proj.weight, 0),
                      (block.mlp.c_fc.weight, 1), (block.mlp.c_up.weight, 1), (block.mlp.c_proj.weight, 0)]
        return pairs

    @torch.no_grad()
    def after_optimizer_step(self):
        """Every matrix back onto the unit sphere along the embedding dimension: part of each step."""
        for weight, dim in self.unit_weights():
            normalize_(weight, dim)

    def describe_norms(self):
        c = self.config
        return "\n".join([
            "normalized transformer (nGPT): no norm layers; hidden states, embeddings and every weight vector "
            "along the embedding dimension are unit-norm (matrices renormalized after every optimizer step)",
            f"  blocks: h <- Norm(h + alpha * (Norm(sublayer(h)) - h)), alpha per feature from {ALPHA_INIT}; "
            f"q, k unit per head times s_qk, softmax scale sqrt(head_dim); SwiGLU u*s_u, v*s_v*sqrt(d); logits * s_z",
            self.describe_model(),
            "  weight decay: none on any parameter (weight_decay does not apply)"]
            + ([f"  z_loss: {c.z_loss:g} * mean(log Z^2) added to the training loss"] if c.z_loss else []))

    def forward(self, idx, targets=None, kv_caches=None, fused_add_norm=None, per_token=False):
        """GPT.forward's signature (fused_add_norm has no meaning here: there is no norm layer)."""
        T = idx.size(1)
        past = kv_caches[0].get("pos", 0) if kv_caches else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens exceeds block_size {self.config.block_size}")
        h = self.transformer.wte(idx)
        for i, block in enumerate(self.transformer.h):
            h = block(h, None if kv_caches is None else kv_caches[i])
        if per_token:
            return None, self.token_losses(h, targets)
        logits = self.output_logits(h)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))

    def output_logits(self, h):
        return self.lm_head(h) * self.s_z().to(h.dtype)

    def optimizer_groups(self, weight_decay):
        """No weight decay, ever: it would pull unit vectors off the sphere, and on the scales it
        would fight the reparametrisation (the paper trains nGPT without it)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "weight_decay": 0.0}]


def normalize_(weight, dim):
    """weight /= its norm along dim, in place. Under FSDP2 (a DTensor) each process holds a shard; when
    the shards split `dim`, the squared norms are summed over the processes that share the rows."""
    if not isinstance(weight, DTensor):
        weight.copy_(unit(weight, dim))
        return
    local = weight.to_local()
    squares = upcast(local).square().sum(dim, keepdim=True)
    for mesh_dim, placement in enumerate(weight.placements):
        if placement.is_shard() and placement.dim == dim:
            dist.all_reduce(squares, group=weight.device_mesh.get_group(mesh_dim))
        elif placement.is_partial():
            raise ValueError(f"cannot renormalize a weight with placement {placement}")
    local.copy_((upcast(local) / squares.sqrt().clamp_min(TINY)).to(local.dtype))
