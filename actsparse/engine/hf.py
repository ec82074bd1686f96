"""What the decoder needs to know about transformers models: forward arguments across versions, EOS ids,
a static cache that a CUDA graph can hold, why a model cannot be captured, and what a captured graph
depends on (so that a change triggers a new capture)."""

from __future__ import annotations

import functools
import inspect
import itertools
import types
import warnings
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn as nn
from transformers.cache_utils import StaticCache, StaticLayer

__all__ = [
    "output_cache",
    "forward_kwargs",
    "eos_token_ids",
    "warn_unapplied_generation_settings",
    "make_static_cache",
    "OneCounterLayer",
    "ONE_COUNTER_MODELS",
    "not_capturable",
    "structure_key",
    "hooks_key",
    "has_hooks",
    "output_capturing_index",
    "code_key",
    "forward_key",
    "compile_form",
    "own_code",
    "EAGER_NUMERICS",
]


@functools.lru_cache(maxsize=64)
def _forward_params(forward: Callable) -> frozenset[str]:
    return frozenset(inspect.signature(forward).parameters)


def forward_kwargs(model: nn.Module, cache: Any, *, last_only: bool = True) -> dict[str, Any]:
    """Keyword arguments for ``model(ids, **kwargs)`` with a KV ``cache``: transformers >= 5.2x names it
    ``cache``, earlier versions ``past_key_values``; ``logits_to_keep=1`` where the forward takes it."""
    params = _forward_params(getattr(model.forward, "__func__", model.forward))
    kwargs: dict[str, Any] = {"use_cache": True}
    if cache is not None:
        kwargs["cache" if "cache" in params else "past_key_values"] = cache
    if last_only and "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1  # only the last position's logits are needed (lm_head sees one row)
    return kwargs


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned, or None: ``output.cache`` in transformers >= 5.2x (whose
    ``past_key_values`` property warns that the name is deprecated), ``output.past_key_values`` before."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def eos_token_ids(model: nn.Module, tokenizer: Any = None) -> tuple[int, ...]:
    """The model's EOS token ids in their order (generation config first, then the tokenizer's; the first is
    what ``generate`` pads finished rows with when there is no pad token); empty when it has none."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(dict.fromkeys(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])))


# generation_config settings model.generate applies to greedy decoding too (logits processors), with the
# values that turn each off; the Decoder and the eager loop pick the argmax of the raw logits
_GREEDY_PROCESSORS: dict[str, tuple[Any, ...]] = {
    "repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None, []),
    "suppress_tokens": (None, []),
    "begin_suppress_tokens": (None, []),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "sequence_bias": (None, {}),
    "exponential_decay_length_penalty": (None,),
}


def warn_unapplied_generation_settings(model: nn.Module, who: str) -> dict[str, Any]:
    """Warn (and return them) when the model's ``generation_config`` sets logits processors that
    ``model.generate`` applies even to greedy decoding and ``who`` does not (e.g. Qwen2.5's
    ``repetition_penalty=1.05``): its tokens can then differ from ``model.generate``'s."""
    cfg = getattr(model, "generation_config", None)
    found = {k: v for k, off in _GREEDY_PROCESSORS.items() if (v := getattr(cfg, k, None)) not in off}
    if found:
        settings = ", ".join(f"{k}={v!r}" for k, v in found.items())
        warnings.warn(
            f"{type(model).__name__}'s generation_config sets {settings}; model.generate applies "
            f"{'it' if len(found) == 1 else 'them'} to greedy decoding too, {who} does not (it picks the argmax of "
            "the logits), so the tokens can differ from model.generate's",
            stacklevel=3,
        )
    return found


def _tensor_key(t: torch.Tensor | None) -> tuple:
    if t is None:
        return ()
    plain = type(t) in (torch.Tensor, nn.Parameter)
    return id(t), t.data_ptr() if plain and t.device.type != "meta" else 0


_serial = itertools.count()


