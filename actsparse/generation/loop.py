"""Text generation from a (sparsified) causal LM: streaming, prefill/decode timing, measured sparsity.

A gpt-fast style loop over the HF model with its KV cache: :func:`prefill` runs the prompt once and picks
the first new token (its time is the *time to first token*), :func:`decode_one_token` feeds one token and
picks the next (their total time gives the *decode tokens/s*). Greedy decoding picks the argmax of the fp32
logits, as ``model.generate(do_sample=False)`` does, so with no sparsity it reproduces it token for token.
Sampling applies the temperature, then nucleus (top-p) filtering, and draws from a ``torch.Generator``
seeded with ``seed``: the same seed gives the same draws, so dense and sparse runs differ only where their
probabilities do.

Timing excludes the streaming callback and the detokenizer: the reported speed is the model's. Measured
sparsity is taken *after* the timed run, by replaying the same tokens with a
:class:`~actsparse.eval.SparsityMonitor`: the prompt in one pass (prefill) and the generated tokens that
the decode steps fed, in one more pass on its KV cache (decode). Thresholds act on each token's activations
independently, so the replay sees the inputs the decode steps saw (up to fp rounding of batched matmuls),
while the timed loop runs without the monitor's hooks (which would slow the sparse run but not the dense
one).

Chat template: by default (``chat=False``) the prompt is plain text to continue (completion), as
``transformers.pipeline`` and vLLM's ``generate`` treat a string, even for instruct models: a prompt such as
"The capital of France is" is a completion prompt, and the embedded SmolLM2-135M-Instruct completes it
(" Paris.") far better than it answers it as a chat turn. ``chat=True`` wraps the prompt in the tokenizer's
chat template as one user message with the assistant turn opened (an error without a template);
``chat=None`` does that only when the tokenizer has a template.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from ..engine import Decoder, eos_token_ids, forward_kwargs, select_next
from ..engine.hf import output_cache, warn_unapplied_generation_settings
from ..errors import UsageError
from ..eval.sparsity import SparsityMonitor
from ..offload import model_device
from ..sparse_linear import plain_linear, sparse_layers
from .prompt import Detokenizer, Stream, check_settings, encode_checked, resolve_engine
from .results import Comparison, GenerationResult

__all__ = ["generate", "compare_generate", "prefill", "decode_one_token", "dense_view"]


def _pick(
    logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    """Greedy argmax, or a draw after temperature and top-p (nucleus) filtering, of ``logits`` [vocab]."""
    return int(
        select_next(logits.view(1, -1), do_sample=do_sample, temperature=temperature, top_p=top_p, generator=generator)[
            0
        ]
    )


def _forward(model: nn.Module, ids: torch.Tensor, cache: Any, *, all_logits: bool = False) -> tuple[torch.Tensor, Any]:
    out = model(ids, **forward_kwargs(model, cache, last_only=not all_logits))
    return out.logits[0, -1], _cache_of(out)


def _cache_of(out: Any) -> Any:
    cache = output_cache(out)
    if cache is not None:
        return cache
    raise UsageError("the model returned no KV cache with use_cache=True; generation needs a causal LM with a cache")


def prefill(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Run the prompt ``ids`` [1, T]; ``(last logits [vocab], KV cache)``."""
    return _forward(model, ids, None)


def decode_one_token(model: nn.Module, token: int, cache: Any) -> tuple[torch.Tensor, Any]:
    """Feed one ``token`` on the KV ``cache``; ``(logits [vocab], cache)``."""
    return _forward(model, torch.tensor([[token]], device=model_device(model)), cache)


def _measure(model: nn.Module, prompt_ids: torch.Tensor, new_ids: list[int]) -> tuple[dict, dict, dict]:
    """Replay with a SparsityMonitor: ``(prefill sparsity, decode sparsity, targets)`` per layer."""
    with SparsityMonitor(model) as pre:
        _, cache = prefill(model, prompt_ids)
    decode: dict[str, float] = {}
    if len(new_ids) > 1:  # the decode steps fed every new token but the last, in one pass here
        with SparsityMonitor(model) as dec:
            _forward(model, torch.tensor([new_ids[:-1]], device=prompt_ids.device), cache, all_logits=True)
        decode = dec.sparsity()
    return pre.sparsity(), decode, pre.targets()


