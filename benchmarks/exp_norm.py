"""Issue 17: what fusing the RMSNorm before q/k/v and gate/up into the sparse GEMV would save per occurrence.

    python benchmarks/exp_norm.py --out $OUT/exp_norm.json      # ≈ 1-2 min on an H100/H200

In the decode step each RMSNorm is its own kernel (inductor's, the residual add fused): 2 per layer, 2.4 µs
each plus a 0.47 µs gap on an H100 (bench_generate.py --profile), ≈ 7% of a 70%-sparse Llama-2-7B step. A
fused design hands the GEMV the residual stream: every block reads all K inputs for the mean square, then
normalizes its slice in its x load (``sparse_gemv_cuda(..., norm=(weight, eps))``; results/exp_norm_h100.* came
from an earlier probe build with weight 1), and the residual add moves into the previous GEMV's epilogue
(``residual=``). Graph-timed µs per occurrence, over weight copies that stream from memory, on the q/k/v and
gate/up shapes of Llama-2-7B and Llama-3-8B:

* ``chained``: torch.compile'd ``h2 = h + r; xn = rmsnorm(h2)`` (one inductor kernel, as in the decoder), then
  the library GEMV on ``xn`` (what runs today);
* ``fused+add``: a compiled ``h + r`` kernel, then the norm-forming GEMV on ``h2`` (the norm fused, the add not);
* ``fused``: the norm-forming GEMV on ``h2`` alone (the add in the previous GEMV's epilogue, see ``+residual``);
* ``gemv``: the library GEMV on ``xn`` alone;
* ``gemv+residual``: the same writing ``r + y`` (what the epilogue add costs the GEMV that does it).

Thresholds are quantiles of ``|xn|`` (the normalized inputs, as calibration sees them); the norm-forming and
residual-adding outputs are checked against the torch reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_gemv import Case, env_info, graph_time_us  # noqa: E402

from actsparse.kernels import cuda_gemv as CG  # noqa: E402
from actsparse.kernels import sparse_gemv_reference  # noqa: E402

SHAPES = [(4096, 12288), (4096, 22016), (4096, 6144), (4096, 28672)]  # Llama-2 q/k/v, gate/up; Llama-3's
EPS = 1e-5


def add_norm(h: torch.Tensor, r: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's residual add and LlamaRMSNorm, as transformers writes them."""
    h2 = h + r
    f = h2.float()
    return h2, w * (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + EPS)).to(h2.dtype)


def time_variants(gemv, fused_add_norm, add, hs, rs, w, h2s, xns, res) -> dict[str, float]:
    """Graph-timed µs per occurrence of each variant (module docstring) over the weight copies; ``gemv(x, i,
    **fusions)`` runs the library's CUDA kernel on weight copy ``i``."""
    m = len(hs)
    norm = (w, EPS)
    return {
        "chained": graph_time_us(lambda i: gemv(fused_add_norm(hs[i % m], rs[i % m], w)[1], i), 2 * m),
        "fused+add": graph_time_us(lambda i: gemv(add(hs[i % m], rs[i % m]), i, norm=norm), 2 * m),
        "fused": graph_time_us(lambda i: gemv(h2s[i % m], i, norm=norm), 2 * m),
        "gemv": graph_time_us(lambda i: gemv(xns[i % m], i), 2 * m),
        "gemv+residual": graph_time_us(lambda i: gemv(xns[i % m], i, residual=res[i % m]), 2 * m),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsities", default="0.5,0.7")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("exp_norm needs a CUDA GPU")
    dev = torch.device("cuda")
    fused_add_norm = torch.compile(add_norm, fullgraph=True)
    add = torch.compile(torch.add, fullgraph=True)
    rows = []
    for k, n in SHAPES:
        case = Case(k, n, torch.bfloat16, layout=None)
        m = case.copies
        w = (1 + 0.1 * torch.randn(k, device=dev)).to(torch.bfloat16)  # a norm weight near 1, as trained ones are
        hs = [torch.randn(1, k, dtype=torch.bfloat16, device=dev) for _ in range(m)]
        rs = [torch.randn(1, k, dtype=torch.bfloat16, device=dev) for _ in range(m)]
        h2s, xns = zip(*(add_norm(h, r, w) for h, r in zip(hs, rs)))
        case.x = [x.view(-1) for x in xns]  # thresholds from the normalized inputs
        ys = [torch.empty(p.padded_out, dtype=torch.bfloat16, device=dev) for p in case.packed]
        res = [torch.randn(p.padded_out, dtype=torch.bfloat16, device=dev) for p in case.packed]
        cfg = CG.cuda_config(case.packed[0], dev)

        def gemv(x, i, cfg=cfg, case=case, ys=ys, m=m, **fusions):
            return CG.sparse_gemv_cuda(x.view(-1), case.packed[i % m], cfg, out=ys[i % m], **fusions)

        for s in (float(v) for v in args.sparsities.split(",")):
            case.set_sparsity(s)
            ref = sparse_gemv_reference(h2s[0].view(-1), case.packed[0], norm=(w, EPS)).double()
            got = gemv(h2s[0], 0, norm=(w, EPS)).double()
            err = ((got - ref).norm() / ref.norm()).item()
            ref_r = sparse_gemv_reference(xns[0].view(-1), case.packed[0], residual=res[0]).double()
            err_r = ((gemv(xns[0], 0, residual=res[0]).double() - ref_r).norm() / ref_r.norm()).item()
            assert err < 1e-2 and err_r < 1e-2, (k, n, s, err, err_r)
            t = time_variants(gemv, fused_add_norm, add, hs, rs, w, h2s, xns, res)
            row = dict(k=k, n=n, sparsity=s, config=str(cfg), rel_err=err, **t)
            rows.append(row)
            print(
                f"{k}x{n} at {s:.0%}: chained {t['chained']:6.2f}  fused+add {t['fused+add']:6.2f}  fused "
                f"{t['fused']:6.2f}  gemv {t['gemv']:6.2f}  gemv+residual {t['gemv+residual']:6.2f} us  -> saves "
                f"{t['chained'] - t['fused'] - (t['gemv+residual'] - t['gemv']):5.2f} us (the epilogue add counted) "
                f"({t['chained'] - t['fused+add']:5.2f} with the add kept)",
                flush=True,
            )
        del case
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env_info(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
