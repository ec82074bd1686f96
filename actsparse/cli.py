"""Command line: ``actsparse demo | calibrate | eval | sweep | attribution | generate``."""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
import time
from typing import Any

import torch

from . import __version__
from .api import SparsifyConfig, remove_sparsity, sparse_layers, sparsify_
from .calibrate import model_device
from .data import chunk_tokens, count_words, load_corpus, tokenize
from .errors import ActSparseError
from .eval.lmeval import LMEVAL_INSTALL
from .eval.perplexity import perplexity
from .eval.sparsity import SparsityMonitor, layer_type, summarize_by_type
from .io import load_thresholds, save_thresholds
from .kernels import KERNEL_MIN_SPARSITY, enable_kernels, triton_available
from .eval.sweep import (ALL_PROJECTIONS, format_table, method_meta, parse_range, run_sweep, sweep_methods,
                         write_sweep)
from .methods import method_from_spec, method_to_dict, parse_option, registered_methods
from .models import DEVICE_MAPS, parse_max_memory
from .quant import WEIGHT_MODES, compress_weights
from .methods.scap import export_scap_json, import_scap_json, parse_scap_config
from .scope import IgnoredScope, TargetScope

NNCF_RECIPE = [".*up_proj.*=0.3", ".*gate_proj.*=0.3", ".*down_proj.*=0.5"]


def _scope_arg(text: str) -> tuple[str, float]:
    pattern, sep, value = text.rpartition("=")
    try:
        if not sep or not pattern:
            raise ValueError
        return pattern, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PATTERN=SPARSITY, e.g. '.*up_proj.*=0.3', got {text!r}") from None


