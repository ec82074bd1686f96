"""Peak memory of sequential calibration on the embedded model, at several depths (issue 6).

Claim under test (actsparse/calibrate.py): calibration holds one block's inputs and outputs for the
calibration set, never all layers' activations, so its peak memory above the loaded model should not grow
with the number of decoder blocks (only per-layer results, a few bytes to KiB each, may).

For every configuration (depth = first N decoder blocks of SmolLM2-135M, fp32; calibration set = S windows
of L tokens of the embedded corpus; recipe) a FRESH subprocess loads the model, truncates it, builds the
calibration batches exactly like ``actsparse calibrate`` (``_token_batches``: windows of ``--calib-seq-len``,
``--calib-batch-size`` per forward), releases freed heap pages (``gc.collect()`` + ``malloc_trim(0)``), reads
its RSS, resets the kernel's RSS high-water mark (``echo 5 > /proc/self/clear_refs``), starts tracemalloc
and runs ``actsparse.sparsify_`` (calibration + swapping in SparseLinear) with progress off. It reports:

- peak RSS above the RSS right before calibration (``VmHWM`` after - ``VmRSS`` before; if clear_refs is
  not writable, ``ru_maxrss`` is used and the row says so: then the number is only an upper bound);
- tracemalloc's peak (Python-object allocations only: torch tensor storage is not traced);
- yardsticks: model weights, ONE block's activations for the calibration set (tokens x hidden x 4 bytes, in
  and out), and what a non-streaming calibration that keeps every target layer's inputs would hold
  (sum over targets of tokens x in_features x 4 bytes);
- diagnostics taken after the measurement: the bytes of the block-call kwargs that calibrate.py captures
  per batch and per block (position embeddings, masks, ...), unique storages vs. the per-block sum, and the
  size of one threshold collector and of the per-layer results left on the model.

``--malloc strict`` runs the children with a fixed 128 KiB mmap/trim threshold (freed tensors are unmapped at
once, so RSS follows live bytes); ``--malloc trim`` keeps glibc's defaults but calls ``malloc_trim(0)`` after
every calibration phase (what a trim per block inside calibrate.py would give). The child also reads glibc's
own books (``mallinfo2``: bytes in use vs. arena size) after every phase.

Usage (from the repository root; about 8 minutes on 2 idle CPU cores with the default 2 repeats):

    .venv/bin/python benchmarks/calibration_memory.py
    .venv/bin/python benchmarks/calibration_memory.py --depths 6,15,30 --calib-samples 32 --calib-seq-len 256 \
        --vary-samples 16,64 --scope nncf --repeats 2 --malloc default --out benchmarks/results/calibration_memory.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time

MiB = 2**20
RECIPES = {
    "nncf": {".*up_proj.*": 0.3, ".*gate_proj.*": 0.3, ".*down_proj.*": 0.5},
    "all7": {f".*{p}.*": 0.5 for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")},
}


# ------------------------------------------------------------------------------------------ child process
def _status_kib(field: str) -> int | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024  # the reset took effect


class _Peaks:
    """The RSS high-water mark per calibration phase: block-input capture, each block's threshold fitting,
    each block's output pass (advance), and the swap to SparseLinear.

    The mark is read and reset around every phase (``clear_refs``), so ``overall_kib()`` (the maximum of
    every reading) is the peak of the whole call. Wraps private functions of actsparse.calibrate / api in
    this (throw-away) process only.
    """

    def __init__(self, trim: bool = False):
        self.trim = trim  # malloc_trim(0) after every phase: what a trim per block in calibrate.py would give
        self.overall = 0
        self.phases: list[tuple[str, int]] = []
        self.malloc: list[tuple[str, int, int]] = []  # (phase, in use, held) right after each phase
        self._saved: list[tuple[object, str, object]] = []

    def _read(self) -> int:
        h = _status_kib("VmHWM")
        self.overall = max(self.overall, h)
        return h

    def _wrap(self, name, fn):
        def wrapped(*args, **kwargs):
            self._read()
            _reset_hwm()
            try:
                return fn(*args, **kwargs)
            finally:
                self.phases.append((name, self._read()))
                mb = _malloc_bytes()
                if mb is not None:
                    self.malloc.append((name, *mb))
                if self.trim:
                    _malloc_trim()
                _reset_hwm()

        return wrapped

    def _patch(self, owner, attr, name):
        fn = getattr(owner, attr)
        self._saved.append((owner, attr, fn))
        setattr(owner, attr, self._wrap(name, fn))

    def install(self):
        import actsparse.api as api
        import actsparse.calibrate as cal

        self._patch(cal, "_capture_block_inputs", "capture")
        self._patch(cal, "_calibrate_stage", "fit")
        self._patch(api, "apply_thresholds", "apply")
        block_stages = cal._block_stages

        def staged(*args, **kwargs):
            stages = block_stages(*args, **kwargs)
            for s in stages or []:
                s.advance = self._wrap("advance", s.advance)
            return stages

        self._saved.append((cal, "_block_stages", block_stages))
        cal._block_stages = staged

    def uninstall(self):
        for owner, attr, fn in reversed(self._saved):
            setattr(owner, attr, fn)
        self._saved.clear()

    def overall_kib(self) -> int:
        self._read()
        return self.overall

    def summary(self, rss0_kib: int, malloc0: tuple[int, int] | None) -> dict:
        out: dict = {}
        for name, kib in self.phases:
            out.setdefault(name, []).append((kib - rss0_kib) * 1024)
        if malloc0 is not None:  # glibc's own books: live bytes vs bytes it holds, above the baseline
            for name, used, held in self.malloc:
                out.setdefault("malloc_in_use_after_" + name, []).append(used - malloc0[0])
                out.setdefault("malloc_held_after_" + name, []).append(held - malloc0[1])
        return out  # {phase: [peak above baseline, bytes, one per call in order], ...}


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _malloc_bytes() -> tuple[int, int] | None:
    """(bytes in use, bytes held from the OS) by glibc malloc in all arenas, or None without mallinfo2."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    m = fn()
    return m.uordblks + m.hblkhd, m.arena + m.hblkhd


