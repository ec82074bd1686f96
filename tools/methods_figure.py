"""Perplexity and zero-shot accuracy vs measured sparsity for every method of the zero-shot table (one figure).

    python tools/methods_figure.py docs/zeroshot/limit500/zeroshot.csv --out docs/sweep/methods_cpu.png

The table's rows are ``method@target`` (tools/zeroshot_table.py; the ``dense`` row is the reference line): every
method at its measured sparsity, net of what it reads besides the kept weights (rotations, low-rank terms), on
the same items and the same evaluation split, all on the CPU. Rows without a target (NNCF's recipe, int8) and
the attribution rows (sparsity of heads and neurons, not of weight columns) are left out.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from actsparse.eval.plots import plot_sweep  # noqa: E402
from actsparse.eval.sweep import SweepPoint  # noqa: E402


def points(path: str) -> tuple[float, float, list[SweepPoint]]:
    """(dense perplexity, dense mean accuracy, one point per ``method@target`` row)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    dense = next((r for r in rows if r["row"] == "dense"), None)
    if dense is None:
        raise SystemExit(f"{path}: no 'dense' row to compare with")
    ppl = float(dense["token_perplexity"])
    out = []
    for r in rows:
        method, at, target = r["row"].partition("@")
        if not at or method.startswith("attribution"):
            continue
        p = float(r["token_perplexity"])
        out.append(
            SweepPoint(
                method=method,
                target=float(target),
                measured=float(r["measured_sparsity"]),
                measured_mean=float(r["measured_sparsity"]),
                token_perplexity=p,
                delta_percent=100.0 * (p / ppl - 1.0),
                calibration_seconds=0.0,
                mean_acc=float(r["mean_acc"]),
                mean_acc_stderr=float(r["mean_acc_stderr"]),
            )
        )
    return ppl, float(dense["mean_acc"]), out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("table", help="a zeroshot.csv written by tools/zeroshot_table.py")
    ap.add_argument("--out", required=True, help="the figure (.png)")
    args = ap.parse_args(argv)
    ppl, acc, pts = points(args.table)
    title = "embedded SmolLM2-135M, all seven projections (CPU)"
    written = plot_sweep(args.out, ppl, pts, title=title, dense_acc=acc)
    if written is None:
        raise SystemExit("matplotlib is not installed")
    print(f"wrote {written}: {len(pts)} points of {len({p.method for p in pts})} methods")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