def _option_arg(text: str) -> tuple[str, Any]:
    try:
        return parse_option(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value
    return parse


def _limit_arg(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of examples or a fraction below 1, got {text!r}")
    return int(value) if value >= 1 and value == int(value) else value


def _device_map_arg(text: str) -> str | dict[str, Any]:
    if text in DEVICE_MAPS:
        return text
    try:
        if os.path.isfile(text):
            with open(text, encoding="utf-8") as f:
                value = json.load(f)
        else:
            value = json.loads(text)
    except (OSError, json.JSONDecodeError):
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected {', '.join(DEVICE_MAPS)}, or a JSON object {{module name: device}} "
                                         f"(inline or in a file), got {text!r}")
    return value


def _max_memory_arg(text: str) -> dict[int | str, int]:
    try:
        return parse_max_memory(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded",
                   help="HF model name, folder or .gguf file (default: the embedded SmolLM2-135M)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default=None,
                   help="device for the whole model (default cuda when available, else cpu); not with --device-map")
    p.add_argument("--device-map", type=_device_map_arg, default=None, metavar="{auto,balanced,sequential}|JSON",
                   help="spread a model that does not fit one device over the GPUs, the CPU and disk (accelerate), "
                        "within --max-memory or else all free GPU memory and the available CPU RAM; planned before "
                        "loading, and an error if weights would go to disk without --offload-folder. Or a JSON "
                        "object / file {module name: device}")
    p.add_argument("--max-memory", type=_max_memory_arg, default=None, metavar="DEVICE=SIZE,...",
                   help="with --device-map: memory per device for the weights, e.g. cpu=2GiB,0=70GiB (default: "
                        "the free GPU memory and the available CPU RAM, as accelerate finds them)")
    p.add_argument("--offload-folder", default=None, metavar="DIR",
                   help="with --device-map: allow offloading weights to disk, re-saving them in DIR where needed")
    p.add_argument("--weights", default="dense", choices=["dense", *WEIGHT_MODES],
                   help="compress the Linear weights to int8 (torchao, per channel) after loading, before any "
                        "calibration (default dense)")
    p.add_argument("--data", default="embedded",
                   help="'embedded' (gensim's Lee corpus), a text file, or hf:DATASET[:CONFIG]")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_calib_args(p: argparse.ArgumentParser, default_scopes: list[str] | None) -> None:
    p.add_argument("--scope", action="append", type=_scope_arg, metavar="PATTERN=SPARSITY",
                   help="regex (re.match on module names) and target sparsity; repeatable "
                        f"(default: NNCF's recipe {' '.join(NNCF_RECIPE)})")
    p.add_argument("--ignore", action="append", default=[], metavar="PATTERN",
                   help="regex of layers to leave dense; repeatable")
    p.add_argument("--method", default="quantile",
                   help=f"calibration method: {', '.join(registered_methods(aliases=True))}; "
                        "append '+topk' for exact per-token top-k at inference (default quantile)")
    p.add_argument("--option", action="append", default=[], type=_option_arg, metavar="KEY=VALUE",
                   help="method option, e.g. step=0.1 for teal or mode=kde for scap (JSON value; None, True "
                        "and False also read as Python's); repeatable")
    p.add_argument("--statistic", default=None, choices=["histogram", "ema"],
                   help="quantile statistic: one quantile over all tokens (histogram) or NNCF's per-batch EMA")
    p.add_argument("--scap-config", default=None, metavar="TYPE,MODE,SPARSITY,...",
                   help="SCAP recipe, e.g. up,zero,0.35,gate,zero,0.35,down,median,0.55 (sets scopes and method)")
    p.add_argument("--config", default=None, metavar="JSON",
                   help="versioned JSON sparsify config (scopes, ignored scope, method and options; see "
                        "SparsifyConfig.save) instead of --scope/--ignore/--method/--option")
    p.add_argument("--save-config", default=None, metavar="JSON", help="write the sparsify config used to this file")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration sequences (default 32)")
    p.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration sequence (default 256)")
    p.add_argument("--calib-batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.set_defaults(default_scopes=default_scopes)


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--context", type=int, default=1024, help="perplexity window (default 1024)")
    p.add_argument("--stride", type=int, default=None,
                   help="new tokens scored per window (default: context - 1; consecutive windows share one token)")
    p.add_argument("--eval-tokens", type=int, default=None, help="evaluate the first N tokens of the split")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="actsparse", description="Post-training activation sparsity for HF LMs")
    parser.add_argument("--version", action="version", version=f"actsparse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="embedded model + corpus, NNCF recipe: dense vs sparse perplexity")
    _add_model_args(demo)
    _add_calib_args(demo, NNCF_RECIPE)
    _add_eval_args(demo)
    demo.set_defaults(eval_tokens=8192)
    demo.add_argument("--int8", action="store_true",
                      help="add int8 weights (torchao, per channel; --weights picks the mode, default int8_asym) "
                           "without and with the same recipe: seed 000's dense/sparse/int8/int8+sparse table")

    cal = sub.add_parser("calibrate", help="calibrate thresholds and save them")
    _add_model_args(cal)
    _add_calib_args(cal, NNCF_RECIPE)
    cal.add_argument("--out", default="thresholds.safetensors", help="output file (default thresholds.safetensors)")
    cal.add_argument("--plot", default=None, metavar="PNG",
                     help="save the per-layer activation ratio on the calibration data (Sparsing Law's plot)")
    cal.add_argument("--per-layer", action="store_true", help="print every layer's threshold and activation ratio")
    cal.add_argument("--export-scap", default=None, metavar="JSON",
                     help="also write SCAP's calibrated_thresholds.json (threshold/shift methods only)")

    ev = sub.add_parser("eval", help="perplexity (or lm-eval accuracy with --tasks) and measured sparsity, dense "
                                     "or with saved thresholds")
    _add_model_args(ev)
    _add_eval_args(ev)
    ev.add_argument("--thresholds", default=None, help="thresholds file from `actsparse calibrate`")
    ev.add_argument("--scap-json", default=None, help="SCAP calibrated_thresholds.json to apply instead")
    ev.add_argument("--tasks", default=None, metavar="TASK,...",
                    help="lm-eval tasks, e.g. winogrande,piqa,sciq,hellaswag,boolq,arc_easy,arc_challenge: report "
                         "their accuracy instead of perplexity (--data and the perplexity options are then unused; "
                         f"needs {LMEVAL_INSTALL})")
    ev.add_argument("--num-fewshot", type=_int_at_least(0), default=None, help="lm-eval few-shot examples (default 0)")
    ev.add_argument("--limit", type=_limit_arg, default=None,
                    help="lm-eval examples per task (a fraction if < 1); for quick checks, not reportable numbers")
    ev.add_argument("--lm-eval-batch-size", type=_int_at_least(1), default=None,
                    help="lm-eval batch size (default 1; larger batches are padded, and padding counts in the "
                         "measured sparsity)")
    ev.add_argument("--include-path", default=None, metavar="DIR", help="folder of custom lm-eval task YAMLs")

    sw = sub.add_parser("sweep", help="every method at every sparsity: perplexity vs measured sparsity (CSV/JSON/PNG)")
    _add_model_args(sw)
    _add_eval_args(sw)
    sw.set_defaults(eval_tokens=8192)
    sw.add_argument("--methods", default="quantile,teal-greedy,scap-median,wina", metavar="NAME[:KEY=VALUE...],...",
                    help="comma list of methods, each with optional ':'-separated options (the KEY=VALUE of "
                         "calibrate's --option), e.g. quantile,teal-greedy:step=0.025:greedy_tokens=null; the spec "
                         "labels the method in the outputs (default quantile,teal-greedy,scap-median,wina)")
    sw.add_argument("--sparsity", default="0.2:0.7:0.1", help="START:STOP:STEP or a comma list (default 0.2:0.7:0.1)")
    sw.add_argument("--scope", default=ALL_PROJECTIONS,
                    help="regex of the layers to sparsify (default: all seven projections)")
    sw.add_argument("--ignore", action="append", default=[], metavar="PATTERN", help="regex of layers to leave dense")
    sw.add_argument("--calib-samples", type=int, default=32, help="calibration sequences (default 32)")
    sw.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration sequence (default 256)")
    sw.add_argument("--calib-batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    sw.add_argument("--out", default="sweep", help="output folder for sweep.csv/json/png (default ./sweep)")
    ev.add_argument("--per-layer", action="store_true", help="print measured sparsity of every layer")

    at = sub.add_parser("attribution", help="attribution-based unit deactivation (heads/neurons): accuracy-sparsity "
                                            "trade-off curves (CSV/JSON/PNG)")
    _add_model_args(at)
    at.add_argument("--metrics", default="magnitude,gradient,gxo,ig,snip,cor_gxo",
                    help="comma list of magnitude,gradient,gxo,ig,snip,cor_gxo (default: all)")
    at.add_argument("--sparsity", default="0:0.9:0.1", help="fractions of units deactivated per layer (default 0:0.9:0.1)")
    at.add_argument("--units", default="heads,neurons,both", help="unit sets, comma list (default heads,neurons,both)")
    at.add_argument("--modes", default="per-input,calibrated", help="per-input and/or calibrated (default both)")
    at.add_argument("--n-steps", type=int, default=8, help="integrated-gradients interpolations (default 8)")
    at.add_argument("--ig-chunk", type=int, default=4, help="IG interpolations per backward pass (memory; default 4)")
    at.add_argument("--rho", default="0.5", help="corrected-GxO drift weight: a number or 'auto' (default 0.5)")
    at.add_argument("--target", default="dense", choices=["dense", "labels"],
                    help="per-input attribution target: the dense model's own predictions (default) or the true "
                         "next tokens (oracle)")
    at.add_argument("--eval-samples", type=int, default=16, help="evaluation sequences (default 16)")
    at.add_argument("--seq-len", type=int, default=128, help="tokens per evaluation sequence (default 128)")
    at.add_argument("--batch-size", type=int, default=4, help="sequences per pass (default 4)")
    at.add_argument("--calib-samples", type=int, default=16, help="calibration sequences (default 16)")
    at.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration sequence (default 256)")
    at.add_argument("--calib-batch-size", type=int, default=4, help="calibration sequences per pass (default 4)")
    at.add_argument("--mc", default=None, metavar="FILE|hf:NAME",
                    help="multiple-choice set (JSON/JSONL with question, choices, label): accuracy on it too")
    at.add_argument("--mc-limit", type=int, default=None, help="use the first N multiple-choice items")
    at.add_argument("--no-corpus", action="store_true", help="evaluate only on --mc (no next-token accuracy)")
    at.add_argument("--out", default="attribution", help="output folder (default ./attribution)")

    gen = sub.add_parser("generate", help="stream text from the sparsified model: time to first token, decode "
                                          "tokens/s, measured sparsity; --compare: dense and sparse side by side")
    _add_model_args(gen)
    _add_calib_args(gen, NNCF_RECIPE)  # used only when neither --thresholds, --scap-json nor --dense is given
    gen.add_argument("--prompt", required=True, help="prompt text, or '-' to read it from stdin")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=None,
                     help="sampling temperature (with --sample; default 1)")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (with --sample; default 1)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    gen.add_argument("--chat", action="store_true",
                     help="wrap the prompt in the tokenizer's chat template as a user turn (default: plain completion)")
    gen.add_argument("--thresholds", default=None,
                     help="thresholds file from `actsparse calibrate` (default: calibrate the --scope recipe, "
                          "NNCF's unless given, on --data first)")
    gen.add_argument("--scap-json", default=None, help="SCAP calibrated_thresholds.json to apply instead")
    gen.add_argument("--dense", action="store_true", help="generate with the dense model (no thresholds)")
    gen.add_argument("--compare", action="store_true",
                     help="generate dense, then sparse, and print them side by side (nothing is streamed)")
    gen.add_argument("--no-stream", action="store_true", help="print the text once it is complete")
    gen.add_argument("--engine", default="auto", choices=["auto", "graph", "eager"],
                     help="graph: the static-cache decoder, one CUDA-graph replay per token (compiled on CUDA); "
                          "eager: the dynamic-cache loop; auto (default): graph on CUDA, eager elsewhere")
    gen.add_argument("--no-kernels", action="store_true",
                     help="on CUDA, decode sparse layers with masked dense matmuls instead of the sparse GEMV kernels "
                          "(default: kernels where they beat cuBLAS, see actsparse.kernels.enable_kernels)")
    return parser


# ------------------------------------------------------------------------------------------ steps
def _log(args, msg: str) -> None:
    if not args.json:
        print(msg, file=sys.stderr, flush=True)


def _load_model(args, *, compress: bool = True):
    """``(model, tokenizer)`` as the model flags say: loaded, then int8-compressed with ``--weights``."""
    from .models import load_model

    device = args.device
    if device is None and args.device_map is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    t = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device, device_map=args.device_map,
                                  max_memory=args.max_memory, offload_folder=args.offload_folder)
    _log(args, f"loaded {args.model} in {time.perf_counter() - t:.1f} s")
    placed = getattr(model, "hf_device_map", None)
    if args.device_map is not None and placed:
        counts = collections.Counter(str(d) for d in placed.values())
        _log(args, "device map: " + ", ".join(f"{n} module(s) on {d}" for d, n in counts.items()))
    if compress and args.weights != "dense":
        names = compress_weights(model, args.weights)
        _log(args, f"compressed {len(names)} Linear weights to {args.weights}")
    return model, tokenizer


def _load(args, *, compress: bool = True):
    return (*_load_model(args, compress=compress), load_corpus(args.data))


def _calibration_data(args, tokenizer, corpus) -> list[torch.Tensor]:
    if args.calib_samples < 1:
        raise ValueError(f"--calib-samples must be >= 1, got {args.calib_samples}")
    if args.calib_batch_size < 1:
        raise ValueError(f"--calib-batch-size must be >= 1, got {args.calib_batch_size}")
    return _token_batches(tokenizer, corpus.calibration, args.calib_samples, args.calib_seq_len,
                          args.calib_batch_size)


def _token_batches(tokenizer, text: str, n: int, seq_len: int, batch_size: int) -> list[torch.Tensor]:
    """Up to ``n`` windows of ``seq_len`` tokens of ``text``, ``batch_size`` per ``[B, seq_len]`` tensor."""
    chunks = chunk_tokens(tokenizer, text, seq_len, n)
    return [torch.cat(chunks[i:i + batch_size]) for i in range(0, len(chunks), batch_size)]


def _method(args):
    options = dict(args.option)
    if args.statistic is not None:
        options["statistic"] = args.statistic
    if args.scap_config:
        if args.scope:
            raise ValueError("give either --scap-config or --scope, not both (the SCAP recipe sets the scopes)")
        scopes, method = parse_scap_config(args.scap_config)
        if args.method not in ("quantile", "scap"):
            raise ValueError(f"--scap-config sets the method to scap; drop --method {args.method}")
        if options:
            import dataclasses
            method = dataclasses.replace(method, **options)
        return scopes, method
    scopes = args.scope or [_scope_arg(s) for s in args.default_scopes]
    return {TargetScope(patterns=[p]): s for p, s in scopes}, method_from_spec(args.method, **options)


def _sparsify_config(args) -> SparsifyConfig:
    """The config the flags ask for: ``--config FILE``, or ``--scope/--ignore/--method/--option/--scap-config``."""
    if args.config:
        given = [flag for flag, on in (("--scope", args.scope), ("--ignore", args.ignore),
                                       ("--method", args.method != "quantile"), ("--option", args.option),
                                       ("--statistic", args.statistic), ("--scap-config", args.scap_config)) if on]
        if given:
            raise ValueError(f"--config holds the scopes and the method; drop {', '.join(given)} "
                             f"(or edit the config file)")
        return SparsifyConfig.load(args.config)
    scopes, method = _method(args)
    return SparsifyConfig(scopes, IgnoredScope(patterns=args.ignore) if args.ignore else None, method)


def _calibrate(args, model, tokenizer, corpus) -> dict[str, Any]:
    config = args.sparsify_config  # built (and checked) by main() before the model loads
    data = _calibration_data(args, tokenizer, corpus)
    t = time.perf_counter()
    sparsify_(model, config, data, progress=not args.no_progress)
    seconds = time.perf_counter() - t
    args._calibration_batches = data
    result = {"scopes": {"|".join(k.patterns) or str(k): v for k, v in config.target_sparsity_by_scope.items()},
              "method": method_to_dict(config.method), "config": config.to_dict(),
              "calibration_tokens": sum(d.numel() for d in data), "calibration_seconds": seconds}
    if args.save_config:
        result["config_file"] = config.save(args.save_config)
    return result


def _evaluate(args, model, tokenizer, text: str) -> dict[str, Any]:
    ids = tokenize(tokenizer, text)
    if args.eval_tokens is not None:
        ids = ids[: args.eval_tokens]
        text = tokenizer.decode(ids)
    words = count_words(text)
    monitor = SparsityMonitor(model) if sparse_layers(model) else None
    with monitor or contextlib.nullcontext():
        ppl = perplexity(model, ids, context=args.context, stride=args.stride, n_words=words,
                         progress=not args.no_progress)
    out: dict[str, Any] = {"token_perplexity": ppl.token_perplexity, "word_perplexity": ppl.word_perplexity,
                           "eval_tokens": int(ids.numel()), "words": words, "context": ppl.context,
                           "stride": ppl.stride}
    if monitor:
        measured = monitor.sparsity()
        targets = monitor.targets()
        out["measured_sparsity"] = measured
        out["target_sparsity"] = targets
        out["by_type"] = _by_type(measured, targets)
    return out


def _by_type(measured: dict[str, float], targets: dict[str, float | None]) -> dict[str, dict[str, float]]:
    mean_m = summarize_by_type(measured)
    mean_t = summarize_by_type({n: t for n, t in targets.items() if t is not None})
    counts: dict[str, int] = {}
    for n in measured:
        counts[layer_type(n)] = counts.get(layer_type(n), 0) + 1
    return {k: {"layers": counts[k], "target": mean_t.get(k), "measured": v} for k, v in mean_m.items()}


def _sparsity_table(by_type: dict[str, dict[str, float]]) -> list[str]:
    lines = [f"{'projection':<14}{'layers':>7}{'target':>9}{'measured':>10}"]
    for k, v in by_type.items():
        target = "-" if v["target"] is None else f"{v['target']:.3f}"
        lines.append(f"{k:<14}{v['layers']:>7}{target:>9}{v['measured']:>10.3f}")
    return lines


# -------------------------------------------------------------------------------------- commands
def cmd_demo(args) -> dict[str, Any]:
    model, tokenizer, corpus = _load(args, compress=not args.int8)  # --int8: dense rows first, then int8
    _log(args, "evaluating the dense model")
    dense = _evaluate(args, model, tokenizer, corpus.evaluation)
    _log(args, "calibrating thresholds")
    cal = _calibrate(args, model, tokenizer, corpus)
    _log(args, "evaluating the sparse model")
    sparse = _evaluate(args, model, tokenizer, corpus.evaluation)
    delta = 100.0 * (sparse["token_perplexity"] / dense["token_perplexity"] - 1.0)
    result = {"model": args.model, "data": corpus.name, "dtype": args.dtype,
              "weights": "dense" if args.int8 else args.weights,
              "calibration": cal, "dense": dense, "sparse": sparse, "delta_token_ppl_percent": delta}
    rows = [("dense", dense), ("sparse", sparse)]
    if args.int8:  # seed 000's table: the same recipe calibrated again on int8 weights
        mode = args.weights if args.weights != "dense" else "int8_asym"
        remove_sparsity(model)
        compress_weights(model, mode)
        label = mode.replace("_", "-")
        _log(args, f"evaluating the {label} model")
        result["int8"] = _evaluate(args, model, tokenizer, corpus.evaluation)
        _log(args, f"calibrating thresholds on the {label} model")
        result["int8_calibration"] = _calibrate(args, model, tokenizer, corpus)
        _log(args, f"evaluating the {label}+sparse model")
        result["int8_sparse"] = _evaluate(args, model, tokenizer, corpus.evaluation)
        result["int8_mode"] = mode
        rows += [(label, result["int8"]), (f"{label}+sparse", result["int8_sparse"])]
    if not args.json:
        recipe = ", ".join(f"{p}={s}" for p, s in cal["scopes"].items())
        print(f"\nactsparse demo: {args.model} model, {corpus.name} corpus, {args.dtype}")
        print(f"calibration: {cal['calibration_tokens']} tokens, method {_method_label(cal['method'])}, "
              f"{cal['calibration_seconds']:.1f} s; recipe {recipe}")
        print(f"evaluation: {dense['eval_tokens']} tokens ({dense['words']} words), context {dense['context']}\n")
        width = max(len(label) for label, _ in rows) + 2
        print(f"{'':<{width}}{'token ppl':>11} {'word ppl':>11}{'Δ token ppl':>13}")
        for label, r in rows:
            d = 100.0 * (r["token_perplexity"] / dense["token_perplexity"] - 1.0)
            change = f"{d:>+12.2f}%" if r is not dense else ""
            print(f"{label:<{width}}{r['token_perplexity']:>11.3f} {r['word_perplexity']:>11.3f}{change}")
        print()
        print("\n".join(_sparsity_table(sparse["by_type"])))
        if args.int8:
            print(f"\n{result['int8_mode'].replace('_', '-')}+sparse (thresholds calibrated on the int8 weights):")
            print("\n".join(_sparsity_table(result["int8_sparse"]["by_type"])))
    return result


def _method_label(m: dict[str, Any]) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in m.items() if k != "name" and k in ("statistic", "allocation", "mode", "topk")
                     and v not in (False, None))
    return f"{m['name']} ({opts})" if opts else m["name"]


