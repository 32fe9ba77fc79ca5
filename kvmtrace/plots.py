"""Plots for the HTML views (report and diff), as inline SVG text.

matplotlib with the Agg backend: no display needed, and SVG keeps the HTML
file self-contained (no scripts, no external files). Text is drawn as paths;
matplotlib writes each string only into an XML comment, which it escapes
(``<``, ``&``, ``--``). Every label goes through ``_txt`` first, so a ``$``
in a name is a dollar sign, never mathtext (which could fail to parse), and
a leading ``_`` does not hide a legend entry.

matplotlib is an optional extra (``pip install 'kvmtrace[html]'``): without
it this module still imports, ``available()`` is False, and any plot raises
PlotsUnavailable with MISSING, the one line the cli prints before it starts.
"""

from __future__ import annotations

import io

import numpy as np

MISSING = ("--format html needs matplotlib, an optional extra: pip install 'kvmtrace[html]' "
           "(Debian: apt install python3-matplotlib)")


class PlotsUnavailable(ImportError):
    pass


class _Missing:
    """Stands for matplotlib's modules where it is not installed."""

    def __getattr__(self, name):
        raise PlotsUnavailable(MISSING)


try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker
except ImportError:  # the html extra is not installed
    matplotlib = plt = ticker = _Missing()


def available() -> bool:
    return not isinstance(plt, _Missing)

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
    """Horizontal stacked bars, one per label (a slot): the share of each
    mapping size (``shares``' keys, in order) written on segments wide enough
    to hold it, the legend outside the bars (right of the axes)."""
    colors = ("#9ecae1", "#3f88c5", "#0b3a6b")  # base page, level 2, level 3: light to dark
    labels = [_txt(x) for x in labels]
    n = len(labels)
    fig, ax = plt.subplots(figsize=(6.4, 1.1 + 0.3 * max(n, 1)))
    y = np.arange(n)
    left = np.zeros(n)
    for i, level in enumerate(shares):
        v = np.nan_to_num(np.asarray(shares.get(level, [0] * n), dtype=float))
        color = colors[i % len(colors)]
        ax.barh(y, v, left=left, height=0.72, label=_txt(level), color=color,
                edgecolor="white", linewidth=0.6)
        ink = "black" if i % len(colors) == 0 else "white"
        for yi, (x0, w) in enumerate(zip(left, v)):
            if w >= 0.12:
                ax.text(x0 + w / 2, yi, f"{w * 100:.0f}%", ha="center", va="center",
                        fontsize=7, color=ink)
        left += v
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_ylim(n - 0.5, -0.5)  # first label on top
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(ticker.PercentFormatter(1.0))
    ax.tick_params(axis="x", labelsize=8)
    ax.set_xlabel("share of faults", fontsize=9)
    ax.set_title(_txt(title), fontsize=10)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.legend(title="mapping size", fontsize=8, title_fontsize=8, frameon=False,
              loc="upper left", bbox_to_anchor=(1.01, 1.0))
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
