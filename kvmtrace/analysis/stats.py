"""Effect sizes with confidence intervals, not bare means.

Two measures for a latency-like sample pair (base, new):
- the ratio of medians new/base with a percentile-bootstrap 95% interval
  (resampling each side independently, vectorised: one array op per batch of
  resamples);
- Cliff's delta (P(new > base) - P(new < base)), from the Mann-Whitney U
  computed with ranks: a distribution-free effect size in [-1, 1]
  (|d| < 0.147 negligible, < 0.33 small, < 0.474 medium, else large:
  Romano et al. 2006).
Service times are heavy-tailed and differ between runs of the same workload,
so a regression is called only when the whole interval clears the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass
class Effect:
    n_base: int
    n_new: int
    median_base: float
    median_new: float
    ratio: float
    ci_low: float
    ci_high: float
    cliffs_delta: float

    @property
    def magnitude(self) -> str:
        d = abs(self.cliffs_delta)
        return ("negligible" if d < 0.147 else "small" if d < 0.33 else
                "medium" if d < 0.474 else "large")


def cliffs_delta(base: np.ndarray, new: np.ndarray) -> float:
    n1, n2 = len(base), len(new)
    if not n1 or not n2:
        return float("nan")
    ranks = pd.Series(np.concatenate([new, base])).rank(method="average").to_numpy()
    u_new = ranks[:n2].sum() - n2 * (n2 + 1) / 2
    return float(2 * u_new / (n1 * n2) - 1)


def median_ratio(base, new, resamples: int = 2000, seed: int = 0,
                 max_n: int = 20000) -> Effect:
    base = np.asarray(base, dtype=float)
    new = np.asarray(new, dtype=float)
    base, new = base[np.isfinite(base)], new[np.isfinite(new)]
    rng = np.random.default_rng(seed)
    mb, mn = (float(np.median(x)) if len(x) else float("nan") for x in (base, new))
    if len(base) < 2 or len(new) < 2 or mb <= 0:
        return Effect(len(base), len(new), mb, mn, mn / mb if mb else float("nan"),
                      float("nan"), float("nan"), cliffs_delta(base, new))
    # Large samples: the bootstrap of a subsample is already tight; bound the work.
    b = base if len(base) <= max_n else rng.choice(base, max_n, replace=False)
    n = new if len(new) <= max_n else rng.choice(new, max_n, replace=False)
    ratios = []
    batch = max(1, 2_000_000 // max(len(b), len(n)))
    done = 0
    while done < resamples:
        k = min(batch, resamples - done)
        rb = np.median(b[rng.integers(0, len(b), (k, len(b)))], axis=1)
        rn = np.median(n[rng.integers(0, len(n), (k, len(n)))], axis=1)
        ratios.append(rn / np.maximum(rb, 1e-12))
        done += k
    r = np.concatenate(ratios)
    lo, hi = np.percentile(r, [2.5, 97.5])
    return Effect(len(base), len(new), mb, mn, mn / mb, float(lo), float(hi),
                  cliffs_delta(base, new))


def quantiles(x) -> dict:
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    if not len(x):
        return {"count": 0, "p50": np.nan, "p90": np.nan, "p99": np.nan, "max": np.nan}
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return {"count": len(x), "p50": p50, "p90": p90, "p99": p99, "max": float(x.max())}
