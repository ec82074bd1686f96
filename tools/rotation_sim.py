"""Rotated activations simulated online (issue 21): how much a PCA basis helps before anything is folded or paid for.

    python tools/rotation_sim.py --sparsity 0.4,0.5 --modes plain,global,layer,layer2,layer2g   # ~15 min, 2 CPU cores

The embedded model, fp32. Forward pre-hooks replace the input x of q/k/v and of gate/up by ``(m(x·Q))·Qᵀ``,
m = zero the entries with ``|·| <= τ``; o_proj and down_proj get plain thresholds. τ per input is the quantile
of its |coordinates| over the *dense* model's calibration activations (32 × 256 tokens, not sequential),
uniform at the target. Nothing is charged for the rotations (they would cost a matmul per input or an adapter
per layer): this is the upper bound of what a basis buys. Modes:

* ``plain``: no rotation;
* ``global``: one basis for every layer, from the pooled second moment of the normalized residual
  (``x / g``, the gain folded out: what ``rotate_residual(layers_per_basis=None)`` folds for free);
* ``layer``: one basis per layer shared by its attention and MLP inputs (``rotate_residual``'s default);
* ``layer2``: one basis per layer and input; ``layer2g``: the same on ``x`` with the gain (LaRoSA's code).

``MODE:R`` (e.g. ``layer2g:64``): the basis whose first R vectors are MODE's top R eigenvectors, completed by
the complete QR of those (LAPACK: a product of R Householder reflections, ``Q = I - V T Vᵀ`` with ``V`` D×R),
so applying it online reads about 2·D·R values instead of D².
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from actsparse.data import chunk_tokens, load_corpus, tokenize  # noqa: E402
from actsparse.eval import perplexity  # noqa: E402
from actsparse.models import load_model  # noqa: E402

MODES = ("plain", "global", "layer", "layer2", "layer2g")


def eig(h: torch.Tensor) -> torch.Tensor:
    h = h + 0.01 * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    return torch.linalg.eigh(h)[1].float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", default="0.4,0.5")
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args()
    modes = args.modes.split(",")
    if bad := [m for m in modes if m.split(":")[0] not in MODES or (":" in m and m.split(":")[0] == "plain")]:
        sys.exit(f"unknown modes {bad}; choose from {', '.join(MODES)}")
    torch.manual_seed(0)
    model, tok = load_model(None)
    corpus = load_corpus("embedded")
    calib = torch.cat(chunk_tokens(tok, corpus.calibration, 256, 32))
    ids = tokenize(tok, corpus.evaluation)[:8192]
    layers = model.model.layers
    gains = {}
    for i, layer in enumerate(layers):
        gains[f"{i}.attn"] = layer.input_layernorm.weight.detach().float()
        gains[f"{i}.mlp"] = layer.post_attention_layernorm.weight.detach().float()

    acts: dict[str, dict] = {}

    def grab(name):
        def hook(module, a):
            x = a[0].detach().reshape(-1, a[0].shape[-1]).float()
            st = acts.setdefault(name, {"H": 0, "Hg": 0, "xs": []})
            st["Hg"] = st["Hg"] + x.double().T @ x.double()  # with the gain
            if name in gains:
                x = x / gains[name]
            st["H"] = st["H"] + x.double().T @ x.double()
            st["xs"].append(x[::4])

        return hook

    hooks = []
    for i, layer in enumerate(layers):
        for mod, name in ((layer.self_attn.q_proj, "attn"), (layer.mlp.gate_proj, "mlp")):
            hooks.append(mod.register_forward_pre_hook(grab(f"{i}.{name}")))
        for mod, name in ((layer.self_attn.o_proj, "o"), (layer.mlp.down_proj, "down")):
            hooks.append(mod.register_forward_pre_hook(grab(f"{i}.{name}")))
    with torch.no_grad():
        for b in calib.split(8):
            model(b)
    for h in hooks:
        h.remove()
    for st in acts.values():
        st["xs"] = torch.cat(st["xs"])
    rotated = list(gains)
    bases = {
        "global": dict.fromkeys(rotated, eig(sum(acts[k]["H"] for k in rotated))),
        "layer": {k: eig(acts[f"{k.split('.')[0]}.attn"]["H"] + acts[f"{k.split('.')[0]}.mlp"]["H"]) for k in rotated},
        "layer2": {k: eig(acts[k]["H"]) for k in rotated},
        "layer2g": {k: eig(acts[k]["Hg"]) for k in rotated},
    }
    dense = perplexity(model, ids, context=1024, progress=False).token_perplexity
    print(f"dense {dense:.3f}", flush=True)

    def hook_for(mode: str, k: str, s: float):
        mode, _, rank = mode.partition(":")
        q = bases[mode].get(k) if mode != "plain" else None
        if q is not None and rank:  # the top-R eigenvectors (eigh: ascending) completed by R reflections
            q = torch.linalg.qr(q[:, -int(rank) :].double(), mode="complete")[0].float()
        with_gain = q is None or mode == "layer2g"  # plain thresholds and LaRoSA's basis see x itself
        g = gains.get(k)
        xs = acts[k]["xs"] if not with_gain or g is None else acts[k]["xs"] * g  # xs were stored without g
        z = xs @ q if q is not None else xs
        tau = torch.quantile(z.abs().flatten()[::7], s).item()

        def hook(module, a):
            x = a[0]
            if q is None:
                return (torch.where(x.abs() > tau, x, 0.0),)
            u = x.float() if with_gain else x.float() / g
            z = u @ q
            z = torch.where(z.abs() > tau, z, 0.0) @ q.T
            return ((z if with_gain else z * g).to(x.dtype),)

        return hook

    for s in (float(v) for v in args.sparsity.split(",")):
        for mode in modes:
            t = time.time()
            hooks = []
            for i, layer in enumerate(layers):
                fa, fm = hook_for(mode, f"{i}.attn", s), hook_for(mode, f"{i}.mlp", s)
                for mod in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    hooks.append(mod.register_forward_pre_hook(fa))
                for mod in (layer.mlp.gate_proj, layer.mlp.up_proj):
                    hooks.append(mod.register_forward_pre_hook(fm))
                hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(hook_for("plain", f"{i}.o", s)))
                hooks.append(layer.mlp.down_proj.register_forward_pre_hook(hook_for("plain", f"{i}.down", s)))
            ppl = perplexity(model, ids, context=1024, progress=False).token_perplexity
            for h in hooks:
                h.remove()
            print(
                f"s={s} {mode:<8} ppl {ppl:.3f} ({100 * (ppl / dense - 1):+.1f}%)  {time.time() - t:.0f} s", flush=True
            )


if __name__ == "__main__":
    main()
