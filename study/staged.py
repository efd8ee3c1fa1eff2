"""Error bars and staged decisions for the probe's flips (study/probe.py).

A flip's data are, per window w: d_w, the summed nats of the window's targets with the flip minus
without it (the same window, so the difference is paired), n_w its number of targets, and the document
it comes from. Δ = Σ d_w / Σ n_w, the change of the mean loss per token.

- ci95: a percentile bootstrap that resamples DOCUMENTS with replacement (each draw pools the windows
  of the drawn documents and recomputes Δ), since the windows of one document are not independent.
- The decision: |Δ| is "above" the threshold, "below" it, or "undecided" when the decision interval
  holds both a value of |Δ| above and one below. The probe looks at each site several times (after
  the screen, then after each batch of added windows), so the decision interval is corrected for the
  looks by Bonferroni: with K planned looks, each look's interval has level 1 - alpha / K, so the
  chance that ANY look's interval misses the true Δ, and hence of any wrong decision, is at most alpha
  per site (not per probe: of 60 sites near the threshold, ~3 may be wrong at alpha = 0.05). The
  interval is Student's t with n_documents - 1 degrees of freedom on the documents' totals (the
  cluster-robust standard error of a ratio), not the bootstrap's percentiles: with the 8 documents of
  a screen, a percentile interval at level 1 - 0.05/4 is far too narrow (it cannot reach past the
  most extreme document), and the error rate it promised would not hold. tests/test_probe_stats.py
  simulates sites with known Δ and checks the rate.
"""
import numpy as np
from scipy import stats

ALPHA = 0.05
BOOTSTRAP = 2000
DECISIONS = ("above", "below", "undecided")


def by_document(diffs, tokens, docs):
    """(Σ d, Σ n) per document, in the order of the documents' first windows."""
    _, first, which = np.unique(np.asarray(docs), return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))  # np.unique sorts the names: put the documents back in window order
    D = np.bincount(order[which], weights=np.asarray(diffs, dtype=float))
    N = np.bincount(order[which], weights=np.asarray(tokens, dtype=float))
    return D, N


def delta(diffs, tokens):
    return float(np.sum(diffs) / np.sum(tokens))


def bootstrap_ci(diffs, tokens, docs, rng, n_boot=BOOTSTRAP, level=0.95):
    """[lo, hi] of Δ: the percentile interval of n_boot resamples of the documents."""
    D, N = by_document(diffs, tokens, docs)
    picked = rng.integers(0, len(D), size=(n_boot, len(D)))
    draws = D[picked].sum(1) / N[picked].sum(1)
    tail = 100 * (1 - level) / 2
    return [float(np.percentile(draws, tail)), float(np.percentile(draws, 100 - tail))]


def t_interval(diffs, tokens, docs, alpha):
    """[lo, hi] of Δ at level 1 - alpha: Student's t on the documents' totals (the linearized ratio's
    cluster-robust standard error). Unbounded with fewer than two documents."""
    D, N = by_document(diffs, tokens, docs)
    n = len(D)
    if n < 2:
        return [-np.inf, np.inf]
    d = D.sum() / N.sum()
    se = np.sqrt(n / (n - 1) * np.sum((D - d * N) ** 2)) / N.sum()
    q = stats.t.ppf(1 - alpha / 2, n - 1)
    return [float(d - q * se), float(d + q * se)]


def decide(interval, threshold):
    """"above" when every Δ in the interval has |Δ| > threshold, "below" when every one has
    |Δ| < threshold, else "undecided"."""
    lo, hi = interval
    if lo > threshold or hi < -threshold:
        return "above"
    if -threshold < lo and hi < threshold:
        return "below"
    return "undecided"


def planned_looks(screen, most):
    """Cumulative window counts at each look: the screen, then doubling, up to `most`."""
    looks = [min(screen, most)]
    while looks[-1] < most:
        looks.append(min(2 * looks[-1], most))
    return looks


def staged(labels, tokens, docs, looks, evaluate, threshold, alpha=ALPHA):
    """Decide each label's |Δ| against threshold in stages. evaluate(active labels, window indices)
    yields (label, window, d) for the windows it could afford (it may stop early: a time budget);
    window w has tokens[w] targets from document docs[w]. Look k evaluates windows looks[k-1]..looks[k]
    for the labels still undecided. Returns ({label: {window: d}}, {label: decision}, {label: interval}).
    A resumed probe replays the same looks on the recorded windows and reaches the same state."""
    diffs = {label: {} for label in labels}
    decision = {label: "undecided" for label in labels}
    interval = {label: [-np.inf, np.inf] for label in labels}
    per_look = alpha / len(looks)  # Bonferroni over the planned looks (module docstring)
    first = 0
    for last in looks:
        active = [label for label in labels if decision[label] == "undecided"]
        if not active:
            break
        for label, window, d in evaluate(active, range(first, last)):
            diffs[label][window] = d
        for label in active:
            w = sorted(diffs[label])
            if w:
                interval[label] = t_interval([diffs[label][i] for i in w], tokens[w], docs[w], per_look)
                decision[label] = decide(interval[label], threshold)
        first = last
    return diffs, decision, interval
