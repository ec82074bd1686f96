"""``actsparse calibrate``: calibrate thresholds, save them, report the activation ratio per layer."""

from __future__ import annotations

from typing import Any

import torch

from ..config import SparsifyConfig
from ..errors import UsageError
from ..eval.plots import plot_activation_ratio
from ..eval.sparsity import SparsityMonitor
from ..eval.sweep import weighted_sparsity
from ..io import save_thresholds
from ..methods.scap import export_scap_json
from ..offload import model_device
from ..sparse_linear import sparse_layers
from .args import NNCF_RECIPE, add_calib_args, add_model_args, add_rotate_inputs_arg
from .common import calibrate, load_all


def register(sub) -> None:
    cal = sub.add_parser("calibrate", help="calibrate thresholds and save them")
    add_model_args(cal)
    add_calib_args(cal, NNCF_RECIPE)
    cal.add_argument("--out", default="thresholds.safetensors", help="output file (default thresholds.safetensors)")
    add_rotate_inputs_arg(cal)  # the file keeps the rotations; --thresholds folds them into the checkpoint
    cal.add_argument(
        "--plot",
        default=None,
        metavar="PNG",
        help="save the per-layer activation ratio on the calibration data (Sparsing Law's plot)",
    )
    cal.add_argument("--per-layer", action="store_true", help="print every layer's threshold and activation ratio")
    cal.add_argument(
        "--export-scap",
        default=None,
        metavar="JSON",
        help="also write SCAP's calibrated_thresholds.json (threshold/shift methods only)",
    )


def calibration_report(args, model, batches: list[torch.Tensor]) -> dict[str, Any]:
    """Activation ratio (1 - measured sparsity) per layer on the calibration data, thresholds, PPL ratio (pplp)."""
    with SparsityMonitor(model) as mon, torch.no_grad():
        for batch in batches:
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
        report["plot"] = plot_activation_ratio(
            args.plot, report["activation_ratio"], title=f"{args.model}: activation ratio per layer"
        )
        if report["plot"] is None:
            raise UsageError("--plot needs matplotlib: pip install matplotlib")
    return report


def run(args, config: SparsifyConfig | None) -> dict[str, Any]:
    model, tokenizer, corpus = load_all(args)
    assert config is not None  # main() builds it for every command with the calibration flags
    cal, batches = calibrate(args, config, model, tokenizer, corpus)
    path = save_thresholds(model, args.out, extra={"calibration": cal, "data": corpus.name})
    cal["out"] = path
    if args.export_scap:
        cal["scap_json"] = export_scap_json(model, args.export_scap)
    cal.update(calibration_report(args, model, batches))
    cal["layers"] = len(sparse_layers(model))
    if not args.json:
        print(
            f"calibrated {cal['layers']} layers on {cal['calibration_tokens']} tokens in "
            f"{cal['calibration_seconds']:.1f} s; thresholds saved to {path}"
        )
        print(
            f"average activation ratio on the calibration data: {cal['average_activation_ratio']:.3f} "
            f"(weighted by layer size: {cal['weighted_activation_ratio']:.3f})"
        )
        if "ppl_ratio" in cal:
            print(f"PPL ratio on the calibration data: {cal['ppl_ratio']:.4f} (shared CETT {cal['cett']:.4g})")
        if args.per_layer:
            for n, tau in cal["thresholds"].items():
                print(f"  {n:<48} threshold {tau:.6g}  activation ratio {cal['activation_ratio'][n]:.3f}")
        if "plot" in cal:
            print(f"activation-ratio plot: {cal['plot']}")
    return cal
