"""Plots for the HTML views (report and diff), as inline SVG text.

matplotlib with the Agg backend: no display needed, and SVG keeps the HTML
file self-contained (no scripts, no external files). Text is drawn as paths;
matplotlib writes each string only into an XML comment, which it escapes
(``<``, ``&``, ``--``). Every label goes through ``_txt`` first, so a ``$``
in a name is a dollar sign, never mathtext (which could fail to parse), and
a leading ``_`` does not hide a legend entry.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402
import numpy as np  # noqa: E402

COLORS = {"base": "#4c72b0", "new": "#dd8452"}


def _txt(s) -> str:
    """A label drawn literally (no mathtext, never hidden from the legend)."""
    s = str(s).replace("$", r"\$")
    return "\u200b" + s if s.startswith("_") else s


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def latency_cdf(series: dict[str, np.ndarray], title: str) -> str:
    """Empirical CDFs of fault service time (microseconds, log x)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for i, (label, x) in enumerate(series.items()):
        x = np.sort(np.asarray(x, dtype=float)[np.isfinite(x)])
        if not len(x):
            continue
        y = np.arange(0, len(x) + 1) / len(x)
        color = COLORS.get((str(label).split() or [""])[0], f"C{i}")
        ax.step(np.r_[x[0], x], y, where="post", label=_txt(f"{label} (n={len(x)})"),
                color=color)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("fault service time (us)")
    ax.set_ylabel("fraction of faults")
    ax.set_title(_txt(title), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _svg(fig)


def level_mix(labels: list[str], shares: dict[str, list[float]], title: str) -> str:
    """Stacked bars: share of each mapping size (``shares``' keys, in order) per bar."""
    labels = [_txt(x) for x in labels]
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(labels) + 2), 3.2))
    bottom = np.zeros(len(labels))
    for i, level in enumerate(shares):
        v = np.asarray(shares.get(level, [0] * len(labels)), dtype=float)
        ax.bar(labels, v, bottom=bottom, label=level, color=f"C{i}")
        bottom += v
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of faults")
    ax.set_title(_txt(title), fontsize=10)
    ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    ax.legend(fontsize=8)
    return _svg(fig)


def grouped_bars(labels: list[str], groups: dict[str, list[float]], title: str,
                 ylabel: str) -> str:
    fig, ax = plt.subplots(figsize=(max(4, 0.7 * len(labels) + 2), 3.2))
    x = np.arange(len(labels))
    w = 0.8 / max(len(groups), 1)
    for i, (name, vals) in enumerate(groups.items()):
        ax.bar(x + i * w - 0.4 + w / 2, vals, w, label=_txt(name),
               color=COLORS.get(name, f"C{i}"))
    ax.set_xticks(x, [_txt(x) for x in labels], rotation=45, fontsize=8)
    ax.set_ylabel(_txt(ylabel))
    ax.set_title(_txt(title), fontsize=10)
    ax.legend(fontsize=8)
    return _svg(fig)