def _calibration_report(args, model) -> dict[str, Any]:
    """Activation ratio (1 - measured sparsity) per layer on the calibration data, thresholds, PPL ratio (pplp)."""
    from .eval.plots import plot_activation_ratio
    from .eval.sweep import weighted_sparsity

    with SparsityMonitor(model) as mon, torch.no_grad():
        for batch in args._calibration_batches:
            model(batch.to(model_device(model)), use_cache=False)
    measured = mon.sparsity()
    layers = sparse_layers(model)
    report: dict[str, Any] = {
        "activation_ratio": {n: 1.0 - v for n, v in measured.items()},
        "average_activation_ratio": 1.0 - sum(measured.values()) / len(measured),
        "weighted_activation_ratio": 1.0 - weighted_sparsity(model, measured),
        "thresholds": {n: m.params.threshold for n, m in layers.items()},
    }
    info = next(iter(layers.values())).params.info
    if "ppl_ratio" in info:
        report["ppl_ratio"], report["cett"] = info["ppl_ratio"], info["cett"]
    if args.plot:
        report["plot"] = plot_activation_ratio(args.plot, report["activation_ratio"],
                                               title=f"{args.model}: activation ratio per layer")
        if report["plot"] is None:
            raise ValueError("--plot needs matplotlib: pip install matplotlib")
    return report


