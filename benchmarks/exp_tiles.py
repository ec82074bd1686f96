"""The launch rule's tiles were tuned on an H100; sweep them on this GPU (issue 17: streaming efficiency).

    python benchmarks/exp_tiles.py    # ≈5 min on an H200; writes $OUT/exp_tiles.json (results/exp_tiles_h200.json)

bf16, plain ``[K, N]`` layout (the Decoder's), kept-row list on: for the q/k/v (4096×12288) and down
(11008×4096) shapes of Llama-2-7B, every tile (BLOCK_K × BLOCK_N), warps, stages and programs per SM in the
grid below, graph-timed at 100%, 50% and 0% sparsity next to dense ``F.linear``; each config is checked
against the torch reference first (configs that do not fit the SM fail and are listed).
"""

from __future__ import annotations

import itertools
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_gemv import Case, env_info  # noqa: E402

from actsparse.kernels import sparse_gemv_reference  # noqa: E402
from actsparse.kernels import triton_gemv as tg  # noqa: E402

SHAPES = [(4096, 12288), (11008, 4096)]
GRID = dict(block_n=(128, 256, 512), block_k=(32, 64, 128), warps=(4, 8), stages=(3, 4), per_sm=(2, 4))


def config(k: int, n: int, bk: int, bn: int, warps: int, stages: int, per_sm: int, sms: int) -> tg.GemvConfig:
    split = max(1, min(per_sm * sms // (n // bn), k // (2 * bk)), triton.cdiv(k, tg.MAX_COMPACT_ROWS))
    cfg = tg.GemvConfig(bk, bn, split, warps, stages, True, True)
    return tg.GemvConfig(bk, bn, triton.cdiv(k, cfg.k_per(k)), warps, stages, True, True)


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("exp_tiles needs a CUDA GPU")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows, failed = [], []
    for k, n in SHAPES:
        case = Case(k, n, torch.bfloat16, layout=None)
        dense = case.time_dense()
        rule = tg.launch_config(case.packed[0], torch.device("cuda"))
        kept = {s: case.set_sparsity(s) for s in (1.0, 0.0, 0.5)}  # ends at 0.5 for the check
        ref = sparse_gemv_reference(case.x[0], case.packed[0]).double()
        cfgs = {"rule": rule}
        for bn, bk, warps, stages, per_sm in itertools.product(*GRID.values()):
            cfgs[f"{bk}x{bn}/w{warps}/s{stages}/p{per_sm}"] = config(k, n, bk, bn, warps, stages, per_sm, sms)
        ok = {}
        for name, cfg in cfgs.items():
            try:
                y = tg.sparse_gemv_triton(case.x[0], case.packed[0], cfg).double()
                err = ((y - ref).norm() / ref.norm()).item()
                assert err < 1e-2, err
                ok[name] = cfg
            except Exception as e:  # noqa: BLE001 - out of resources etc.: record and go on
                failed.append({"k": k, "n": n, "cfg": name, "error": repr(e)[:160]})
        times: dict[str, dict[float, float]] = {name: {} for name in ok}
        for s in (1.0, 0.5, 0.0):
            case.set_sparsity(s)
            for name, cfg in ok.items():
                times[name][s] = case.time_sparse(cfg)
        for name, cfg in ok.items():
            t = times[name]
            gbs = {s: kept[s] * case.wbytes_row / (t[s] * 1e-6) / 1e9 for s in (0.5, 0.0)}
            rows.append({"k": k, "n": n, "cfg": name, "config": cfg.__dict__, "dense": dense, "us": t, "gbs": gbs})
        best = sorted(ok, key=lambda nm: times[nm][0.5])[:8]
        print(f"{k}x{n}: dense {dense:.2f} us; rule {rule}")
        print(f"  {'config':<24} {'100%':>7} {'50%':>7} {'0%':>7} {'GB/s@50':>8} {'GB/s@0':>8}")
        for nm in ["rule", *[b for b in best if b != "rule"]]:
            t = times[nm]
            r = next(r for r in rows if r["k"] == k and r["cfg"] == nm)
            print(
                f"  {nm:<24} {t[1.0]:7.2f} {t[0.5]:7.2f} {t[0.0]:7.2f} {r['gbs'][0.5]:8.0f} {r['gbs'][0.0]:8.0f}",
                flush=True,
            )
        del case
        torch.cuda.empty_cache()
    print(f"{len(failed)} configs failed (resources)")
    with open(os.path.join(os.environ.get("OUT", "."), "exp_tiles.json"), "w") as f:
        json.dump({"env": env_info(), "grid": GRID, "rows": rows, "failed": failed}, f, indent=1)


if __name__ == "__main__":
    main()
