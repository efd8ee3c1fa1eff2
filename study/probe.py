"""The re-centering probe: which norm sites does a trained model rely on, and how?

It flips ONE norm site at a time and evaluates the fixed validation set (training.evaluation):
  - a site that re-centers (LayerNorm) loses its mean subtraction and keeps its gain and bias: it becomes
    g * x / sqrt(mean(x²) + eps) + b, i.e. RMSNorm with the LayerNorm's parameters;
  - any other site (RMSNorm, pRMSNorm, ScaleNorm, DyT, none) gets mean subtraction as a pre-step,
    norm(x - mean(x)), with its own parameters. For RMSNorm that is exactly LayerNorm without bias.
Then it REMOVES, one at a time, each block's QK-norm (q and k together) and each output norm (the
sublayer-output norms of "peri" and "output" blocks), replacing them by the identity.
No weights are retrained, so Δ val loss measures how much the trained weights rely on the site's
(non-)centering, or on the site at all.
"""
import json
from pathlib import Path

import torch
import torch.nn as nn
from accelerate import Accelerator

from config import UserError
from data.prepare import prepare_data
from kernels.rmsnorm import rms_norm
from data.batches import diagnostics_batch
from model.diagnostics import SITE_SLOTS, collect, norm_sites, site_slot
from model.norms import LayerNorm, refuse_normalized, upcast
from study import plots
from training.checkpoint import load_model
from training.evaluation import evaluate
from training.runlog import DIAGNOSTICS, read_diagnostics


