"""The sublayers of a block: causal self-attention (optional QK-norm, rotary positions, grouped-query
heads, a KV cache) and the MLP (GELU, GPT-2's tanh GELU, SwiGLU or ReLU²)."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.norms import make_norm


class Rotary:
    """Rotary position embedding (Su et al. 2021) in the half-split layout that Llama's transformers
    code uses: feature i of a head is rotated together with feature i + head_dim/2, by the angle
    position * theta^(-2i / head_dim). The cos/sin tables cover block_size positions and are built
    once per device, in fp32, on first use (a plain attribute, not a buffer: no checkpoint key, and
    nothing for FSDP's meta-device loading to lose)."""

    def __init__(self, head_dim, block_size, theta):
        self.head_dim, self.block_size, self.theta = head_dim, block_size, theta
        self.tables = {}

    def cos_sin(self, device):
        if device not in self.tables:
            inv_freq = self.theta ** -(torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)
            angles = torch.outer(torch.arange(self.block_size, dtype=torch.float64), inv_freq)
            self.tables[device] = (angles.cos().float().to(device), angles.sin().float().to(device))
        return self.tables[device]

    def __call__(self, x, past):
        """x (B, heads, T, head_dim) at positions past .. past + T - 1, rotated."""
        cos, sin = self.cos_sin(x.device)
        T = x.size(-2)
        cos, sin = cos[past:past + T], sin[past:past + T]
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, rotary=None):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head or config.n_head
        self.head_dim = config.n_embd // config.n_head
        kv_width = self.n_kv_head * self.head_dim
        # one projection for q, k and v: (n_embd | kv_width | kv_width) output features
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_width, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        if config.qk_norm:  # one norm over head_dim, its gains shared by the heads (OLMo 2, Qwen3)
            self.q_norm = make_norm(config.qk_norm, self.head_dim, config)
            self.k_norm = make_norm(config.qk_norm, self.head_dim, config)
        else:
            self.q_norm = self.k_norm = None
        self.rotary = rotary
        self.softmax_scale = None  # None: SDPA's 1/sqrt(head_dim); nGPT's unit-norm q and k use sqrt(head_dim)

    def project(self, x, past=0):
        """(q, k, v) of x at positions past.., each (B, heads, T, head_dim): QK-normed, then rotated
        (as OLMo 2 and Qwen3 order them); k and v have n_kv_head heads."""
        B, T, C = x.shape
        kv_width = self.n_kv_head * self.head_dim
        q, k, v = self.c_attn(x).split([C, kv_width, kv_width], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim)
        k, v = (t.view(B, T, self.n_kv_head, self.head_dim) for t in (k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.rotary is not None:
            q, k = self.rotary(q, past), self.rotary(k, past)
        return q, k, v

    def expand_kv(self, t):
        """(B, n_kv_head, T, d) -> (B, n_head, T, d): each key/value head serves n_head / n_kv_head queries."""
        groups = self.n_head // self.n_kv_head
        return t if groups == 1 else t.repeat_interleave(groups, dim=1)

    def queries_keys(self, x):
        """The queries and keys whose scores the attention softmaxes, (B, n_head, T, head_dim) each
        (model/diagnostics.py recomputes the scores, which the fused kernel never forms)."""
        q, k, _ = self.project(x)
        return q, self.expand_kv(k)

    def forward(self, x, kv_cache=None):
        """kv_cache: None, or a dict this layer fills with keys/values of all tokens seen so far
        (normed and rotated: new tokens are rotated at their true offset)."""
        B, T, C = x.shape
        past = kv_cache["k"].size(2) if kv_cache is not None and "k" in kv_cache else 0
        q, k, v = self.project(x, past)
        if kv_cache is not None:
            if past:
                k = torch.cat([kv_cache["k"], k], dim=2)
                v = torch.cat([kv_cache["v"], v], dim=2)
            kv_cache["k"], kv_cache["v"] = k, v
        if past == 0:
            mask, causal = None, True
        else:
            # new query i may attend to every cached key and to new keys up to itself
            rows = torch.arange(T, device=x.device)[:, None] + past
            mask, causal = torch.arange(past + T, device=x.device)[None, :] <= rows, False
        y = F.scaled_dot_product_attention(q, self.expand_kv(k), self.expand_kv(v), attn_mask=mask,
                                           is_causal=causal, dropout_p=self.dropout if self.training else 0.0,
                                           scale=self.softmax_scale)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


def mlp_hidden_size(config):
    """config.mlp_hidden, or by default 4 * n_embd; for SwiGLU Llama's 2/3 of that, rounded up to a
    multiple of 64, so that its three matrices hold about as many parameters as GELU's two."""
    if config.mlp_hidden:
        return config.mlp_hidden
    if config.mlp == "swiglu":
        return 64 * math.ceil(8 * config.n_embd / 3 / 64)
    return 4 * config.n_embd


class MLP(nn.Module):
    """c_proj(act(c_fc(x))); SwiGLU: c_proj(silu(c_fc(x)) * c_up(x)), c_fc the gate (Llama's gate_proj)."""

    def __init__(self, config):
        super().__init__()
        hidden = mlp_hidden_size(config)
        self.kind = config.mlp
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        if config.mlp == "swiglu":
            self.c_up = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.kind == "gelu":
            h = F.gelu(h)
        elif self.kind == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        elif self.kind == "swiglu":
            h = F.silu(h) * self.c_up(x)
        else:  # relu2
            h = F.relu(h).square()
        return self.dropout(self.c_proj(h))
