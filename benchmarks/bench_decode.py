"""Batch-1 Llama decode, dense ``F.linear`` vs actsparse's sparse GEMV, in one process on one GPU.

    python benchmarks/bench_decode.py --models llama2-7b,llama3-8b --out results/decode.json

gpt-fast style: random bf16 weights with the real shapes, a static KV cache, one decode step per
CUDA-graph replay (the step feeds its own greedy token and position forward, so replays generate).
Each layer's code is ``torch.compile``d once (the sparse GEMV is an opaque custom op inside it) and the
whole step is captured in a CUDA graph. Both variants fuse the same way: q/k/v in one launch and
gate/up in one launch (dense: concatenated weights; sparse: one packed GEMV), o and down alone.
Thresholds for each sparsity are quantiles of |input| of each layer group, collected over a few eager
decode steps, so the kernels see realistic (not uniform random) masks. lm_head stays dense.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import actsparse.kernels as K  # noqa: E402
from actsparse.kernels.reference import rms_norm as reference_rms_norm  # noqa: E402

CONFIGS = {
    "llama2-7b": dict(dim=4096, layers=32, heads=32, kv_heads=32, inter=11008, vocab=32000),
    "llama3-8b": dict(dim=4096, layers=32, heads=32, kv_heads=8, inter=14336, vocab=128256),
    "tiny": dict(dim=256, layers=2, heads=4, kv_heads=2, inter=512, vocab=1000),
}
GROUPS = ("qkv", "o", "gate_up", "down")
DEV = "cuda"


@dataclass
class Layer:
    attn_norm: torch.Tensor
    mlp_norm: torch.Tensor
    dense: dict  # group -> [out, in] weight (qkv and gate_up concatenated)
    packed: dict | None  # group -> PackedGemv
    cache_k: torch.Tensor
    cache_v: torch.Tensor


EPS = 1e-5  # the RMSNorms' epsilon


def rms_norm(x, w):
    """Llama's RMSNorm (the library's reference: what the fused GEMVs form as they load ``x``)."""
    return reference_rms_norm(x, w, EPS)


def rotary(x, cos, sin):  # x [1, heads, 1, hd]
    x1, x2 = x[..., ::2].float(), x[..., 1::2].float()
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).to(x.dtype)


def make_layer_fn(
    cfg, sparse: bool, segments: dict | None, linear_fn=None, reduce="kernel", backend="triton", fused=False
):
    """One decoder layer as a function of tensors only (so one torch.compile serves every layer).

    ``lin[group]`` is the dense weight, or ``(weight_t, threshold, scale, zero)`` of the packed GEMV;
    ``linear_fn(h, lin, group)`` (returning a tuple of outputs) replaces both (benchmarks/bounds.py).
    ``reduce``: where the sparse GEMV's split-K partials are summed (``actsparse.kernels.sparse_gemv``);
    ``backend``: which sparse GEMV runs (``PackedGemv.backend``). ``fused`` (sparse only): the GEMVs take what
    the Decoder's fused layers give them (``fuse_norms``, ``fuse_glu``): q/k/v and gate/up form the RMSNorm of
    the residual stream, o and down add the residual, down forms ``silu(gate) * up``.
    """
    heads, kvh, dim = cfg["heads"], cfg["kv_heads"], cfg["dim"]
    hd = dim // heads

    def linear(h, lin, group, record, **fused_args):
        if record is not None:
            record.setdefault(group, []).append(h.detach().float().abs().flatten())
        if linear_fn is not None:
            return linear_fn(h, lin, group)
        if sparse:
            wt, thr, scale, zero = lin[group]
            packed = K.PackedGemv(wt, segments[group], thr, scale=scale, zero=zero, backend=backend)
            return K.sparse_gemv(h.view(-1) if fused else h, packed, reduce=reduce, **fused_args)
        return (F.linear(h, lin[group]),)

    if fused and (not sparse or linear_fn is not None):
        raise ValueError("fused: the sparse GEMV's layer only")

    def step(x, pos, cos, sin, attn_norm, mlp_norm, cache_k, cache_v, lin: dict, record=None):
        if fused:
            return fused_step(x, pos, cos, sin, attn_norm, mlp_norm, cache_k, cache_v, lin)
        h = rms_norm(x, attn_norm)
        out = linear(h, lin, "qkv", record)
        qkv = out[0] if len(out) == 1 else torch.cat(out, dim=-1)
        a = attention(qkv, pos, cos, sin, cache_k, cache_v, x.device)
        x = x + linear(a, lin, "o", record)[0]
        h = rms_norm(x, mlp_norm)
        out = linear(h, lin, "gate_up", record)
        g, u = out if len(out) == 2 else out[0].chunk(2, dim=-1)
        return x + linear(F.silu(g) * u, lin, "down", record)[0]

    def fused_step(x, pos, cos, sin, attn_norm, mlp_norm, cache_k, cache_v, lin: dict):
        qkv = torch.cat(linear(x, lin, "qkv", None, norm=(attn_norm, EPS)), dim=-1)
        a = attention(qkv, pos, cos, sin, cache_k, cache_v, x.device)
        x = linear(a, lin, "o", None, residual=x.view(-1))[0].view(1, 1, dim)
        g, u = linear(x, lin, "gate_up", None, norm=(mlp_norm, EPS))
        return linear(u, lin, "down", None, gate=g, residual=x.view(-1))[0].view(1, 1, dim)

    def attention(qkv, pos, cos, sin, cache_k, cache_v, device):
        q, k, v = qkv.split([dim, kvh * hd, kvh * hd], dim=-1)
        q = rotary(q.view(1, 1, heads, hd).transpose(1, 2), cos, sin)
        k = rotary(k.view(1, 1, kvh, hd).transpose(1, 2), cos, sin)
        v = v.view(1, 1, kvh, hd).transpose(1, 2)
        cache_k.index_copy_(2, pos, k)
        cache_v.index_copy_(2, pos, v)
        ck, cv = cache_k, cache_v
        if kvh != heads:
            ck = ck.repeat_interleave(heads // kvh, dim=1)
            cv = cv.repeat_interleave(heads // kvh, dim=1)
        mask = torch.arange(ck.shape[2], device=device) <= pos
        a = F.scaled_dot_product_attention(q, ck, cv, attn_mask=mask.view(1, 1, 1, -1))
        return a.transpose(1, 2).reshape(1, 1, dim)

    return step


class Model:
    def __init__(self, cfg, max_seq, dtype=torch.bfloat16, seed=0):
        torch.manual_seed(seed)
        self.cfg, self.dtype = cfg, dtype
        d, i, hd = cfg["dim"], cfg["inter"], cfg["dim"] // cfg["heads"]
        kv = cfg["kv_heads"] * hd

        def w(o, n):
            return torch.randn(o, n, device=DEV, dtype=dtype) / math.sqrt(n)

        self.emb = torch.randn(cfg["vocab"], d, device=DEV, dtype=dtype)
        self.norm = torch.ones(d, device=DEV, dtype=dtype)
        self.lm_head = w(cfg["vocab"], d)
        self.layers = []
        for _ in range(cfg["layers"]):
            dense = {"qkv": w(d + 2 * kv, d), "o": w(d, d), "gate_up": w(2 * i, d), "down": w(d, i)}
            self.layers.append(
                Layer(
                    torch.ones(d, device=DEV, dtype=dtype),
                    torch.ones(d, device=DEV, dtype=dtype),
                    dense,
                    None,
                    torch.zeros(1, cfg["kv_heads"], max_seq, hd, device=DEV, dtype=dtype),
                    torch.zeros(1, cfg["kv_heads"], max_seq, hd, device=DEV, dtype=dtype),
                )
            )
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, device=DEV).float() / hd))
        ang = torch.outer(torch.arange(max_seq, device=DEV).float(), inv)
        self.cos, self.sin = ang.cos(), ang.sin()
        self.token = torch.zeros(1, dtype=torch.long, device=DEV)
        self.pos = torch.zeros(1, dtype=torch.long, device=DEV)
        self.fns = {False: make_layer_fn(cfg, False, None)}

    def pack(self, quantize=None, reduce="kernel", backend="triton"):
        """Pack the weights for ``backend``: Triton's blocked layout, or the plain one the CUDA kernel reads."""
        layout = None if backend == "cuda" else K.COLUMN_ALIGN
        self.backend, self.packed_as = backend, (quantize, backend)
        d, hd = self.cfg["dim"], self.cfg["dim"] // self.cfg["heads"]
        kv = self.cfg["kv_heads"] * hd
        i = self.cfg["inter"]
        for L in self.layers:
            qkv, gu = L.dense["qkv"], L.dense["gate_up"]
            L.packed = {
                "qkv": K.pack([qkv[:d], qkv[d : d + kv], qkv[d + kv :]], quantize=quantize, layout_block=layout),
                "o": K.pack([L.dense["o"]], quantize=quantize, layout_block=layout),
                "gate_up": K.pack([gu[:i], gu[i:]], quantize=quantize, layout_block=layout),
                "down": K.pack([L.dense["down"]], quantize=quantize, layout_block=layout),
            }
        self.set_reduce(reduce)

    def set_reduce(self, reduce, fused=False):
        """The sparse layer function with the split-K partials summed where ``reduce`` says, its GEMVs fused
        with the norms, residual adds and gated input when ``fused`` (recompiled by :meth:`compile`)."""
        segments = {g: p.segments for g, p in self.layers[0].packed.items()}
        self.fns[True] = make_layer_fn(self.cfg, True, segments, reduce=reduce, backend=self.backend, fused=fused)

    def compile(self):
        self.fns = {
            k: f if hasattr(f, "_torchdynamo_orig_callable") else torch.compile(f, fullgraph=True, dynamic=False)
            for k, f in self.fns.items()
        }

    def lin(self, L, sparse):
        if not sparse:
            return L.dense
        return {g: (p.weight_t, p.threshold, p.scale, p.zero) for g, p in L.packed.items()}

    def step(self, sparse, records=None):
        x = self.emb[self.token].view(1, 1, -1)
        cos, sin = self.cos[self.pos].view(1, 1, 1, -1), self.sin[self.pos].view(1, 1, 1, -1)
        fn = self.fns[sparse]
        for li, L in enumerate(self.layers):
            args = (x, self.pos, cos, sin, L.attn_norm, L.mlp_norm, L.cache_k, L.cache_v, self.lin(L, sparse))
            x = fn(*args) if records is None else fn(*args, record=records[li])
        logits = F.linear(rms_norm(x, self.norm), self.lm_head)
        self.token.copy_(logits.view(-1).argmax().view(1))
        self.pos.add_(1)
        return logits

    def set_sparsity(self, s, stats):
        for li, L in enumerate(self.layers):
            for g in GROUPS:
                a = stats[li][g]
                tau = (
                    -math.inf
                    if s <= 0
                    else torch.quantile(a[torch.randperm(a.numel(), device=a.device)[: 1 << 20]], s).item()
                )
                L.packed[g].threshold.fill_(tau)


