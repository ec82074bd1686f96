"""The steps the commands share: load the model (and compress it), build the sparsify config from the flags,
calibrate, evaluate perplexity with the measured sparsity, apply saved thresholds."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, cast

import torch

from ..api import sparsify_
from ..config import SparsifyConfig
from ..data import chunk_tokens, count_words, load_corpus, tokenize
from ..errors import UsageError
from ..eval.perplexity import perplexity
from ..eval.sparsity import SparsityMonitor, layer_type, summarize_by_type
from ..fileio import check_output_path, names_folder
from ..input_rotation import rotate_inputs
from ..io import import_scap_json, load_thresholds, read_thresholds
from ..methods import MethodConfig, method_from_spec, method_to_dict
from ..methods.scap import parse_scap_config
from ..models import empty_model, load_model
from ..moe import expert_scope_hint, experts_unfused
from ..quant import compress_weights
from ..scope import IgnoredScope, TargetScope, resolve_targets
from ..sparse_linear import sparse_layers
from .args import scope_arg

__all__ = [
    "log",
    "load_model_from_args",
    "load_all",
    "precheck_scopes",
    "will_calibrate",
    "check_outputs",
    "check_window",
    "calibration_data",
    "token_batches",
    "sparsify_config",
    "calibrate",
    "evaluate",
    "by_type",
    "method_label",
    "check_saved_thresholds",
    "apply_saved_thresholds",
]


def log(args, msg: str) -> None:
    if not args.json:
        print(msg, file=sys.stderr, flush=True)


def load_model_from_args(args, *, compress: bool = True):
    """``(model, tokenizer)`` as the model flags say: loaded, then int8-compressed with ``--weights``."""
    device = args.device
    if device is None and args.device_map is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.model == "embedded" and args.device_map is None:
        log(args, "loading the embedded SmolLM2-135M (about 15 s on 2 idle CPU cores)")
    t = time.perf_counter()
    model, tokenizer = load_model(
        args.model,
        dtype=args.dtype,
        device=device,
        device_map=args.device_map,
        max_memory=args.max_memory,
        offload_folder=args.offload_folder,
    )
    log(args, f"loaded {args.model} in {time.perf_counter() - t:.1f} s")
    placed = getattr(model, "hf_device_map", None)
    if args.device_map is not None and placed:
        counts = collections.Counter(str(d) for d in placed.values())
        log(args, "device map: " + ", ".join(f"{n} module(s) on {d}" for d, n in counts.items()))
    if compress and args.weights != "dense":
        names = compress_weights(model, args.weights)
        log(args, f"compressed {len(names)} Linear weights to {args.weights}")
    return model, tokenizer


def load_all(args, *, compress: bool = True):
    """``(model, tokenizer, corpus)``; the corpus first, so that bad ``--data`` fails before the slow load."""
    corpus = load_corpus(args.data)
    return (*load_model_from_args(args, compress=compress), corpus)


def check_outputs(args) -> None:
    """Every output flag names a place that can be written, before any work (a folder for sweep's and
    attribution's ``--out``, a file or a folder for calibrate's, files for the others)."""
    folder_out = args.command in ("sweep", "attribution")
    if getattr(args, "out", None) is not None:
        # calibrate --out FOLDER (an existing one, or one named with a trailing /) writes FOLDER/<thresholds file>
        is_folder = folder_out or os.path.isdir(args.out) or (args.command == "calibrate" and names_folder(args.out))
        check_output_path(args.out, "--out", folder=is_folder)
    for flag in ("save_config", "export_scap", "plot"):
        value = getattr(args, flag, None)
        if value is not None:
            check_output_path(value, "--" + flag.replace("_", "-"))


def check_window(args) -> None:
    """``--stride`` within ``--context`` (each is checked alone by argparse), before any loading."""
    stride, context = getattr(args, "stride", None), getattr(args, "context", None)
    if stride is not None and context is not None and stride > context:
        raise UsageError(f"--stride {stride} exceeds --context {context}: use a stride in [1, {context}]")


def will_calibrate(args) -> bool:
    """Whether the command calibrates thresholds (generate does only without saved thresholds or --dense)."""
    if args.command != "generate":
        return args.command in ("demo", "calibrate")
    return not (args.thresholds or args.scap_json or args.dense)


def precheck_scopes(args, config: SparsifyConfig) -> None:
    """Resolve ``config``'s scopes on the model's empty module tree (seconds, no weights): a scope that matches
    nothing is reported before the slow load. Models whose module tree cannot be built from the config alone
    are checked after the load, as before."""
    try:
        meta = empty_model(args.model)
    except Exception:  # e.g. a custom architecture: the real load reports (or passes)
        return
    with experts_unfused(meta):
        scopes = cast("Mapping[TargetScope, float]", config.target_sparsity_by_scope)
        resolve_targets(meta, scopes, config.ignored_scope, hint=expert_scope_hint(meta))


def calibration_data(args, tokenizer, corpus, *, evaluates: bool = False) -> list[torch.Tensor]:
    """The calibration windows, with a line saying how many tokens of the data they use; ``evaluates``: the
    command then measures perplexity on ``corpus.evaluation`` (a note when that is the same text)."""
    batches = token_batches(
        tokenizer, corpus.calibration, args.calib_samples, args.calib_seq_len, args.calib_batch_size
    )
    windows = sum(b.shape[0] for b in batches)
    available = tokenize(tokenizer, corpus.calibration).numel()
    short = (
        f"; the text fills only {windows} of the {args.calib_samples} windows asked for (--calib-samples)"
        if windows < args.calib_samples
        else ""
    )
    log(
        args,
        f"calibration data: {windows} windows x {args.calib_seq_len} tokens = {windows * args.calib_seq_len} of the "
        f"{available} calibration tokens of {corpus.name}{short}",
    )
    if evaluates and corpus.calibration is corpus.evaluation:
        log(
            args,
            f"note: {corpus.name} is used whole for calibration and evaluation, so perplexity is measured on the "
            "calibration text; for held-out numbers evaluate on another file (actsparse eval --data OTHER)",
        )
    return batches


def token_batches(tokenizer, text: str, n: int, seq_len: int, batch_size: int) -> list[torch.Tensor]:
    """Up to ``n`` windows of ``seq_len`` tokens of ``text``, ``batch_size`` per ``[B, seq_len]`` tensor."""
    chunks = chunk_tokens(tokenizer, text, seq_len, n)
    return [torch.cat(chunks[i : i + batch_size]) for i in range(0, len(chunks), batch_size)]


def method_from_args(args):
    options = dict(args.option)
    if args.statistic is not None:
        options["statistic"] = args.statistic
    if args.scap_config:
        if args.scope:
            raise UsageError("give either --scap-config or --scope, not both (the SCAP recipe sets the scopes)")
        scopes, method = parse_scap_config(args.scap_config)
        if args.method not in ("quantile", "scap"):
            raise UsageError(f"--scap-config sets the method to scap; drop --method {args.method}")
        if options:
            method = dataclasses.replace(method, **options)
        return scopes, method
    pairs = args.scope or [scope_arg(s) for s in args.default_scopes]
    return {TargetScope(patterns=[p]): s for p, s in pairs}, method_from_spec(args.method, **options)


def sparsify_config(args) -> SparsifyConfig:
    """The config the flags ask for: ``--config FILE``, or ``--scope/--ignore/--method/--option/--scap-config``."""
    if args.config:
        given = [
            flag
            for flag, on in (
                ("--scope", args.scope),
                ("--ignore", args.ignore),
                ("--method", args.method != "quantile"),
                ("--option", args.option),
                ("--statistic", args.statistic),
                ("--scap-config", args.scap_config),
            )
            if on
        ]
        if given:
            raise UsageError(
                f"--config holds the scopes and the method; drop {', '.join(given)} (or edit the config file)"
            )
        return SparsifyConfig.load(args.config)
    scopes, method = method_from_args(args)
    return SparsifyConfig(scopes, IgnoredScope(patterns=args.ignore) if args.ignore else None, method)


def rotate_inputs_from_args(args, model, data) -> dict[str, Any] | None:
    """``--rotate-inputs R`` (calibrate, sweep): rotate ``model``'s inputs on ``data``, log it and return the
    record for the outputs; None without the flag."""
    if not getattr(args, "rotate_inputs", None):
        return None
    log(args, f"rotating the q/k/v and gate/up inputs (rank {args.rotate_inputs} Householder bases)")
    rot = rotate_inputs(model, data, rank=args.rotate_inputs, progress=not args.no_progress)
    log(
        args,
        f"  {100 * rot.energy_in_rank:.1f}% of the energy in the top {rot.rank} directions; "
        f"{rot.weights_read} rotation weights read per token (subtracted from the measured skipped weights)",
    )
    return {
        "rank": rot.rank,
        "tokens": rot.tokens,
        "energy_in_rank": rot.energy_in_rank,
        "weights_read": rot.weights_read,
    }


def calibrate(
    args, config: SparsifyConfig, model, tokenizer, corpus, *, evaluates: bool = False
) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Sparsify ``model`` with ``config`` (built and checked before the model loaded); ``(report, batches)``."""
    data = calibration_data(args, tokenizer, corpus, evaluates=evaluates)
    rotation = rotate_inputs_from_args(args, model, data)  # (calibrate --rotate-inputs R) before the thresholds
    t = time.perf_counter()
    sparsify_(model, config, data, progress=not args.no_progress)
    seconds = time.perf_counter() - t
    # SparsifyConfig.__post_init__ made every key a TargetScope and the method a MethodConfig
    scopes = cast("Mapping[TargetScope, float]", config.target_sparsity_by_scope)
    result = {
        "scopes": {"|".join(k.patterns) or str(k): v for k, v in scopes.items()},
        "method": method_to_dict(cast(MethodConfig, config.method)),
        "config": config.to_dict(),
        "calibration_tokens": sum(d.numel() for d in data),
        "calibration_seconds": seconds,
    }
    if rotation is not None:
        result["input_rotation"] = rotation
    if args.save_config:
        result["config_file"] = config.save(args.save_config)
    return result, data


