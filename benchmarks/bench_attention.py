"""Decode attention per layer: transformers' SDPA path vs actsparse's split-KV kernel, graph-timed.

    python benchmarks/bench_attention.py --out $OUT/attention_h200.json

One query token against a static cache of ``L`` positions of which ``written`` are let through by the mask
(a Decoder with ``max_seq_len = L`` after ``written`` tokens), Llama-2-7B (32 heads, MHA) and Llama-3-8B
(32 query heads, 8 key/value heads) shapes, bf16, head dim 128. Both run as the compiled decoder runs them:
``torch.compile(fullgraph=True)`` of transformers' attention function (``sdpa_attention_forward``: under
compile it repeats the key/value heads for GQA, then ``scaled_dot_product_attention`` with the boolean mask)
and of ``actsparse.engine.attention.decode_attention_forward``, each called on 8 layers' caches in turn
(so that the caches stream from memory), captured in a CUDA graph: µs per layer, the ratio, and the bytes
the kernel must read (the written positions' keys and values) at the measured time as GB/s.
``kernel`` is the library's choice (``ONE_LAUNCH = None``); "one / two launches": the kernel with its ranges
combined by the last program of each key/value head, and by a second kernel (as before 2026-12-07).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_gemv import env_info, graph_time_us  # noqa: E402

from actsparse.engine.attention import decode_attention_forward  # noqa: E402
from actsparse.kernels import decode_attention as DA  # noqa: E402

SHAPES = {"llama2-7b": (32, 32), "llama3-8b": (32, 8)}
LAYERS = 8


class _Attn(torch.nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def compiled(attention, module: torch.nn.Module):
    """``attention`` (transformers' attention-function interface) compiled as the decoder compiles it."""
    return torch.compile(lambda q, k, v, m: attention(module, q, k, v, m, scaling=128**-0.5)[0], fullgraph=True)


def layer_inputs(hq: int, hkv: int, length: int) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A bf16 query ``[1, hq, 1, 128]`` and ``LAYERS`` layers' keys and values ``[1, hkv, length, 128]`` (seeded)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, hq, 1, 128, device="cuda", dtype=torch.bfloat16, generator=g)

    def cache() -> torch.Tensor:
        return torch.randn(1, hkv, length, 128, device="cuda", dtype=torch.bfloat16, generator=g)

    return q, [(cache(), cache()) for _ in range(LAYERS)]


def prefix_mask(length: int, written: int) -> torch.Tensor:
    """The static cache's boolean mask after ``written`` positions: ``[1, 1, 1, length]``."""
    mask = torch.zeros(1, 1, 1, length, dtype=torch.bool, device="cuda")
    mask[..., :written] = True
    return mask


def per_layer_us(fn, q, kv, mask) -> float:
    """Graph-timed µs per call of ``fn`` over the layers' caches in turn."""
    return graph_time_us(lambda i: fn(q, *kv[i % LAYERS], mask), LAYERS)


def step_today(module: torch.nn.Module):
    """A step's attention from the new token's projections as the compiled decoder runs it: transformers'
    ``apply_rotary_pos_emb``, the two ``index_copy_`` cache writes, then the decode attention."""

    def fn(q, k, v, cos, sin, kc, vc, pos, mask):
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        kc.index_copy_(2, pos.view(1), k)
        vc.index_copy_(2, pos.view(1), v)
        return decode_attention_forward(module, q, kc, vc, mask, scaling=128**-0.5)[0].transpose(1, 2)

    return fn


def step_fused(q, k, v, cos, sin, kc, vc, pos, mask):
    """The same with ``decode_attention_rope`` (one kernel)."""
    return DA.decode_attention_rope(q, k, v, cos, sin, kc, vc, pos, mask, 128**-0.5)


def rope_row(name: str, fns: dict, hq: int, hkv: int, length: int, written: int) -> dict:
    """Both of ``fns`` over 8 layers' caches of ``length`` positions, the new token at ``written - 1``."""
    q, kv = layer_inputs(hq, hkv, length)
    g = torch.Generator(device="cuda").manual_seed(1)
    k, v = (torch.randn(1, hkv, 1, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    ang = torch.rand(1, 1, 64, device="cuda", generator=g) * 40
    cos, sin = (f(torch.cat((ang, ang), -1)).to(torch.bfloat16) for f in (torch.cos, torch.sin))
    pos, mask = torch.tensor(written - 1, device="cuda"), prefix_mask(length, written)
    outs = {n: f(q, k, v, cos, sin, *kv[0], pos, mask) for n, f in fns.items()}
    err = ((outs["fused"].float() - outs["today"].float()).norm() / outs["today"].float().norm()).item()
    t = {
        n: graph_time_us(lambda i, f=f: f(q, k, v, cos, sin, *kv[i % LAYERS], pos, mask), LAYERS)
        for n, f in fns.items()
    }
    print(
        f"{name:10} L={length:5} written={written:5}  rotary + cache writes + attention {t['today']:6.2f} us, "
        f"decode_attention_rope {t['fused']:6.2f} us (-{t['today'] - t['fused']:.2f}; rel err {err:.1e})",
        flush=True,
    )
    return dict(model=name, length=length, written=written, today_us=t["today"], fused_us=t["fused"],
                saved_us=t["today"] - t["fused"], rel_err=err)  # fmt: skip


def rope_rows(lengths: list[int], written: int) -> list[dict]:
    """The attention of a decode step from the new token's projections, as the decoder runs it today against
    ``decode_attention_rope``: µs per layer, graph-timed over 8 layers' caches."""
    rows = []
    for name, (hq, hkv) in SHAPES.items():
        fns = {
            "today": torch.compile(step_today(_Attn(hq // hkv)), fullgraph=True),
            "fused": torch.compile(step_fused, fullgraph=True),
        }
        rows += [rope_row(name, fns, hq, hkv, length, min(written, length)) for length in lengths]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="512,2048,4096", help="static cache sizes L")
    ap.add_argument("--written", default="256,0.5,1.0", help="positions let through: counts, or fractions of L")
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--rope",
        action="store_true",
        help="instead: the rotary, cache writes and attention of a step as the decoder runs them vs "
        "decode_attention_rope (the first --written count is the position)",
    )
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention needs a CUDA GPU")
    if args.rope:
        rows = rope_rows([int(v) for v in args.lengths.split(",")], int(args.written.split(",")[0]))
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"env": env_info(), "rows": rows}, f, indent=1)
        return
    rows = []
    for name, (hq, hkv) in SHAPES.items():
        module = _Attn(hq // hkv)
        sdpa, ours = compiled(sdpa_attention_forward, module), compiled(decode_attention_forward, module)
        for length in (int(v) for v in args.lengths.split(",")):
            q, kv = layer_inputs(hq, hkv, length)
            for w in args.written.split(","):
                written = min(length, int(float(w) * length) if "." in w else int(w))
                mask = prefix_mask(length, written)
                ref = sdpa(q, *kv[0], mask)
                got = ours(q, *kv[0], mask)
                err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
                t_sdpa, t_ours = per_layer_us(sdpa, q, kv, mask), per_layer_us(ours, q, kv, mask)
                DA.ONE_LAUNCH = False  # the same kernel with its ranges combined by a second launch
                t_two = per_layer_us(ours, q, kv, mask)
                err_two = ((ours(q, *kv[0], mask).float() - got.float()).abs().max()).item()
                DA.ONE_LAUNCH = True  # ... and by the last program of each key/value head
                t_one = per_layer_us(ours, q, kv, mask)
                DA.ONE_LAUNCH = None
                read = 2 * hkv * written * 128 * 2  # the written keys and values, bf16
                row = dict(
                    model=name, length=length, written=written, sdpa_us=t_sdpa, kernel_us=t_ours,
                    two_launch_us=t_two, one_launch_us=t_one, two_launch_max_diff=err_two,
                    speedup=t_sdpa / t_ours, kernel_gbs=read / t_ours / 1e3, rel_err=err,
                )  # fmt: skip
                rows.append(row)
                print(
                    f"{name:10} L={length:5} written={written:5}  sdpa {t_sdpa:7.2f} us  kernel {t_ours:6.2f} us  "
                    f"x{t_sdpa / t_ours:5.2f}  one / two launches {t_one:6.2f} / {t_two:6.2f} us  ({row['kernel_gbs']:.0f} GB/s of written K/V, rel err {err:.1e})",
                    flush=True,
                )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env_info(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