# Inductor keeps fused bf16/fp16 intermediates in fp32 unless told to round them as eager does; rounding them
# makes the compiled step compute what the eager forward computes (same tokens, not just close logits)
EAGER_NUMERICS: dict[str, Any] | None = (
    {"emulate_precision_casts": True} if hasattr(torch._inductor.config, "emulate_precision_casts") else None
)


def own_code(fn: Callable) -> Callable:
    """``fn`` with a code object of its own. Dynamo keeps compiled graphs per code object and reuses one for
    any module tree that passes its guards, which do not cover hooks (``skip_nnmodule_hook_guards``): a graph
    traced without a hook would silently skip one added later. Each Decoder, and each set of hooks, gets
    its own code object and so its own trace (and its own recompile limit)."""
    code = fn.__code__
    code = code.replace(co_name=f"{code.co_name}_{next(_serial)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _sliding_window(cache: StaticCache) -> int | None:
    # a StaticCache's sliding layers are StaticSlidingWindowLayer (a StaticLayer)
    sizes = [cast(StaticLayer, layer).max_cache_len for layer in cache.layers if getattr(layer, "is_sliding", False)]
    return min(sizes) if sizes else None


# Decoder stacks whose every layer updates the cache once per forward, in layer order, and that read only the first
# layer's length (transformers' Llama4 reads each layer's before its update; Mllama's cross-attention layers
# write image tokens at positions of their own): the one-counter cache is exact for these
ONE_COUNTER_MODELS = frozenset(
    {
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "gemma", "gemma2",
        "granite", "olmo2", "starcoder2", "smollm3",
    }
)  # fmt: skip


# Experiment (benchmarks/bench_generate.py --kv): each layer's keys and values as the two halves of one buffer,
# written by one index_copy_ of both, so that the compiled step may write them in one kernel instead of two
STACKED_KV = False


class OneCounterLayer(StaticLayer):
    """A full static cache layer whose write position is its device's one position counter.

    transformers' ``StaticLayer`` keeps a position counter per layer and advances each in its ``update``: in a
    compiled decode step that is a one-element kernel per layer (32 launches a token on a 32-layer model). Here
    the layers on one device share one counter tensor: the first of them (the first to initialize) advances it
    in its ``update``, the others write at ``counter - tokens`` (fused into their cache-write kernel). Same
    positions, keys and values as transformers' layers for the stacks in :data:`ONE_COUNTER_MODELS`, whose
    layers update in order, once per forward, and whose forward reads only the first layer's length.
    """

    def __init__(self, max_cache_len: int, counters: dict[torch.device, torch.Tensor], stacked: bool = False):
        super().__init__(max_cache_len=max_cache_len)
        self._counters = counters  # device -> its counter, shared by the cache's layers
        self._advances = False
        self._stacked = stacked  # keys and values as halves of one buffer (STACKED_KV), where their shapes match
        self._kv: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        device = key_states.device
        counter = self._counters.get(device)
        if counter is None:  # the first layer on this device (layers initialize in forward order) advances it
            counter = self._counters[device] = torch.zeros((), dtype=torch.long, device=device)
            self._advances = True
        self.cumulative_length = counter  # (StaticLayer's .to(device) keeps it: the same device)
        super().lazy_initialization(key_states, value_states)
        keys, values = cast(torch.Tensor, self.keys), cast(torch.Tensor, self.values)
        if self._stacked and keys.shape == values.shape and keys.dtype == values.dtype:
            self._kv = torch.zeros((2, *keys.shape), dtype=keys.dtype, device=keys.device)
            self.keys, self.values = self._kv[0], self._kv[1]
            if not torch.compiler.is_compiling():  # static addresses for the CUDA graph, as transformers marks its own
                for t in (self.keys, self.values, self._kv):
                    torch._dynamo.mark_static_address(t)

    def write_start(self, n: int) -> torch.Tensor:
        """The position (a 0-d tensor) at which this forward's ``n`` new tokens go, the shared counter advanced
        when this layer is the one that advances it (as :meth:`update` does; for writers of their own)."""
        if self._advances:
            start = self.cumulative_length + 0  # (a copy: the counter moves on)
            self.cumulative_length.add_(n)
            return start
        return self.cumulative_length - n  # the device's first layer advanced the counter in this forward already

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        positions = torch.arange(n, device=self.device) + self.write_start(n)
        keys, values = cast(torch.Tensor, self.keys), cast(torch.Tensor, self.values)  # (allocated above)
        if self._kv is not None:
            self._kv.index_copy_(3, positions, torch.stack((key_states, value_states)))
            return keys, values
        try:
            keys.index_copy_(2, positions, key_states)
            values.index_copy_(2, positions, value_states)
        except NotImplementedError:  # devices without index_copy_ (MPS), as transformers' layer does
            keys[:, :, positions] = key_states
            values[:, :, positions] = value_states
        return keys, values

    def crop(self, tokens_to_remove: int) -> None:
        """Moves the shared counter back once (by the layer that advances it; the others share it)."""
        if self._advances or not self.is_initialized or tokens_to_remove > 0:  # (> 0: transformers' error)
            super().crop(tokens_to_remove)


def _one_counter(cache: StaticCache, config: Any, max_seq_len: int) -> None:
    """Full static layers become :class:`OneCounterLayer` (for the stacks of :data:`ONE_COUNTER_MODELS`, where
    this transformers' static layer keeps its position in a ``cumulative_length`` tensor, as 5.x does)."""
    layers = cache.layers
    if getattr(config, "model_type", None) not in ONE_COUNTER_MODELS:
        return
    if not layers or any(type(layer) is not StaticLayer for layer in layers):
        return  # sliding or other layers keep positions of their own: leave the cache as transformers made it
    if not isinstance(getattr(layers[0], "cumulative_length", None), torch.Tensor):
        return
    counters: dict[torch.device, torch.Tensor] = {}
    cache.layers = [OneCounterLayer(max_seq_len, counters, stacked=STACKED_KV) for _ in layers]


def make_static_cache(config: Any, max_seq_len: int) -> StaticCache:
    """A transformers ``StaticCache`` of ``max_seq_len`` positions; sliding-window layers that the positions never
    leave become full static layers (same keys, same attention, no Python-side position counter), and full
    static layers share one position counter (:class:`OneCounterLayer`)."""
    cache = StaticCache(config=config, max_cache_len=max_seq_len)
    window = _sliding_window(cache)
    if window is not None and max_seq_len <= window:
        # positions never leave the window: a full static layer holds the same keys and gives the same
        # attention, without the sliding layer's Python-side position counter (which a graph would freeze)
        cache.layers = [
            StaticLayer(max_cache_len=max_seq_len) if getattr(layer, "is_sliding", False) else layer
            for layer in cache.layers
        ]
    _one_counter(cache, config, max_seq_len)
    return cache


def not_capturable(model: nn.Module, cache: StaticCache, max_seq_len: int) -> str | None:
    """Why a CUDA graph cannot take this model and cache (None: it can)."""
    window = _sliding_window(cache)
    if window is not None:
        return (
            f"its sliding-window cache ({window} positions) is shorter than max_seq_len={max_seq_len}; "
            f"a graph needs max_seq_len <= {window}"
        )
    for name, m in model.named_modules():
        hook = getattr(m, "_hf_hook", None)
        hooks = getattr(hook, "hooks", (hook,))
        if any(getattr(h, "offload", False) for h in hooks):
            return f"its weights are offloaded by accelerate ({name or 'the model'} loads them per call)"
    return None


def structure_key(model: nn.Module) -> tuple:
    """What a captured graph depends on: module identities, parameter/buffer storage, hooks, packed kernels."""
    parts: list[Any] = []
    for m in model.modules():
        parts.append(
            (
                id(m),
                m.training,
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                id(getattr(m, "_packed", None)),
                id(getattr(m, "_kernel_group", None)),
            )
        )
        parts.extend(_tensor_key(t) for t in m._parameters.values())
        parts.extend(_tensor_key(t) for t in m._buffers.values())
    return tuple(parts)


def has_hooks(m: nn.Module, allow: Callable[[nn.Module, int], bool] | None = None, *, deep: bool = True) -> bool:
    """Hooks, or accelerate's dispatch (offloading), on ``m`` or (``deep``) a submodule. With ``allow``, a
    transformers output-capturing forward hook on module ``s`` recording output ``index``
    (:func:`output_capturing_index`) does not count where ``allow(s, index)``."""
    for s in m.modules() if deep else (m,):
        if s._forward_pre_hooks or getattr(s, "_hf_hook", None) is not None:
            return True
        for hook in s._forward_hooks.values():
            index = None if allow is None else output_capturing_index(hook)
            if index is None or allow is None or not allow(s, index):
                return True
    return False


def output_capturing_index(hook: Any) -> int | None:
    """The output index a transformers output-capturing forward hook records (None: another hook). transformers
    installs these for good on the decoder layers and attentions at the first call with ``output_hidden_states``
    or ``output_attentions``; in other calls they do nothing."""
    if (
        getattr(hook, "__module__", None) != "transformers.utils.output_capturing"
        or getattr(hook, "__name__", None) != "output_capturing_hook"
    ):
        return None
    cells = dict(zip(hook.__code__.co_freevars, (c.cell_contents for c in hook.__closure__ or ())))
    index = cells.get("index")
    return index if isinstance(index, int) else None


# transformers 5.x renamed the attention's and the decoder layer's past_key_values to cache (a wrapper maps the old
# name); a fused forward that binds a call maps it too
CACHE_RENAMED = {"past_key_values": "cache"}


def bind_call(names: tuple[str, ...], args: tuple, kwargs: dict) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """A forward call's arguments as ``(the given ones of names, the other keyword arguments)``, with
    :data:`CACHE_RENAMED`'s old names taken as their new ones where ``names`` holds the new; None for a call bound
    otherwise (more positional arguments than ``names``, or one given twice): a fused forward leaves it to the
    class forward, which takes it or raises."""
    if len(args) > len(names):
        return None
    named: dict[str, Any] = dict(zip(names, args))
    extra = {}
    for k, v in kwargs.items():
        if k not in names and CACHE_RENAMED.get(k) in names:
            k = CACHE_RENAMED[k]
        if k in named:
            return None
        if k in names:
            named[k] = v
        else:
            extra[k] = v
    return named, extra


def code_key(f: Any, *, signature: bool = False) -> tuple | None:
    """What identifies ``f``'s code for comparison with a reference form compiled by the same Python: its
    instructions, names, constants and argument count (with ``signature``: also its parameter and local names
    and its defaults); None for something without code."""
    code = getattr(f, "__code__", None)
    if code is None:
        return None
    key = (code.co_code, code.co_names, code.co_consts, code.co_argcount)
    return (*key, code.co_varnames, f.__defaults__) if signature else key


def forward_key(f: Any) -> tuple | None:
    """:func:`code_key` with the signature, of the function a decorator wrapped (transformers wraps forwards that
    renamed an argument): how the fused forwards recognize the class forwards they replace."""
    return code_key(inspect.unwrap(f) if callable(f) else f, signature=True)


def compile_form(source: str, label: str) -> Callable:
    """The ``forward`` that ``source`` defines (a reference form of a transformers forward, written once and
    formatted per variant), compiled as ``<actsparse reference form: label>``."""
    namespace: dict[str, Any] = {}
    exec(compile(source, f"<actsparse reference form: {label}>", "exec"), namespace)
    return namespace["forward"]


def hooks_key(model: nn.Module) -> tuple:
    """The forward hooks of every module (the compiled step's trace depends on them; dynamo does not guard them)."""
    return tuple(
        (i, tuple(m._forward_pre_hooks), tuple(m._forward_hooks))
        for i, m in enumerate(model.modules())
        if m._forward_pre_hooks or m._forward_hooks
    )
