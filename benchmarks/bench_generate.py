"""Decode speed on the Hugging Face model object itself: HF generate vs actsparse's Decoder, dense and sparse.

    python benchmarks/bench_generate.py --models llama2-7b,llama3-8b,qwen2-7b --out results/generate_h200.json

What a user gets: ``transformers`` models (LlamaForCausalLM, Qwen2ForCausalLM) with real shapes and random
bf16 weights, batch 1, a prompt of ``--prompt-len`` random tokens, then ``--tokens`` greedy tokens:

* ``hf-generate``: dense ``model.generate`` (eager, dynamic cache), decode tokens/s from the difference of
  a ``--tokens`` and a 1-token generation (so the prompt's prefill cancels out);
* ``decoder``: ``actsparse.engine.Decoder(model, max_seq_len)``, dense: the model's own forward compiled
  (``fullgraph=True``) and replayed as one CUDA graph per token, q/k/v and gate/up fused into one GEMM each
  (the Decoder's default; ``decoder-unfused``: the same with HF's separate projections);
* ``decoder-sparse``: the same Decoder after ``apply_thresholds`` on all seven projections and
  ``enable_kernels`` (q/k/v and gate/up fused; the dense route below the break-even sparsity), at each
  ``--sparsities`` target; thresholds are per-layer quantiles of |input| over a ``--calib-len``-token random
  prompt, measured sparsity is what a SparsityMonitor counts on another prompt;
* ``--int8``: the same after ``compress_weights(model, "int8_asym")`` (torchao), dense and sparse.

Timing: ``DecodeResult.decode_seconds`` (host clock around the replays, one sync at the end), median of
``--reps`` runs. Also checked: the decoder's greedy tokens against HF generate's (identical prefix length).
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import math
import os
import re
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_gemv import print_profile, profile_replays  # noqa: E402
from exp_cuda import VARIANTS, use_variant  # noqa: E402

import actsparse as A  # noqa: E402
import actsparse.kernels as K  # noqa: E402
import actsparse.kernels.cuda_gemv as CG  # noqa: E402
import actsparse.kernels.linear as KL  # noqa: E402
import actsparse.kernels.ops as KO  # noqa: E402
from actsparse.engine import Decoder, glu_fused, norms_fused, rope_fused, unfuse_projections  # noqa: E402
from actsparse.engine import hf as HF  # noqa: E402
from actsparse.eval import SparsityMonitor  # noqa: E402

CONFIGS = {
    "llama2-7b": (
        "llama",
        dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
        ),
    ),
    "llama3-8b": (
        "llama",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            rope_theta=500000.0,
        ),
    ),
    "qwen2-7b": (
        "qwen2",
        dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            rope_theta=1000000.0,
        ),
    ),
    "tiny": (
        "llama",
        dict(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1000,
        ),
    ),
}
PROJ = r".*(q|k|v|o|gate|up|down)_proj$"
DEV = "cuda"
PDL_DEFAULT = CG.PDL  # the library's programmatic-dependent-launch default (cuda-pdl / cuda-nopdl override it)


def build(name: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    arch, kw = CONFIGS[name]
    cls, cfg_cls = (LlamaForCausalLM, LlamaConfig) if arch == "llama" else (Qwen2ForCausalLM, Qwen2Config)
    cfg = cfg_cls(**kw, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEV):
            model = cls(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    return model


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def hf_generate_tok_s(model, ids, tokens, reps):
    def once(n):
        sync()
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync()
        return time.perf_counter() - t, out

    once(2)
    t1 = statistics.median(once(1)[0] for _ in range(reps))
    times, outs = zip(*(once(tokens) for _ in range(reps)))
    return (tokens - 1) / (statistics.median(times) - t1), outs[0]


def decoder_tok_s(dec, ids, tokens, reps):
    dec.run(ids, 4, eos_token_id=[])  # compile/capture (first time) outside the timing
    runs = [dec.run(ids, tokens, eos_token_id=[]) for _ in range(reps)]
    return statistics.median(r.decode_tokens_per_s for r in runs), runs[0]


def profile_row(dec, row, args, label):
    """With ``--profile``: the kernels of the decoder's graph replays (count, busy, gaps, the busiest) in ``row``."""
    if args.profile and dec._graph is not None:
        row["profile"] = profile_replays(dec._graph.replay, top=25)
        print_profile(label, row["profile"], lines=25)