def evaluate(args, model, tokenizer, text: str) -> dict[str, Any]:
    ids = tokenize(tokenizer, text)
    if args.eval_tokens is not None:
        ids = ids[: args.eval_tokens]
        text = tokenizer.decode(ids)
    words = count_words(text)
    monitor = SparsityMonitor(model) if sparse_layers(model) else None
    with monitor or contextlib.nullcontext():
        ppl = perplexity(
            model, ids, context=args.context, stride=args.stride, n_words=words, progress=not args.no_progress
        )
    out: dict[str, Any] = {
        "token_perplexity": ppl.token_perplexity,
        "word_perplexity": ppl.word_perplexity,
        "eval_tokens": int(ids.numel()),
        "words": words,
        "context": ppl.context,
        "stride": ppl.stride,
    }
    if monitor:
        measured = monitor.sparsity()
        targets = monitor.targets()
        out["measured_sparsity"] = measured
        out["target_sparsity"] = targets
        out["by_type"] = by_type(measured, targets)
    return out


def by_type(measured: dict[str, float], targets: dict[str, float | None]) -> dict[str, dict[str, float | None]]:
    mean_m = summarize_by_type(measured)
    mean_t = summarize_by_type({n: t for n, t in targets.items() if t is not None})
    counts: dict[str, int] = {}
    for n in measured:
        counts[layer_type(n)] = counts.get(layer_type(n), 0) + 1
    return {k: {"layers": counts[k], "target": mean_t.get(k), "measured": v} for k, v in mean_m.items()}


def method_label(m: dict[str, Any]) -> str:
    opts = ", ".join(
        f"{k}={v}"
        for k, v in m.items()
        if k != "name" and k in ("statistic", "allocation", "mode", "topk") and v not in (False, None)
    )
    return f"{m['name']} ({opts})" if opts else m["name"]


def check_saved_thresholds(args) -> None:
    """``--thresholds`` / ``--scap-json``: at most one, and a thresholds file must read, before the model loads."""
    if args.thresholds and args.scap_json:
        raise UsageError("give either --thresholds or --scap-json, not both")
    if args.thresholds:
        read_thresholds(args.thresholds)


def apply_saved_thresholds(args, model) -> bool:
    """Sparsify ``model`` with ``--thresholds`` or ``--scap-json``; False when neither was given."""
    if args.thresholds:  # thresholds of a rotated model that keep their bases rotate the checkpoint first
        load_thresholds(model, args.thresholds, rotate="auto")
    elif args.scap_json:
        import_scap_json(model, args.scap_json)
    return bool(args.thresholds or args.scap_json)
