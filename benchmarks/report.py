"""Tables (markdown) and plots (PNG) from benchmarks/results/*.json.

python benchmarks/report.py            # prints the tables of benchmarks/README.md, writes the PNGs
"""

from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
RES = os.path.join(HERE, "results")


def gemv_table(d, sparsities=(0.0, 0.3, 0.5, 0.7, 0.9)):
    print(
        f"GEMV, batch 1, {d['env']['gpu']}, copy bandwidth {d['copy_gbs']:.0f} GB/s; "
        "time in µs (CUDA graph replays, weights streamed from HBM); ratio = dense F.linear / sparse\n"
    )
    print("| K×N | weights | dense µs | " + " | ".join(f"{int(s * 100)}% µs (×, %copy)" for s in sparsities) + " |")
    print("|---|---|---|" + "---|" * len(sparsities))
    rows = d["rows"]
    for key in dict.fromkeys((r["k"], r["n"], r["weights"]) for r in rows):
        sel = {r["sparsity"]: r for r in rows if (r["k"], r["n"], r["weights"]) == key}
        cells = [f"{sel[s]['sparse_us']:.1f} (×{sel[s]['ratio']:.2f}, {sel[s]['pct_copy']:.0f}%)" for s in sparsities]
        print(f"| {key[0]}×{key[1]} | {key[2]} | {sel[0.0]['dense_us']:.1f} | " + " | ".join(cells) + " |")


def before_after_table(d, sparsities=(0.0, 0.5, 0.7)):
    """Same run: the kernel before issue 7's changes (``--baseline``) vs the current one."""
    rows = [r for r in d["rows"] if "before_us" in r]
    if not rows:
        return
    print(
        "\nBefore → after (same run, same protocol); µs, × vs dense F.linear (graph-timed / do_bench-timed), "
        "%copy of the bytes actually read\n"
    )
    print(
        "| K×N | weights | dense µs graph / do_bench | "
        + " | ".join(f"{int(s * 100)}%: before → after µs (× graph / do_bench, %copy)" for s in sparsities)
        + " |"
    )
    print("|---|---|---|" + "---|" * len(sparsities))
    for key in dict.fromkeys((r["k"], r["n"], r["weights"]) for r in rows):
        sel = {r["sparsity"]: r for r in rows if (r["k"], r["n"], r["weights"]) == key}
        r0 = sel[0.0]
        cells = [
            f"{sel[s]['before_us']:.1f} → **{sel[s]['sparse_us']:.1f}** (×{sel[s]['ratio']:.2f} / "
            f"×{sel[s]['dense_dobench_us'] / sel[s]['sparse_us']:.2f}, {sel[s]['pct_copy']:.0f}%)"
            for s in sparsities
        ]
        print(
            f"| {key[0]}×{key[1]} | {key[2]} | {r0['dense_us']:.1f} / {r0['dense_dobench_us']:.1f} | "
            + " | ".join(cells)
            + " |"
        )


def decode_table(d):
    before = any("before_tok_s" in r for r in d["rows"])
    print(
        f"\nDecode, batch 1, {d['env']['gpu']}, tokens/s (one CUDA-graph replay per token)"
        + ('; "before" = the kernel before issue 7\'s changes, same run' if before else "")
        + "\n"
    )
    print(
        "| model | weights | target | measured | dense tok/s | sparse tok/s | × vs dense |"
        + (" before tok/s | before × |" if before else "")
    )
    print("|---|---|---|---|---|---|---|" + ("---|---|" if before else ""))
    for r in d["rows"]:
        print(
            f"| {r['model']} | {r['weights']} | {r['target']:.2f} | {r['measured']:.3f} | {r['dense_tok_s']:.1f} | "
            f"{r['sparse_tok_s']:.1f} | {r['speedup']:.2f} |"
            + (f" {r['before_tok_s']:.1f} | {r['before_speedup']:.2f} |" if "before_tok_s" in r else "")
        )


