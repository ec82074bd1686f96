"""Issue 17: the decode attention's launch shape, swept (block size, programs per SM, warps, where ranges combine).

    python benchmarks/exp_attention.py --out $OUT/exp_attention.json     # a few minutes on an H100/H200

The decode attention (actsparse/kernels/decode_attention.py) takes 6-9 µs per layer on an H100 where its bytes
need about 1 µs (bench_attention.py): a chain of memory latencies (mask, then keys and values, then the partials
and their combine) over a grid sized by ``split_count``. This times the kernel, as the decoder calls it (one
query token, a boolean prefix mask, 8 layers' caches in turn, graph-timed), for every combination of
``BLOCK_N`` (positions per block) × ``PROGRAMS_PER_SM`` (the split count's aim) × ``NUM_WARPS`` × ``ONE_LAUNCH``
(None: the library's rule; True: the last program of each key/value head combines; False: a combine kernel) ×
``SKIP_DROPPED_BLOCKS`` (False: every block read without waiting for its mask; the caches here are finite),
on Llama-2-7B (MHA) and Llama-3-8B (GQA) shapes, each output checked against the torch reference. Prints the
library's current setting and the fastest per case, and writes every point.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_attention import LAYERS, SHAPES, layer_inputs, prefix_mask  # noqa: E402
from bench_gemv import env_info, graph_time_us  # noqa: E402

from actsparse.kernels import decode_attention as DA  # noqa: E402

CASES = [(512, 256), (512, 512), (2048, 256), (2048, 2048)]
KNOBS = ("BLOCK_N", "PROGRAMS_PER_SM", "NUM_WARPS", "ONE_LAUNCH", "SKIP_DROPPED_BLOCKS")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block-n", default="32,64,128")
    ap.add_argument("--per-sm", default="1,2,4")
    ap.add_argument("--warps", default="4")
    ap.add_argument("--skip", default="1,0", help="SKIP_DROPPED_BLOCKS values (1: the mask gates each block's read)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("exp_attention needs a CUDA GPU")
    default = {k: getattr(DA, k) for k in KNOBS}
    grid = list(
        itertools.product(
            [int(v) for v in args.block_n.split(",")],
            [int(v) for v in args.per_sm.split(",")],
            [int(v) for v in args.warps.split(",")],
            [None, True, False],
            [v == "1" for v in args.skip.split(",")],
        )
    )
    rows = []
    for name, (hq, hkv) in SHAPES.items():
        for length, written in CASES:
            q, kv = layer_inputs(hq, hkv, length)
            mask = prefix_mask(length, written)
            ref = DA.decode_attention_reference(q, *kv[0], mask, 128**-0.5).float()
            case = []
            for values in grid:
                point = dict(zip(KNOBS, values))
                if point["ONE_LAUNCH"] is (hq == hkv):
                    continue  # the rule's choice for this layout (one launch for MHA), timed as None already
                for k, v in point.items():
                    setattr(DA, k, v)
                try:
                    err = (DA.decode_attention(q, *kv[0], mask, 128**-0.5).float() - ref).abs().max().item()
                    us = graph_time_us(
                        lambda i, q=q, kv=kv, mask=mask: DA.decode_attention(q, *kv[i % LAYERS], mask, 128**-0.5),
                        LAYERS,
                    )
                finally:
                    for k, v in default.items():
                        setattr(DA, k, v)
                row = dict(model=name, length=length, written=written, us=us, max_err=err, **point)
                case.append(row)
                rows.append(row)
            lib = next((r["us"] for r in case if all(r[k] == default[k] for k in KNOBS)), math.nan)  # (if swept)
            best = min(case, key=lambda r: r["us"])
            print(
                f"{name:10} L={length:5} written={written:5}  library {lib:6.2f} us  best {best['us']:6.2f} us "
                f"({', '.join(f'{k}={best[k]}' for k in KNOBS)}; max err {best['max_err']:.1e})",
                flush=True,
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env_info(), "default": default, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
