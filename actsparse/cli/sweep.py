"""``actsparse sweep``: every method at every sparsity, perplexity vs measured sparsity (CSV/JSON/PNG)."""

from __future__ import annotations

from typing import Any

from ..config import SparsifyConfig
from ..data import tokenize
from ..errors import UsageError
from ..eval.lmeval import TASK_DATA, check_tasks, mean_accuracy, run_lm_eval
from ..eval.sweep import ALL_PROJECTIONS, format_table, method_meta, parse_range, run_sweep, sweep_methods, write_sweep
from ..rotation import rotate_residual
from ..scope import IgnoredScope
from .args import add_eval_args, add_model_args, add_rotate_inputs_arg, int_at_least, limit_arg, positive_int
from .common import calibration_data, load_all, log, precheck_scopes, rotate_inputs_from_args


def register(sub) -> None:
    sw = sub.add_parser("sweep", help="every method at every sparsity: perplexity vs measured sparsity (CSV/JSON/PNG)")
    add_model_args(sw)
    add_eval_args(sw, eval_tokens=8192)
    sw.add_argument(
        "--methods",
        default="quantile,teal-greedy,scap-median,wina",
        metavar="NAME[:KEY=VALUE...],...",
        help="comma list of methods, each with optional ':'-separated options (the KEY=VALUE of "
        "calibrate's --option), e.g. quantile,teal-greedy:step=0.025:greedy_tokens=null; the spec "
        "labels the method in the outputs (default quantile,teal-greedy,scap-median,wina)",
    )
    sw.add_argument("--sparsity", default="0.2:0.7:0.1", help="START:STOP:STEP or a comma list (default 0.2:0.7:0.1)")
    sw.add_argument(
        "--scope", default=ALL_PROJECTIONS, help="regex of the layers to sparsify (default: all seven projections)"
    )
    sw.add_argument("--ignore", action="append", default=[], metavar="PATTERN", help="regex of layers to leave dense")
    sw.add_argument("--calib-samples", type=int_at_least(1), default=32, help="calibration sequences (default 32)")
    sw.add_argument(
        "--calib-seq-len", type=int_at_least(2), default=256, help="tokens per calibration sequence (default 256)"
    )
    sw.add_argument(
        "--calib-batch-size", type=int_at_least(1), default=8, help="sequences per forward pass (default 8)"
    )
    sw.add_argument("--out", default="sweep", help="output folder for sweep.csv/json/png (default ./sweep)")
    sw.add_argument(
        "--tasks",
        default=None,
        metavar="TASK,...",
        help="also measure zero-shot mean accuracy at every point (lm-eval; e.g. zeroshot: the seven standard "
        "tasks, offline), a second quality axis in the table, CSV/JSON and plot",
    )
    sw.add_argument(
        "--limit",
        type=limit_arg,
        default=None,
        help="with --tasks: examples per task (the same items at every point)",
    )
    sw.add_argument("--task-data", default="auto", choices=TASK_DATA, help="with --tasks: as eval's --task-data")
    sw.add_argument(
        "--rotate",
        nargs="?",
        const="1",
        default=None,
        type=_layers_per_basis,
        metavar="K|global",
        help="first rotate the residual stream into the PCA basis of the calibration activations, folded into "
        "the weights (rotate_residual: the same dense function); every method then sparsifies the rotated "
        "q/k/v and gate/up inputs. K (default 1): one basis per K consecutive layers, a residual adapter "
        "between bases, whose weights count against the skipped ones; global: one basis, no adapter",
    )
    add_rotate_inputs_arg(sw)


def _layers_per_basis(text: str) -> int | str:
    return text if text == "global" else positive_int(text, "a number of layers >= 1 or 'global'")


