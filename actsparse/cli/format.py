"""Terminal output of the commands: tables, the side-by-side generation view and its summaries."""

from __future__ import annotations

import shutil
import sys
import textwrap
from typing import Any

from ..eval.sparsity import summarize_by_type
from ..generation import Comparison, GenerationResult

__all__ = [
    "perplexity_table",
    "sparsity_table",
    "print_sparsity",
    "curves_table",
    "write_stdout",
    "format_side_by_side",
    "format_summary",
    "format_footer",
    "ENGINE_LABELS",
]


def perplexity_table(rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """``label  token ppl  word ppl  Δ token ppl`` rows; Δ against the first row."""
    base = rows[0][1]["token_perplexity"]
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"{'':<{width}}{'token ppl':>11} {'word ppl':>11}{'Δ token ppl':>13}"]
    for i, (label, r) in enumerate(rows):
        change = f"{100.0 * (r['token_perplexity'] / base - 1.0):>+12.2f}%" if i else ""
        lines.append(f"{label:<{width}}{r['token_perplexity']:>11.3f} {r['word_perplexity']:>11.3f}{change}")
    return lines


def sparsity_table(by_type: dict[str, dict[str, float]]) -> list[str]:
    lines = [f"{'projection':<14}{'layers':>7}{'target':>9}{'measured':>10}"]
    for k, v in by_type.items():
        target = "-" if v["target"] is None else f"{v['target']:.3f}"
        lines.append(f"{k:<14}{v['layers']:>7}{target:>9}{v['measured']:>10.3f}")
    return lines


def print_sparsity(args, result: dict[str, Any]) -> None:
    if "by_type" in result:
        print("\n".join(sparsity_table(result["by_type"])))
    if args.per_layer and "measured_sparsity" in result:
        for n, v in result["measured_sparsity"].items():
            t = result["target_sparsity"].get(n)
            print(f"  {n:<48} target {'-' if t is None else f'{t:.3f}'}  measured {v:.3f}")


def curves_table(points) -> str:
    mc = any(p.mc_items for p in points)
    rows = [
        f"{'mode':<11} {'units':<8} {'metric':<10} {'sparsity':>8} {'ppl':>10} {'acc':>7}" + ("  mc acc" if mc else "")
    ]
    for p in points:
        ppl = "-" if p.tokens == 0 else f"{p.perplexity:.3f}"
        acc = "-" if p.tokens == 0 else f"{p.accuracy:.4f}"
        rows.append(
            f"{p.mode:<11} {p.units:<8} {p.metric:<10} {p.sparsity:>8.2f} {ppl:>10} {acc:>7}"
            + (f"  {p.mc_accuracy:.4f}" if mc else "")
        )
    return "\n".join(rows)


def write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _wrap(text: str, width: int) -> list[str]:
    lines: list[str] = []
    for para in text.split("\n"):
        lines += textwrap.wrap(para, width) or [""]
    return [line.rstrip() for line in lines]


def format_side_by_side(
    left: str, right: str, *, width: int | None = None, titles: tuple[str, str] = ("dense", "sparse")
) -> list[str]:
    """Two texts in two columns wrapped to ``width`` (default: the terminal's), separated by `` | ``."""
    width = width or shutil.get_terminal_size((100, 24)).columns
    col = max(12, (width - 3) // 2)
    a, b = _wrap(left, col), _wrap(right, col)
    a += [""] * (len(b) - len(a))
    b += [""] * (len(a) - len(b))
    return [f"{titles[0]:<{col}} | {titles[1]}", f"{'-' * col}-+-{'-' * col}"] + [
        f"{x:<{col}} | {y}".rstrip() for x, y in zip(a, b)
    ]


def _num(value: float | None, fmt: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{unit}"


def _sparsity_line(r: GenerationResult) -> str | None:
    mean = r.mean_sparsity("decode")
    phase = "decode"
    if mean is None:
        mean, phase = r.mean_sparsity("prefill"), "prefill"
    if mean is None:
        return None
    by_type = r.sparsity_by_type(phase)
    targets = summarize_by_type({n: t for n, t in r.target_sparsity.items() if t is not None})
    parts = ", ".join(
        f"{k} {v:.3f}" + (f" (target {targets[k]:.2f})" if k in targets else "") for k, v in by_type.items()
    )
    n = len(r.decode_sparsity if phase == "decode" else r.prefill_sparsity)
    return f"measured sparsity ({phase}): {mean:.3f} mean over {n} layers; {parts}"


ENGINE_LABELS = {"graph": "CUDA graph", "compile": "compiled", "eager": "static cache", "loop": "eager loop"}


def format_summary(r: GenerationResult) -> list[str]:
    """Lines after a single generation: tokens, time to first token, decode tokens/s, measured sparsity."""
    lines = [
        f"{r.new_tokens} new tokens (stop: {r.stop_reason}); prompt {r.prompt_tokens} tokens"
        f"{' (chat template)' if r.chat else ''}; time to first token {r.prefill_seconds:.3f} s; "
        f"decode {_num(r.decode_tokens_per_s, '.1f')} tokens/s ({ENGINE_LABELS.get(r.engine, r.engine)})"
    ]
    line = _sparsity_line(r)
    if line:
        lines.append(line)
    return lines


def format_footer(c: Comparison) -> list[str]:
    """The comparison's footer: a dense/sparse table, the sparse run's measured sparsity, the first divergence."""
    d, s = c.dense, c.sparse
    rows = [
        ("new tokens", str(d.new_tokens), str(s.new_tokens)),
        ("time to first token", _num(d.prefill_seconds, ".3f", " s"), _num(s.prefill_seconds, ".3f", " s")),
        ("decode tokens/s", _num(d.decode_tokens_per_s, ".1f"), _num(s.decode_tokens_per_s, ".1f")),
        ("measured sparsity", "-", _num(s.mean_sparsity("decode"), ".3f")),
        ("engine", ENGINE_LABELS.get(d.engine, d.engine), ENGINE_LABELS.get(s.engine, s.engine)),
    ]
    lines = [f"{'':<22}{'dense':>14}{'sparse':>14}"] + [f"{k:<22}{a:>14}{b:>14}" for k, a, b in rows]
    line = _sparsity_line(s)
    if line:
        lines.append(line)
    i = c.first_divergence
    if i is None:
        lines.append(f"first divergence: none (identical {d.new_tokens} tokens)")
    else:
        tok = lambda r: repr(r.tokens[i]) if i < r.new_tokens else "(ended)"  # noqa: E731
        lines.append(f"first divergence: new token {i} (dense {tok(d)}, sparse {tok(s)})")
    return lines
