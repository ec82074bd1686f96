"""What rotations cost at decode (issue 21), Llama-2-7B shapes, random weights.

    python benchmarks/bench_rotation.py    # ≈3 min on an H200; writes $OUT/rotation_h200.json
    python benchmarks/bench_rotation.py --inputs 16,64    # ≈6 min; writes $OUT/input_rotation_h200.json

``--inputs RANKS``: ``rotate_inputs(model, factors=...)`` with random rank-r Householder bases (two per layer:
the q/k/v and the gate/up inputs; the cost does not depend on which bases), each rank against the unrotated
model in the same run, through the Decoder dense and with the CUDA sparse GEMV at 50% of all seven projections
(thresholds at the 50% quantile of each layer's own, rotated, inputs over one prefill): the tok/s ratio is the
rotations' price, at equal activation sparsity.

``rotate_residual(model, basis=...)`` with random orthogonal bases (the cost does not depend on which bases):
one per layer (31 adapters, 4096×4096 each) and one per 4 layers (7), against the model unrotated, through the Decoder (compiled, one CUDA graph per token), bf16, batch 1, dense. The dense
function is unchanged by construction (logits of one prefill compared); the tok/s ratio is the adapters' price.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_gemv import env_info  # noqa: E402
from bench_generate import PROJ, build, decoder_tok_s, layer_stats, measured, set_sparsity  # noqa: E402

import actsparse as A  # noqa: E402
import actsparse.kernels as K  # noqa: E402
from actsparse.engine import Decoder  # noqa: E402
from actsparse.input_rotation import check_factors, compact_wy  # noqa: E402


def random_bases(n: int, d: int, per: int | None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    k = n if per is None else per
    qs = [
        torch.linalg.qr(torch.randn(d, d, device="cuda", dtype=torch.float64, generator=g))[0]
        for _ in range(-(-n // k))
    ]
    return torch.stack([qs[i // k] for i in range(n)])


def random_factors(n: int, d: int, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random rank-``rank`` Householder bases in compact-WY form ``(Y [n, d, r], T [n, r, r])``."""
    g = torch.Generator().manual_seed(seed)
    wys = [compact_wy(torch.linalg.qr(torch.randn(d, rank, generator=g))[0]) for _ in range(n)]
    y, t = torch.stack([y for y, _ in wys]), torch.stack([t for _, t in wys])
    assert check_factors(y, t, n=n, d=d) is None
    return y, t


def input_rotations(ranks: list[int]) -> None:
    tokens, reps = 128, 3
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, 32000, (1, 256), device="cuda", generator=g)
    rows = []
    for rank in [0, *ranks]:
        model = build("llama2-7b")
        row: dict = {"rank": rank}
        if rank:
            with torch.no_grad():
                before = model(ids[:, :32]).logits.float()
            res = A.rotate_inputs(model, factors=random_factors(64, 4096, rank), progress=False)
            with torch.no_grad():
                after = model(ids[:, :32]).logits.float()
            row["logit_rel_err"] = float((after - before).abs().max() / before.abs().max())
            row["rotation_weights_read"] = res.weights_read
        row["dense_tok_s"], _ = decoder_tok_s(Decoder(model, max_seq_len=512, sync_every=tokens), ids, tokens, reps)
        A.apply_thresholds(
            model,
            {n: -math.inf for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.match(PROJ, n)},
        )
        set_sparsity(model, layer_stats(model, ids), 0.5)
        row["measured"] = measured(model, ids)
        row["kernel_layers"] = len(K.enable_kernels(model, backend="cuda"))
        row["sparse_tok_s"], _ = decoder_tok_s(Decoder(model, max_seq_len=512, sync_every=tokens), ids, tokens, reps)
        if rank:
            row["dense_ratio"] = row["dense_tok_s"] / rows[0]["dense_tok_s"]
            row["sparse_ratio"] = row["sparse_tok_s"] / rows[0]["sparse_tok_s"]
        print(json.dumps(row), flush=True)
        rows.append(row)
        del model
        torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT", "."), "input_rotation_h200.json"), "w") as f:
        json.dump({"env": env_info(), "tokens": tokens, "prompt": 256, "sparsity": 0.5, "rows": rows}, f, indent=1)


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench_rotation needs a CUDA GPU")
    if "--inputs" in sys.argv:
        input_rotations([int(r) for r in sys.argv[sys.argv.index("--inputs") + 1].split(",")])
        return
    tokens, reps = 128, 3
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, 32000, (1, 256), device="cuda", generator=g)
    model = build("llama2-7b")
    base_tok_s, _ = decoder_tok_s(Decoder(model, max_seq_len=512, sync_every=tokens), ids, tokens, reps)
    print(f"dense {base_tok_s:.1f} tok/s", flush=True)
    rows = []
    for per in (1, 4):
        model = model if per == 1 else build("llama2-7b")
        with torch.no_grad():
            before = model(ids[:, :32]).logits.float()
        t = time.time()
        res = A.rotate_residual(model, basis=random_bases(32, 4096, per), progress=False)
        fold_s = time.time() - t
        with torch.no_grad():
            after = model(ids[:, :32]).logits.float()
        err = float((after - before).abs().max() / before.abs().max())
        rot_tok_s, _ = decoder_tok_s(Decoder(model, max_seq_len=512, sync_every=tokens), ids, tokens, reps)
        proj = sum(m.weight.numel() for n, m in model.named_modules() if n.endswith("_proj"))
        row = {
            "layers_per_basis": per,
            "adapters": sum(isinstance(m, A.rotation.ResidualAdapter) for m in model.modules()),
            "adapter_weights": res.adapter_weights,
            "adapter_share": res.adapter_weights / proj,
            "dense_tok_s": base_tok_s,
            "rotated_tok_s": rot_tok_s,
            "ratio": rot_tok_s / base_tok_s,
            "logit_rel_err": err,
            "fold_s": fold_s,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        del model
        torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT", "."), "rotation_h200.json"), "w") as f:
        json.dump({"env": env_info(), "tokens": tokens, "prompt": 256, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
