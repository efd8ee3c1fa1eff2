"""Sweeps in a comparison: one config key crossed with every variant and seed, and the learning-rate
sensitivity of Wortsman et al. (2023). compare.py reads the [sweep] table through this module.

    [sweep]
    learning_rate = [3e-3, 1e-2, 3e-2]

crosses every variant with every value (and every seed). A point of the grid is labelled
"<variant>@<key>=<value>" in tables (e.g. "rmsnorm@learning_rate=0.01") and its runs live in
<out_dir>/runs/<variant>/<key>_<value>/seed<seed>. When the sweep sets learning_rate, min_lr follows it
by the ratio min_lr / learning_rate of the variant's own config, so the cosine schedule keeps its shape.

LR sensitivity (Wortsman et al. 2023, section 3.1): with L(v) the mean over seeds of
min(final val loss, initial val loss) at value v, a diverged run counting as the initial loss (the
step-0 val loss, about log(vocab_size)),

    sensitivity = mean over v of L(v)  -  min over v of L(v)

0 means every swept value trains equally well; a variant that only trains at one value scores high.
"""
import math

import numpy as np

from config import UserError
from training.runlog import read_diagnostics

DIVERGED = "diverged"  # a run's status when it produced non-finite losses (train.TrainingDiverged or a NaN loss)


def parse_sweep(spec, where):
    """(key, values) of a comparison's [sweep] table, or (None, [None]) without one."""
    if spec is None:
        return None, [None]
    if not isinstance(spec, dict) or len(spec) != 1:
        raise UserError(f"{where}: [sweep] must hold exactly one config key with a list of values, "
                        f"e.g. learning_rate = [3e-3, 1e-2, 3e-2]")
    (key, values), = spec.items()
    if not isinstance(values, list) or not values or len(set(map(repr, values))) != len(values):
        raise UserError(f"{where}: sweep {key} must be a non-empty list of distinct values, got {values!r}")
    return key, values


def value_text(value):
    return format(value, "g") if isinstance(value, float) else str(value).lower()


def point_label(variant, key, value):
    """A grid point's name in tables: the variant alone without a sweep."""
    return variant if key is None else f"{variant}@{key}={value_text(value)}"


def point_folder(key, value):
    """The folder between runs/<variant>/ and seed<N>/ ("" without a sweep)."""
    return "" if key is None else f"{key}_{value_text(value)}"


def sweep_overrides(config, key, value):
    """The overrides that put `config` (base + variant) at this sweep value."""
    if key is None:
        return {}
    overrides = {key: value}
    if key == "learning_rate" and config.learning_rate > 0:
        overrides["min_lr"] = config.min_lr * value / config.learning_rate
    return overrides


def capped_loss(row):
    """min(final val loss, initial val loss) of a run; a diverged run counts as its initial loss."""
    if row["status"] == DIVERGED or row.get("final_val_loss") is None or not math.isfinite(row["final_val_loss"]):
        return row["initial_val_loss"]
    return min(row["final_val_loss"], row["initial_val_loss"])


def lr_sensitivity(capped_by_value):
    """{value: [capped loss of each seed]} -> (sensitivity, best value, {value: mean capped loss}).
    Values without any result are left out."""
    means = {v: float(np.mean(losses)) for v, losses in capped_by_value.items() if losses}
    if not means:
        return None, None, means
    best = min(means, key=means.get)
    return float(np.mean(list(means.values())) - means[best]), best, means


def final_max_attention_logit(run_dir):
    """The largest attention logit over layers at a run's last diagnostics row (None without diagnostics)."""
    rows = [r for r in read_diagnostics(run_dir) if r.get("attn_max_logit")]
    return max(rows[-1]["attn_max_logit"]) if rows else None


def summarize_sweep(rows, comparison):
    """Per variant: final val loss at each value (mean ± std over the seeds that did not diverge), the
    diverged count, mean max attention logit at the end, best value and LR sensitivity."""
    key, summary = comparison.sweep_key, []
    for variant in comparison.base_variants:
        at = {}
        for label, (v, value) in comparison.points.items():
            if v != variant:
                continue
            runs = [r for r in rows if r["variant"] == label and r["status"] in ("ok", DIVERGED)]
            finals = [r["final_val_loss"] for r in runs if r["status"] == "ok"]
            logits = [x for x in (final_max_attention_logit(r["run_dir"]) for r in runs if r["status"] == "ok")
                      if x is not None]
            at[value] = {"mean": float(np.mean(finals)) if finals else None,
                         "std": float(np.std(finals, ddof=1)) if len(finals) > 1 else None,
                         "n_ok": len(finals), "n_diverged": sum(r["status"] == DIVERGED for r in runs),
                         "max_attn_logit": float(np.mean(logits)) if logits else None,
                         "capped": [capped_loss(r) for r in runs if r.get("initial_val_loss") is not None]}
        sensitivity, best, means = lr_sensitivity({v: e["capped"] for v, e in at.items()})
        summary.append({"variant": variant, "key": key, "values": at, "best_value": best,
                        "lr_sensitivity": sensitivity, "capped_means": means,
                        "n_diverged": sum(e["n_diverged"] for e in at.values())})
    return summary


def sweep_table(summary, values):
    """Markdown: one row per variant, one column per swept value."""
    def cell(e):
        loss = "–" if e["mean"] is None else f"{e['mean']:.3f}" + ("" if e["std"] is None else f" ± {e['std']:.3f}")
        extra = [f"{e['n_diverged']} diverged"] if e["n_diverged"] else []
        if e["max_attn_logit"] is not None:
            extra.append(f"logit {e['max_attn_logit']:.0f}")
        return loss + (f" ({', '.join(extra)})" if extra else "")
    key = summary[0]["key"]
    lines = ["| variant | " + " | ".join(f"{key} = {value_text(v)}" for v in values)
             + " | best | diverged | LR sensitivity |", "|---" * (len(values) + 4) + "|"]
    for s in summary:
        best = "–" if s["best_value"] is None else value_text(s["best_value"])
        sens = "–" if s["lr_sensitivity"] is None else f"{s['lr_sensitivity']:.3f}"
        lines.append(f"| {s['variant']} | " + " | ".join(cell(s["values"][v]) for v in values)
                     + f" | {best} | {s['n_diverged']} | {sens} |")
    return "\n".join(lines)
