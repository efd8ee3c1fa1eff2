"""The re-centering probe: which norm sites does a trained model rely on, and how?

It flips ONE norm site at a time and measures the loss on the same windows with and without the flip:
  - a site that re-centers (LayerNorm) loses its mean subtraction and keeps its gain and bias: it becomes
    g * x / sqrt(mean(x²) + eps) + b, i.e. RMSNorm with the LayerNorm's parameters;
  - any other site (RMSNorm, pRMSNorm, ScaleNorm, DyT, none) gets mean subtraction as a pre-step,
    norm(x - mean(x)), with its own parameters. For RMSNorm that is exactly LayerNorm without bias.
Then it REMOVES, one at a time, each block's QK-norm (q and k together) and each output norm (the
sublayer-output norms of "peri" and "output" blocks), replacing them by the identity.
No weights are retrained, so Δ val loss measures how much the trained weights rely on the site's
(non-)centering, or on the site at all.

The windows: one per document, starting at its start (data.batches.document_windows). Each flip gets a
95% interval (a bootstrap over documents) and a decision against a threshold, in stages: every flip is
screened on a few windows, then only the undecided ones get more (study/staged.py). The unchanged
model's stream entering each block is computed once per batch; a flip reruns only from its block on.
"""
import json
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator

from config import UserError
from data.batches import IGNORE, diagnostics_batch, document_batch, document_windows
from data.prepare import prepare_data
from data.tokenizer import end_of_document, window_start_token
from kernels.rmsnorm import rms_norm
from model.diagnostics import SITE_SLOTS, collect, norm_sites, site_slot
from model.norms import LayerNorm, upcast
from model.stack import parse_site, refuse_normalized, site_name
from study import plots
from study.recentering import DELTA_THRESHOLD
from study.staged import ALPHA, DECISIONS, bootstrap_ci, delta, planned_looks, staged
from training.checkpoint import load_model
from training.runlog import DIAGNOSTICS, METRICS, read_diagnostics

SCREEN = 8  # windows every flip is screened on
MAX_WINDOWS = 64  # windows a flip gets at most (looks at 8, 16, 32, 64: alpha / 4 per look)


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
    block, suffix = parse_site(site)
    if block is None:  # "final" or "embed"
        setattr(model.transformer, "ln_f" if site == "final" else "ln_e", module)
        return
    owner, attr = site_slot(model.transformer.h[block], dict(SITE_SLOTS)[suffix])
    setattr(owner, attr, module)


def removable_sites(model):
    """[(label, [site names], change)] of the sites the probe removes: per block its QK-norm (q and k
    together) and each output norm."""
    names = [name for name, _ in norm_sites(model)]
    groups = []
    for i in range(len(model.transformer.h)):
        if site_name(i, "q") in names:
            groups.append((site_name(i, "qk"), [site_name(i, "q"), site_name(i, "k")], "QK-norm removed"))
        groups += [(site_name(i, s), [site_name(i, s)], "output norm removed") for s in ("attn_out", "mlp_out")
                   if site_name(i, s) in names]
    return groups


def flips(model, center=None, removals=True):
    """The probe's flips, in order: one per norm site (its centering flipped, or with center=True/False
    set to that state), then, without center and with removals, one per removable site group. Each is a
    dict with the row's fields, "key" (unique: an output norm's removal is named as its site), "swaps", the
    [(site, module)] to put in, and "start", the block the flip's first changed module is in (len(h)
    for the final norm, None for the embedding norm: the whole model)."""
    out = []
    for site, norm in norm_sites(model):
        target = (not recenters(norm)) if center is None else center
        change = "same" if target == recenters(norm) else \
            "mean subtraction removed" if recenters(norm) else "mean subtraction added"
        out.append({"key": site, "site": site, "norm": type(norm).__name__, "recenters": recenters(norm), "change": change,
                    "swaps": [(site, with_centering(norm, target))], "start": first_block(model, site)})
    modules = dict(norm_sites(model))
    for label, sites, change in (removable_sites(model) if center is None and removals else []):
        out.append({"key": f"{label} removed", "site": label, "norm": type(modules[sites[0]]).__name__,
                    "recenters": None, "change": change,
                    "swaps": [(site, nn.Identity()) for site in sites], "start": first_block(model, label)})
    return out