def same_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    a, b = a.view(-1).tolist(), b.view(-1).tolist()
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def layer_stats(model, ids):
    """|input| samples of every sparse layer over one prefill of ``ids`` (at most 2^22 values each)."""
    stats, hooks = {}, []
    for name, m in A.sparse_layers(model).items():

        def pre(mod, args, name=name):
            a = args[0].detach().float().abs().flatten()
            stats[name] = a[torch.randperm(a.numel(), device=a.device)[: 1 << 22]]

        hooks.append(m.register_forward_pre_hook(pre))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return stats


def set_sparsity(model, stats, s):
    with torch.no_grad():
        for name, m in A.sparse_layers(model).items():
            tau = -math.inf if s <= 0 else torch.quantile(stats[name][: 1 << 24], s).item()
            m.act_threshold.fill_(tau)
            m.target_sparsity = s


def measured(model, ids):
    with SparsityMonitor(model) as mon, torch.no_grad():
        model(ids)
    sp = mon.sparsity()
    sizes = {n: m.in_features * m.out_features for n, m in A.sparse_layers(model).items()}
    return sum(sp[n] * sizes[n] for n in sp) / sum(sizes[n] for n in sp)  # weighted by bytes read


def _base(backend: str) -> str:
    """The enable_kernels backend of a --backends entry (cuda-pdl, cuda-nopdl, cuda-tune, cuda@legacy: cuda)."""
    return backend.partition("@")[0].removesuffix("-pdl").removesuffix("-nopdl").removesuffix("-tune")


def _pdl(backend: str) -> bool:
    """cuda_gemv.PDL for a --backends entry: on for cuda-pdl, off for cuda-nopdl, else the library's default."""
    head = backend.partition("@")[0]
    return head.endswith("-pdl") or (PDL_DEFAULT and not head.endswith("-nopdl"))


