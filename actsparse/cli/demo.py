"""``actsparse demo``: the embedded model and corpus, NNCF's recipe: dense vs sparse perplexity (and int8 rows)."""

from __future__ import annotations

from typing import Any

from ..api import remove_sparsity
from ..config import SparsifyConfig
from ..quant import compress_weights
from .args import NNCF_RECIPE, add_calib_args, add_eval_args, add_model_args
from .common import calibrate, evaluate, load_all, log, method_label
from .format import perplexity_table, sparsity_table


def register(sub) -> None:
    demo = sub.add_parser("demo", help="embedded model + corpus, NNCF recipe: dense vs sparse perplexity")
    add_model_args(demo)
    add_calib_args(demo, NNCF_RECIPE)
    add_eval_args(demo, eval_tokens=8192)
    demo.add_argument(
        "--int8",
        action="store_true",
        help="add int8 weights (torchao, per channel; --weights picks the mode, default int8_asym) "
        "without and with the same recipe: seed 000's dense/sparse/int8/int8+sparse table",
    )


# measured with `make demo` on an idle 2-core machine (README); a busy machine takes several times longer
EMBEDDED_DEMO_TIME = "about 2 minutes on 2 idle CPU cores (load 15 s, evaluations of 20 and 25 s, calibration 50 s)"


def run(args, config: SparsifyConfig | None) -> dict[str, Any]:
    if args.model == "embedded" and args.data == "embedded" and not args.int8:
        log(args, f"actsparse demo: {EMBEDDED_DEMO_TIME}")
    model, tokenizer, corpus = load_all(args, compress=not args.int8)  # --int8: dense rows first, then int8
    log(args, "evaluating the dense model")
    dense = evaluate(args, model, tokenizer, corpus.evaluation)
    log(args, "calibrating thresholds")
    assert config is not None  # main() builds it for every command with the calibration flags
    cal, _ = calibrate(args, config, model, tokenizer, corpus, evaluates=True)
    log(args, "evaluating the sparse model")
    sparse = evaluate(args, model, tokenizer, corpus.evaluation)
    delta = 100.0 * (sparse["token_perplexity"] / dense["token_perplexity"] - 1.0)
    result = {
        "model": args.model,
        "data": corpus.name,
        "dtype": args.dtype,
        "weights": "dense" if args.int8 else args.weights,
        "calibration": cal,
        "dense": dense,
        "sparse": sparse,
        "delta_token_ppl_percent": delta,
    }
    rows = [("dense", dense), ("sparse", sparse)]
    if args.int8:  # seed 000's table: the same recipe calibrated again on int8 weights
        mode = args.weights if args.weights != "dense" else "int8_asym"
        remove_sparsity(model)
        compress_weights(model, mode)
        label = mode.replace("_", "-")
        log(args, f"evaluating the {label} model")
        result["int8"] = evaluate(args, model, tokenizer, corpus.evaluation)
        log(args, f"calibrating thresholds on the {label} model")
        result["int8_calibration"], _ = calibrate(args, config, model, tokenizer, corpus)
        log(args, f"evaluating the {label}+sparse model")
        result["int8_sparse"] = evaluate(args, model, tokenizer, corpus.evaluation)
        result["int8_mode"] = mode
        rows += [(label, result["int8"]), (f"{label}+sparse", result["int8_sparse"])]
    if not args.json:
        recipe = ", ".join(f"{p}={s}" for p, s in cal["scopes"].items())
        print(f"\nactsparse demo: {args.model} model, {corpus.name} corpus, {args.dtype}")
        print(
            f"calibration: {cal['calibration_tokens']} tokens, method {method_label(cal['method'])}, "
            f"{cal['calibration_seconds']:.1f} s; recipe {recipe}"
        )
        print(f"evaluation: {dense['eval_tokens']} tokens ({dense['words']} words), context {dense['context']}\n")
        print("\n".join(perplexity_table(rows)))
        print()
        print("\n".join(sparsity_table(sparse["by_type"])))
        if args.int8:
            print(f"\n{result['int8_mode'].replace('_', '-')}+sparse (thresholds calibrated on the int8 weights):")
            print("\n".join(sparsity_table(result["int8_sparse"]["by_type"])))
    return result
