"""Argument types and the argument groups the commands share (model, calibration, evaluation), defined once."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from ..methods import parse_option, registered_methods
from ..models import DEVICE_MAPS, parse_max_memory
from ..quant import WEIGHT_MODES

__all__ = [
    "NNCF_RECIPE",
    "scope_arg",
    "option_arg",
    "int_at_least",
    "limit_arg",
    "device_map_arg",
    "max_memory_arg",
    "add_model_args",
    "add_calib_args",
    "add_eval_args",
]

NNCF_RECIPE = [".*up_proj.*=0.3", ".*gate_proj.*=0.3", ".*down_proj.*=0.5"]


def scope_arg(text: str) -> tuple[str, float]:
    pattern, sep, value = text.rpartition("=")
    try:
        if not sep or not pattern:
            raise ValueError
        sparsity = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PATTERN=SPARSITY, e.g. '.*up_proj.*=0.3', got {text!r}") from None
    if not 0.0 <= sparsity <= 1.0:
        hint = f"; did you mean {pattern}={sparsity / 100:g}?" if 1.0 < sparsity <= 100.0 else ""
        raise argparse.ArgumentTypeError(f"the sparsity in {text!r} must be a fraction in [0, 1]{hint}")
    return pattern, sparsity


def option_arg(text: str) -> tuple[str, Any]:
    try:
        return parse_option(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def limit_arg(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of examples or a fraction below 1, got {text!r}")
    return int(value) if value >= 1 and value == int(value) else value


def positive_int(text: str, what: str) -> int:
    """``text`` as an int >= 1, else an argparse error saying ``expected <what>``."""
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return k


def rank_arg(text: str) -> int:
    return positive_int(text, "a rank >= 1")


def add_rotate_inputs_arg(parser) -> None:
    """``--rotate-inputs R`` (sweep, calibrate): rank-R input rotations before calibrating."""
    parser.add_argument(
        "--rotate-inputs",
        default=None,
        type=rank_arg,
        metavar="R",
        help="first rotate each layer's q/k/v and gate/up inputs online by a rank-R Householder basis whose first "
        "R directions are the inputs' principal ones (rotate_inputs; the same dense function, 2·D·R float32 "
        "values read per input and token, subtracted from the skipped weights; e.g. 64)",
    )


def device_map_arg(text: str) -> str | dict[str, Any]:
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
        raise argparse.ArgumentTypeError(
            f"expected {', '.join(DEVICE_MAPS)}, or a JSON object {{module name: device}} "
            f"(inline or in a file), got {text!r}"
        )
    return value


def max_memory_arg(text: str) -> dict[int | str, int]:
    try:
        return parse_max_memory(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="embedded", help="HF model name, folder or .gguf file (default: the embedded SmolLM2-135M)"
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="weights and activations (default float32; bfloat16 or float16 on a GPU for speed)",
    )
    p.add_argument(
        "--device",
        default=None,
        help="device for the whole model (default cuda when available, else cpu); not with --device-map",
    )
    p.add_argument(
        "--device-map",
        type=device_map_arg,
        default=None,
        metavar="{auto,balanced,sequential}|JSON",
        help="spread a model that does not fit one device over the GPUs, the CPU and disk (accelerate), "
        "within --max-memory or else all free GPU memory and the available CPU RAM; planned before "
        "loading, and an error if weights would go to disk without --offload-folder. Or a JSON "
        "object / file {module name: device}",
    )
    p.add_argument(
        "--max-memory",
        type=max_memory_arg,
        default=None,
        metavar="DEVICE=SIZE,...",
        help="with --device-map: memory per device for the weights, e.g. cpu=2GiB,0=70GiB (default: "
        "the free GPU memory and the available CPU RAM, as accelerate finds them)",
    )
    p.add_argument(
        "--offload-folder",
        default=None,
        metavar="DIR",
        help="with --device-map: allow offloading weights to disk, re-saving them in DIR where needed",
    )
    p.add_argument(
        "--weights",
        default="dense",
        choices=["dense", *WEIGHT_MODES],
        help="compress the Linear weights to int8 (torchao, per channel) after loading, before any "
        "calibration (default dense)",
    )
    p.add_argument(
        "--data", default="embedded", help="'embedded' (gensim's Lee corpus), a text file, or hf:DATASET[:CONFIG]"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_calib_args(p: argparse.ArgumentParser, default_scopes: list[str] | None) -> None:
    p.add_argument(
        "--scope",
        action="append",
        type=scope_arg,
        metavar="PATTERN=SPARSITY",
        help="regex (re.match on module names) and target sparsity; repeatable "
        f"(default: NNCF's recipe {' '.join(NNCF_RECIPE)})",
    )
    p.add_argument(
        "--ignore", action="append", default=[], metavar="PATTERN", help="regex of layers to leave dense; repeatable"
    )
    p.add_argument(
        "--method",
        default="quantile",
        help=f"calibration method: {', '.join(registered_methods(aliases=True))}; "
        "append '+topk' for exact per-token top-k at inference (default quantile)",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        type=option_arg,
        metavar="KEY=VALUE",
        help="method option, e.g. step=0.1 for teal or mode=kde for scap (JSON value; None, True "
        "and False also read as Python's); repeatable",
    )
    p.add_argument(
        "--statistic",
        default=None,
        choices=["histogram", "ema"],
        help="quantile statistic: one quantile over all tokens (histogram) or NNCF's per-batch EMA",
    )
    p.add_argument(
        "--scap-config",
        default=None,
        metavar="TYPE,MODE,SPARSITY,...",
        help="SCAP recipe, e.g. up,zero,0.35,gate,zero,0.35,down,median,0.55 (sets scopes and method)",
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="JSON",
        help="versioned JSON sparsify config (scopes, ignored scope, method and options; see "
        "SparsifyConfig.save) instead of --scope/--ignore/--method/--option",
    )
    p.add_argument("--save-config", default=None, metavar="JSON", help="write the sparsify config used to this file")
    p.add_argument("--calib-samples", type=int_at_least(1), default=32, help="calibration sequences (default 32)")
    p.add_argument(
        "--calib-seq-len", type=int_at_least(2), default=256, help="tokens per calibration sequence (default 256)"
    )
    p.add_argument("--calib-batch-size", type=int_at_least(1), default=8, help="sequences per forward pass (default 8)")
    p.set_defaults(default_scopes=default_scopes)


def add_eval_args(p: argparse.ArgumentParser, eval_tokens: int | None = None) -> None:
    p.add_argument("--context", type=int_at_least(2), default=1024, help="perplexity window (default 1024)")
    p.add_argument(
        "--stride",
        type=int_at_least(1),
        default=None,
        help="new tokens scored per window (default: context - 1; consecutive windows share one token)",
    )
    p.add_argument(
        "--eval-tokens",
        type=int_at_least(2),
        default=eval_tokens,
        help=f"evaluate the first N tokens of the evaluation split (default {eval_tokens or 'all of them'})",
    )
