"""Narrow tiles without split-K (no reduction tail) against the launch rule (issue 17 diagnostics).

    python benchmarks/exp_split.py    # ≈40 s on an H200; writes $OUT/exp_split.json (results/exp_split_h200.json)

For the decode GEMV shapes of Llama-2-7B (qkv 4096×12288, gate/up 4096×22016, o, down 11008×4096) and
Llama-3-8B (qkv 4096×6144, gate/up 4096×28672, down 14336×4096), plain and blocked-256 layouts, bf16: the
graph-timed time of the launch rule's config and of 64/128-column tiles with K split as little as the
kept-row list allows (1 for K = 4096), at 100%, 50% and 0% sparsity, next to dense ``F.linear``.
Every config is first checked against the torch reference.
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_gemv import Case  # noqa: E402

from actsparse.kernels import sparse_gemv_reference  # noqa: E402
from actsparse.kernels import triton_gemv as tg  # noqa: E402

SHAPES = [(4096, 12288), (4096, 22016), (4096, 4096), (11008, 4096), (4096, 6144), (4096, 28672), (14336, 4096)]


def candidates(k: int, lb: int, base: tg.GemvConfig) -> dict[str, tg.GemvConfig]:
    cands = {"rule": base}
    smin = math.ceil(k / tg.MAX_COMPACT_ROWS)  # the kept-row list holds at most MAX_COMPACT_ROWS rows
    for bn in (64, 128):
        if lb % bn == 0:
            for split in sorted({smin, max(smin, base.split_k * bn // 256), 2 * smin}):
                cands[f"bn{bn}/s{split}"] = tg.GemvConfig(64, bn, split, 4, 3, True, True)
    return cands


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("exp_split needs a CUDA GPU")
    out = []
    for layout in (None, 256):
        for k, n in SHAPES:
            c = Case(k, n, torch.bfloat16, layout=layout)
            base = tg.launch_config(c.packed[0], torch.device("cuda"))
            cands = candidates(k, c.packed[0].layout_block, base)
            c.set_sparsity(0.5)
            ref = sparse_gemv_reference(c.x[0], c.packed[0]).double()
            for name, cfg in cands.items():
                y = tg.sparse_gemv_triton(c.x[0], c.packed[0], cfg).double()
                assert ((y - ref).norm() / ref.norm()).item() < 1e-2, name
            row: dict = {"k": k, "n": n, "layout": layout, "dense": c.time_dense(), "rule": str(base)}
            for s in (1.0, 0.5, 0.0):
                c.set_sparsity(s)
                for name, cfg in cands.items():
                    row[f"{name}@{s}"] = c.time_sparse(cfg)
            out.append(row)
            print(json.dumps({key: round(v, 2) if isinstance(v, float) else v for key, v in row.items()}), flush=True)
            del c
            torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT", "."), "exp_split.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
