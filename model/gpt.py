"""A nanoGPT-style decoder-only transformer whose norm is chosen per block and per sublayer.

Pre-norm block (norm_position = "pre", GPT-2):     Post-norm block ("post", original Transformer):

    x ──┬─────────────────(+)── x'                     x ──┬──────────────(+)── norm_1 ── x'
        └─ norm_1 ─ attn ──┘                               └──── attn ─────┘
    x' ─┬─────────────────(+)── out                    x' ─┬──────────────(+)── norm_2 ── out
        └─ norm_2 ─ mlp ───┘                               └──── mlp ──────┘

The final norm (ln_f) sits before the tied output head in both cases.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.norms import check_model_config, make_norm, resolve_norm_stack


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, kv_cache=None):
        """kv_cache: None, or a dict this layer fills with keys/values of all tokens seen so far."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        past = 0
        if kv_cache is not None:
            if "k" in kv_cache:
                past = kv_cache["k"].size(2)
                k = torch.cat([kv_cache["k"], k], dim=2)
                v = torch.cat([kv_cache["v"], v], dim=2)
            kv_cache["k"], kv_cache["v"] = k, v
        if past == 0:
            mask, causal = None, True
        else:
            # new query i may attend to every cached key and to new keys up to itself
            rows = torch.arange(T, device=x.device)[:, None] + past
            mask, causal = torch.arange(past + T, device=x.device)[None, :] <= rows, False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config, attn_norm, mlp_norm):
        super().__init__()
        self.post_norm = config.norm_position == "post"
        self.ln_1 = make_norm(attn_norm, config.n_embd, config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(mlp_norm, config.n_embd, config)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None):
        if self.post_norm:
            x = self.ln_1(x + self.attn(x, kv_cache))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x), kv_cache)
        return x + self.mlp(self.ln_2(x))

    def forward_fused(self, x, delta, kv_cache=None):
        """forward()'s pre-norm math for config.fused_add_norm. It takes and returns (x, delta):
        delta is the last sublayer output not yet added to x, because each norm does that add in
        the same kernel as the norm itself:

            x ──(+ delta)── ln_1 ── attn ──> a      x ──(+ a)── ln_2 ── mlp ──> delta'
        """
        x, h = add_then_norm(self.ln_1, x, delta)
        x, h = add_then_norm(self.ln_2, x, self.attn(h, kv_cache))
        return x, self.mlp(h)


def add_then_norm(norm, x, delta):
    """(x + delta, norm(x + delta)), as one fused kernel when the norm has one (RMSNorm.add_norm)."""
    if delta is None:
        return x, norm(x)
    if getattr(norm, "add_norm", None) is None:
        x = x + delta
        return x, norm(x)
    h, x = norm.add_norm(delta, x)
    return x, h


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = check_model_config(config)
        block_norms, final_norm = resolve_norm_stack(config)
        self.norm_stack = block_norms, final_norm
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, a, m) for a, m in block_norms]),
            ln_f=make_norm(final_norm, config.n_embd, config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied input/output embeddings
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer) so the
        # residual stream's variance does not grow with depth at initialisation.
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "is_residual_projection", False):
                std /= math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def describe_norms(self):
        """One line per norm site group, so a run's log shows the stack that was trained."""
        blocks, final = self.norm_stack
        lines = [f"norm stack ({self.config.norm_position}-norm, eps={self.config.norm_eps}):"]
        lines += [f"  block {i}: attn={a} mlp={m}" for i, (a, m) in enumerate(blocks)]
        lines.append(f"  final: {final}")
        return "\n".join(lines)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def forward(self, idx, targets=None, kv_caches=None):
        B, T = idx.shape
        past = kv_caches[0]["k"].size(2) if kv_caches and "k" in kv_caches[0] else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(past, past + T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        delta = None  # with fused_add_norm: the last sublayer output, added to x by the next norm
        for i, block in enumerate(self.transformer.h):
            kv_cache = None if kv_caches is None else kv_caches[i]
            if self.config.fused_add_norm:
                x, delta = block.forward_fused(x, delta, kv_cache)
            else:
                x = block(x, kv_cache)
        _, h = add_then_norm(self.transformer.ln_f, x, delta)
        logits = self.lm_head(h)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def optimizer_groups(self, weight_decay):
        """Weight decay on matrices (embeddings, linear weights) only, never on gains, biases or
        ScaleNorm's scalar g."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, use_cache=True,
                 generator=None, on_token=None):
        """Sample max_new_tokens after idx (B, T). temperature 0 is greedy. With use_cache, keys and
        values are reused while the sequence fits the context; past block_size the window slides,
        so each step recomputes the last block_size tokens (as generation without a cache does)."""
        caches = None
        for _ in range(max_new_tokens):
            fits = idx.size(1) <= self.config.block_size
            if use_cache and fits and caches is not None:
                logits, _ = self(idx[:, -1:], kv_caches=caches)
            else:
                caches = [{} for _ in self.transformer.h] if use_cache and fits else None
                logits, _ = self(idx[:, -self.config.block_size:], kv_caches=caches)
            next_token = sample_next(logits[:, -1, :].float(), temperature, top_k, top_p, generator)
            idx = torch.cat([idx, next_token], dim=1)
            if on_token is not None:
                on_token(next_token)
        return idx


def sample_next(logits, temperature, top_k, top_p, generator=None):
    """Pick the next token from (B, vocab) logits: greedy at temperature 0, else top-k / top-p."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)