def cmd_calibrate(args) -> dict[str, Any]:
    model, tokenizer, corpus = _load(args)
    cal = _calibrate(args, model, tokenizer, corpus)
    path = save_thresholds(model, args.out, extra={"calibration": cal, "data": corpus.name})
    cal["out"] = path
    if args.export_scap:
        cal["scap_json"] = export_scap_json(model, args.export_scap)
    cal.update(_calibration_report(args, model))
    cal["layers"] = len(sparse_layers(model))
    if not args.json:
        print(f"calibrated {cal['layers']} layers on {cal['calibration_tokens']} tokens in "
              f"{cal['calibration_seconds']:.1f} s; thresholds saved to {path}")
        print(f"average activation ratio on the calibration data: {cal['average_activation_ratio']:.3f} "
              f"(weighted by layer size: {cal['weighted_activation_ratio']:.3f})")
        if "ppl_ratio" in cal:
            print(f"PPL ratio on the calibration data: {cal['ppl_ratio']:.4f} (shared CETT {cal['cett']:.4g})")
        if args.per_layer:
            for n, tau in cal["thresholds"].items():
                print(f"  {n:<48} threshold {tau:.6g}  activation ratio {cal['activation_ratio'][n]:.3f}")
        if "plot" in cal:
            print(f"activation-ratio plot: {cal['plot']}")
    return cal


