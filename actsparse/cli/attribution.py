"""``actsparse attribution``: attribution-based unit deactivation, accuracy-sparsity trade-off curves."""

from __future__ import annotations

import time
from typing import Any

from ..attribution import ScoreBatch, find_unit_layers, tradeoff_curves, write_curves
from ..attribution.curves import check_options
from ..attribution.scores import check_metrics
from ..config import SparsifyConfig
from ..errors import UsageError
from ..eval.mc import load_mc, tokenize_mc
from ..eval.sweep import parse_range
from .args import add_model_args, int_at_least
from .common import load_all, log, token_batches
from .format import curves_table


def register(sub) -> None:
    at = sub.add_parser(
        "attribution",
        help="attribution-based unit deactivation (heads/neurons): accuracy-sparsity trade-off curves (CSV/JSON/PNG)",
    )
    add_model_args(at)
    at.add_argument(
        "--metrics",
        default="magnitude,gradient,gxo,ig,snip,cor_gxo",
        help="comma list of magnitude,gradient,gxo,ig,snip,cor_gxo (default: all)",
    )
    at.add_argument(
        "--sparsity", default="0:0.9:0.1", help="fractions of units deactivated per layer (default 0:0.9:0.1)"
    )
    at.add_argument("--units", default="heads,neurons,both", help="unit sets, comma list (default heads,neurons,both)")
    at.add_argument("--modes", default="per-input,calibrated", help="per-input and/or calibrated (default both)")
    at.add_argument("--n-steps", type=int, default=8, help="integrated-gradients interpolations (default 8)")
    at.add_argument(
        "--ig-chunk", type=int_at_least(1), default=4, help="IG interpolations per backward pass (memory; default 4)"
    )
    at.add_argument("--rho", default="0.5", help="corrected-GxO drift weight: a number or 'auto' (default 0.5)")
    at.add_argument(
        "--target",
        default="dense",
        choices=["dense", "labels"],
        help="per-input attribution target: the dense model's own predictions (default) or the true "
        "next tokens (oracle)",
    )
    at.add_argument("--eval-samples", type=int_at_least(1), default=16, help="evaluation sequences (default 16)")
    at.add_argument("--seq-len", type=int_at_least(2), default=128, help="tokens per evaluation sequence (default 128)")
    at.add_argument("--batch-size", type=int_at_least(1), default=4, help="sequences per pass (default 4)")
    at.add_argument("--calib-samples", type=int_at_least(1), default=16, help="calibration sequences (default 16)")
    at.add_argument(
        "--calib-seq-len", type=int_at_least(2), default=256, help="tokens per calibration sequence (default 256)"
    )
    at.add_argument(
        "--calib-batch-size", type=int_at_least(1), default=4, help="calibration sequences per pass (default 4)"
    )
    at.add_argument(
        "--mc",
        default=None,
        metavar="FILE|hf:NAME",
        help="multiple-choice set (JSON/JSONL with question, choices, label): accuracy on it too",
    )
    at.add_argument("--mc-limit", type=int_at_least(1), default=None, help="use the first N multiple-choice items")
    at.add_argument("--no-corpus", action="store_true", help="evaluate only on --mc (no next-token accuracy)")
    at.add_argument("--out", default="attribution", help="output folder (default ./attribution)")


def rho_arg(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"--rho must be a number >= 0 or 'auto', got {text!r}") from None


def run(args, config: SparsifyConfig | None = None) -> dict[str, Any]:
    split = lambda text: [p.strip() for p in text.split(",") if p.strip()]  # noqa: E731
    metrics, units, modes = check_metrics(split(args.metrics)), split(args.units), split(args.modes)
    sparsities, rho = parse_range(args.sparsity), rho_arg(args.rho)
    check_options(sparsities, units, modes, args.n_steps, rho, args.target)
    if args.no_corpus and not args.mc:
        raise UsageError("--no-corpus needs --mc (there would be nothing to evaluate)")
    items = load_mc(args.mc) if args.mc else []  # fail on bad data before loading the model
    if args.mc_limit is not None:
        items = items[: args.mc_limit]
    model, tokenizer, corpus = load_all(args)
    layers = find_unit_layers(model, tuple(k for k in ("heads", "neurons") if k in units or "both" in units))

    def batches(text, n, seq_len, bs):
        return [ScoreBatch.from_ids(ids) for ids in token_batches(tokenizer, text, n, seq_len, bs)]

    eval_batches = (
        [] if args.no_corpus else batches(corpus.evaluation, args.eval_samples, args.seq_len, args.batch_size)
    )
    calib = (
        batches(corpus.calibration, args.calib_samples, args.calib_seq_len, args.calib_batch_size)
        if "calibrated" in modes
        else []
    )
    mc = tokenize_mc(tokenizer, items) if items else []
    log(
        args,
        f"attribution: {len(layers)} unit layers, {len(metrics)} metrics x {len(sparsities)} sparsities x "
        f"{len(units)} unit sets, modes {', '.join(modes)}",
    )
    t = time.perf_counter()
    points = tradeoff_curves(
        model,
        layers,
        eval_batches=eval_batches,
        mc_examples=mc,
        calibration=calib,
        metrics=metrics,
        sparsities=sparsities,
        units=units,
        modes=modes,
        n_steps=args.n_steps,
        ig_chunk=args.ig_chunk,
        rho=rho,
        target=args.target,
        progress=not args.no_progress,
    )
    meta = {
        "model": args.model,
        "data": corpus.name,
        "dtype": args.dtype,
        "metrics": metrics,
        "modes": modes,
        "units": units,
        "n_steps": args.n_steps,
        "rho": rho,
        "target": args.target,
        "eval_tokens": sum(b.n_labels for b in eval_batches),
        "mc": args.mc,
        "mc_items": len(mc),
        "calibration_tokens": sum(int(b.attention.sum()) for b in calib),
        "seconds": round(time.perf_counter() - t, 1),
        "title": f"{args.model}: attribution-based deactivation",
    }
    paths = write_curves(args.out, points, meta)
    if not args.json:
        print(curves_table(points))
        print("\nwrote " + ", ".join(paths.values()))
    return {**meta, "points": [p.__dict__ for p in points], "files": paths}