def sparse_points(model, name, weights, args, ids, calib, held_out, dense_tok_s, rows, log, sparsities):
    A.apply_thresholds(
        model, {n: -math.inf for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.match(PROJ, n)}
    )
    stats = layer_stats(model, calib)
    # the first is the main result
    variants = [
        (r, b, g, kv, nm, cb, rp)
        for r in args.reduce
        for b in args.backends
        for g in args.glu
        for kv in args.kv
        for nm in args.norms
        for cb in args.combo
        for rp in args.rope
    ]
    combo_default = torch._inductor.config.combo_kernels
    for reduce, backend, glu, kv, norms, combo, rope in variants:
        if weights == "int8":
            floor = K.INT8_MIN_SPARSITY
        elif KO.cuda_kernel_available(DEV) and backend != "triton":
            floor = K.CUDA_MIN_SPARSITY
        else:
            floor = K.KERNEL_MIN_SPARSITY
        # the kernels' layer path calls this name; a partial pins the reduction for this compile
        KL.sparse_gemv = functools.partial(KO.sparse_gemv, reduce=reduce)
        CG.PDL = _pdl(backend)  # cuda-nopdl@pdl-early: without PDL, that build
        CG._CONFIGS.clear()  # a tuned variant's choices must not leak into the next variant
        variant = backend.partition("@")[2]  # cuda@legacy: the graph captures that build's kernel
        if DEV == "cuda":
            use_variant(variant, torch.device(DEV))
        label = f"reduce={reduce}, backend={backend}, attention={args.attention}, glu={glu}, kv={kv}, norms={norms}"
        if len(args.combo) > 1 or combo == "on":
            label += f", combo={combo}"
        if len(args.rope) > 1 or rope == "on":
            label += f", rope={rope}"
        # (read when the Decoder compiles its step: at its first run below)
        torch._inductor.config.combo_kernels = combo == "on" if combo != "default" else combo_default
        HF.STACKED_KV = kv == "stacked"  # (read when the Decoder makes its cache)
        dec = Decoder(
            model,
            max_seq_len=args.max_seq,
            attention=args.attention,
            sync_every=args.tokens,
            glu=glu == "on",
            norms=norms == "on",
            rope=rope == "on",
        )
        routes = None
        for s in sparsities:
            set_sparsity(model, stats, s)
            plan = s >= floor  # enable_kernels' own rule for these layers
            # re-plan only where the route changes (thresholds are read live), or to re-time the tiles at this point
            if plan != routes or backend.endswith("-tune"):
                t = time.time()
                K.enable_kernels(model, backend=_base(backend), tune=backend.endswith("-tune"))
                dec.run(ids, 4, eos_token_id=[])
                log(
                    f"[{name}] {weights}: kernels {'on' if plan else 'off (dense route)'}, {label}, "
                    f"compile+capture {time.time() - t:.0f}s, mode {dec.mode}"
                )
                if backend.endswith("-tune"):  # what tuning chose, per K x N_pad (bytes per weight)
                    chosen = {f"{k}x{n}/{b}B": f"{c.block_n}/{c.cluster}" for (k, n, b, _), c in CG._CONFIGS.items()}
                    log(f"[{name}] {weights}: tuned tiles at {s:.2f}: {chosen}")
                routes = plan
            tok_s, run = decoder_tok_s(dec, ids, args.tokens, args.reps)
            meas = measured(model, held_out)
            packed = sum(1 for r in K.kernel_routes(model).values() if r is not None and r.route == "kernel")
            rows.append(
                dict(
                    model=name,
                    path="decoder-sparse"
                    if (reduce, backend, glu, kv, norms, combo, rope) == variants[0]
                    else f"decoder-sparse/{reduce}/{backend}/glu-{glu}/kv-{kv}/norms-{norms}/combo-{combo}/rope-{rope}",
                    weights=weights,
                    target=s,
                    measured=meas,
                    tok_s=tok_s,
                    vs_dense=tok_s / dense_tok_s,
                    kernel_layers=packed,
                    mode=dec.mode,
                    reduce=reduce,
                    backend=backend,
                    glu=glu,
                    kv=kv,
                    glu_mlps=len(glu_fused(model)),  # the MLPs that ran fused (glu on and down on the CUDA kernel)
                    norms=norms,
                    norm_layers=len(norms_fused(model)),  # the decoder layers that ran their norms in the GEMVs
                    combo=combo,
                    rope=rope,
                    rope_attentions=len(rope_fused(model)),
                )
            )
            log(
                f"[{name}] {weights} {label} sparsity {s:.2f} (measured {meas:.3f}): {tok_s:.1f} tok/s "
                f"x{tok_s / dense_tok_s:.3f} vs decoder dense ({packed} kernel layers, "
                f"{rows[-1]['norm_layers']} decoder layers with fused norms)"
            )
            profile_row(dec, rows[-1], args, f"[{name}] {weights} sparse {s:.2f}")
        if (reduce, backend, glu, kv, norms, combo, rope) != variants[-1]:
            del dec
    torch._inductor.config.combo_kernels = combo_default
    KL.sparse_gemv = KO.sparse_gemv
    CG.PDL = PDL_DEFAULT
    HF.STACKED_KV = False
    if DEV == "cuda":
        use_variant("", torch.device(DEV))
    # the compiled sparse graph against the same model decoded eagerly (HF generate: the kernels run eagerly)
    with torch.no_grad():
        eager = model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    graph = dec.generate(ids, 32, eos_token_id=[])
    static = Decoder(
        model, max_seq_len=args.max_seq, attention=args.attention, compile=False, cuda_graph=False
    ).generate(ids, 32, eos_token_id=[])
    p = ids.shape[1]
    rows[-1]["same_tokens_as_hf_generate"] = same_prefix(graph[:, p:], eager[:, p:])
    rows[-1]["same_tokens_as_eager_decoder"] = same_prefix(graph[:, p:], static[:, p:])
    log(
        f"[{name}] {weights} sparse {sparsities[-1]}: graph decoder vs the same sparse model eagerly: "
        f"{rows[-1]['same_tokens_as_eager_decoder']}/32 greedy tokens identical to the eager Decoder (static cache), "
        f"{rows[-1]['same_tokens_as_hf_generate']}/32 to HF generate (dynamic cache)"
    )
    del dec
    K.disable_kernels(model)
    A.remove_sparsity(model)
    if DEV == "cuda":
        torch.cuda.empty_cache()