def _check_saved_thresholds(args) -> None:
    """``--thresholds`` / ``--scap-json``: at most one, and a thresholds file must read, before the model loads."""
    from .io import read_thresholds

    if args.thresholds and args.scap_json:
        raise ValueError("give either --thresholds or --scap-json, not both")
    if args.thresholds:
        read_thresholds(args.thresholds)


def _apply_saved_thresholds(args, model) -> bool:
    """Sparsify ``model`` with ``--thresholds`` or ``--scap-json``; False when neither was given."""
    if args.thresholds:
        load_thresholds(model, args.thresholds)
    elif args.scap_json:
        import_scap_json(model, args.scap_json)
    return bool(args.thresholds or args.scap_json)


def cmd_eval(args) -> dict[str, Any]:
    _check_saved_thresholds(args)
    if args.tasks is not None:
        return _eval_tasks(args)
    lm_only = [f"--{k.replace('_', '-')}" for k in ("num_fewshot", "limit", "lm_eval_batch_size", "include_path")
               if getattr(args, k) is not None]
    if lm_only:
        raise ValueError(f"{', '.join(lm_only)} apply only to lm-eval; add --tasks TASK,... or drop them")
    model, tokenizer, corpus = _load(args)
    _apply_saved_thresholds(args, model)
    result = {"model": args.model, "data": corpus.name, "thresholds": args.thresholds,
              **_evaluate(args, model, tokenizer, corpus.evaluation)}
    if not args.json:
        word = result["word_perplexity"]
        print(f"token perplexity {result['token_perplexity']:.3f}, word perplexity {word:.3f} "
              f"({result['eval_tokens']} tokens, context {result['context']})")
        _print_sparsity(args, result)
    return result


