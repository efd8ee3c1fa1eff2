"""A nanoGPT-style decoder-only transformer whose norm is chosen per block and per sublayer.

Each sublayer f (attention, then MLP) is wrapped by the block's norm position (norm_position, or
block_positions per block); shown for attention, the MLP is alike with ln_2 / ln_2_out:

    "pre" (GPT-2):           x ──┬──────────────────────────(+)── x'
                                 └─ ln_1 ─ attn ─────────────┘
    "post" (Transformer):    x ──┬──────────────────────────(+)── ln_1 ── x'
                                 └───────── attn ────────────┘
    "peri" (Peri-LN, Gemma): x ──┬──────────────────────────(+)── x'
                                 └─ ln_1 ─ attn ─ ln_1_out ──┘
    "output" (OLMo 2):       x ──┬──────────────────────────(+)── x'
                                 └───────── attn ─ ln_1_out ─┘

With qk_norm, queries and keys get a norm per head (q_norm, k_norm, gains of size head_dim) after
the projection. The final norm (ln_f) sits before the tied output head in every case.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.norms import check_model_config, make_norm, resolve_block_positions, resolve_norm_stack


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        if config.qk_norm:  # one norm over head_dim, its gains shared by the heads (OLMo 2, Qwen3)
            self.q_norm = make_norm(config.qk_norm, config.n_embd // config.n_head, config)
            self.k_norm = make_norm(config.qk_norm, config.n_embd // config.n_head, config)
        else:
            self.q_norm = self.k_norm = None
        self.keep_qk, self.last_qk = False, None  # model/diagnostics.py sets keep_qk for its one pass

    def forward(self, x, kv_cache=None):
        """kv_cache: None, or a dict this layer fills with keys/values of all tokens seen so far."""
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head) for t in self.c_attn(x).split(C, dim=2))
        if self.q_norm is not None:  # normed before caching: cached keys are already normed
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.keep_qk:  # the diagnostics pass only: explicit scores are too slow for training
            self.last_qk = (q, k)
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
    def __init__(self, config, position, attn_norm, mlp_norm):
        super().__init__()
        self.position = position
        has_out = position in ("peri", "output")

        def norm(name, present):  # absent sites are None: no parameters, no checkpoint keys
            return make_norm(name, config.n_embd, config) if present else None
        self.ln_1 = norm(attn_norm, position != "output")
        self.attn = CausalSelfAttention(config)
        self.ln_1_out = norm(config.output_norm or attn_norm, has_out)
        self.ln_2 = norm(mlp_norm, position != "output")
        self.mlp = MLP(config)
        self.ln_2_out = norm(config.output_norm or mlp_norm, has_out)

    def forward(self, x, kv_cache=None):
        x = self.residual(x, lambda h: self.attn(h, kv_cache), self.ln_1, self.ln_1_out)
        return self.residual(x, self.mlp, self.ln_2, self.ln_2_out)

    def residual(self, x, sublayer, norm_in, norm_out):
        """x plus the sublayer's output, with the norms of this block's position (module docstring)."""
        if self.position == "post":
            return norm_in(x + sublayer(x))
        h = sublayer(x if norm_in is None else norm_in(x))
        return x + (h if norm_out is None else norm_out(h))

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
        positions = resolve_block_positions(config)
        self.norm_stack = block_norms, final_norm, positions
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, p, a, m) for p, (a, m) in zip(positions, block_norms)]),
            ln_f=make_norm(final_norm, config.n_embd, config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
        self.apply(self._init_weights)

    def tie_weights(self):
        """Tied input/output embeddings. accelerate's FSDP2 calls this by name after loading sharded
        weights (fsdp_cpu_ram_efficient_loading), which would otherwise leave lm_head a separate copy."""
        self.transformer.wte.weight = self.lm_head.weight

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
        blocks, final, positions = self.norm_stack
        c = self.config
        kind = "per-block positions" if c.block_positions else f"{c.norm_position}-norm"
        lines = [f"norm stack ({kind}, eps={c.norm_eps}):"]
        for i, ((a, m), position) in enumerate(zip(blocks, positions)):
            line = f"  block {i}: attn={a} mlp={m}"
            if position == "output":  # no input norms: the sublayer norms sit on the outputs only
                line = f"  block {i}:"
            if position in ("peri", "output"):
                line += f" attn_out={c.output_norm or a} mlp_out={c.output_norm or m}"
            if c.block_positions:
                line += f" ({position})"
            if c.qk_norm:
                line += f" q,k={c.qk_norm}"
            lines.append(line)
        lines.append(f"  final: {final}")
        if "dyt" in {n for pair in blocks for n in pair} | {final, c.qk_norm, c.output_norm}:
            lines.append(f"  dyt: alpha initialised to {c.dyt_alpha}")
        if c.z_loss:
            lines.append(f"  z_loss: {c.z_loss:g} * mean(log Z^2) added to the training loss")
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


def z_loss(logits):
    """mean(log(Z)^2) over tokens, Z the softmax normaliser of each row of logits: the auxiliary
    loss that keeps log Z near 0, so the output logits cannot drift (Wortsman et al. 2023)."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


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