def first_block(model, site):
    if site == "embed":
        return None
    return len(model.transformer.h) if site == "final" else int(site.split(".")[0].removeprefix("block"))


@contextmanager
def swapped(model, swaps):
    """The model with each (site, module) of swaps in place, put back as it was afterwards."""
    modules = dict(norm_sites(model))
    kept = [(site, modules[site]) for site, _ in swaps]
    for site, module in swaps:
        set_site(model, site, module)
    try:
        yield model
    finally:
        for site, module in kept:
            set_site(model, site, module)


def window_nats(logits, y):
    """The summed cross-entropy of each window's targets (rows of y; IGNORE targets count nothing), in
    float64. The probe's one loss computation: per window, so that windows can be paired and resampled."""
    nats = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none", ignore_index=IGNORE)
    return nats.view(y.shape).double().sum(1)


@torch.no_grad()
def batch_nats(model, x, y, flips, reuse=True):
    """Yields ("", the unchanged model's window_nats), then (flip["key"], that flip's) for each flip: a
    caller may stop early (a time budget). With reuse, the stream entering each block is kept from the
    unchanged pass and a flip reruns only the blocks from its own on (a flip at block k changes nothing
    before it); without, every flip reruns the whole model. Same losses, bit for bit (tests/test_probe.py)."""
    model.eval()
    streams = []  # (x, delta) entering block i; i = len(h): entering the final norm
    keep = (lambda i, h, delta: streams.append((h, delta))) if reuse else None
    logits, _ = model.forward_from(0, model.embed(x), on_block=keep)
    yield "", window_nats(logits, y)
    for flip in flips:
        with swapped(model, flip["swaps"]):
            if reuse and flip["start"] is not None:
                h, delta = streams[flip["start"]]
                logits, _ = model.forward_from(flip["start"], h, delta=delta)
            else:
                logits, _ = model(x)
        yield flip["key"], window_nats(logits, y)


class Windows:
    """The probe's windows: one per document (data.batches.document_windows), drawn from each split in
    turn (the validation split first), in a seeded random order, at most `most`. A window's document
    is named "<split>:<start>"."""

    def __init__(self, splits, separator, block_size, most, seed=0):
        self.splits, self.separator, self.block_size = splits, separator, block_size
        rng = np.random.default_rng(seed)
        picked = []
        for name, tokens in splits.items():
            starts, n_targets = document_windows(tokens, separator, block_size)
            order = rng.permutation(len(starts))
            picked += [(name, int(starts[i]), int(n_targets[i])) for i in order]
        self.where = picked[:most]
        if not self.where:
            raise UserError(f"the {'/'.join(splits)} split(s) hold no document to probe")
        self.tokens = np.array([n for _, _, n in self.where], dtype=float)
        self.docs = np.array([f"{name}:{start}" for name, start, _ in self.where])

    def __len__(self):
        return len(self.where)

    def batch(self, indices, device):
        """(x, y) of the windows at `indices`, each split's windows cut from its own tokens."""
        xs, ys = [], []
        for i in indices:
            name, start, n = self.where[i]
            x, y = document_batch(self.splits[name], [start], [n], self.separator, self.block_size, device)
            xs.append(x)
            ys.append(y)
        return torch.cat(xs), torch.cat(ys)