def calibrate(model, steps=8):
    """|input| samples of every layer group over ``steps`` eager dense decode steps."""
    records = [dict() for _ in model.layers]
    start = model.pos.clone()
    for _ in range(steps):
        model.step(False, records)
    model.pos.copy_(start)
    return [{g: torch.cat(v) for g, v in rec.items()} for rec in records]


def measured_sparsity(model, stats, s):
    """Fraction of calibration inputs at or under each group's threshold (what the kernel skips)."""
    fr = []
    for li, L in enumerate(model.layers):
        for g in GROUPS:
            fr.append(
                (stats[li][g].to(model.dtype).float() <= L.packed[g].threshold[0].to(model.dtype).float())
                .float()
                .mean()
                .item()
            )
    return statistics.mean(fr)


def time_graph(model, sparse, start_pos, steps=32, reps=5):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    model.pos.fill_(start_pos)
    with torch.cuda.stream(s):
        for _ in range(3):
            model.step(sparse)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    model.pos.fill_(start_pos)
    with torch.cuda.graph(g):
        model.step(sparse)

    def run():
        times = []
        for _ in range(reps):
            model.pos.fill_(start_pos)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(steps):
                g.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / steps)
        return statistics.median(times)

    return g, run


def bench_model(name, args):
    torch._dynamo.reset()  # every variant compiles the same layer code: keep each model under the recompile limit
    cfg = CONFIGS[name]
    model = Model(cfg, args.max_seq)
    model.pos.fill_(args.start_pos)
    stats = calibrate(model)
    if args.compile:
        model.compile()
    t0 = time.time()
    _, run_dense = time_graph(model, False, args.start_pos)
    dense_ms = run_dense()
    print(
        f"[{name}] dense step {dense_ms:.3f} ms ({1000 / dense_ms:.1f} tok/s) [capture {time.time() - t0:.0f}s]",
        flush=True,
    )
    rows = []
    kernels = [("current", None)] + ([("before", load_kernel_module(args.baseline))] if args.baseline else [])
    # every kernel with every split-K reduction and backend; the first is the main result, the others extra columns
    variants = [
        (k if (i, j) == (0, 0) else f"{k}/{r}" + (f"/{b}" if j else ""), mod, r, b)
        for k, mod in kernels
        for i, r in enumerate(args.reduce)
        for j, b in enumerate(args.backends)
    ]
    for quant in [None, "int8"] if args.int8 else [None]:
        for kname, mod, reduce, backend in variants:
            if getattr(model, "packed_as", None) != (quant, backend):
                model.pack(quantize=quant, backend=backend)
            model.set_reduce(reduce)
            if args.compile:
                model.compile()
            saved = K.ops._tg
            if mod is not None:  # the custom op calls whatever kernel module ops._tg holds at capture time
                K.ops._tg = mod
            model.set_sparsity(0.0, stats)
            t0 = time.time()
            g, run_sparse = time_graph(model, True, args.start_pos)
            print(f"[{name}] sparse graph ({kname} kernel) captured in {time.time() - t0:.0f}s", flush=True)
            for s in args.sparsities:
                model.set_sparsity(s, stats)
                ms = run_sparse()
                meas = measured_sparsity(model, stats, s)
                row = dict(
                    model=name,
                    weights="int8" if quant else "bf16",
                    target=s,
                    measured=meas,
                    dense_ms=dense_ms,
                    sparse_ms=ms,
                    dense_tok_s=1000 / dense_ms,
                    sparse_tok_s=1000 / ms,
                    speedup=dense_ms / ms,
                )
                if kname != "current":
                    cur = next(r for r in rows if (r["model"], r["weights"], r["target"]) == (name, row["weights"], s))
                    key = "before" if kname == "before" else kname.replace("/", "_")
                    cur.update({f"{key}_ms": ms, f"{key}_tok_s": 1000 / ms, f"{key}_speedup": dense_ms / ms})
                else:
                    rows.append(row)
                print(
                    f"[{name}] {kname} {row['weights']} sparsity {s:.2f} (measured {meas:.3f}): {ms:.3f} ms "
                    f"{1000 / ms:.1f} tok/s  x{dense_ms / ms:.2f} vs dense",
                    flush=True,
                )
            K.ops._tg = saved
            del g, run_sparse
        for L in model.layers:
            L.packed = None
        torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()
    return rows


