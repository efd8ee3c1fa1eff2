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
the projection, before rotary positions (pos_emb = "rope"). embed_norm puts a norm (ln_e) on the
embedding before the first block (embed_scale: times a learned scalar first); the final norm (ln_f) sits before the output head (tied to the
embedding unless tie_embeddings = false) in every case. norm_scaling = "layer" multiplies block i's
input norms by 1/sqrt(i + 1); logit_softcap = c makes the logits c * tanh(logits / c).

Gemma 3's pieces: head_dim (a head size other than n_embd / n_head), query_pre_attn_scalar (the
softmax scale), scale_embedding (the embedding times the constant sqrt(n_embd)), the geglu_tanh MLP,
and local blocks (block_attention, sliding_window) with a RoPE base of their own (rope_local_theta).
"""
import math
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import UserError
from model.layers import MLP, CausalSelfAttention, Rotary, head_size, mlp_hidden_size
from model.norms import make_norm
from model.stack import (FUSABLE_NORMS, block_norm_names, check_model_config, norm_names_used,
                         resolve_block_attention, resolve_block_positions, resolve_norm_stack, site_norm)


LOGIT_CHUNK_ELEMENTS = 2 ** 26  # per chunk of token_losses: 256 MB of fp32 logits, 256 tokens of Gemma 3's


class Block(nn.Module):
    def __init__(self, config, position, attn_norm, mlp_norm, index=0, rotary=None, window=0):
        super().__init__()
        self.position = position
        # LayerNorm Scaling: deeper blocks' sublayers see smaller inputs, so the residual stream's
        # variance grows slower with depth (a plain float: no parameter, no checkpoint key)
        self.input_scale = 1 / math.sqrt(index + 1) if config.norm_scaling == "layer" else 1.0
        has_out = position in ("peri", "output")

        def norm(name, present, cfg=config):  # absent sites are None: no parameters, no checkpoint keys
            return make_norm(name, config.n_embd, cfg) if present else None
        attn_config = replace(config, dyt_alpha=config.dyt_alpha_attn) if config.dyt_alpha_attn else config
        names = block_norm_names(config, index)
        self.ln_1 = norm(attn_norm, position != "output", attn_config)
        self.attn = CausalSelfAttention(config, rotary, window, (names["q"], names["k"]))
        self.ln_1_out = norm(names["attn_out"], has_out)
        self.ln_2 = norm(mlp_norm, position != "output")
        self.mlp = MLP(config)
        self.ln_2_out = norm(names["mlp_out"], has_out)

    def forward(self, x, kv_cache=None):
        x = self.residual(x, lambda h: self.attn(h, kv_cache), self.ln_1, self.ln_1_out)
        return self.residual(x, self.mlp, self.ln_2, self.ln_2_out)

    def residual(self, x, sublayer, norm_in, norm_out):
        """x plus the sublayer's output, with the norms of this block's position (module docstring)."""
        if self.position == "post":
            return norm_in(x + sublayer(x))
        h = sublayer(x if norm_in is None else self.scaled(norm_in(x)))
        return x + (h if norm_out is None else norm_out(h))

    def scaled(self, h):
        return h if self.input_scale == 1.0 else h * self.input_scale

    def forward_fused(self, x, delta, kv_cache=None):
        """forward()'s pre-norm math for config.fused_add_norm. It takes and returns (x, delta):
        delta is the last sublayer output not yet added to x, because each norm does that add in
        the same kernel as the norm itself:

            x ──(+ delta)── ln_1 ── attn ──> a      x ──(+ a)── ln_2 ── mlp ──> delta'
        """
        x, h = add_then_norm(self.ln_1, x, delta)
        x, h = add_then_norm(self.ln_2, x, self.attn(self.scaled(h), kv_cache))
        return x, self.mlp(self.scaled(h))


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
        if config.block_type != "standard":  # a GPT would silently be the standard model
            raise ValueError(f"GPT builds block_type 'standard', not {config.block_type!r}; use model.make_model")
        block_norms, final_norm = resolve_norm_stack(config)
        positions = resolve_block_positions(config)
        self.norm_stack = block_norms, final_norm, positions
        attention = resolve_block_attention(config)
        rotary = local_rotary = None
        if config.pos_emb == "rope":  # local blocks may have a base of their own (Gemma 3: 10k, global 1M)
            rotary = Rotary(head_size(config), config.block_size, config.rope_theta)
            local_theta = config.rope_local_theta or config.rope_theta
            local_rotary = rotary if local_theta == config.rope_theta else Rotary(head_size(config), config.block_size, local_theta)
        blocks = [Block(config, p, a, m, i, rotary, 0) if kind == "global" else
                  Block(config, p, a, m, i, local_rotary, config.sliding_window)
                  for i, (p, (a, m), kind) in enumerate(zip(positions, block_norms, attention))]
        layers = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.pos_emb == "learned":
            layers["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        if config.embed_norm:
            layers["ln_e"] = make_norm(site_norm(config, "embed", config.embed_norm), config.n_embd, config)
        layers.update(
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(blocks),
            ln_f=make_norm(final_norm, config.n_embd, config))
        self.transformer = nn.ModuleDict(layers)
        if config.embed_scale:
            self.embed_scale = nn.Parameter(torch.tensor(float(config.embed_scale)))
        if config.scale_embedding:  # Gemma's constant sqrt(d), rounded as transformers rounds it: to fp32, then
            # to the embedding's dtype (sqrt(640) = 25.2982 is 25.25 in bf16); per dtype, a plain Python number
            sqrt_d = torch.tensor(math.sqrt(config.n_embd), dtype=torch.float32, device="cpu")  # also on meta init
            self.embedding_multiplier = {t: sqrt_d.to(t).item() for t in (torch.float64, torch.float32, torch.bfloat16, torch.float16)}
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
        self.apply(self._init_weights)

    def tie_weights(self):
        """Tied input/output embeddings (tie_embeddings). accelerate's FSDP2 calls this by name after
        loading sharded weights (fsdp_cpu_ram_efficient_loading), which would otherwise leave lm_head
        a separate copy. An untied head is initialised as the embedding is, N(0, 0.02)."""
        if self.config.tie_embeddings:
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
            names = block_norm_names(c, i)
            if position in ("peri", "output"):
                line += f" attn_out={names['attn_out']} mlp_out={names['mlp_out']}"
            if c.block_positions:
                line += f" ({position})"
            if c.qk_norm:
                line += f" q,k={names['q']}" if names["q"] == names["k"] else f" q={names['q']} k={names['k']}"
            lines.append(line)
        if c.embed_norm:
            lines.insert(1, f"  embed: {site_norm(c, 'embed', c.embed_norm)}")
        lines.append(f"  final: {final}")
        used = norm_names_used(c, blocks, final)
        if "dyt" in used:
            lines.append(f"  dyt: alpha initialised to {c.dyt_alpha}")
        if c.dyt_alpha_attn:  # it reaches ln_1 only: say where it applied, and which attention norms it did not
            pairs = list(zip(blocks, positions))
            attn = sum(a == "dyt" and p != "output" for (a, _), p in pairs)
            missed = [name for name, dyt in (
                ("q/k", c.qk_norm == "dyt"),
                ("attention output", any((c.output_norm or a) == "dyt" for (a, _), p in pairs if p in ("peri", "output"))))
                if dyt]
            lines.append(f"  dyt_alpha_attn: alpha initialised to {c.dyt_alpha_attn} at the attention input norm (ln_1) "
                         f"of {attn} of {len(blocks)} blocks" + (f"; the {' and '.join(missed)} norms keep dyt_alpha"
                                                                 if missed else "")
                         + ("" if attn else " (no ln_1 is dyt here: it changes nothing)"))
        if c.fused_add_norm:
            lines.append("  fused_add_norm: each residual add runs in one kernel with the norm after it"
                         + ("" if final in FUSABLE_NORMS else f", except before the final norm ({final}: no fused kernel)"))
        if c.embed_scale:
            lines.insert(1, f"  embed: times a learned scalar, initialised to {c.embed_scale:g}")
        if "derf" in used:
            lines.append(f"  derf: alpha initialised to {c.derf_alpha}, shift to 0")
        lines.append(self.describe_model())
        if c.z_loss:
            lines.append(f"  z_loss: {c.z_loss:g} * mean(log Z^2) added to the training loss")
        return "\n".join(lines)

    def local_blocks(self):
        local = [i for i, block in enumerate(self.transformer.h) if block.attn.window]
        return "all" if len(local) == len(self.transformer.h) else ",".join(map(str, local)) or "none"

    def describe_model(self):
        """The log line of what is not a norm: positions, MLP, heads, output head."""
        c = self.config
        return (f"  model: positions {c.pos_emb}" + (f" (theta {c.rope_theta:g})" if c.pos_emb == "rope" else "")
                + f", mlp {c.mlp} (hidden {mlp_hidden_size(c)}), heads {c.n_head}"
                + (f" (kv {c.n_kv_head})" if c.n_kv_head and c.n_kv_head != c.n_head else "")
                + (f" of {c.head_dim}" if c.head_dim else "")
                + (f", softmax scale 1/sqrt({c.query_pre_attn_scalar:g})" if c.query_pre_attn_scalar else "")
                + (f", embedding times sqrt({c.n_embd})" if c.scale_embedding else "")
                + (f", local blocks {self.local_blocks()} (window {c.sliding_window}"
                   + (f", theta {c.rope_local_theta:g})" if c.rope_local_theta else ")") if c.sliding_window else "")
                + f", head {'tied' if c.tie_embeddings else 'untied'}"
                + (f", logit soft-cap {c.logit_softcap:g}" if c.logit_softcap else "")
                + (", LayerNorm Scaling 1/sqrt(layer)" if c.norm_scaling == "layer" else ""))

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def forward(self, idx, targets=None, kv_caches=None, fused_add_norm=None, per_token=False):
        """Logits (and the mean cross-entropy against targets). fused_add_norm: None = the config's
        choice; False runs every norm as its own module call (the diagnostics' hooks see each one).
        per_token: (None, each target's cross-entropy as (B, T), 0 where the target is -100),
        computed over the output layer a chunk of tokens at a time (token_losses)."""
        T = idx.size(1)
        past = kv_caches[0].get("pos", 0) if kv_caches else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens exceeds block_size {self.config.block_size}")
        return self.forward_from(0, self.embed(idx, past), targets, kv_caches, fused_add_norm, per_token=per_token)

    def embed(self, idx, past=0):
        """The stream entering block 0: the embedding of idx at positions past.., with ln_e and dropout."""
        x = self.transformer.wte(idx)
        if self.config.scale_embedding:
            x = x * self.embedding_multiplier[x.dtype]
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(torch.arange(past, past + idx.size(1), device=idx.device))
        if self.config.embed_scale:
            x = x * self.embed_scale.to(x.dtype)
        if "ln_e" in self.transformer:
            x = self.transformer.ln_e(x)
        return self.transformer.drop(x)

    def forward_from(self, start, x, targets=None, kv_caches=None, fused_add_norm=None, delta=None, on_block=None,
                     per_token=False):
        """forward() from block `start` on (len(h): the final norm and head only), given the stream
        entering it: x, and with fused_add_norm delta, the sublayer output not yet added to x.
        on_block(i, x, delta) sees the stream entering each block i and the final norm (i = len(h)),
        so that a caller can rerun only a suffix of the model (study/probe.py)."""
        fused = self.config.fused_add_norm if fused_add_norm is None else fused_add_norm
        for i in range(start, len(self.transformer.h)):
            if on_block is not None:
                on_block(i, x, delta)
            kv_cache = None if kv_caches is None else kv_caches[i]
            if fused:  # with fused_add_norm, delta is the last sublayer output, added to x by the next norm
                x, delta = self.transformer.h[i].forward_fused(x, delta, kv_cache)
            else:
                x = self.transformer.h[i](x, kv_cache)
        if on_block is not None:
            on_block(len(self.transformer.h), x, delta)
        _, h = add_then_norm(self.transformer.ln_f, x, delta)
        if per_token:
            return None, self.token_losses(h, targets)
        logits = self.output_logits(h)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def output_logits(self, h):
        logits = self.lm_head(h)
        if self.config.logit_softcap:  # in fp32: tanh saturates early in bf16
            c = self.config.logit_softcap
            logits = c * torch.tanh(logits.float() / c)
        return logits

    def token_losses(self, h, targets):
        """The cross-entropy of each target (targets' shape) from the final hidden states h, whose
        logits are formed LOGIT_CHUNK_ELEMENTS at a time: with a large vocabulary (Gemma 3's 262,144
        rows) the logits of a whole evaluation batch would not fit in memory."""
        chunk = max(1, LOGIT_CHUNK_ELEMENTS // self.config.vocab_size)
        h, flat = h.reshape(-1, h.size(-1)), targets.reshape(-1)
        nats = [F.cross_entropy(self.output_logits(h[i:i + chunk]).float(), flat[i:i + chunk], reduction="none")
                for i in range(0, flat.numel(), chunk)]
        return torch.cat(nats).view(targets.shape)

    def after_optimizer_step(self):
        """Called by the trainer right after every optimizer step; the standard model has nothing to do
        (the normalized one puts its weights back on the unit sphere: model/normalized.py)."""

    def optimizer_groups(self, weight_decay):
        """Weight decay on matrices (embeddings, linear weights) and on parameters a norm marks for it
        (SeeDNorm's alpha and beta, as its paper does), never on gains, biases or scalars."""
        params = [p for p in self.parameters() if p.requires_grad]
        decayed = [p.dim() >= 2 or getattr(p, "weight_decay", False) for p in params]
        return [{"params": [p for p, d in zip(params, decayed) if d], "weight_decay": weight_decay},
                {"params": [p for p, d in zip(params, decayed) if not d], "weight_decay": 0.0}]

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


def load_exactly(module, state, where, tied=()):
    """Load `state` into `module` (a GPT or a transformers model) so that every parameter comes from it
    and every tensor finds a place: never run on half the weights. tied: keys that may be missing (an
    output head that is the embedding under a second name). One line (UserError) otherwise."""
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a shape mismatch
        raise UserError(f"{where}: weights do not fit the model: {str(e).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise UserError(f"{where}: weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