class Record:
    """Each (window, flip) result as it comes, one JSON line each in a file beside probe.json, so that
    a stopped probe resumes where it stopped. The first line names the probe (model, windows); a file
    that names another probe is started afresh."""

    def __init__(self, path, identity, log=print):
        self.path, self.done = Path(path) if path else None, {}
        if self.path is None:
            return
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        if lines and json.loads(lines[0]).get("probe") == identity:
            for line in lines[1:]:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # a line cut short when the probe was stopped
                    continue
                self.done[(r["window"], r["site"])] = r["nats"]
            log(f"resuming the probe from {self.path}: {len(self.done)} window results recorded")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"probe": identity}) + "\n")

    def add(self, window, site, nats):
        if self.done.get((window, site)) == nats:  # the unchanged model's, computed again for another flip
            return
        self.done[(window, site)] = nats
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps({"window": window, "site": site, "nats": nats}) + "\n")


def probe(model, windows, center=None, threshold=DELTA_THRESHOLD, alpha=ALPHA, screen=SCREEN, batch_size=4,
          budget_s=None, record=None, seed=0, removals=True, log=print):
    """One row per flip (flips()): Δ val loss against the unchanged model on the same windows, its ci95
    (a document bootstrap), the flip's own base loss and windows, and its decision against threshold
    (study/staged.py). Every flip is screened on the first `screen` windows; windows are then added,
    doubling, only to flips still undecided, until all of `windows` are used or budget_s seconds have
    passed (the screen always completes). record: a Record to resume from and add to."""
    record = record or Record(None, None)
    device = next(model.parameters()).device
    todo = flips(model, center, removals)
    begun = time.monotonic()

    def out_of_time(window_range):  # the screen (the first look) always completes
        return budget_s is not None and window_range.start > 0 and time.monotonic() - begun > budget_s

    def evaluate(active, window_range):
        chosen = [f for f in todo if f["key"] in active]
        wanted = list(window_range)
        for i in range(0, len(wanted), batch_size):
            batch = wanted[i:i + batch_size]
            missing = [f for f in chosen if any((w, f["key"]) not in record.done for w in batch)]
            if missing and not out_of_time(window_range):
                x, y = windows.batch(batch, device)
                for site, values in batch_nats(model, x, y, missing):
                    for w, v in zip(batch, values.tolist()):
                        record.add(w, site, v)
                    if out_of_time(window_range):
                        break
            for f in chosen:
                for w in batch:
                    if (w, f["key"]) in record.done:
                        yield f["key"], w, record.done[(w, f["key"])] - record.done[(w, "")]

    looks = planned_looks(screen, len(windows))
    diffs, decision, interval = staged([f["key"] for f in todo], windows.tokens, windows.docs, looks, evaluate,
                                       threshold, alpha)
    rng = np.random.default_rng(seed)
    rows = []
    for f in todo:
        used = sorted(diffs[f["key"]])
        d, n = np.array([diffs[f["key"]][w] for w in used]), windows.tokens[used]
        base = sum(record.done[(w, "")] for w in used) / n.sum()
        rows.append({**{k: v for k, v in f.items() if k not in ("key", "swaps", "start")},
                     "val_loss": base + delta(d, n), "base_val_loss": base, "delta": delta(d, n),
                     "ci95": bootstrap_ci(d, n, windows.docs[used], rng), "decision": decision[f["key"]],
                     "decision_interval": interval[f["key"]], "windows": len(used),
                     "documents": len(set(windows.docs[used])), "threshold": threshold,
                     "alpha_per_look": alpha / len(looks)})
    log(f"probe: {len(todo)} flips, looks at {looks} windows, {time.monotonic() - begun:.0f} s")
    return rows


def probe_table(rows):
    first = rows[0]
    lines = [f"Δ: val loss per token with the flip minus without it, on the same windows (one per document, "
             f"starting at its start). ci95: a bootstrap over documents. Decision at |Δ| = {first['threshold']:g} "
             f"nats: Student's t on the documents' totals at level 1 - {first['alpha_per_look']:.4g} per look "
             f"(Bonferroni over the planned looks; study/staged.py). Each flip's base loss is on its own windows.", "",
             "| site | norm | change | base loss | Δ val loss | ci95 | windows | decision |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['site']} | {r['norm']} | {r['change']} | {r['base_val_loss']:.5f} | {r['delta']:+.5f} "
              f"| [{r['ci95'][0]:+.5f}, {r['ci95'][1]:+.5f}] | {r['windows']} | {r['decision']} |" for r in rows]
    counts = {d: sum(r["decision"] == d for r in rows) for d in DECISIONS}
    lines += ["", ", ".join(f"{n} {d}" for d, n in counts.items() if n) + f" of {len(rows)} flips."]
    return "\n".join(lines)


