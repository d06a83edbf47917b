"""Figures: score vs realised cache % from budget sweeps, and retention maps.

`sweep_groups` collects, per (domain, model, metric), each benchmark's points from all result files; a group is
a sweep when some baseline has two or more cache sizes, and only benchmarks with such a baseline get a panel. `plot_sweep` draws one panel per benchmark: a line per
baseline over its budgets, NAMM as single points (its cache size is emergent), full cache as a dashed level.
"""
from __future__ import annotations

import re
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .results import RENORM, ResultSet, is_namm

def is_fixed(method: str) -> bool:
    """Methods whose cache size is not set by a budget: full cache and every NAMM variant."""
    return method == "full" or is_namm(method)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass
class SweepPoint:
    method: str
    cache_pct: float
    score: float
    source: str  # result file


def sweep_groups(results: list[ResultSet]) -> dict[tuple[str, str, str], dict[str, list[SweepPoint]]]:
    """{(domain, model, metric): {benchmark: [points]}}, only for groups where a baseline has >= 2 cache sizes."""
    groups: dict = defaultdict(lambda: defaultdict(list))
    for r in results:
        for m in r.methods.values():
            if m.score is not None and m.cache_pct is not None:
                groups[(r.domain, r.model, r.metric.name)][r.benchmark].append(
                    SweepPoint(m.method, m.cache_pct, m.score, r.source.result_file))

    def swept(pts: list[SweepPoint]) -> bool:
        return any(len({p.cache_pct for p in pts if p.method == method}) >= 2
                   for method in {p.method for p in pts} if not is_fixed(method))

    out = {k: {bench: pts for bench, pts in v.items() if swept(pts)} for k, v in groups.items()}
    return {k: v for k, v in out.items() if v}


def slug(*parts: str) -> str:
    """A file-name-safe name: each part reduced to letters, digits, dots and dashes, joined by '_'."""
    return "_".join(re.sub(r"[^A-Za-z0-9.]+", "-", p).strip("-") for p in parts)[:120]


def sweep_colours(methods: list[str]) -> dict[str, str]:
    """One colour per method in every panel: budgeted baselines from the start of matplotlib's cycle, NAMM
    variants from its end, so a NAMM point never takes the colour of a baseline's curve."""
    points = [m for m in methods if is_namm(m)]
    point_colours = [f"C{(4 + i) % 10}" for i in range(len(points))]
    free = [f"C{i}" for i in range(10) if f"C{i}" not in point_colours] or ["C0"]
    lines = [m for m in methods if m != "full" and not is_namm(m)]
    return {**{m: free[i % len(free)] for i, m in enumerate(lines)}, **dict(zip(points, point_colours))}