def _loop(
    model: nn.Module,
    ids: torch.Tensor,
    max_new_tokens: int,
    eos: tuple[int, ...],
    sampling: dict[str, Any],
    generator: torch.Generator | None,
    detok: Detokenizer,
) -> tuple[list[int], float, float]:
    """The eager loop (dynamic cache, one host sync per token): ``(new tokens, prefill s, decode s)``."""
    t = time.perf_counter()
    logits, cache = prefill(model, ids)
    token = _pick(logits, generator=generator, **sampling)  # int(): the device has finished
    prefill_seconds = time.perf_counter() - t
    new = [token]
    detok.push(token)
    decode_seconds = 0.0
    while len(new) < max_new_tokens and token not in eos:
        t = time.perf_counter()
        logits, cache = decode_one_token(model, token, cache)
        token = _pick(logits, generator=generator, **sampling)
        decode_seconds += time.perf_counter() - t
        new.append(token)
        detok.push(token)
    return new, prefill_seconds, decode_seconds


def _decoder_for(model: nn.Module, decoder: Decoder | None, needed: int, attention: str | None = None) -> Decoder:
    if decoder is None:  # a cache as long as this generation needs: decode attends over all of it
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        size = -(-needed // 64) * 64
        length = max(2, min(size, limit) if isinstance(limit, int) and limit > 0 else size)
        return Decoder(model, length) if attention is None else Decoder(model, length, attention=attention)
    if decoder.model is not model:
        raise UsageError("the decoder was built for another model; pass Decoder(model) of this model")
    if attention is not None:
        raise UsageError("pass attention= to the Decoder you give as decoder=, not to generate")
    return decoder


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    chat: bool | None = False,
    stream: Stream | None = None,
    stop_at_eos: bool = True,
    measure_sparsity: bool = True,
    engine: str = "auto",
    decoder: Decoder | None = None,
    attention: str | None = None,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` after ``prompt`` (batch 1, KV cache) and time it.

    ``stream`` receives text chunks as they are decoded; their concatenation is the result's ``text``
    (special tokens skipped). Generation stops at the model's EOS token(s) unless ``stop_at_eos=False``.
    ``engine``: ``"graph"`` decodes with the static-cache :class:`~actsparse.engine.Decoder` (one CUDA-graph
    replay per token on CUDA; the same computation eagerly elsewhere), ``"eager"`` with the dynamic-cache
    loop, ``"auto"`` (default) the decoder on CUDA and the loop elsewhere. Pass ``decoder=Decoder(model, ...)``
    to reuse one compiled graph across calls (otherwise each call compiles its own). ``attention``: the
    graph engine's attention (``Decoder(..., attention=)``: ``"model"``, ``"auto"``, ``"kernel"``; default the
    Decoder's); ``"kernel"`` with the eager loop is refused.
    The model is not modified; on bad input a ``ValueError`` is raised before it runs.
    """
    check_settings(
        prompt, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p, engine=engine
    )
    ids, chat = encode_checked(model, tokenizer, prompt, chat, max_new_tokens)
    chosen = "graph" if decoder is not None else resolve_engine(model, engine)
    if attention == "kernel" and chosen != "graph":
        raise UsageError(
            "attention='kernel' runs in the graph engine's decode steps (CUDA); this generation runs the eager "
            "loop: pass engine='graph' on a CUDA model, or attention='auto'"
        )
    device = model_device(model)
    ids = ids.to(device)
    eos = eos_token_ids(model, tokenizer) if stop_at_eos else ()
    sampling: dict[str, Any] = {"do_sample": do_sample, "temperature": temperature, "top_p": top_p}
    detok = Detokenizer(tokenizer, stream)
    if chosen == "graph":
        dec = _decoder_for(model, decoder, ids.shape[1] + max_new_tokens, attention)

        def on_tokens(toks: list[int]) -> None:
            for t in toks:
                detok.push(t)

        out = dec.run(
            ids,
            max_new_tokens,
            seed=seed,
            eos_token_id=list(eos),
            **sampling,
            on_tokens=on_tokens,
        )
        new = out.sequences[0, ids.shape[1] : ids.shape[1] + out.new_tokens].tolist()
        prefill_seconds, decode_seconds, mode = out.prefill_seconds, out.decode_seconds, out.mode
    else:
        warn_unapplied_generation_settings(model, "the eager loop")
        generator = torch.Generator(device=device).manual_seed(seed) if do_sample else None
        new, prefill_seconds, decode_seconds = _loop(model, ids, max_new_tokens, eos, sampling, generator, detok)
        mode = "loop"
    text = detok.finish()

    is_sparse = bool(sparse_layers(model))
    pre, dec_sp, targets = _measure(model, ids, new) if is_sparse and measure_sparsity else ({}, {}, {})
    return GenerationResult(
        prompt=prompt,
        chat=chat,
        prompt_tokens=int(ids.shape[1]),
        text=text,
        token_ids=new,
        tokens=[tokenizer.decode([i]) for i in new],
        stop_reason="eos" if new[-1] in eos else "length",
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        sparse=is_sparse,
        prefill_sparsity=pre,
        decode_sparsity=dec_sp,
        target_sparsity=targets,
        engine=mode,
        settings={
            "max_new_tokens": max_new_tokens,
            "do_sample": do_sample,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
        },
    )


# ------------------------------------------------------------------------------------------ compare
@contextmanager
def dense_view(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily swap every ``SparseLinear`` for a plain ``nn.Linear`` sharing its weights; restored on exit
    (also on error). Unlike :func:`actsparse.remove_sparsity` it keeps the sparse layers (and any packed kernel
    state) to put back."""
    layers = sparse_layers(model)
    try:
        for name, m in layers.items():
            view = plain_linear(m)
            vars(view)["_fuse_no_copy"] = True  # its weight is the sparse layer's: engine.fusion must not move it
            model.set_submodule(name, view)
        yield model
    finally:
        for name, m in layers.items():
            model.set_submodule(name, m)


def compare_generate(
    model: nn.Module, tokenizer, prompt: str, *, stream: Stream | None = None, warmup: bool = True, **settings: Any
) -> Comparison:
    """Generate with the dense view of the sparsified ``model`` and then with the model itself.

    Same prompt and ``settings`` (the keyword arguments of :func:`generate`) for both, so greedy runs differ
    only through sparsity and sampled runs draw the same random numbers. ``stream`` streams the sparse run
    only. ``warmup`` first runs two untimed tokens of each, so neither timing pays one-off start-up costs
    (with the graph engine: compiling and capturing both). Both run through the same engine, with the
    graph engine through one :class:`~actsparse.engine.Decoder` (it recaptures when the layers swap).
    """
    if not sparse_layers(model):
        raise UsageError("the model has no SparseLinear layers; sparsify it (or load thresholds) before comparing")
    check_settings(
        prompt,
        max_new_tokens=settings.get("max_new_tokens", 64),
        do_sample=settings.get("do_sample", False),
        temperature=settings.get("temperature", 1.0),
        top_p=settings.get("top_p", 1.0),
        engine=settings.get("engine", "auto"),
    )
    ids, _ = encode_checked(model, tokenizer, prompt, settings.get("chat"), settings.get("max_new_tokens", 64))
    if settings.get("decoder") is None and resolve_engine(model, settings.get("engine", "auto")) == "graph":
        needed = ids.shape[1] + settings.get("max_new_tokens", 64)
        settings["decoder"] = _decoder_for(model, None, needed, settings.pop("attention", None))
    if warmup:
        short = {**settings, "max_new_tokens": min(2, settings.get("max_new_tokens", 64)), "measure_sparsity": False}
        with dense_view(model):
            generate(model, tokenizer, prompt, **short)
        generate(model, tokenizer, prompt, **short)
    with dense_view(model):
        dense = generate(model, tokenizer, prompt, **settings)
    sparse = generate(model, tokenizer, prompt, stream=stream, **settings)
    return Comparison(dense, sparse)