def run(args, config: SparsifyConfig | None = None) -> dict[str, Any]:
    # the labels, every spec checked (name, option keys and values) before anything loads
    methods = list(sweep_methods([m for m in args.methods.split(",") if m.strip()]))
    sparsities = parse_range(args.sparsity)
    ignored = IgnoredScope(patterns=args.ignore) if args.ignore else None
    precheck_scopes(args, SparsifyConfig({args.scope: 0.5}, ignored))  # the scope regex, before the model loads
    if args.rotate and args.rotate_inputs:
        raise UsageError("--rotate and --rotate-inputs: choose one rotation, not both")
    if args.limit is not None and args.tasks is None:
        raise UsageError("--limit applies to --tasks (zero-shot accuracy); add --tasks TASK,... or drop it")
    tasks = check_tasks(args.tasks, task_data=args.task_data) if args.tasks else None  # before the load
    model, tokenizer, corpus = load_all(args)
    accuracy = None
    if tasks is not None:

        def accuracy(m):
            r = run_lm_eval(m, tokenizer, args.tasks, limit=args.limit, task_data=args.task_data)
            return mean_accuracy(r)

    data = calibration_data(args, tokenizer, corpus, evaluates=True)
    ids = tokenize(tokenizer, corpus.evaluation)
    if args.eval_tokens is not None:
        ids = ids[: args.eval_tokens]
    rotation = None
    if args.rotate:
        log(args, "rotating the residual stream into the PCA basis of the calibration activations")
        k = None if args.rotate == "global" else args.rotate
        rot = rotate_residual(model, data, layers_per_basis=k, progress=not args.no_progress)
        rotation = {
            "mode": args.rotate,
            "tokens": rot.tokens,
            "energy_in_top_half": rot.energy_in_top(0.5),
            "untied_head": rot.untied_head,
            "adapter_weights": rot.adapter_weights,
        }
        log(
            args,
            f"  {100 * rotation['energy_in_top_half']:.1f}% of the energy in the top half of the coordinates; "
            f"{rot.adapter_weights} adapter weights read per token (subtracted from the measured skipped weights)",
        )
    input_rotation = rotate_inputs_from_args(args, model, data)
    log(args, f"sweep: {len(methods)} methods x {len(sparsities)} sparsities on {args.scope}")

    def show(p):
        log(
            args,
            f"  {p.method:<16} target {p.target:.2f}  measured {p.measured:.3f}  "
            f"ppl {p.token_perplexity:.3f} ({p.delta_percent:+.2f}%)  calibration {p.calibration_seconds:.0f} s",
        )

    meta = {
        "model": args.model,
        "data": corpus.name,
        "dtype": args.dtype,
        "scope": args.scope,
        "eval_tokens": int(ids.numel()),
        "context": args.context,
        "stride": min(args.stride or args.context - 1, args.context - 1),  # as perplexity() clamps it
        "ignore": list(args.ignore or []),
        "calibration_tokens": sum(d.numel() for d in data),
        "methods": method_meta(methods),
        "title": f"{args.model} on {corpus.name}: {int(ids.numel())} eval tokens"
        + (
            ""
            if rotation is None
            else f", residual stream rotated ({'one basis' if args.rotate == 'global' else f'{args.rotate} layer(s) per basis'})"
        )
        + ("" if input_rotation is None else f", inputs rotated (rank {args.rotate_inputs})"),
        "rotation": rotation,
        "input_rotation": input_rotation,
    }
    if accuracy is not None:
        meta.update(tasks=tasks, limit=args.limit)
    # partial results after every point (a failed or interrupted sweep keeps what it finished; "complete" says
    # which); an older sweep in the folder is replaced at the start, not left looking current
    done: list = []
    state: dict[str, float] = {}

    def keep_partial(dense: float) -> None:
        state["dense"] = dense
        write_sweep(args.out, dense, done, {**meta, "complete": False}, plot=False)

    def on_point(p) -> None:
        show(p)
        done.append(p)
        write_sweep(args.out, state["dense"], done, {**meta, "complete": False}, plot=False)

    dense, points = run_sweep(
        model,
        data,
        ids,
        methods,
        sparsities,
        scope=args.scope,
        ignored=args.ignore,
        context=args.context,
        stride=args.stride,
        progress=not args.no_progress,
        per_layer=True,
        on_point=on_point,
        on_dense=keep_partial,
        accuracy=accuracy,
    )
    if accuracy is not None:
        log(args, f"zero-shot accuracy of the dense model on {', '.join(tasks or [])}")
        dense_acc = accuracy(model)  # the model ends dense
        meta.update(
            dense_mean_acc=dense_acc[0] if dense_acc else None,
            dense_mean_acc_stderr=dense_acc[1] if dense_acc else None,
        )
    meta["complete"] = True
    paths = write_sweep(args.out, dense, points, meta)
    if not args.json:
        print("\n".join(format_table(dense, points, meta.get("dense_mean_acc"))))
        print("\nwrote " + ", ".join(paths.values()))
    return {**meta, "dense_token_perplexity": dense, "points": [p.__dict__ for p in points], "files": paths}