def _malloc_trim() -> bool:
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def truncate(model, depth: int):
    """Keep the first ``depth`` decoder blocks; make the config's per-layer fields agree."""
    import torch.nn as nn

    layers = model.model.layers
    if not 1 <= depth <= len(layers):
        raise ValueError(f"depth must be in [1, {len(layers)}], got {depth}")
    model.model.layers = nn.ModuleList(list(layers)[:depth])
    cfg = model.config
    n = cfg.num_hidden_layers
    cfg.num_hidden_layers = depth
    for key, value in list(vars(cfg).items()):  # layer_types and any other per-layer list
        if isinstance(value, (list, tuple)) and len(value) == n and n != depth:
            setattr(cfg, key, type(value)(value[:depth]))
    return model


def _unique_bytes(tensors) -> tuple[int, int]:
    """(bytes of distinct storages, bytes counting every reference) of the tensors."""
    seen, unique, total = set(), 0, 0
    for t in tensors:
        nbytes = t.untyped_storage().nbytes()
        total += nbytes
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            unique += nbytes
    return unique, total


def _tensors_in(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors_in(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors_in(o)


def child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(2)
    from actsparse import SparsifyConfig, TargetScope, sparsify_  # (quiets torchao's import-time warnings)
    from actsparse.cli.common import token_batches
    from actsparse.data import load_corpus
    from actsparse.models import load_model
    from actsparse.scope import resolve_targets

    t0 = time.perf_counter()
    model, tokenizer = load_model(None)
    load_s = time.perf_counter() - t0
    full_blocks = len(model.model.layers)
    truncate(model, spec["depth"])
    corpus = load_corpus("embedded")
    data = token_batches(tokenizer, corpus.calibration, spec["samples"], spec["seq_len"], spec["batch_size"])
    tokens = sum(d.numel() for d in data)
    if data[0].shape[1] != spec["seq_len"] or len(data) * spec["batch_size"] < spec["samples"]:
        raise SystemExit(f"the embedded corpus has too few tokens for {spec['samples']} x {spec['seq_len']}")
    config = SparsifyConfig(
        {TargetScope(patterns=[p]): s for p, s in RECIPES[spec["scope"]].items()}, method="quantile"
    )
    targets = resolve_targets(model, config.target_sparsity_by_scope, None)
    modules = dict(model.named_modules())
    cfg = model.config
    hidden = cfg.hidden_size
    seen, weight_bytes = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            weight_bytes += p.numel() * p.element_size()
    block_weight_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    all_inputs_bytes = sum(tokens * modules[n].in_features * 4 for n in targets)

    # ---- the measurement
    del corpus
    gc.collect()
    trimmed = _malloc_trim()
    rss0 = _status_kib("VmRSS")
    malloc0 = _malloc_bytes()
    hwm_reset = _reset_hwm()
    peaks = _Peaks(spec.get("trim", False)) if hwm_reset and (spec.get("phases", True) or spec.get("trim")) else None
    if peaks is not None:
        peaks.install()
    import tracemalloc

    tracemalloc.start()
    t = time.perf_counter()
    sparsify_(model, config, data, progress=False)
    calib_s = time.perf_counter() - t
    _, tm_peak = tracemalloc.get_traced_memory()
    tm_overhead = tracemalloc.get_tracemalloc_memory()
    tracemalloc.stop()
    if peaks is not None:
        peaks.uninstall()
        peak_kib, peak_source = peaks.overall_kib(), "VmHWM after clear_refs=5 (reset between phases)"
    elif hwm_reset:
        peak_kib, peak_source = _status_kib("VmHWM"), "VmHWM after clear_refs=5"
    else:  # ru_maxrss is the whole process's peak (KiB on Linux): includes model loading, an upper bound only
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_source = "ru_maxrss (clear_refs not writable: whole-process peak, an upper bound)"
    rss1 = _status_kib("VmRSS")

    # ---- diagnostics (after the measurement, not part of it)
    from actsparse.api import remove_sparsity, sparse_layers
    from actsparse.calibrate import _capture_block_inputs
    from actsparse.data import prepare_batches
    from actsparse.methods import method_from_spec

    layers = sparse_layers(model)
    result_bytes = sum(b.numel() * b.element_size() for m in layers.values() for b in m.buffers())
    remove_sparsity(model)
    collector = method_from_spec("quantile").make_collector(next(iter(targets)), modules[next(iter(targets))], 0.5)
    collector_bytes = sum(t.numel() * t.element_size() for t in vars(collector).values() if torch.is_tensor(t))
    with torch.no_grad():
        captured = _capture_block_inputs(model, model.model.layers, prepare_batches(data), torch.device("cpu"))
    kw_unique = kw_per_block = hidden0_bytes = 0
    kw_keys: list[str] = []
    if captured is not None:
        hidden0, rest = captured
        hidden0_bytes = sum(h.numel() * h.element_size() for h in hidden0)
        kw_unique, kw_per_block = _unique_bytes(_tensors_in(rest))
        kw_keys = sorted(
            {
                k
                for per_batch in rest
                for _, kw, _ in per_batch
                for k, v in kw.items()
                if any(True for _ in _tensors_in(v))
            }
        )
    del captured

    return {
        "depth": spec["depth"],
        "full_model_blocks": full_blocks,
        "scope": spec["scope"],
        "calib_samples": spec["samples"],
        "calib_seq_len": spec["seq_len"],
        "calib_batch_size": spec["batch_size"],
        "calib_batches": len(data),
        "calib_tokens": tokens,
        "target_layers": len(targets),
        "hidden_size": hidden,
        "weights_bytes": weight_bytes,
        "block_weights_bytes": block_weight_bytes,
        "one_block_activation_bytes": 2 * tokens * hidden * 4,
        "all_layers_inputs_bytes": all_inputs_bytes,
        "rss_before_kib": rss0,
        "rss_after_kib": rss1,
        "peak_rss_kib": peak_kib,
        "peak_source": peak_source,
        "peak_rss_above_baseline_bytes": (peak_kib - rss0) * 1024,
        "retained_rss_bytes": (rss1 - rss0) * 1024,
        "malloc_trim_released": trimmed,
        "tracemalloc_peak_bytes": tm_peak,
        "tracemalloc_own_bytes_at_end": tm_overhead,
        "per_layer_results_bytes": result_bytes,
        "collector_bytes": collector_bytes,
        "captured_kwargs_unique_bytes": kw_unique,
        "captured_kwargs_per_block_sum_bytes": kw_per_block,
        "captured_kwargs_tensor_keys": kw_keys,
        "captured_hidden0_bytes": hidden0_bytes,
        "load_seconds": load_s,
        "calibration_seconds": calib_s,
        "phases": None if peaks is None else peaks.summary(rss0, malloc0),
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "malloc_trim_per_phase": bool(peaks is not None and peaks.trim),
    }


# ------------------------------------------------------------------------------------------ parent process
STRICT_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _cpu_info() -> dict:
    info = {"machine": platform.machine(), "os_cpu_count": os.cpu_count()}
    try:
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["model_name"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["mem_total_kib"] = int(f.readline().split()[1])
    except OSError:
        pass
    return info


def _versions() -> dict:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch, transformers, sys; "
            "print(torch.__version__, transformers.__version__, sys.version.split()[0])",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return {"torch": out[0], "transformers": out[1], "python": out[2], "glibc": "-".join(platform.libc_ver())}


def run_child(spec: dict, env: dict) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=root, env={**os.environ, **env})
    if proc.returncode != 0:
        raise SystemExit(f"child {spec} failed with exit status {proc.returncode}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT ") :])