def bounds_tables(b):
    """benchmarks/bounds.py: what any kernel could reach (kept bytes at the measured read bandwidth)."""
    print(
        f"\nBounds, {b['env']['gpu']}: read bandwidth {b['read_gbs']:.0f} GB/s (copy {b['copy_gbs']:.0f}), "
        f"empty launch {b['launch_floor_us']:.2f} µs; ceiling = dense F.linear (graph-timed) / (kept bytes at read "
        'bandwidth), "+launch" adds one empty launch\n'
    )
    print(
        "| K×N | weights | dense µs (% of read bw) | 0%: ours × / ceiling × (+launch) | "
        "50%: ours × / ceiling × (+launch) | 70%: ours × / ceiling × (+launch) |"
    )
    print("|---|---|---|---|---|---|")
    for key in dict.fromkeys((r["k"], r["n"], r["weights"]) for r in b["gemv"]):
        sel = {r["sparsity"]: r for r in b["gemv"] if (r["k"], r["n"], r["weights"]) == key}
        r0 = sel[0.0]
        cells = [
            f"×{sel[s]['ours_ratio']:.2f} / ×{sel[s]['ceiling_ratio']:.2f} (×{sel[s]['ceiling_ratio_launch']:.2f})"
            for s in (0.0, 0.5, 0.7)
        ]
        print(
            f"| {key[0]}×{key[1]} | {key[2]} | {r0['dense_us']:.1f} ({r0['dense_pct_read']:.0f}%) | "
            + " | ".join(cells)
            + " |"
        )
    print(
        "\nDecode, bf16: step = no-GEMV part (norms, RoPE, cache, attention, residuals, lm_head) + GEMVs; ceiling = "
        'dense / (no-GEMV part + kept bytes at read bandwidth), "+launch" adds one empty launch per GEMV\n'
    )
    print(
        "| model | dense ms (GEMVs % of read bw) | no GEMVs ms | ours at 100% ms (fixed µs/GEMV) | sparsity | "
        "ours × | ceiling × (+launch) | GEMV bandwidth 2.0× needs |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for m in b["decode"]:
        for r in m["rows"]:
            print(
                f"| {m['model']} | {m['dense_ms']:.3f} ({m['dense_gemv_pct_read']:.0f}%) | {m['no_gemv_ms']:.3f} | "
                f"{m['sparse100_ms']:.3f} ({m['fixed_us_per_gemv']:.1f}) | {r['target']:.2f} | {r['speedup']:.2f} | "
                f"{r['ceiling']:.2f} ({r['ceiling_launch']:.2f}) | {r['pct_read_for_2x']:.0f}% of read |"
            )


GENERATE_MODELS = ("llama2", "llama3", "qwen2")


def generate_tables():
    """benchmarks/bench_generate.py (the HF model object) next to bench_decode.py (the hand-written loop)."""
    runs = {
        m: json.load(open(os.path.join(RES, f"generate_{m}_h200.json")))
        for m in GENERATE_MODELS
        if os.path.exists(os.path.join(RES, f"generate_{m}_h200.json"))
    }
    if not runs:
        return
    env = next(iter(runs.values()))["env"]
    print(
        f"\nDecode on the Hugging Face model object, batch 1, {env['gpu']}, torch {env['torch']}, transformers "
        f"{env['transformers']}: tokens/s (× vs the Decoder dense, same run); prompt 256 tokens, 64 new, static "
        "cache 512; bench_decode.py = the hand-written gpt-fast loop in the same call where run\n"
    )
    sparsities = (0.0, 0.25, 0.4, 0.5, 0.6, 0.7)
    print(
        "| model | weights | HF generate | Decoder dense | "
        + " | ".join(f"{int(s * 100)}%" for s in sparsities)
        + " | bench_decode dense / 50% |"
    )
    print("|---|---|---|---|" + "---|" * len(sparsities) + "---|")
    for m, d in runs.items():
        rows = d["rows"]
        name = rows[0]["model"]
        hf = next(r for r in rows if r["path"] == "hf-generate")
        dense = next(r for r in rows if r["path"] == "decoder" and r["weights"] == "bf16")
        bd_path = os.path.join(RES, f"decode_{m}_h200.json")
        bd = json.load(open(bd_path))["rows"] if os.path.exists(bd_path) else []
        for weights in ("bf16", "int8"):
            sel = {r["target"]: r for r in rows if r["path"] == "decoder-sparse" and r["weights"] == weights}
            if not sel:
                continue
            base = (
                dense
                if weights == "bf16"
                else next(r for r in rows if r["path"] == "decoder" and r["weights"] == "int8")
            )
            cells = [f"{sel[s]['tok_s']:.1f} (×{sel[s]['vs_dense']:.2f})" if s in sel else "-" for s in sparsities]
            b = {r["target"]: r for r in bd if r["weights"] == weights}
            ref = f"{b[0.0]['dense_tok_s']:.1f} / {b[0.5]['sparse_tok_s']:.1f} (×{b[0.5]['speedup']:.2f})" if b else "-"
            hf_cell = f"{hf['tok_s']:.1f}" if weights == "bf16" else ""
            dense_cell = (
                f"{base['tok_s']:.1f}"
                if weights == "bf16"
                else f"{base['tok_s']:.1f} (torchao, ×{base['vs_dense']:.2f})"
            )
            print(f"| {name} | {weights} | {hf_cell} | {dense_cell} | " + " | ".join(cells) + f" | {ref} |")
    print("\nGreedy tokens of the graph decoder identical to the same model decoded eagerly (identical prefix)\n")
    print(
        "| model | dense: vs HF generate / HF static cache / eager Decoder (of 64) | "
        "bf16 70%: vs eager Decoder / HF generate (of 32) | int8 70%: same |"
    )
    print("|---|---|---|---|")
    for d in runs.values():
        rows = d["rows"]
        dense = next(r for r in rows if r["path"] == "decoder" and r["weights"] == "bf16")
        last = {
            w: [r for r in rows if r["path"] == "decoder-sparse" and r["weights"] == w][-1:] for w in ("bf16", "int8")
        }
        cells = [
            f"{v[0]['same_tokens_as_eager_decoder']} / {v[0]['same_tokens_as_hf_generate']}" if v else "-"
            for v in last.values()
        ]
        print(
            f"| {rows[0]['model']} | {dense['same_tokens_as_hf_generate']} / {dense['same_tokens_as_hf_static']} / "
            f"{dense['same_tokens_as_eager_decoder']} | " + " | ".join(cells) + " |"
        )


def plots(gemv, decode):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for key in dict.fromkeys((r["k"], r["n"], r["weights"]) for r in gemv["rows"]):
        if key[2] == "fp16":
            continue
        sel = sorted((r for r in gemv["rows"] if (r["k"], r["n"], r["weights"]) == key), key=lambda r: r["sparsity"])
        axes[0].plot(
            [r["sparsity"] for r in sel],
            [r["ratio"] for r in sel],
            marker="o",
            ms=3,
            label=f"{key[0]}×{key[1]} {key[2]}",
            ls="-" if key[2] == "bf16" else "--",
        )
    axes[0].axhline(1.0, color="gray", lw=0.8)
    axes[0].set(xlabel="activation sparsity", ylabel="speedup vs dense F.linear (bf16)", title="batch-1 GEMV")
    axes[0].legend(fontsize=7)
    for key in dict.fromkeys((r["model"], r["weights"]) for r in decode["rows"]):
        sel = [r for r in decode["rows"] if (r["model"], r["weights"]) == key]
        axes[1].plot([r["measured"] for r in sel], [r["speedup"] for r in sel], marker="o", label=" ".join(key))
    axes[1].axhline(1.0, color="gray", lw=0.8)
    axes[1].set(xlabel="measured sparsity (all 7 projections)", ylabel="tokens/s vs dense", title="batch-1 decode")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"actsparse kernels on {gemv['env']['gpu']}")
    fig.tight_layout()
    out = os.path.join(RES, "speedup_h100.png")
    fig.savefig(out, dpi=110)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    generate_tables()
    g = json.load(open(os.path.join(RES, "gemv_h100.json")))
    dd = json.load(open(os.path.join(RES, "decode_h100.json")))
    gemv_table(g)
    before_after_table(g)
    decode_table(dd)
    bounds = os.path.join(RES, "bounds_h100.json")
    if os.path.exists(bounds):
        bounds_tables(json.load(open(bounds)))
    plots(g, dd)