def load_kernel_module(path):
    from bench_gemv import load_kernel_module as load

    return load(path)


def add_loop_args(ap: argparse.ArgumentParser) -> None:
    """The decode loop's flags (shared with bounds.py)."""
    ap.add_argument("--models", default="llama2-7b,llama3-8b")
    ap.add_argument("--sparsities", default="0,0.25,0.4,0.5,0.6,0.7")
    ap.add_argument("--max-seq", type=int, default=512)
    ap.add_argument("--start-pos", type=int, default=256)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_loop_args(ap)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--int8", action="store_true", help="also int8 weights + sparsity")
    ap.add_argument("--out", default=None)
    ap.add_argument("--baseline", default=None, help="also run the sparse loop with the kernel module at this path")
    ap.add_argument(
        "--reduce",
        default="kernel",
        help="split-K reductions to time, comma-separated: kernel (the default), consumer",
    )
    ap.add_argument(
        "--backends",
        default="triton",
        help="sparse GEMVs to time, comma-separated: triton (the default; blocked layout), cuda (the CUDA C++ kernel)",
    )
    args = ap.parse_args()
    args.reduce = args.reduce.split(",")
    args.backends = args.backends.split(",")
    args.sparsities = [float(v) for v in args.sparsities.split(",")]
    if not torch.cuda.is_available():
        sys.exit("bench_decode needs a CUDA GPU")
    from bench_gemv import env_info

    rows = []
    for name in args.models.split(","):
        rows += bench_model(name, args)
    extra = [k[: -len("_tok_s")] for k in rows[0] if k.endswith("_tok_s") and k not in ("dense_tok_s", "sparse_tok_s")]
    print(
        f"\n{'model':>10} {'weights':>7} {'target':>6} {'meas.':>6} {'dense tok/s':>11} {'sparse tok/s':>12} {'x':>5}"
        + "".join(f" {e + ' tok/s':>16} {'x':>5}" for e in extra)
    )
    for r in rows:
        print(
            f"{r['model']:>10} {r['weights']:>7} {r['target']:>6.2f} {r['measured']:>6.3f} {r['dense_tok_s']:>11.1f} "
            f"{r['sparse_tok_s']:>12.1f} {r['speedup']:>5.2f}"
            + "".join(f" {r[e + '_tok_s']:>16.1f} {r[e + '_speedup']:>5.2f}" for e in extra)
        )
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"env": env_info(), "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
