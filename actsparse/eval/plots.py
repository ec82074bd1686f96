"""Plots (matplotlib, optional): per-layer activation ratio, sparsity-vs-perplexity sweeps."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from .sparsity import layer_type

if TYPE_CHECKING:
    from .sweep import SweepPoint

__all__ = ["plot_activation_ratio", "plot_sweep", "plot_tradeoff"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(plt, fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _finish(plt, fig, ax, path: str, title: str | None) -> str:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(plt, fig, path)


def _block_index(name: str) -> int | None:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def plot_activation_ratio(path: str, activation_ratio: Mapping[str, float], *, title: str | None = None) -> str | None:
    """Activation ratio (1 - measured sparsity) per block, one line per projection type, as the Sparsing Law
    repository plots it. Returns the path, or None when matplotlib is not installed."""
    plt = _pyplot()
    if plt is None:
        return None
    lines: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for i, (name, r) in enumerate(activation_ratio.items()):
        block = _block_index(name)
        lines[layer_type(name)].append((block if block is not None else i, r))
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for kind, pts in lines.items():
        pts.sort()
        ax.plot([p for p, _ in pts], [r for _, r in pts], marker="o", ms=3, label=kind)
    ax.set_xlabel("block")
    ax.set_ylabel("activation ratio (1 - sparsity)")
    ax.set_ylim(0, 1.02)
    return _finish(plt, fig, ax, path, title)


def plot_sweep(
    path: str, dense: float, points: Sequence[SweepPoint], *, title: str | None = None, dense_acc: float | None = None
) -> str | None:
    """Perplexity (and, when the points have it, zero-shot mean accuracy in a second panel) vs measured
    (weighted) sparsity, one line per method. None if matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return None
    accs = any(p.mean_acc is not None for p in points)
    if not accs:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
    else:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11.5, 4.4))
    for method in dict.fromkeys(p.method for p in points):
        pts = sorted((p.measured, p.token_perplexity, p.mean_acc) for p in points if p.method == method)
        ax.plot([0.0] + [x for x, _, _ in pts], [dense] + [y for _, y, _ in pts], marker="o", ms=3, label=method)
        if accs:
            xs = ([0.0] if dense_acc is not None else []) + [x for x, _, a in pts if a is not None]
            ys = ([dense_acc] if dense_acc is not None else []) + [a for _, _, a in pts if a is not None]
            ax2.plot(xs, ys, marker="o", ms=3, label=method)
    ax.axhline(dense, color="gray", lw=0.8, ls="--", label=f"dense {dense:.2f}")
    ax.set_xlabel("measured sparsity (fraction of weight columns skipped)")
    ax.set_ylabel("token perplexity")
    ax.set_yscale("log")
    if accs:
        if dense_acc is not None:
            ax2.axhline(dense_acc, color="gray", lw=0.8, ls="--", label=f"dense {dense_acc:.3f}")
        ax2.set_xlabel("measured sparsity (fraction of weight columns skipped)")
        ax2.set_ylabel("zero-shot mean accuracy")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=8)
    return _finish(plt, fig, ax, path, title)


def plot_tradeoff(path: str, points: Sequence, *, title: str | None = None) -> str | None:
    """Attribution trade-off curves: accuracy (multiple-choice if measured, else next-token) vs the fraction of
    units deactivated, one panel per mode, one line per metric. Returns the path, or None without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    modes = list(dict.fromkeys(p.mode for p in points))
    use_mc = any(p.mc_items for p in points)
    fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 3.9), squeeze=False, sharey=True)
    for ax, mode in zip(axes[0], modes):
        lines: dict[str, list] = defaultdict(list)
        for p in points:
            if p.mode == mode:
                lines[p.metric].append((p.sparsity, p.mc_accuracy if use_mc else p.accuracy))
        for metric, pts in lines.items():
            pts.sort()
            ax.plot([s for s, _ in pts], [a for _, a in pts], marker="o", ms=3, label=metric)
        ax.set_xlabel("fraction of units deactivated per layer")
        ax.set_title(mode, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("multiple-choice accuracy" if use_mc else "next-token accuracy")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(plt, fig, path)