def dense_variant_row(model, name, args, ids, dense_tok_s, rows, log, path, weights, what, **decoder_kw):
    """One more dense Decoder (unfused projections, int8 weights): tokens/s against the bf16 fused dense."""
    t = time.time()
    dec = Decoder(model, max_seq_len=args.max_seq, attention=args.attention, sync_every=args.tokens, **decoder_kw)
    dec.run(ids, 4, eos_token_id=[])
    tok_s, _ = decoder_tok_s(dec, ids, args.tokens, args.reps)
    rows.append(
        dict(
            model=name,
            path=path,
            weights=weights,
            target=None,
            tok_s=tok_s,
            vs_dense=tok_s / dense_tok_s,
            mode=dec.mode,
        )
    )
    log(f"[{name}] {what}: {tok_s:.1f} tok/s x{tok_s / dense_tok_s:.3f} vs bf16 fused dense [{time.time() - t:.0f}s]")
    del dec


def bench_model(name, args, log):
    rows = []
    t = time.time()
    model = build(name)
    log(f"[{name}] built in {time.time() - t:.0f}s: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params")
    g = torch.Generator(device=DEV).manual_seed(1)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, args.prompt_len), device=DEV, generator=g)
    calib = torch.randint(0, vocab, (1, args.calib_len), device=DEV, generator=g)
    held_out = torch.randint(0, vocab, (1, args.calib_len), device=DEV, generator=g)

    hf_tok_s, hf_out = hf_generate_tok_s(model, ids, args.tokens, args.reps)
    rows.append(dict(model=name, path="hf-generate", weights="bf16", target=None, tok_s=hf_tok_s))
    log(f"[{name}] HF generate (eager, dynamic cache): {hf_tok_s:.1f} tok/s")
    t = time.time()
    dec = Decoder(model, max_seq_len=args.max_seq, attention=args.attention, sync_every=args.tokens)
    dec.run(ids, 4, eos_token_id=[])
    log(f"[{name}] decoder dense compile+capture {time.time() - t:.0f}s, mode {dec.mode}")
    dense_tok_s, run = decoder_tok_s(dec, ids, args.tokens, args.reps)
    ident = same_prefix(run.sequences[:, args.prompt_len :], hf_out[:, args.prompt_len :])
    static = Decoder(
        model, max_seq_len=args.max_seq, attention=args.attention, compile=False, cuda_graph=False
    ).generate(ids, args.tokens, eos_token_id=[])
    ident_static = same_prefix(run.sequences[:, args.prompt_len :], static[:, args.prompt_len :])
    with torch.no_grad():  # HF's own static-cache path, eagerly: the same attention over a masked static cache
        hf_static = model.generate(
            ids,
            max_new_tokens=args.tokens,
            min_new_tokens=args.tokens,
            do_sample=False,
            cache_implementation="static",
            disable_compile=True,
        )
    ident_hf_static = same_prefix(run.sequences[:, args.prompt_len :], hf_static[:, args.prompt_len :])
    rows.append(
        dict(
            model=name,
            path="decoder",
            weights="bf16",
            target=None,
            tok_s=dense_tok_s,
            vs_hf=dense_tok_s / hf_tok_s,
            same_tokens_as_hf_generate=ident,
            same_tokens_as_eager_decoder=ident_static,
            same_tokens_as_hf_static=ident_hf_static,
            mode=dec.mode,
        )
    )
    log(
        f"[{name}] decoder dense: {dense_tok_s:.1f} tok/s (x{dense_tok_s / hf_tok_s:.1f} vs HF generate); "
        f"{ident}/{args.tokens} greedy tokens identical to HF generate, {ident_hf_static}/{args.tokens} to HF generate "
        f"with its static cache (eager), {ident_static}/{args.tokens} to the eager Decoder"
    )
    profile_row(dec, rows[-1], args, f"[{name}] dense decoder")
    del dec
    unfuse_projections(model)  # (the sparse points start from HF's own projections, as a user's model does)
    if not args.no_unfused:  # HF's own three and two GEMMs: what fusing q/k/v and gate/up is worth
        dense_variant_row(
            model, name, args, ids, dense_tok_s, rows, log, "decoder-unfused", "bf16",
            "decoder dense without fused projections", fuse=False,
        )  # fmt: skip
    sparse_points(model, name, "bf16", args, ids, calib, held_out, dense_tok_s, rows, log, args.sparsities)
    if args.int8:
        A.compress_weights(model, "int8_asym")
        dense_variant_row(
            model, name, args, ids, dense_tok_s, rows, log, "decoder", "int8", "decoder int8 dense (torchao)"
        )
        sparse_points(
            model,
            name,
            "int8",
            args,
            ids,
            calib,
            held_out,
            dense_tok_s,
            rows,
            log,
            args.sparsities,
        )  # int8 codes never take the dense route (K.INT8_MIN_SPARSITY)
    del model
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama2-7b,llama3-8b,qwen2-7b")
    ap.add_argument("--sparsities", default="0,0.25,0.4,0.5,0.6,0.7")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per timed generation")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--max-seq", type=int, default=512, help="the decoder's static cache (bench_decode's --max-seq)")
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--int8", action="store_true", help="also int8 weights (torchao) dense and sparse")
    ap.add_argument("--out", default=None)
    ap.add_argument("--reduce", default="kernel", help="split-K reductions of the kernels to time: kernel,consumer")
    ap.add_argument(
        "--backends",
        default="auto",
        help="sparse GEMV backends to time: auto,cuda,triton (cuda-pdl, cuda-nopdl: the CUDA kernel with PDL, without it; cuda-tune: "
        "enable_kernels(tune=True), its tiles timed per shape at every sparsity point; cuda@NAME: the CUDA "
        "kernel built as exp_cuda.py's VARIANTS[NAME], e.g. cuda,cuda@legacy for the kernel before and after)",
    )
    ap.add_argument(
        "--attention",
        default="auto",
        help="the Decoders' attention, or several (model,auto: each model benchmarked once per value, in one "
        "process; auto: actsparse's decode attention on CUDA; model: the model's SDPA; kernel)",
    )
    ap.add_argument("--no-unfused", action="store_true", help="skip the dense Decoder without fused projections")
    ap.add_argument(
        "--glu",
        default="on",
        help="the sparse Decoder's fuse_glu: on (SiLU(gate)*up in the down GEMV's load), off, or on,off (both)",
    )
    ap.add_argument(
        "--norms",
        default="on",
        help="the sparse Decoder's fuse_norms: on (the Decoder's default: RMSNorms in the q/k/v and gate/up GEMVs' "
        "loads, residual adds in o_proj's and down_proj's epilogues), off, or off,on (both, one process)",
    )
    ap.add_argument(
        "--rope",
        default="off",
        help="the sparse Decoder's fuse_rope: on (the decode attention rotates q and k and writes the cache itself: "
        "no rotary or cache-write kernels), off (the Decoder's default), or off,on (both, one process)",
    )
    ap.add_argument(
        "--combo",
        default="default",
        help="the sparse Decoder's compile with inductor's combo_kernels (independent kernels of the step, e.g. the "
        "rotary and cache writes of q, k and v, launched as one): default (--inductor's or torch's), on, off, or "
        "off,on (both, one process)",
    )
    ap.add_argument(
        "--kv",
        default="separate",
        help="the sparse Decoder's cache: separate (keys and values in two buffers), stacked (one buffer, one write "
        "of both: actsparse.engine.hf.STACKED_KV), or separate,stacked (both, one process)",
    )
    ap.add_argument(
        "--inductor",
        default="",
        help="torch._inductor.config settings for every compile of the run, e.g. triton.multi_kernel=1 (comma-"
        "separated key=value, values as Python literals): compare the --profile of two runs",
    )
    ap.add_argument("--profile", action="store_true", help="the kernels of each decoder graph (torch.profiler)")
    ap.add_argument("--cpu-smoke", action="store_true", help="run on the CPU (eager, no kernels): checks the script")
    args = ap.parse_args()
    for item in filter(None, args.inductor.split(",")):
        key, _, value = item.partition("=")
        *path, name = key.strip().split(".")
        owner = functools.reduce(getattr, path, torch._inductor.config)
        if not hasattr(owner, name):
            sys.exit(f"--inductor: torch._inductor.config has no {key.strip()}")
        setattr(owner, name, ast.literal_eval(value.strip()))  # for every compile of the run
    args.sparsities = [float(v) for v in args.sparsities.split(",")]
    args.reduce = args.reduce.split(",")
    args.backends = args.backends.split(",")
    args.glu = args.glu.split(",")
    args.kv = args.kv.split(",")
    args.norms = args.norms.split(",")
    args.combo = args.combo.split(",")
    args.rope = args.rope.split(",")
    attentions = args.attention.split(",")
    if (
        set(args.glu) - {"on", "off"}
        or set(args.norms) - {"on", "off"}
        or set(attentions) - {"auto", "kernel", "model"}
        or set(args.kv) - {"separate", "stacked"}
        or set(args.combo) - {"default", "on", "off"}
        or set(args.rope) - {"on", "off"}
    ):
        sys.exit(
            "--glu and --norms take on, off or on,off; --attention auto, kernel and model; --kv separate and stacked; "
            "--combo default, on and off; --rope on, off; comma-separated"
        )
    bad = [
        b
        for b in args.backends
        if _base(b) not in KO.BACKENDS or ("@" in b and (_base(b) != "cuda" or b.partition("@")[2] not in VARIANTS))
    ]
    if bad:
        sys.exit(
            f"--backends: unknown {', '.join(bad)} (auto, cuda, cuda-pdl, cuda-nopdl, cuda-tune, triton, cuda@NAME with NAME one of "
            f"{', '.join(VARIANTS)})"
        )
    global DEV
    if args.cpu_smoke:
        DEV = "cpu"
    elif not torch.cuda.is_available():
        sys.exit("bench_generate needs a CUDA GPU (or --cpu-smoke)")
    import transformers
    from bench_gemv import env_info

    def log(msg):
        print(msg, flush=True)

    rows = []
    for name in args.models.split(","):
        for attention in attentions:  # one process: the variants share the GPU's state
            model_rows = bench_model(name, argparse.Namespace(**{**vars(args), "attention": attention}), log)
            rows += [{**r, "attention": attention} for r in model_rows]
        if args.out:  # keep what is done if a later model runs out of time
            write(args, rows, {**(env_info() if DEV == "cuda" else {}), "transformers": transformers.__version__})
    print(
        f"\n{'model':>10} {'attention':>9} {'path':>32} {'weights':>7} {'target':>6} {'meas.':>6} {'tok/s':>8} "
        f"{'x dense':>8}"
    )
    for r in rows:
        target = "-" if r["target"] is None else f"{r['target']:.2f}"
        meas = f"{r['measured']:.3f}" if "measured" in r else "-"
        ratio = r.get("vs_dense", 1.0 if r["path"] == "decoder" and r["weights"] == "bf16" else None)
        print(
            f"{r['model']:>10} {r['attention']:>9} {r['path']:>32} {r['weights']:>7} {target:>6} {meas:>6} "
            f"{r['tok_s']:>8.1f} "
            f"{'-' if ratio is None else f'{ratio:.3f}':>8}"
        )


def write(args, rows, env):
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"env": env, "args": vars(args), "rows": rows}, f, indent=1)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
