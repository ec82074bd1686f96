"""What the residual adapters of a per-layer rotation cost at decode (issue 21), Llama-2-7B shapes, random weights.

    python benchmarks/bench_rotation.py    # ≈3 min on an H200; writes $OUT/rotation_h200.json

``rotate_residual(model, basis=...)`` with random orthogonal bases (the cost does not depend on which bases):
one per layer (31 adapters, 4096×4096 each) and one per 4 layers (7), against the model unrotated, through the Decoder (compiled, one CUDA graph per token), bf16, batch 1, dense. The dense
function is unchanged by construction (logits of one prefill compared); the tok/s ratio is the adapters' price.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_gemv import env_info  # noqa: E402
from bench_generate import build, decoder_tok_s  # noqa: E402

import actsparse as A  # noqa: E402
from actsparse.engine import Decoder  # noqa: E402


def random_bases(n: int, d: int, per: int | None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    k = n if per is None else per
    qs = [
        torch.linalg.qr(torch.randn(d, d, device="cuda", dtype=torch.float64, generator=g))[0]
        for _ in range(-(-n // k))
    ]
    return torch.stack([qs[i // k] for i in range(n)])


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench_rotation needs a CUDA GPU")
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