def run_probe(run_dir, log=print, **options):
    model, config, folder = load_model(run_dir)
    return probe_model(model, config, run_dir, f"{run_dir} ({Path(folder).name})", log, **options)


def probe_model(model, config, out_dir, name, log=print, splits=("val",), threshold=DELTA_THRESHOLD, alpha=ALPHA,
                screen=SCREEN, max_windows=MAX_WINDOWS, budget_s=None, seed=0, removals=True):
    """The probe of a loaded model on windows at document starts of config's data -> out_dir/probe.md,
    probe.json, probe.png, and probe_windows.jsonl (each window's result, to resume from). A pretrained
    model (analyze.py) may draw documents from both splits: it has seen none of them."""
    refuse_normalized(config, "the re-centering probe (it flips each norm site's re-centering)")
    out_dir = Path(out_dir)
    if screen < 2 or max_windows < screen:
        raise UserError(f"--screen must be >= 2 windows (two documents give the first interval) and --max_windows "
                        f">= --screen; got {screen} and {max_windows}")
    if budget_s is not None and budget_s < 0:
        raise UserError(f"--budget_s must be >= 0 seconds, got {budget_s}")
    model.to(Accelerator(cpu=config.device == "cpu").device)
    data = prepare_data(config, log=lambda *a: None)
    separator = end_of_document(data.load_tokenizer(), data.eod_token)[1]
    windows = Windows({s: data.tokens(s) for s in splits}, separator, config.block_size, max_windows, seed)
    identity = {"model": name, "data": data.directory, "block_size": config.block_size, "splits": list(splits),
                "seed": seed, "windows": len(windows), "dtype": str(next(model.parameters()).dtype)}
    record = Record(out_dir / "probe_windows.jsonl", identity, log)
    rows = probe(model, windows, threshold=threshold, alpha=alpha, screen=screen, batch_size=config.batch_size,
                 budget_s=budget_s, record=record, seed=seed, removals=removals, log=log)
    table = (f"# Re-centering probe of {name}\n\n{len(windows)} windows of up to {config.block_size} tokens from "
             f"the {' and '.join(splits)} split(s)" + (f", a budget of {budget_s:g} s" if budget_s is not None else "")
             + f".\n\n{probe_table(rows)}\n")
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
    return collect(model, diagnostics_batch(val, config.block_size, config.batch_size, device, window_start_token(config)))


def run_diagnostics(run_dir, log=print):
    rows = read_diagnostics(run_dir)
    runs = sorted(p.parent for p in (Path(run_dir) / "runs").rglob(METRICS)) if not rows else []
    if runs:  # a comparison folder: diagnostics are its runs'
        recorded = [r for r in runs if read_diagnostics(r)]
        raise UserError(f"{str(run_dir)!r} is a comparison folder; diagnostics are per run, e.g. analyze.py diagnostics "
                        f"{recorded[0]} ({len(recorded)} of its {len(runs)} runs recorded them; their seed means "
                        f"are its diagnostics_<variant>.png)" if recorded else
                        f"{str(run_dir)!r} is a comparison folder, and none of its {len(runs)} runs recorded diagnostics; "
                        f"set diagnostics = true in its [base] table and train again")
    if not rows:
        raise UserError(f"{str(run_dir)!r} has no diagnostics.jsonl; train with diagnostics = true")
    path = Path(run_dir) / "diagnostics.png"
    plots.plot_diagnostics(rows, path, str(run_dir))
    log(f"written: {path}")