def _print_sparsity(args, result: dict[str, Any]) -> None:
    if "by_type" in result:
        print("\n".join(_sparsity_table(result["by_type"])))
    if args.per_layer and "measured_sparsity" in result:
        for n, v in result["measured_sparsity"].items():
            t = result["target_sparsity"].get(n)
            print(f"  {n:<48} target {'-' if t is None else f'{t:.3f}'}  measured {v:.3f}")


def _eval_tasks(args) -> dict[str, Any]:
    """``eval --tasks``: lm-eval accuracy of the (sparsified) model object, then the sparsity it measured."""
    from .eval.lmeval import check_options, check_tasks, format_lm_eval_table, run_lm_eval

    shots = 0 if args.num_fewshot is None else args.num_fewshot
    batch_size = 1 if args.lm_eval_batch_size is None else args.lm_eval_batch_size
    check_options(shots, args.limit, batch_size)
    tasks = check_tasks(args.tasks, include_path=args.include_path)  # bad names fail before the model loads
    model, tokenizer = _load_model(args)
    _apply_saved_thresholds(args, model)
    _log(args, f"lm-eval on {', '.join(tasks)} ({shots}-shot)")
    r = run_lm_eval(model, tokenizer, tasks, num_fewshot=shots, limit=args.limit,
                    batch_size=batch_size, include_path=args.include_path)
    result = {"model": args.model, "weights": args.weights, "thresholds": args.thresholds,
              "scap_json": args.scap_json, **r}
    if not args.json:
        weights = args.thresholds or args.scap_json
        limit = "" if args.limit is None else f", limit {args.limit}"
        print(f"lm-eval {r['lm_eval_version']}: {args.model} {'with ' + weights if weights else '(dense)'}, "
              f"{shots}-shot{limit}, {r['seconds']:.1f} s\n")
        print("\n".join(format_lm_eval_table(r)))
        if "by_type" in result:
            print("\nmeasured sparsity during the lm-eval run:")
        _print_sparsity(args, result)
    return result


