"""Sequential threshold calibration with bounded memory.

Later layers are calibrated on inputs that earlier, already-calibrated layers have sparsified.

How: the model's stack of decoder blocks (the outermost ``nn.ModuleList`` holding every target) is
found, and block inputs are captured once. Then, block by block, the target Linears are visited in
*groups*: consecutive calls on the same input tensor (q/k/v; o; gate/up; down in a Llama block), found
by tracing the block once. For each group the block is re-run over the cached calibration inputs,
stopping right after the group's last layer, with earlier groups already sparsifying; then the
group's thresholds are fixed. A final pass produces the block's sparsified outputs, which are the
next block's inputs. Memory is one block's inputs and outputs for the calibration set, never all
layers' activations.

Models without such a stack (or targets outside it) fall back to running the whole model per group:
slower, same semantics.

The model is only touched through temporary forward pre-hooks, removed in all cases: on error it is
left exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .data import Batch
from .errors import CalibrationError
from .forward import (
    calibration_tokens,
    call_model,
    eval_mode,
    find_block_stack,
    input_hooks,
    leading_batches,
    next_token_nll,
    real_tokens,
)
from .methods import Collector, MethodConfig
from .offload import execution_device, model_device
from .rule import SparsityParams, dense_equivalent_input, drop_mask, lowrank_term

__all__ = [
    "calibrate_thresholds",
    "CalibrationResult",
    "StageContext",
    "as_params",
    "next_token_nll",
    "real_tokens",
    "leading_batches",
]


class _StopForward(Exception):
    pass


class _Hooks:
    """Forward pre-hooks on the target Linears: sparsify calibrated layers, collect for the group."""

    def __init__(self, modules: dict[str, nn.Linear]):
        self.modules = modules
        self.params: dict[str, tuple] = {}  # name -> (τ, μ, scale, topk) on the layer's device
        self.lowrank: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (U, V), fp32, its device
        self._lowrank_out: dict[str, torch.Tensor] = {}  # name -> U·V·d of its current call
        self.collectors: dict[str, Collector] = {}
        self.stop_after: str | None = None
        self.token_mask: torch.Tensor | None = None
        self.batch_index = 0
        self.trace: list[tuple[str, torch.Tensor]] | None = None

    @contextmanager
    def installed(self) -> Iterator[_Hooks]:
        handles = [m.register_forward_hook(partial(self._add_lowrank, n)) for n, m in self.modules.items()]
        try:
            with input_hooks(self.modules, self._hook):
                yield self
        finally:
            for h in handles:
                h.remove()
            self._lowrank_out.clear()

    def _add_lowrank(self, name: str, module: nn.Module, args: tuple, y: torch.Tensor) -> torch.Tensor | None:
        """A calibrated layer with low-rank factors: its dropped entries' ``U·V·d`` added to the dense output,
        as ``SparseLinear`` computes it (the input hook, which sees the original input, made it)."""
        extra = self._lowrank_out.pop(name, None)
        return None if extra is None else y + extra.to(y.dtype)

    def _hook(self, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        if self.trace is not None:
            self.trace.append((name, x))
        collector = self.collectors.get(name)
        if collector is not None:
            collector.update(calibration_tokens(x, self.token_mask, name, self.batch_index))
            if name == self.stop_after:
                raise _StopForward
        p = self.params.get(name)
        if p is None:
            return None
        factors = self.lowrank.get(name)
        if factors is not None:
            d = x.float() - (0.0 if p[1] is None else p[1])
            self._lowrank_out[name] = lowrank_term(d, drop_mask(x, *p), *factors)
        return dense_equivalent_input(x, *p)

    def set_params(self, name: str, p: SparsityParams) -> None:
        dev = execution_device(self.modules[name]) or torch.device("cpu")  # not meta: offloaded weights rest there
        self.params[name] = (
            torch.tensor(p.threshold, dtype=torch.float32, device=dev),
            p.shift if p.shift != 0.0 else None,
            None if p.scale is None else p.scale.to(dev, torch.float32),
            p.topk,
        )
        if p.lowrank is not None:  # R-Sparse: the next layers see what the SparseLinear will give them
            self.lowrank[name] = (p.lowrank[0].to(dev, torch.float32), p.lowrank[1].to(dev, torch.float32))
        else:
            self.lowrank.pop(name, None)


class _Stage:
    """A piece of the model that can be re-run on each calibration batch: one block, or all of it.

    ``run(b)`` runs it on batch ``b``; ``advance()`` is called once its layers are calibrated (a block
    then computes its sparsified outputs: the next block's inputs).
    """

    def __init__(self, names: list[str], run: Callable[[int], Any], advance: Callable[[], None], label: str):
        self.names, self.run, self.advance, self.label = names, run, advance, label


def _groups(trace: list[tuple[str, torch.Tensor]], names: Sequence[str]) -> tuple[list[list[str]], bool]:
    """Consecutive calls on the same input object form a group. Also: may we stop early?"""
    wanted = set(names)
    groups: list[list[str]] = []
    seen: set[str] = set()
    prev = None
    called_once = True
    for name, x in trace:
        if name not in wanted:
            prev = x
            continue
        if name in seen:
            called_once = False
            continue
        seen.add(name)
        if groups and x is prev:
            groups[-1].append(name)
        else:
            groups.append([name])
        prev = x
    missing = [n for n in names if n not in seen]
    if missing:
        # not called on the traced batch (an MoE expert it routed no token to): calibrated on what later batches
        # give, one at a time in module order, so that each sees the layers before it sparsified (an expert's
        # down_proj after its gate/up) as every traced group does
        groups.extend([n] for n in missing)
        called_once = False
    return groups, called_once


def _capture_block_inputs(model, blocks: nn.ModuleList, batches, device):
    """Run the model once per batch up to the last block; record each block's call arguments.

    Returns (hidden states into block 0, per-batch per-block (args without hidden, kwargs, positional?))
    or None when the blocks are not a plain sequential stack (then the caller falls back).
    """
    n = len(blocks)
    hidden0: list[torch.Tensor] = []
    rest: list[list[tuple]] = []
    state: dict[str, Any] = {}

    def pre(i, module, args, kwargs):
        positional = len(args) > 0
        h = args[0] if positional else kwargs.get("hidden_states")
        if not isinstance(h, torch.Tensor) or state["next"] != i:
            state["ok"] = False
            raise _StopForward
        if i > 0 and h is not state["out"]:
            state["ok"] = False  # something transforms hidden states between blocks
            raise _StopForward
        other_kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        state["rest"].append((tuple(args[1:]) if positional else tuple(args), other_kwargs, positional))
        if i == 0:
            hidden0.append(h)
        state["next"] = i + 1
        if i == n - 1:
            raise _StopForward

    def post(i, module, args, output):
        state["out"] = output[0] if isinstance(output, (tuple, list)) else output

    handles = [b.register_forward_pre_hook(partial(pre, i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(partial(post, i)) for i, b in enumerate(blocks)]
    try:
        for batch in batches:
            state.update(next=0, out=None, ok=True, rest=[])
            try:
                call_model(model, batch, device)
            except _StopForward:
                pass
            if not state["ok"] or state["next"] != n:
                return None
            rest.append(state["rest"])
    finally:
        for h in handles:
            h.remove()
    return hidden0, rest


def _block_stages(model, prefix, blocks, names, batches, device, hooks):
    captured = _capture_block_inputs(model, blocks, batches, device)
    if captured is None:
        return None
    hidden, rest = captured
    stages = []
    for i, block in enumerate(blocks):
        block_names = [n for n in names if n.startswith(f"{prefix}.{i}.")]

        def run(b, i=i, block=block):
            hooks.token_mask = batches[b].token_mask
            args, kwargs, positional = rest[b][i]
            if positional:
                return block(hidden[b], *args, **kwargs)
            return block(*args, hidden_states=hidden[b], **kwargs)

        def advance(i=i, run=run):
            for b in range(len(batches)):
                hooks.batch_index = b
                out = run(b)
                hidden[b] = out[0] if isinstance(out, (tuple, list)) else out

        stages.append(_Stage(block_names, run, advance, f"block {i + 1}/{len(blocks)}"))
    return stages


def _whole_model_stage(model, names, batches, device, hooks):
    def run(b):
        hooks.token_mask = batches[b].token_mask
        return call_model(model, batches[b], device)

    return [_Stage(list(names), run, lambda: None, "whole model")]


class StageContext:
    """What a method's ``allocate()`` may do with one stage (a block, or the whole model).

    ``names`` are the stage's target layers in execution order and ``targets`` their requested sparsities.
    ``collect(collectors)`` feeds each named collector its layer's inputs over the calibration batches
    (earlier stages sparsified, this stage's layers dense unless ``params`` says otherwise);
    ``outputs(params)`` runs the stage with ``{name: SparsityParams}`` applied to this stage's layers and
    returns its outputs per batch (e.g. to compare with the dense outputs, ``outputs({})``).
    """

    def __init__(self, stage: _Stage, hooks: _Hooks, targets: dict[str, float], batches: list[Batch], modules):
        self.names = list(stage.names)
        self._batches = batches
        self.targets = {n: targets[n] for n in self.names}
        self.modules = {n: modules[n] for n in self.names}
        self._stage, self._hooks, self._n = stage, hooks, len(batches)

    def batches_for(self, tokens: int | None) -> int:
        """How many leading calibration batches hold at least ``tokens`` real tokens (all when None)."""
        return leading_batches(self._batches, tokens)

    @contextmanager
    def _applied(self, params: dict[str, SparsityParams]):
        hooks = self._hooks
        saved = {n: hooks.params.pop(n) for n in self.names if n in hooks.params}
        saved_lowrank = {n: hooks.lowrank.pop(n) for n in self.names if n in hooks.lowrank}
        try:
            for n, p in params.items():
                hooks.set_params(n, p)
            yield
        finally:
            for n in self.names:
                hooks.params.pop(n, None)
                hooks.lowrank.pop(n, None)
            hooks.params.update(saved)
            hooks.lowrank.update(saved_lowrank)

    def collect(
        self,
        collectors: dict[str, Collector],
        params: dict[str, SparsityParams] | None = None,
        batches: int | None = None,
    ) -> None:
        with self._applied(params or {}):
            self._hooks.collectors = collectors
            try:
                for b in range(min(self._n, batches or self._n)):
                    self._hooks.batch_index = b
                    self._stage.run(b)
            finally:
                self._hooks.collectors = {}

    def outputs(self, params: dict[str, SparsityParams], batches: int | None = None) -> list[torch.Tensor]:
        outs = []
        with self._applied(params):
            for b in range(min(self._n, batches or self._n)):
                self._hooks.batch_index = b
                out = self._stage.run(b)
                out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", out)
                outs.append(out.float())
        return outs


@dataclass
class CalibrationResult:
    """What calibration found: each layer's parameters, and the target sparsity each was fitted to (after
    the method's own allocation, e.g. TEAL's greedy or block budgets)."""

    params: dict[str, SparsityParams]
    targets: dict[str, float]


def as_params(result: float | SparsityParams) -> SparsityParams:
    """A collector's result as :class:`SparsityParams` (a bare float is a threshold)."""
    return result if isinstance(result, SparsityParams) else SparsityParams(float(result))


@torch.no_grad()
def calibrate_thresholds(
    model: nn.Module,
    batches: list[Batch],
    targets: dict[str, float],
    method: MethodConfig,
    *,
    progress: bool = True,
) -> CalibrationResult:
    """Calibrate every target Linear of ``targets`` (name -> requested sparsity) with ``method``.

    Per-layer methods: ``method.plan`` may re-distribute the targets first, ``method.allocate`` inside each
    stage (block-wise greedy allocation) before its thresholds are fitted, sequentially. Whole-model
    searches (``method.searches()``): ``method.calibrate_model`` gives the parameters. ``targets`` is not
    modified; the result holds the parameters and the per-layer targets they were fitted to.
    """
    modules = dict(model.named_modules())
    linears = {n: modules[n] for n in targets}
    device = model_device(model)
    hooks = _Hooks(linears)
    targets = dict(targets)
    results: dict[str, SparsityParams] = {}
    with eval_mode(model):
        targets.update(method.plan(model, batches, dict(targets), device, progress=progress))
        if method.searches():
            found = method.calibrate_model(model, batches, dict(targets), device, progress=progress)
            missing = [n for n in targets if n not in found]
            if missing:
                raise CalibrationError(f"method {method.name!r} returned no parameters for {missing[0]!r}")
            for n in targets:
                found[n].validate(linears[n].in_features, n, linears[n].out_features)
            return CalibrationResult({n: found[n] for n in targets}, targets)
        with hooks.installed():
            stack = find_block_stack(model, list(targets))
            stages = None
            if stack is not None:
                stages = _block_stages(model, *stack, list(targets), batches, device, hooks)
            if stages is None:
                stages = _whole_model_stage(model, list(targets), batches, device, hooks)
            bar = tqdm(stages, desc="calibrating", unit="block", disable=not progress)
            for stage in bar:
                bar.set_postfix_str(stage.label)
                if stage.names:
                    targets.update(method.allocate(StageContext(stage, hooks, targets, batches, modules)))
                    _calibrate_stage(stage, targets, method, linears, hooks, len(batches), results)
                stage.advance()
    return CalibrationResult({n: results[n] for n in targets}, targets)


def _wants_another_pass(name: str, collector: Collector) -> bool:
    try:
        return bool(collector.next_pass())
    except ValueError as e:
        raise CalibrationError(f"layer {name!r}: {e}; is it reached by the model's forward pass?") from None


def _run_pass(stage: _Stage, hooks: _Hooks, n_batches: int) -> None:
    for b in range(n_batches):
        hooks.batch_index = b
        try:
            stage.run(b)
        except _StopForward:
            pass


def _calibrate_stage(stage: _Stage, targets, method, linears, hooks: _Hooks, n_batches, results):
    hooks.trace = []
    try:
        hooks.batch_index = 0
        stage.run(0)
    finally:
        trace, hooks.trace = hooks.trace, None
    groups, can_stop = _groups(trace, stage.names)
    del trace
    for group in groups:
        made = {n: method.make_collector(n, linears[n], targets[n]) for n in group}
        active = dict(made)
        try:
            while active:  # a collector may ask for another pass over the same data (mode first, then τ)
                hooks.collectors = active
                hooks.stop_after = max(active, key=group.index) if can_stop else None
                _run_pass(stage, hooks, n_batches)
                active = {n: c for n, c in active.items() if _wants_another_pass(n, c)}
        finally:
            hooks.collectors, hooks.stop_after = {}, None
        for n, c in made.items():
            try:
                p = as_params(c.result())
            except ValueError as e:
                raise CalibrationError(
                    f"layer {n!r} saw no calibration tokens ({e}); is it reached by the model's forward pass?"
                ) from None
            if method.topk:  # exact per-token sparsity: keep round((1 - s)·in) entries
                k = linears[n].in_features
                p.topk = k - round(targets[n] * k)
            p.validate(linears[n].in_features, n, linears[n].out_features)
            results[n] = p
            hooks.set_params(n, p)
