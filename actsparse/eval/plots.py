"""Plots (matplotlib, optional): per-layer activation ratio."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Mapping

__all__ = ["plot_activation_ratio"]


def _block_index(name: str) -> int | None:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def plot_activation_ratio(path: str, activation_ratio: Mapping[str, float], *, title: str | None = None) -> str | None:
    """Activation ratio (1 - measured sparsity) per block, one line per projection type, as the Sparsing Law
    repository plots it. Returns the path, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from .sparsity import layer_type

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
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