def cmd_sweep(args) -> dict[str, Any]:
    # the labels, every spec checked (name, option keys and values) before anything loads
    methods = list(sweep_methods([m for m in args.methods.split(",") if m.strip()]))
    sparsities = parse_range(args.sparsity)
    model, tokenizer, corpus = _load(args)
    data = _calibration_data(args, tokenizer, corpus)
    ids = tokenize(tokenizer, corpus.evaluation)
    if args.eval_tokens is not None:
        ids = ids[: args.eval_tokens]
    _log(args, f"sweep: {len(methods)} methods x {len(sparsities)} sparsities on {args.scope}")

    def show(p):
        _log(args, f"  {p.method:<16} target {p.target:.2f}  measured {p.measured:.3f}  "
                   f"ppl {p.token_perplexity:.3f} ({p.delta_percent:+.2f}%)  calibration {p.calibration_seconds:.0f} s")

    dense, points = run_sweep(model, data, ids, methods, sparsities, scope=args.scope, ignored=args.ignore,
                              context=args.context, stride=args.stride, progress=not args.no_progress,
                              per_layer=True, on_point=show)
    meta = {"model": args.model, "data": corpus.name, "dtype": args.dtype, "scope": args.scope,
            "eval_tokens": int(ids.numel()), "context": args.context,
            "calibration_tokens": sum(d.numel() for d in data),
            "methods": method_meta(methods),
            "title": f"{args.model} on {corpus.name}: {int(ids.numel())} eval tokens"}
    paths = write_sweep(args.out, dense, points, meta)
    if not args.json:
        print("\n".join(format_table(dense, points)))
        print("\nwrote " + ", ".join(paths.values()))
    return {**meta, "dense_token_perplexity": dense, "points": [p.__dict__ for p in points], "files": paths}


