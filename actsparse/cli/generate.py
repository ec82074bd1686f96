"""``actsparse generate``: stream text from the (sparsified) model, decode speed, measured sparsity, --compare."""

from __future__ import annotations

import sys
from typing import Any

from ..config import SparsifyConfig
from ..data import load_corpus
from ..errors import UsageError
from ..generation import check_settings, compare_generate, generate
from ..kernels import enable_kernels, triton_available
from ..offload import model_device
from ..sparse_linear import sparse_layers
from .args import NNCF_RECIPE, add_calib_args, add_model_args
from .common import (
    apply_saved_thresholds,
    calibrate,
    check_saved_thresholds,
    load_model_from_args,
    log,
    method_label,
    will_calibrate,
)
from .format import format_footer, format_side_by_side, format_summary, write_stdout


def register(sub) -> None:
    gen = sub.add_parser(
        "generate",
        help="stream text from the sparsified model: time to first token, decode "
        "tokens/s, measured sparsity; --compare: dense and sparse side by side",
    )
    add_model_args(gen)
    add_calib_args(gen, NNCF_RECIPE)  # used only when neither --thresholds, --scap-json nor --dense is given
    gen.add_argument("--prompt", required=True, help="prompt text, or '-' to read it from stdin")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=None, help="sampling temperature (with --sample; default 1)")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (with --sample; default 1)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    gen.add_argument(
        "--chat",
        action="store_true",
        help="wrap the prompt in the tokenizer's chat template as a user turn (default: plain completion)",
    )
    gen.add_argument(
        "--thresholds",
        default=None,
        help="thresholds file from `actsparse calibrate` (default: calibrate the --scope recipe, "
        "NNCF's unless given, on --data first)",
    )
    gen.add_argument("--scap-json", default=None, help="SCAP calibrated_thresholds.json to apply instead")
    gen.add_argument("--dense", action="store_true", help="generate with the dense model (no thresholds)")
    gen.add_argument(
        "--compare",
        action="store_true",
        help="generate dense, then sparse, and print them side by side (nothing is streamed)",
    )
    gen.add_argument("--no-stream", action="store_true", help="print the text once it is complete")
    gen.add_argument(
        "--engine",
        default="auto",
        choices=["auto", "graph", "eager"],
        help="graph: the static-cache decoder, one CUDA-graph replay per token (compiled on CUDA); "
        "eager: the dynamic-cache loop; auto (default): graph on CUDA, eager elsewhere",
    )
    gen.add_argument(
        "--attention",
        default=None,
        choices=["model", "auto", "kernel"],
        help="the graph engine's attention: model (the model's own SDPA), auto (actsparse's decode attention on "
        "CUDA: one-token steps read only the written cache positions), kernel (auto, refused where it cannot "
        "run); default: the Decoder's (auto)",
    )
    gen.add_argument(
        "--no-kernels",
        action="store_true",
        help="on CUDA, decode sparse layers with masked dense matmuls instead of the sparse GEMV kernels "
        "(default: kernels where they beat cuBLAS, see actsparse.kernels.enable_kernels)",
    )


def run(args, config: SparsifyConfig | None) -> dict[str, Any]:
    check_saved_thresholds(args)
    if args.dense and (args.compare or args.thresholds or args.scap_json):
        raise UsageError("--dense generates without sparsity; drop --compare, --thresholds and --scap-json")
    if args.attention == "kernel" and args.engine == "eager":
        raise UsageError("--attention kernel runs in the graph engine's decode steps; drop --engine eager")
    if not args.sample and (args.temperature is not None or args.top_p is not None):
        raise UsageError("--temperature and --top-p apply only with --sample (greedy decoding ignores them)")
    prompt = sys.stdin.read().rstrip("\n") if args.prompt == "-" else args.prompt
    settings: dict[str, Any] = {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": args.sample,
        "seed": args.seed,
        "chat": args.chat,
        "temperature": 1.0 if args.temperature is None else args.temperature,
        "top_p": 1.0 if args.top_p is None else args.top_p,
    }
    check_settings(
        prompt,
        max_new_tokens=settings["max_new_tokens"],
        do_sample=settings["do_sample"],
        temperature=settings["temperature"],
        top_p=settings["top_p"],
    )  # before the slow model load
    corpus = None
    if will_calibrate(args):
        corpus = load_corpus(args.data)  # bad --data fails now, not after the load
        model_flag = "" if args.model == "embedded" else f" --model {args.model}"
        took = " (the embedded model on 2 idle CPU cores: about 50 s)" if args.model == "embedded" else ""
        log(
            args,
            f"no --thresholds given: the model is calibrated first, on {corpus.name}{took}. To calibrate once "
            f"and reuse: actsparse calibrate{model_flag} --out thresholds.safetensors, then "
            f"actsparse generate{model_flag} --thresholds thresholds.safetensors --prompt ...",
        )
    model, tokenizer = load_model_from_args(args)
    result: dict[str, Any] = {
        "model": args.model,
        "weights": args.weights,
        "thresholds": args.thresholds,
        "scap_json": args.scap_json,
    }
    if not apply_saved_thresholds(args, model) and corpus is not None:
        assert config is not None  # main() builds it for every command with the calibration flags
        result["calibration"] = cal = calibrate(args, config, model, tokenizer, corpus)[0]
        result["data"] = corpus.name
        log(
            args,
            f"calibrated {', '.join(f'{p}={s}' for p, s in cal['scopes'].items())} with "
            f"{method_label(cal['method'])} on {cal['calibration_tokens']} tokens in "
            f"{cal['calibration_seconds']:.1f} s",
        )
    settings["engine"] = args.engine
    if args.attention is not None:
        settings["attention"] = args.attention
    if (
        not args.no_kernels
        and not args.dense
        and model_device(model).type == "cuda"
        and triton_available(model_device(model))
    ):
        packed = enable_kernels(model)
        result["kernel_layers"] = len(packed)
        log(
            args,
            f"sparse GEMV kernels on {len(packed)} of {len(sparse_layers(model))} sparse layers "
            "(the others take the dense route: below the break-even sparsity or not eligible; "
            "actsparse.kernels.kernel_routes(model) says which and why)",
        )
    if args.compare:
        log(args, "generating with the dense model, then with the sparse one")
        comparison = compare_generate(model, tokenizer, prompt, **settings)
        result.update(comparison.to_dict())
        if not args.json:
            print("\n".join(format_side_by_side(comparison.dense.text, comparison.sparse.text)))
            print("\n" + "\n".join(format_footer(comparison)))
        return result
    stream = None if args.json or args.no_stream else write_stdout
    r = generate(model, tokenizer, prompt, stream=stream, **settings)
    result.update(r.to_dict())
    if not args.json:
        print(r.text if stream is None else "")
        print("\n" + "\n".join(format_summary(r)))
    return result