def plot_sweep(panels: dict[str, list[SweepPoint]], path: str | Path, title: str, ylabel: str) -> Path:
    """One panel per benchmark, one legend below them all; returns the PNG path."""
    plt = _plt()
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 3.8), squeeze=False)
    colours = sweep_colours(list(dict.fromkeys(p.method for pts in panels.values() for p in pts)))
    legend: dict[str, object] = {}
    for ax, (bench, pts) in zip(axes[0], panels.items()):
        methods = list(dict.fromkeys(p.method for p in pts))
        for method in methods:
            mp = sorted((p for p in pts if p.method == method), key=lambda p: p.cache_pct)
            x, y = [p.cache_pct for p in mp], [p.score for p in mp]
            if method == "full":
                handle = ax.axhline(float(np.mean(y)), color="black", ls="--", lw=1, label="full cache")
            elif is_namm(method):
                marker = {"namm": "*", RENORM: "P"}.get(method, "D")
                handle = ax.scatter(x, y, s=110 if marker == "*" else 70, marker=marker, zorder=5,
                                    color=colours[method], edgecolors="black", linewidths=0.5,
                                    label=f"{method.upper() if method == 'namm' else method} (emergent cache)")
            else:
                (handle,) = ax.plot(x, y, marker="o", ms=4, color=colours[method], label=method)
            legend.setdefault(handle.get_label(), handle)
        ax.set_title(bench, fontsize=9)
        ax.set_xlabel("realised cache %")
        ax.set_ylabel(ylabel)
        ax.set_xlim(0, 105)
        ax.grid(alpha=0.3)
    fig.suptitle(textwrap.fill(title, int(4.6 * n * 14)), fontsize=9)
    ncol = min(len(legend), 2 * n + 1)  # about as many entries per row as fit under n panels
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    rows = -(-len(legend) // ncol)
    fig.tight_layout(rect=(0, 0.065 * rows + 0.02, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------- retention


def plot_heatmap(matrix: np.ndarray, path: str | Path, title: str, xlabel: str, ylabel: str,
                 yticklabels: list[str] | None = None, xticklabels: list[str] | None = None, vmax: float = 1.0,
                 cbar: str = "share of KV heads keeping it", scored_until: float | None = None) -> Path:
    """A (rows x columns) map of kept shares in [0, vmax]; NaN cells (nothing there) shown grey. `scored_until`:
    a dashed line at the column after which no eviction step has scored the tokens yet."""
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    rows, cols = matrix.shape
    fig, ax = plt.subplots(figsize=(min(16, max(5.0, 3 + cols / 40)), min(10, max(3.0, 1.5 + rows * 0.28))))
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    im = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", interpolation="nearest", cmap=cmap,
                   vmin=0, vmax=vmax)
    if yticklabels is not None:
        ax.set_yticks(range(rows))
        ax.set_yticklabels(yticklabels, fontsize=7)
    else:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if scored_until is not None:
        ax.axvline(scored_until - 0.5, color="red", ls="--", lw=1, label="after: not scored yet")
        ax.legend(fontsize=7, loc="lower left")
    if xticklabels is not None:
        ax.set_xticks(range(cols))
        ax.set_xticklabels(xticklabels, fontsize=7)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if rows * cols <= 64:  # small maps: print the values
        for (i, j), v in np.ndenumerate(matrix):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.6 * vmax else "black")
    width = fig.get_size_inches()[0]
    ax.set_title(textwrap.fill(title, int(width * 11)), fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.03, label=cbar)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_text_retention(tokens: list[str], kept: np.ndarray, path: str | Path, title: str,
                        chars_per_line: int = 110, scored_until: int | None = None) -> Path:
    """The prompt as text, each token on a background shaded by its kept share (white + grey text = evicted by
    every head); tokens from `scored_until` on (never scored) are drawn in italics."""
    plt = _plt()
    cmap = plt.get_cmap("Blues")
    lines: list[list[tuple[int, str]]] = [[]]
    width = 0
    for i, tok in enumerate(tokens):
        for n, part in enumerate(tok.split("\n")):
            if n:  # a newline inside the token
                lines.append([])
                width = 0
            if width + len(part) > chars_per_line and lines[-1]:
                lines.append([])
                width = 0
            lines[-1].append((i, part))
            width += len(part)
    char_w = 0.0072
    fig = plt.figure(figsize=(chars_per_line * char_w * 12 + 0.4, 0.6 + 0.16 * len(lines)))
    ax = fig.add_axes((0.01, 0.01, 0.98, 0.92 if len(lines) > 20 else 0.85))
    ax.set_xlim(0, chars_per_line)
    ax.set_ylim(len(lines), 0)
    ax.axis("off")
    for row, line in enumerate(lines):
        x = 0
        for i, part in line:
            if part:
                k = float(kept[i])
                ax.add_patch(plt.Rectangle((x, row + 0.05), len(part), 0.9, lw=0,
                                           color=cmap(0.15 + 0.7 * k) if k > 0 else "white"))
                ax.text(x, row + 0.5, part, va="center", ha="left", family="monospace", fontsize=7,
                        color="black" if k > 0 else "#999999",
                        style="italic" if scored_until is not None and i >= scored_until else "normal")
            x += len(part)
    fig.suptitle(textwrap.fill(title, 160), fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_timestep_retention(rows: dict[str, tuple[list[float], list[int]]], path: str | Path, title: str) -> Path:
    """One row per policy: the share of (layers x KV heads) holding each timestep's state token at one moment
    (NaN / grey past the row's end), timesteps listed in the row's second element outlined in red (the cue)."""
    from matplotlib.patches import Rectangle

    plt = _plt()
    width = max(len(shares) for shares, _ in rows.values())
    matrix = np.full((len(rows), width), np.nan)
    for i, (shares, _) in enumerate(rows.values()):
        matrix[i, : len(shares)] = shares
    fig, ax = plt.subplots(figsize=(max(6.0, 2.5 + width * 0.42), 1.6 + 0.42 * len(rows)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    im = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", interpolation="nearest", cmap=cmap, vmin=0, vmax=1)
    for i, (shares, cue) in enumerate(rows.values()):
        for t in cue:
            ax.add_patch(Rectangle((t - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
        for t, v in enumerate(shares):
            ax.text(t, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v < 0.6 else "black")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(list(rows), fontsize=8)
    ax.set_xticks(range(width))
    ax.set_xlabel("timestep (state token)")
    ax.set_title(textwrap.fill(title, int(fig.get_size_inches()[0] * 11)), fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.03, label="share kept")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