class Centered(nn.Module):
    """norm(x - mean(x)): mean subtraction added in front of a norm that does not re-center. A pre-step,
    so it composes with any norm's forward (autograd Functions and Triton kernels included)."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        xf = upcast(x)  # the mean in fp32, as the norms compute their statistics
        return self.norm(xf - xf.mean(-1, keepdim=True)).to(x.dtype)


class Uncentered(nn.Module):
    """A LayerNorm without its mean subtraction: g * x / sqrt(mean(x²) + eps) + b, same g, b and eps."""

    def __init__(self, layernorm):
        super().__init__()
        self.ln = layernorm

    def forward(self, x):
        y = rms_norm(x, self.ln.weight, self.ln.eps)  # the registry's RMSNorm math, with this site's g
        return y if self.ln.bias is None else y + self.ln.bias.to(y.dtype)


def recenters(norm):
    return isinstance(norm, LayerNorm)


def with_centering(norm, center):
    """The site's norm with mean subtraction on (center=True) or off. A site already in that state is
    returned unchanged, so "flipping" it to what it is changes nothing, bit for bit."""
    if center == recenters(norm):
        return norm
    return Centered(norm) if center else Uncentered(norm)


def set_site(model, site, module):
    """Put `module` at a norm site named as in model.diagnostics.norm_sites ("block2.mlp", "block0.q", "final")."""
    if site in ("final", "embed"):
        setattr(model.transformer, "ln_f" if site == "final" else "ln_e", module)
        return
    block, suffix = site.split(".")
    owner, attr = site_slot(model.transformer.h[int(block.removeprefix("block"))], dict(SITE_SLOTS)[suffix])
    setattr(owner, attr, module)


def removable_sites(model):
    """[(label, [site names], change)] of the sites the probe removes: per block its QK-norm (q and k
    together) and each output norm."""
    names = [name for name, _ in norm_sites(model)]
    groups = []
    for i in range(len(model.transformer.h)):
        if f"block{i}.q" in names:
            groups.append((f"block{i}.qk", [f"block{i}.q", f"block{i}.k"], "QK-norm removed"))
        groups += [(f"block{i}.{s}", [f"block{i}.{s}"], "output norm removed") for s in ("attn_out", "mlp_out")
                   if f"block{i}.{s}" in names]
    return groups


@torch.no_grad()
def probe(model, val_tokens, config, accelerator, center=None):
    """One row per norm site: val loss with that site flipped (or, with center=True/False, set to that
    state) and Δ against the unchanged model; without center, also one row per removable site group."""
    # a swapped-in module has no add_norm, so with fused_add_norm its site runs unfused (model/gpt.py)
    base = evaluate(model, val_tokens, config, accelerator)
    rows = []
    for site, norm in norm_sites(model):
        target = (not recenters(norm)) if center is None else center
        set_site(model, site, with_centering(norm, target))
        try:
            loss = evaluate(model, val_tokens, config, accelerator)
        finally:
            set_site(model, site, norm)
        change = "same" if target == recenters(norm) else \
            "mean subtraction removed" if recenters(norm) else "mean subtraction added"
        rows.append({"site": site, "norm": type(norm).__name__, "recenters": recenters(norm), "change": change,
                     "val_loss": loss, "base_val_loss": base, "delta": loss - base})
    modules = dict(norm_sites(model))
    for label, sites, change in ([] if center is not None else removable_sites(model)):
        for site in sites:
            set_site(model, site, nn.Identity())
        try:
            loss = evaluate(model, val_tokens, config, accelerator)
        finally:
            for site in sites:
                set_site(model, site, modules[site])
        rows.append({"site": label, "norm": type(modules[sites[0]]).__name__, "recenters": None, "change": change,
                     "val_loss": loss, "base_val_loss": base, "delta": loss - base})
    return rows


def probe_table(rows):
    lines = [f"Val loss of the unchanged model: {rows[0]['base_val_loss']:.5f}", "",
             "| site | norm | change | val loss | Δ val loss |", "|---|---|---|---|---|"]
    lines += [f"| {r['site']} | {r['norm']} | {r['change']} | {r['val_loss']:.5f} | {r['delta']:+.5f} |" for r in rows]
    return "\n".join(lines)


def run_probe(run_dir, log=print):
    model, config, folder = load_model(run_dir)
    return probe_model(model, config, run_dir, folder, log)


def probe_model(model, config, out_dir, name, log=print):
    """The probe of a loaded model on config's validation windows -> out_dir/probe.md, probe.json, probe.png
    (analyze.py: a run's checkpoint, or a transformers checkpoint loaded by hf.load_pretrained)."""
    refuse_normalized(config, "the re-centering probe (it flips each norm site's re-centering)")
    out_dir = Path(out_dir)
    accelerator = Accelerator(cpu=config.device == "cpu")
    model.to(accelerator.device)
    data = prepare_data(config, log=lambda *a: None)
    rows = probe(model, data.tokens("val"), config, accelerator)
    table = f"# Re-centering probe of {name}\n\n{probe_table(rows)}\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "probe.md").write_text(table)
    (out_dir / "probe.json").write_text(json.dumps(rows, indent=1))
    plots.plot_probe(rows, out_dir / "probe.png", f"re-centering probe: {name}")
    log(table + f"\nwritten: {out_dir / 'probe.md'}, probe.json, probe.png")
    return rows


def measure_diagnostics(model, config, out_dir, name, log=print):
    """The per-layer diagnostics (model/diagnostics.py) of a model that was not trained here, measured once
    on the first batch_size validation windows -> out_dir/diagnostics.jsonl (one line, step 0) and
    diagnostics.png; `analyze.py diagnostics out_dir` redraws them."""
    out_dir = Path(out_dir)
    model.to(Accelerator(cpu=config.device == "cpu").device)
    row = {"step": 0, **measure_once(model, config), "grad_norm": None}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DIAGNOSTICS).write_text(json.dumps(row) + "\n")
    plots.plot_diagnostics([row], out_dir / "diagnostics.png", f"{name}: {config.batch_size} windows of {config.block_size}")
    log(f"written: {out_dir / DIAGNOSTICS}, {out_dir / 'diagnostics.png'}")
    return row


def measure_once(model, config):
    """The diagnostics line of model on the batch train.py measures: the first batch_size validation
    windows, on the model's device."""
    device = next(model.parameters()).device
    val = prepare_data(config, log=lambda *a: None).tokens("val")
    return collect(model, diagnostics_batch(val, config.block_size, config.batch_size, device))


def run_diagnostics(run_dir, log=print):
    rows = read_diagnostics(run_dir)
    if not rows:
        raise UserError(f"{str(run_dir)!r} has no diagnostics.jsonl; train with diagnostics = true")
    path = Path(run_dir) / "diagnostics.png"
    plots.plot_diagnostics(rows, path, str(run_dir))
    log(f"written: {path}")
