"""The sublayers of a block: causal self-attention (optional QK-norm, rotary positions, grouped-query
heads, a sliding window, a KV cache) and the MLP (GELU, GPT-2's tanh GELU, SwiGLU, GeGLU or ReLU²)."""
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


def head_size(config):
    """The size of one attention head: head_dim, or n_embd // n_head by default."""
    return config.head_dim or config.n_embd // config.n_head


class CausalSelfAttention(nn.Module):
    def __init__(self, config, rotary=None, window=0, qk_norms=None):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head or config.n_head
        self.head_dim = head_size(config)
        q_width, kv_width = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        # one projection for q, k and v: (q_width | kv_width | kv_width) output features
        self.c_attn = nn.Linear(config.n_embd, q_width + 2 * kv_width, bias=config.bias)
        self.c_proj = nn.Linear(q_width, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        if config.qk_norm:  # one norm over head_dim, its gains shared by the heads (OLMo 2, Qwen3)
            q_name, k_name = qk_norms or (config.qk_norm, config.qk_norm)  # the block's (site_norms may differ)
            self.q_norm = make_norm(q_name, self.head_dim, config)
            self.k_norm = make_norm(k_name, self.head_dim, config)
        else:
            self.q_norm = self.k_norm = None
        self.rotary = rotary
        # the softmax scale: None is SDPA's 1/sqrt(head_dim); Gemma's is 1/sqrt(query_pre_attn_scalar)
        self.scale = config.query_pre_attn_scalar ** -0.5 if config.query_pre_attn_scalar else None
        self.window = window  # > 0: a local block, whose query sees itself and the window - 1 keys before it

    def project(self, x, past=0):
        """(q, k, v) of x at positions past.., each (B, heads, T, head_dim): QK-normed, then rotated
        (as OLMo 2 and Qwen3 order them); k and v have n_kv_head heads."""
        B, T, C = x.shape
        kv_width = self.n_kv_head * self.head_dim
        q, k, v = self.c_attn(x).split([self.n_head * self.head_dim, kv_width, kv_width], dim=2)
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

    def mask(self, past, T, S, device):
        """None where plain causal attention is the whole mask (SDPA's is_causal), else (T, S) booleans:
        the query at position past + i sees the key at position past + T - S + j when that key is not
        later than it and, in a local block, fewer than window positions earlier."""
        if S == T and (not self.window or T <= self.window):
            return None
        rows = torch.arange(past, past + T, device=device)[:, None]
        cols = torch.arange(past + T - S, past + T, device=device)[None, :]
        allowed = cols <= rows
        return allowed & (cols > rows - self.window) if self.window else allowed

    def forward(self, x, kv_cache=None):
        """kv_cache: None, or a dict this layer fills with the keys and values later tokens attend to
        (normed and rotated: new tokens are rotated at their true offset) and "pos", the number of
        tokens seen. A local block keeps only its last window - 1, which is all a later query sees."""
        B, T, C = x.shape
        past = kv_cache.get("pos", 0) if kv_cache is not None else 0
        q, k, v = self.project(x, past)
        if kv_cache is not None:
            if "k" in kv_cache:
                k = torch.cat([kv_cache["k"], k], dim=2)
                v = torch.cat([kv_cache["v"], v], dim=2)
            first = max(0, k.size(2) - self.window + 1) if self.window else 0
            kv_cache.update(k=k[:, :, first:], v=v[:, :, first:], pos=past + T)
        mask = self.mask(past, T, k.size(2), x.device)
        y = F.scaled_dot_product_attention(q, self.expand_kv(k), self.expand_kv(v), attn_mask=mask,
                                           is_causal=mask is None, scale=self.scale,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.resid_dropout(self.c_proj(y))


def mlp_hidden_size(config):
    """config.mlp_hidden, or by default 4 * n_embd; for the gated MLPs (SwiGLU, GeGLU) Llama's 2/3 of
    that, rounded up to a multiple of 64, so that their three matrices hold about as many parameters
    as GELU's two."""
    if config.mlp_hidden:
        return config.mlp_hidden
    if config.mlp in GATED:
        return 64 * math.ceil(8 * config.n_embd / 3 / 64)
    return 4 * config.n_embd


GATED = ("swiglu", "geglu_tanh")  # the MLPs with a gate: c_fc (gate_proj) and c_up (up_proj)


class MLP(nn.Module):
    """c_proj(act(c_fc(x))); gated: c_proj(act(c_fc(x)) * c_up(x)), c_fc the gate (gate_proj), act silu
    (SwiGLU, Llama) or the tanh GELU (GeGLU, Gemma)."""

    def __init__(self, config):
        super().__init__()
        hidden = mlp_hidden_size(config)
        self.kind = config.mlp
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        if config.mlp in GATED:
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
        elif self.kind == "geglu_tanh":
            h = F.gelu(h, approximate="tanh") * self.c_up(x)
        else:  # relu2
            h = F.relu(h).square()
        return self.dropout(self.c_proj(h))