def _mib(b: float) -> float:
    return b / MiB


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def _slope(xs, ys) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else float("nan")


def aggregate(rows: list[dict]) -> list[dict]:
    """One entry per (depth, calibration set): medians over the repeats (fresh processes), and the range."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["depth"], r["calib_tokens"]), []).append(r)
    out = []
    for _key, rs in sorted(groups.items()):
        peaks = [r["peak_rss_above_baseline_bytes"] for r in rs]
        a = {
            k: rs[0][k]
            for k in (
                "depth",
                "target_layers",
                "weights_bytes",
                "block_weights_bytes",
                "calib_samples",
                "calib_seq_len",
                "calib_batches",
                "calib_tokens",
                "one_block_activation_bytes",
                "all_layers_inputs_bytes",
                "per_layer_results_bytes",
                "collector_bytes",
                "captured_kwargs_unique_bytes",
                "captured_kwargs_per_block_sum_bytes",
                "captured_kwargs_tensor_keys",
                "captured_hidden0_bytes",
                "peak_source",
            )
        }
        a.update(
            repeats=len(rs),
            peak_rss_bytes=_median(peaks),
            peak_rss_min_bytes=min(peaks),
            peak_rss_max_bytes=max(peaks),
            tracemalloc_peak_bytes=_median([r["tracemalloc_peak_bytes"] for r in rs]),
            retained_rss_bytes=_median([r["retained_rss_bytes"] for r in rs]),
            calibration_seconds=_median([r["calibration_seconds"] for r in rs]),
        )
        if all(r.get("phases") for r in rs):
            ph = [r["phases"] for r in rs]
            a["phase_peaks_bytes"] = {
                "capture": _median([p["capture"][0] for p in ph]),
                "fit_first_block": _median([p["fit"][0] for p in ph]),
                "fit_last_block": _median([p["fit"][-1] for p in ph]),
                "fit_max": _median([max(p["fit"]) for p in ph]),
                "advance_max": _median([max(p["advance"]) for p in ph]),
                "apply": _median([p["apply"][0] for p in ph]),
                "fit_slope_bytes_per_block": _median(
                    [_slope(range(len(p["fit"])), p["fit"]) if len(p["fit"]) > 1 else 0.0 for p in ph]
                ),
            }
            if all("malloc_in_use_after_fit" in p for p in ph):
                for kind in ("in_use", "held"):
                    key = f"malloc_{kind}_after_fit"
                    a["phase_peaks_bytes"][f"malloc_{kind}_after_fit_first"] = _median([p[key][0] for p in ph])
                    a["phase_peaks_bytes"][f"malloc_{kind}_after_fit_last"] = _median([p[key][-1] for p in ph])
        out.append(a)
    return out


def table(aggs: list[dict]) -> list[str]:
    out = [
        f"{'depth':>6} {'target':>6} {'weights':>8} {'calib':>9} {'peak RSS above baseline':>24} "
        f"{'tracemalloc':>11} {'1 block':>8} {'all-layer':>10} {'calib':>6}",
        f"{'blocks':>6} {'layers':>6} {'MiB':>8} {'tokens':>9} {'MiB (min-max)':>24} "
        f"{'peak MiB':>11} {'act MiB':>8} {'inputs MiB':>10} {'s':>6}",
    ]
    for a in aggs:
        toks = f"{a['calib_samples']}x{a['calib_seq_len']}"
        peak = f"{_mib(a['peak_rss_bytes']):.1f}"
        if a["repeats"] > 1:
            peak += f" ({_mib(a['peak_rss_min_bytes']):.0f}-{_mib(a['peak_rss_max_bytes']):.0f})"
        out.append(
            f"{a['depth']:>6} {a['target_layers']:>6} {_mib(a['weights_bytes']):>8.1f} {toks:>9} {peak:>24} "
            f"{_mib(a['tracemalloc_peak_bytes']):>11.2f} {_mib(a['one_block_activation_bytes']):>8.1f} "
            f"{_mib(a['all_layers_inputs_bytes']):>10.1f} {a['calibration_seconds']:>6.1f}"
        )
    return out


def phase_table(aggs: list[dict]) -> list[str]:
    if not all("phase_peaks_bytes" in a for a in aggs):
        return []
    out = [
        "peak RSS above baseline per phase, MiB (median over repeats):",
        f"{'depth':>6} {'calib':>9} {'capture':>8} {'fit blk 1':>10} {'fit last':>9} {'fit max':>8} "
        f"{'fit slope':>10} {'output':>8} {'apply':>6} {'retained':>9} {'malloc live/arena':>17}",
        f"{'blocks':>6} {'tokens':>9} {'inputs':>8} {'':>10} {'block':>9} {'':>8} {'/block':>10} "
        f"{'pass max':>8} {'':>6} {'after':>9} {'after fit 1 -> last':>19}",
    ]
    for a in aggs:
        p = a["phase_peaks_bytes"]
        toks = f"{a['calib_samples']}x{a['calib_seq_len']}"
        out.append(
            f"{a['depth']:>6} {toks:>9} {_mib(p['capture']):>8.1f} {_mib(p['fit_first_block']):>10.1f} "
            f"{_mib(p['fit_last_block']):>9.1f} {_mib(p['fit_max']):>8.1f} "
            f"{_mib(p['fit_slope_bytes_per_block']):>+10.2f} {_mib(p['advance_max']):>8.1f} "
            f"{_mib(p['apply']):>6.1f} {_mib(a['retained_rss_bytes']):>9.1f}"
            + (
                f" {_mib(p['malloc_in_use_after_fit_first']):.0f}/{_mib(p['malloc_held_after_fit_first']):.0f}"
                f" -> {_mib(p['malloc_in_use_after_fit_last']):.0f}/{_mib(p['malloc_held_after_fit_last']):.0f}"
                if "malloc_in_use_after_fit_first" in p
                else ""
            )
        )
    return out


def summary(aggs: list[dict], samples: int) -> tuple[list[str], dict]:
    lines, out = [], {}
    by_depth = [a for a in aggs if a["calib_samples"] == samples]
    if len(by_depth) >= 2:
        lo, hi = by_depth[0], by_depth[-1]
        pk = [a["peak_rss_bytes"] for a in by_depth]
        slope = _slope([a["depth"] for a in by_depth], pk)
        ratio = hi["peak_rss_bytes"] / lo["peak_rss_bytes"]
        tm = hi["tracemalloc_peak_bytes"] / max(lo["tracemalloc_peak_bytes"], 1)
        nonstream = hi["all_layers_inputs_bytes"] / lo["all_layers_inputs_bytes"]
        out["depth"] = {
            "shallow": lo["depth"],
            "deep": hi["depth"],
            "depth_ratio": hi["depth"] / lo["depth"],
            "peak_rss_ratio": ratio,
            "peak_rss_slope_bytes_per_block": slope,
            "tracemalloc_peak_ratio": tm,
            "weights_ratio": hi["weights_bytes"] / lo["weights_bytes"],
            "all_layers_inputs_ratio": nonstream,
        }
        lines.append(
            f"depth {lo['depth']} -> {hi['depth']} blocks (x{hi['depth'] / lo['depth']:.2f}), "
            f"{samples}x{lo['calib_seq_len']} tokens: peak RSS above baseline x{ratio:.2f} "
            f"({_mib(lo['peak_rss_bytes']):.1f} -> {_mib(hi['peak_rss_bytes']):.1f} MiB, median of "
            f"{lo['repeats']}; least-squares {_mib(slope):+.2f} MiB per block); tracemalloc peak x{tm:.2f} "
            f"({_mib(lo['tracemalloc_peak_bytes']):.2f} -> {_mib(hi['tracemalloc_peak_bytes']):.2f} MiB); "
            f"a calibration keeping every target layer's inputs would grow x{nonstream:.2f} "
            f"({_mib(lo['all_layers_inputs_bytes']):.0f} -> {_mib(hi['all_layers_inputs_bytes']):.0f} MiB)"
        )
        p = hi.get("phase_peaks_bytes")
        if p:
            lines.append(
                f"at depth {hi['depth']}: peak while fitting block 1 {_mib(p['fit_first_block']):.1f} MiB, "
                f"block {hi['depth']} {_mib(p['fit_last_block']):.1f} MiB (least-squares "
                f"{_mib(p['fit_slope_bytes_per_block']) * 1024:+.1f} KiB per block over the blocks of one run)"
                + (
                    f"; glibc's live bytes right after fitting block 1 / block {hi['depth']}: "
                    f"{_mib(p['malloc_in_use_after_fit_first']):+.1f} / "
                    f"{_mib(p['malloc_in_use_after_fit_last']):+.1f} MiB, size of its arenas (mapped, not all "
                    f"resident) {_mib(p['malloc_held_after_fit_first']):+.1f} / "
                    f"{_mib(p['malloc_held_after_fit_last']):+.1f}"
                    f" MiB (above the baseline)"
                    if "malloc_in_use_after_fit_first" in p
                    else ""
                )
            )
        lines.append(
            f"per-layer results left on the model: {hi['per_layer_results_bytes'] / hi['target_layers']:.0f} "
            f"bytes per layer ({hi['per_layer_results_bytes'] / 1024:.2f} KiB for {hi['target_layers']} "
            f"layers); one threshold collector (histogram) {hi['collector_bytes'] / 1024:.0f} KiB, alive only "
            f"while its group (at most 2 layers) is fitted"
        )
        lines.append(
            f"captured block-call kwargs ({', '.join(hi['captured_kwargs_tensor_keys']) or 'no tensors'}): "
            f"{_mib(hi['captured_kwargs_unique_bytes']):.2f} MiB in distinct storages vs "
            f"{_mib(hi['captured_kwargs_per_block_sum_bytes']):.2f} MiB counted once per block "
            f"({hi['depth']} blocks): shared by reference, not copied per block; block-0 inputs "
            f"{_mib(hi['captured_hidden0_bytes']):.1f} MiB"
        )
    for d in sorted({a["depth"] for a in aggs if a["calib_samples"] != samples}):
        by_tok = [a for a in aggs if a["depth"] == d]
        if len(by_tok) >= 2:
            xs = [a["calib_tokens"] for a in by_tok]
            ys = [a["peak_rss_bytes"] for a in by_tok]
            slope = _slope(xs, ys)
            per_tok = by_tok[0]["one_block_activation_bytes"] / by_tok[0]["calib_tokens"]
            out[f"tokens_depth{d}"] = {
                "tokens": xs,
                "peak_rss_bytes": ys,
                "slope_bytes_per_token": slope,
                "one_block_activation_bytes_per_token": per_tok,
            }
            lines.append(
                f"depth {d}: calibration tokens {' -> '.join(map(str, xs))}: peak RSS "
                f"{' -> '.join(f'{_mib(y):.1f}' for y in ys)} MiB; least-squares {slope:.0f} bytes per "
                f"token = {slope / per_tok:.2f} x one block's in+out activations ({per_tok:.0f} bytes/token)"
            )
    return lines, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depths", default="6,15,30", help="decoder blocks to keep, comma-separated (default 6,15,30)")
    ap.add_argument("--calib-samples", type=int, default=32, help="calibration windows (default 32)")
    ap.add_argument("--calib-seq-len", type=int, default=256, help="tokens per window (default 256)")
    ap.add_argument("--calib-batch-size", type=int, default=8, help="windows per forward pass (default 8, as the CLI)")
    ap.add_argument(
        "--vary-samples",
        default="16,64",
        help="extra calibration window counts, run at --vary-depth (default 16,64; '' for none)",
    )
    ap.add_argument("--vary-depth", type=int, default=None, help="depth for --vary-samples (default: the smallest)")
    ap.add_argument(
        "--scope",
        choices=sorted(RECIPES),
        default="nncf",
        help="nncf: up/gate 0.3 + down 0.5 (default); all7: all seven projections at 0.5",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="fresh processes per configuration; the table shows the median (default 2)",
    )
    ap.add_argument(
        "--malloc",
        choices=["default", "strict", "trim"],
        default="default",
        help="default: glibc as configured; strict: children run with "
        + " ".join(f"{k}={v}" for k, v in STRICT_MALLOC.items())
        + " (freed tensors go back to the OS at once: RSS follows live bytes more closely); "
        "trim: default glibc, but malloc_trim(0) after every calibration phase (capture, each "
        "block's fit and output pass): what a trim per block in calibrate.py would give",
    )
    ap.add_argument("--no-phases", action="store_true", help="do not record the peak per calibration phase")
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "calibration_memory.json")
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return 0

    depths = sorted(_ints(args.depths))
    vary = _ints(args.vary_samples)
    vary_depth = args.vary_depth if args.vary_depth is not None else min(depths)
    base = {
        "seq_len": args.calib_seq_len,
        "batch_size": args.calib_batch_size,
        "scope": args.scope,
        "phases": not args.no_phases,
        "trim": args.malloc == "trim",
    }
    specs = [{**base, "depth": d, "samples": args.calib_samples} for d in depths]
    specs += [{**base, "depth": vary_depth, "samples": s} for s in vary if s != args.calib_samples]
    env = STRICT_MALLOC if args.malloc == "strict" else {}
    rows = []
    for rep in range(args.repeats):
        for spec in specs:
            t = time.perf_counter()
            r = run_child(spec, env)
            r["repeat"] = rep
            rows.append(r)
            print(
                f"  [{rep + 1}/{args.repeats}] depth {r['depth']:>2}, {r['calib_samples']}x{r['calib_seq_len']}: "
                f"peak RSS above baseline {_mib(r['peak_rss_above_baseline_bytes']):.1f} MiB, tracemalloc "
                f"{_mib(r['tracemalloc_peak_bytes']):.2f} MiB, calibration {r['calibration_seconds']:.1f} s "
                f"({time.perf_counter() - t:.0f} s in all)",
                flush=True,
            )
    aggs = aggregate(rows)
    lines = table(aggs)
    phases = phase_table(aggs)
    notes, ratios = summary(aggs, args.calib_samples)
    title = (
        f"calibration memory: embedded SmolLM2-135M fp32, scope {args.scope}, method quantile, "
        f"{args.calib_batch_size} windows per forward, malloc {args.malloc}, {args.repeats} fresh process(es) "
        f"per row; peak = {rows[0]['peak_source']}"
    )
    print("\n" + title)
    print("\n".join(lines))
    if phases:
        print("\n" + "\n".join(phases))
    print("\n" + "\n".join(notes))
    meta = {
        "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": _cpu_info(),
        "versions": _versions(),
        "scope": args.scope,
        "recipe": RECIPES[args.scope],
        "method": "quantile",
        "torch_threads": 2,
        "malloc": args.malloc,
        "malloc_env": env,
        "repeats": args.repeats,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {
                "meta": meta,
                "summary": ratios,
                "aggregate": aggs,
                "rows": rows,
                "printed": [title, *lines, "", *phases, "", *notes],
            },
            f,
            indent=2,
        )
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