def _rho(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--rho must be a number >= 0 or 'auto', got {text!r}") from None


def cmd_attribution(args) -> dict[str, Any]:
    from .attribution import ScoreBatch, find_unit_layers, tradeoff_curves, write_curves
    from .attribution.curves import check_options
    from .attribution.scores import check_metrics
    from .eval.mc import load_mc, tokenize_mc

    split = lambda text: [p.strip() for p in text.split(",") if p.strip()]  # noqa: E731
    metrics, units, modes = check_metrics(split(args.metrics)), split(args.units), split(args.modes)
    sparsities, rho = parse_range(args.sparsity), _rho(args.rho)
    check_options(sparsities, units, modes, args.n_steps, rho, args.target)
    for flag in ("eval_samples", "seq_len", "batch_size", "calib_samples", "calib_seq_len", "calib_batch_size"):
        if getattr(args, flag) < (2 if "seq_len" in flag else 1):
            raise ValueError(f"--{flag.replace('_', '-')} must be >= {2 if 'seq_len' in flag else 1}")
    if args.no_corpus and not args.mc:
        raise ValueError("--no-corpus needs --mc (there would be nothing to evaluate)")
    items = load_mc(args.mc) if args.mc else []   # fail on bad data before loading the model
    if args.mc_limit is not None:
        items = items[: args.mc_limit]
    model, tokenizer, corpus = _load(args)
    layers = find_unit_layers(model, tuple(k for k in ("heads", "neurons") if k in units or "both" in units))

    def batches(text, n, seq_len, bs):
        return [ScoreBatch.from_ids(ids) for ids in _token_batches(tokenizer, text, n, seq_len, bs)]

    eval_batches = [] if args.no_corpus else batches(corpus.evaluation, args.eval_samples, args.seq_len,
                                                     args.batch_size)
    calib = batches(corpus.calibration, args.calib_samples, args.calib_seq_len, args.calib_batch_size) \
        if "calibrated" in modes else []
    mc = tokenize_mc(tokenizer, items) if items else []
    _log(args, f"attribution: {len(layers)} unit layers, {len(metrics)} metrics x {len(sparsities)} sparsities x "
               f"{len(units)} unit sets, modes {', '.join(modes)}")
    t = time.perf_counter()
    points = tradeoff_curves(model, layers, eval_batches=eval_batches, mc_examples=mc, calibration=calib,
                             metrics=metrics, sparsities=sparsities, units=units, modes=modes, n_steps=args.n_steps,
                             ig_chunk=args.ig_chunk, rho=rho, target=args.target, progress=not args.no_progress)
    meta = {"model": args.model, "data": corpus.name, "dtype": args.dtype, "metrics": metrics, "modes": modes,
            "units": units, "n_steps": args.n_steps, "rho": rho, "target": args.target,
            "eval_tokens": sum(b.n_labels for b in eval_batches), "mc": args.mc, "mc_items": len(mc),
            "calibration_tokens": sum(int(b.attention.sum()) for b in calib),
            "seconds": round(time.perf_counter() - t, 1),
            "title": f"{args.model}: attribution-based deactivation"}
    paths = write_curves(args.out, points, meta)
    if not args.json:
        print(_curves_table(points))
        print("\nwrote " + ", ".join(paths.values()))
    return {**meta, "points": [p.__dict__ for p in points], "files": paths}


def _curves_table(points) -> str:
    mc = any(p.mc_items for p in points)
    rows = [f"{'mode':<11} {'units':<8} {'metric':<10} {'sparsity':>8} {'ppl':>10} {'acc':>7}" + ("  mc acc" if mc else "")]
    for p in points:
        ppl = "-" if p.tokens == 0 else f"{p.perplexity:.3f}"
        acc = "-" if p.tokens == 0 else f"{p.accuracy:.4f}"
        rows.append(f"{p.mode:<11} {p.units:<8} {p.metric:<10} {p.sparsity:>8.2f} {ppl:>10} {acc:>7}"
                    + (f"  {p.mc_accuracy:.4f}" if mc else ""))
    return "\n".join(rows)


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_generate(args) -> dict[str, Any]:
    from .generate import (check_settings, compare_generate, format_footer, format_side_by_side, format_summary,
                           generate)
    _check_saved_thresholds(args)
    if args.dense and (args.compare or args.thresholds or args.scap_json):
        raise ValueError("--dense generates without sparsity; drop --compare, --thresholds and --scap-json")
    if not args.sample and (args.temperature is not None or args.top_p is not None):
        raise ValueError("--temperature and --top-p apply only with --sample (greedy decoding ignores them)")
    prompt = sys.stdin.read().rstrip("\n") if args.prompt == "-" else args.prompt
    settings: dict[str, Any] = {
        "max_new_tokens": args.max_new_tokens, "do_sample": args.sample, "seed": args.seed, "chat": args.chat,
        "temperature": 1.0 if args.temperature is None else args.temperature,
        "top_p": 1.0 if args.top_p is None else args.top_p}
    check_settings(prompt, max_new_tokens=settings["max_new_tokens"], do_sample=settings["do_sample"],
                   temperature=settings["temperature"], top_p=settings["top_p"])  # before the slow model load
    model, tokenizer = _load_model(args)
    result: dict[str, Any] = {"model": args.model, "weights": args.weights, "thresholds": args.thresholds,
                              "scap_json": args.scap_json}
    if not _apply_saved_thresholds(args, model) and not args.dense:
        corpus = load_corpus(args.data)
        _log(args, f"no --thresholds given: calibrating on {corpus.name} "
                   "(save thresholds with `actsparse calibrate` to skip this)")
        result["calibration"] = cal = _calibrate(args, model, tokenizer, corpus)
        result["data"] = corpus.name
        _log(args, f"calibrated {', '.join(f'{p}={s}' for p, s in cal['scopes'].items())} with "
                   f"{_method_label(cal['method'])} on {cal['calibration_tokens']} tokens in "
                   f"{cal['calibration_seconds']:.1f} s")
    settings["engine"] = args.engine
    if not args.no_kernels and not args.dense and triton_available(model_device(model)):
        packed = enable_kernels(model)
        result["kernel_layers"] = len(packed)
        _log(args, f"sparse GEMV kernels on {len(packed)} of {len(sparse_layers(model))} sparse layers "
                   f"(the others take the dense route: below {KERNEL_MIN_SPARSITY:g} expected sparsity or not eligible)")
    if args.compare:
        _log(args, "generating with the dense model, then with the sparse one")
        comparison = compare_generate(model, tokenizer, prompt, **settings)
        result.update(comparison.to_dict())
        if not args.json:
            print("\n".join(format_side_by_side(comparison.dense.text, comparison.sparse.text)))
            print("\n" + "\n".join(format_footer(comparison)))
        return result
    stream = None if args.json or args.no_stream else _write_stdout
    r = generate(model, tokenizer, prompt, stream=stream, **settings)
    result.update(r.to_dict())
    if not args.json:
        print(r.text if stream is None else "")
        print("\n" + "\n".join(format_summary(r)))
    return result


COMMANDS = {"demo": cmd_demo, "calibrate": cmd_calibrate, "eval": cmd_eval, "sweep": cmd_sweep,
            "attribution": cmd_attribution, "generate": cmd_generate}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "default_scopes"):  # commands that may calibrate: a bad recipe fails before any loading
            args.sparsify_config = _sparsify_config(args)
        from .quant import _quiet_torchao

        with _quiet_torchao():  # transformers imports torchao when installed: its CPU-only warnings are noise here
            result = COMMANDS[args.command](args)
    except (ActSparseError, FileNotFoundError, ValueError) as e:
        print(f"actsparse {args.command}: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
