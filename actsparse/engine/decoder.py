"""A static-cache decoder for any Hugging Face causal LM: one CUDA-graph replay per decode step.

``Decoder(model, max_seq_len)`` decodes the model object itself (its weights shared, nothing copied), dense
or sparsified, with the model's own, unmodified forward:

* a transformers ``StaticCache`` of ``max_seq_len`` positions (allocated once, reused by every generation);
* **prefill** runs the prompt through the forward eagerly (prompt lengths vary; sparse layers take their
  dense route for several rows);
* **decode** runs one token per step through ``torch.compile(forward, fullgraph=True)`` captured in one
  CUDA graph: a step is one replay, and the graph feeds its own greedy token forward, so nothing but the
  replay is launched per token and the host waits on the GPU only every ``sync_every`` tokens (for EOS and
  streaming). Sampling draws on the device after each replay (temperature, top-p, seeded generator).

Without CUDA (or with ``compile=False, cuda_graph=False``) the same code runs eagerly, token for token the
same computation. A model the graph cannot take (an offloaded model, a sliding-window cache longer than its
window, a forward that does not trace) falls back to eager with a one-line warning naming the reason.

The graph is captured on first use and again whenever the model changes structurally (modules swapped,
kernels enabled or re-planned, hooks added, weights replaced): the check is cheap and runs at every
:meth:`Decoder.generate`. Values changed *in place* (thresholds by ``fill_``/``copy_``) need no recapture:
the graph reads the buffers live.
"""

from __future__ import annotations

import time
import types
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..errors import DecoderError
from ..kernels.decode_attention import decode_attention_available
from ..kernels.linear import stale_kernels
from ..offload import model_device
from .attention import attention_of, check_decode_attention, decode_attention_scope
from .fusion import fuse_projections
from .glu import fuse_glu, unfuse_glu
from .hf import (
    EAGER_NUMERICS,
    eos_token_ids,
    forward_kwargs,
    hooks_key,
    make_static_cache,
    not_capturable,
    own_code,
    structure_key,
    warn_unapplied_generation_settings,
)
from .norms import fuse_norms, unfuse_norms
from .rope import fuse_rope, unfuse_rope
from .sampling import check_sampling, select_next

__all__ = ["Decoder", "DecodeResult", "forward_kwargs", "eos_token_ids"]

TokenCallback = Callable[[list[int]], None]
ATTENTION_CHOICES = ("auto", "kernel", "model")


@dataclass
class DecodeResult:
    """One :meth:`Decoder.run`: the sequences (prompt + new tokens), timings and how it ran.

    ``prefill_seconds`` is the time to the first new token (prompt forward + its selection);
    ``decode_seconds`` the time of the remaining single-token steps. Rows that stopped at EOS before others
    are padded with ``pad_token_id``.
    """

    sequences: torch.Tensor  # [B, prompt + new] int64, on the model's device
    new_tokens: int  # new positions in sequences (the longest row's)
    prefill_seconds: float
    decode_seconds: float
    stop_reason: str  # "eos" (every row) or "length"
    mode: str  # "graph", "compile" or "eager": how the decode steps ran
    logits: tuple[torch.Tensor, ...] | None = None  # with output_logits: fp32 [B, vocab] per new token
    decode_steps: int | None = None  # steps run (and timed): past new_tokens - 1 when EOS came mid-block

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Decode steps per second per row: ``decode_steps / decode_seconds`` (``None`` without decode steps).

        Steps run between host checks (``sync_every``) after every row's EOS are counted: they took the time."""
        steps = self.new_tokens - 1 if self.decode_steps is None else self.decode_steps
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else None


def _check_no_padding(mask: Any, ids: torch.Tensor) -> None:
    """The Decoder takes an attention mask only as a tokenizer gives it for unpadded prompts: all ones."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.numel() != ids.numel() or mask.shape[-1] != ids.shape[-1]:
        raise DecoderError(
            f"attention_mask must be a tensor of the shape of input_ids {tuple(ids.shape)}, got "
            f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}"
        )
    if not bool((mask == 1).all()):
        raise DecoderError(
            "attention_mask has padding: the Decoder decodes prompts of equal length without padding; give "
            "one prompt per call (batch_size=1) or prompts of the same length"
        )


class Decoder:
    """Greedy or sampled generation from ``model`` with a static KV cache, one CUDA graph per decode step.

    Args:
        model: a Hugging Face causal LM (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ...), dense or sparsified
            (with or without :func:`actsparse.kernels.enable_kernels`); used in place, never copied.
        max_seq_len: positions of the static cache: prompt + new tokens must fit.
        batch_size: rows per generation (prompts of equal length, no padding).
        compile: trace the decode step with ``torch.compile(fullgraph=True)`` (default: on CUDA).
        cuda_graph: capture the compiled step in a CUDA graph (default: on CUDA; needs a CUDA model).
        backend: the ``torch.compile`` backend (``"inductor"``, with eager's bf16/fp16 rounding of fused
            intermediates, so that the compiled step gives the eager forward's tokens).
        sync_every: decode steps between host synchronisations (EOS checks, streaming callbacks).
        fallback: when the graph or the compile cannot take the model, warn once and run eagerly
            (``False``: raise :class:`~actsparse.DecoderError` instead).
        fuse: run the dense q/k/v and gate/up projections as one GEMM per group
            (:func:`~actsparse.engine.fuse_projections`; default: with the CUDA graph). The model stays
            fused (its weights views of one tensor per group); ``unfuse_projections(model)`` undoes it.
        glu: give gated MLPs whose down projection runs the CUDA sparse GEMV a forward that hands it ``gate`` and
            ``up``, the kernel forming ``silu(gate) * up`` as it loads them (:func:`~actsparse.engine.fuse_glu`:
            one elementwise launch fewer per layer, within the noise of a decode step on an H100; default: as
            ``fuse``). ``False`` restores the MLPs' own forward.
        norms: give Llama-style decoder layers whose q/k/v and gate/up groups run the CUDA sparse GEMV a forward
            in which those GEMVs form the RMSNorms as they load the residual stream and o_proj / down_proj add
            the residual as they write (:func:`~actsparse.engine.fuse_norms`: two add+norm kernels fewer per
            layer; Llama-2-7B shapes on an H100: +1.1% / +1.9% / +2.4% at 0 / 50 / 70% sparsity; default: as
            ``fuse``). ``False`` restores the layers' own forward.
        attention: ``"auto"`` (default) switches an SDPA model on CUDA to actsparse's decode attention
            (:mod:`actsparse.engine.attention`: one-token steps read only the cache positions written so far,
            everything else runs SDPA as before; Llama-2-7B shapes on an H100: +0.8% dense, +2.4% / +3.4% at
            50% / 70% sparsity); ``"model"`` keeps the model's own attention; ``"kernel"`` requires the switch.
            The switch lasts each :meth:`run` (:func:`~actsparse.engine.decode_attention_scope`): between runs
            the model is as it was.
        rope: with the decode attention, give Llama-style attention modules a forward whose one-token steps
            rotate q and k, write the cache and attend in one kernel (:func:`~actsparse.engine.fuse_rope`: the
            three rotary and cache-write kernels per layer are gone: +1.6% / +2.2% Llama-2-7B decode at 50 / 70%
            on an H100, bf16). Default ``False`` (opt-in) until its Decoder test has run on a GPU (and the fp16
            kernel's fix); ``False`` restores the modules' own forward.
    """

    def __init__(
        self,
        model: nn.Module,
        max_seq_len: int = 2048,
        *,
        batch_size: int = 1,
        compile: bool | None = None,
        cuda_graph: bool | None = None,
        backend: str = "inductor",
        sync_every: int = 16,
        fallback: bool = True,
        fuse: bool | None = None,
        attention: str = "auto",
        glu: bool | None = None,
        norms: bool | None = None,
        rope: bool | None = None,
    ):
        if not isinstance(model, nn.Module) or getattr(model, "config", None) is None:
            raise DecoderError(
                f"Decoder needs a Hugging Face causal LM (an nn.Module with a .config), got {type(model).__name__}"
            )
        can_generate = getattr(model, "can_generate", None)
        if getattr(model.config, "is_encoder_decoder", False) or (callable(can_generate) and not can_generate()):
            raise DecoderError(
                f"Decoder decodes causal LMs (a decoder-only model that generate() runs, e.g. "
                f"AutoModelForCausalLM); {type(model).__name__} is "
                + ("an encoder-decoder model" if getattr(model.config, "is_encoder_decoder", False) else "not one")
            )
        for name, value, low in (
            ("max_seq_len", max_seq_len, 2),
            ("batch_size", batch_size, 1),
            ("sync_every", sync_every, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise DecoderError(f"{name} must be an integer >= {low}, got {value!r}")
        limit = getattr(model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and limit > 0 and max_seq_len > limit:
            raise DecoderError(
                f"max_seq_len={max_seq_len} exceeds the model's {limit} positions "
                f"(config.max_position_embeddings); use max_seq_len <= {limit}"
            )
        if attention not in ATTENTION_CHOICES:
            raise DecoderError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, got {attention!r}")
        self.model = model
        warn_unapplied_generation_settings(model, "the Decoder")
        self.max_seq_len, self.batch_size, self.sync_every = max_seq_len, batch_size, sync_every
        self.device = model_device(model)
        if attention == "kernel" and not decode_attention_available(self.device):
            raise DecoderError(
                f"attention='kernel' needs a CUDA model and Triton; this one runs on {self.device} "
                "(use attention='auto' or 'model')"
            )
        if attention == "kernel":
            check_decode_attention(model)  # refused now, not at the first run
        # switched around each run (decode_attention_scope), the model left as it was between runs
        self.decode_attention = attention == "kernel" or (
            attention == "auto"
            and self.device.type == "cuda"
            and attention_of(model) == "sdpa"
            and decode_attention_available(self.device)
        )
        if cuda_graph and self.device.type != "cuda":
            raise DecoderError(
                f"cuda_graph=True needs a model on a CUDA device; this one runs on {self.device} (use cuda_graph=False)"
            )
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else bool(cuda_graph)
        self.compile = self.cuda_graph if compile is None else bool(compile)
        self.backend, self.fallback = backend, fallback
        self.fuse = self.cuda_graph if fuse is None else bool(fuse)
        self.glu = self.fuse if glu is None else bool(glu)
        self.norms = self.fuse if norms is None else bool(norms)
        self.rope = False if rope is None else bool(rope)
        self.fallback_reason: str | None = None
        with torch.inference_mode(False):  # what every run updates in place, whatever mode built the Decoder
            self.cache = make_static_cache(model.config, max_seq_len)
            self._tok = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
            self._out = torch.zeros(batch_size, max_seq_len, dtype=torch.long, device=self.device)
            self._step_idx = torch.zeros(1, dtype=torch.long, device=self.device)
        self._kwargs = forward_kwargs(model, self.cache)
        self._graph_logits: torch.Tensor | None = None
        reason = not_capturable(model, self.cache, max_seq_len)
        if reason is not None and (self.compile or self.cuda_graph):
            self._give_up(reason)
        self._step_fn: Callable | None = None
        self._compiled: dict[tuple, Callable] = {}  # hooks -> compiled step
        self._graph: torch.cuda.CUDAGraph | None = None
        self._ready: tuple | None = None

    # ------------------------------------------------------------------------------------------- set-up
    @property
    def mode(self) -> str:
        """How decode steps run: ``"graph"`` (compiled + CUDA graph), ``"compile"`` or ``"eager"``."""
        return "graph" if self.cuda_graph else "compile" if self.compile else "eager"

    def _give_up(self, reason: str) -> None:
        if not self.fallback:
            raise DecoderError(
                f"cannot capture {type(self.model).__name__} in a CUDA graph / compile its decode step: {reason}"
            )
        warnings.warn(f"actsparse Decoder: {type(self.model).__name__} decodes eagerly: {reason}", stacklevel=3)
        self.fallback_reason = reason
        self.compile = self.cuda_graph = False
        self._graph = self._step_fn = None

    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        """The model's fp32 logits of the last position ``[B, vocab]`` for ``ids`` on the static cache."""
        out = self.model(ids, **self._kwargs)
        return out.logits[:, -1, :].float()

    def _replay(self) -> torch.Tensor:
        """One decode step: a graph replay (its logits buffer is returned) or the step run directly."""
        if self._graph is not None:
            self._graph.replay()
            assert self._graph_logits is not None  # captured together with the graph
            return self._graph_logits
        return self._body()

    def _body(self) -> torch.Tensor:
        """One decode step on the static buffers: record the fed token, run it, feed the greedy next one."""
        self._out.index_copy_(1, self._step_idx, self._tok)
        self._step_idx.add_(1)
        logits = self._step_fn(self._tok) if self._step_fn is not None else self._logits(self._tok)
        self._tok.copy_(logits.argmax(dim=-1, keepdim=True))
        return logits

    def _prepare(self) -> None:
        """Compile and capture the decode step for the model as it is now (no-op when nothing changed)."""
        if self.fuse:  # keeps intact groups as they are, re-plans changed ones (before the structure key)
            fuse_projections(self.model)
        if self.glu:  # (after enable_kernels: the MLPs whose down projection runs the CUDA kernel)
            fuse_glu(self.model)
        else:
            unfuse_glu(self.model)
        if self.norms:  # (after fuse_glu: a fused layer calls its MLP's forward)
            fuse_norms(self.model)
        else:
            unfuse_norms(self.model)
        if self.rope and self.decode_attention:  # (the fused path runs under the decode attention only)
            fuse_rope(self.model)
        else:
            unfuse_rope(self.model)
        stale = stale_kernels(self.model)
        if stale:
            raise DecoderError(
                f"the weights of {len(stale)} packed layer(s) (e.g. {stale[0]}) changed after "
                f"enable_kernels; call actsparse.kernels.enable_kernels(model) again"
            )
        key = self._key()
        if self._ready == key:
            return
        self._graph = self._graph_logits = None
        if self._ready is not None:  # the model changed (dtype, device, modules): a cache that matches it
            self.cache = make_static_cache(self.model.config, self.max_seq_len)
            self._kwargs = forward_kwargs(self.model, self.cache)
        if self.compile or self.cuda_graph:
            try:
                self._capture()
            except Exception as e:  # the forward does not trace / capture: eager is always right
                self._graph = self._step_fn = None
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                self._give_up(f"{type(e).__name__}: {first[:300]}")
        self.cache.reset()
        self._ready = self._key()

    def _key(self) -> tuple:
        """What a captured step and the cache depend on: the model's structure, the mode, the attention and
        autocast (a cache allocated under autocast holds its dtype; a step traced under it casts)."""
        dev = self.device.type
        autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)) if dev in ("cuda", "cpu") else ()
        return structure_key(self.model), self.mode, attention_of(self.model), autocast

    def _rewind(self) -> None:
        """The cache and the step index back at position 0 (a warm-up step writes where a run would)."""
        self.cache.reset()
        self._step_idx.zero_()

    def _capture(self) -> None:
        self._rewind()
        self._tok.zero_()
        self._logits(self._tok)  # a one-token prefill allocates the cache's tensors (lazily sized by transformers)
        hooks = hooks_key(self.model)
        if self.compile and hooks not in self._compiled:
            step = types.MethodType(own_code(Decoder._logits), self)
            self._compiled[hooks] = torch.compile(
                step,
                fullgraph=True,
                dynamic=False,
                backend=self.backend,
                options=EAGER_NUMERICS if self.backend == "inductor" else None,
            )
        self._step_fn = self._compiled[hooks] if self.compile else self._logits
        # every warm-up step and the captured one write position 0 of the cache and of the output: any
        # max_seq_len holds them, whatever position the last run reached (runs rewind before they start)
        if not self.cuda_graph:
            self._rewind()
            self._body()  # compiles now, not inside the first timed generation
            return
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(3):  # compile and warm up (allocations, kernel autotuning) outside the capture
                self._rewind()
                self._body()
            self._rewind()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._graph_logits = self._body()
        self._graph = graph

    # ------------------------------------------------------------------------------------------- decode
    def _check_inputs(self, input_ids: Any, max_new_tokens: int) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int, torch.int16):
            raise DecoderError(
                f"input_ids must be an integer tensor [batch, tokens], got "
                f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}"
            )
        ids = input_ids.view(1, -1) if input_ids.dim() == 1 else input_ids
        if ids.dim() != 2 or ids.shape[1] < 1:
            raise DecoderError(
                f"input_ids must have shape [batch, tokens] with tokens >= 1, got {tuple(input_ids.shape)}"
            )
        if ids.shape[0] != self.batch_size:
            raise DecoderError(
                f"input_ids has {ids.shape[0]} rows; this Decoder was built for batch_size="
                f"{self.batch_size} (make one with Decoder(model, batch_size={ids.shape[0]}))"
            )
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise DecoderError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if ids.shape[1] + max_new_tokens > self.max_seq_len:
            raise DecoderError(
                f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                f"max_seq_len={self.max_seq_len}; build the Decoder with a larger max_seq_len "
                f"or generate fewer tokens"
            )
        vocab = getattr(self.model.config, "vocab_size", None)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or isinstance(vocab, int) and hi >= vocab:
            raise DecoderError(
                f"input_ids must be in [0, {vocab}) (the model's vocabulary), got values in [{lo}, {hi}]"
            )
        return ids.to(self.device, torch.long)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def run(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 64,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = 0,
        eos_token_id: int | Iterable[int] | None = None,
        pad_token_id: int | None = None,
        on_tokens: TokenCallback | None = None,
        output_logits: bool = False,
        attention_mask: torch.Tensor | None = None,
    ) -> DecodeResult:
        """Generate up to ``max_new_tokens`` after ``input_ids`` ``[B, T]``; see :meth:`generate`.

        ``on_tokens`` receives row 0's new token ids as they become known on the host (every ``sync_every``
        steps; at every step when given). Generation stops when every row produced an EOS token
        (``eos_token_id``, default: the model's generation config; ``[]`` never stops early).
        ``attention_mask`` (as a tokenizer returns it, so that ``dec.generate(**inputs, max_new_tokens=n)``
        works) must be all ones: rows are prompts of equal length, without padding.
        """
        ids = self._check_inputs(input_ids, max_new_tokens)
        _check_no_padding(attention_mask, ids)
        check_sampling(do_sample, temperature, top_p)
        eos = (
            eos_token_ids(self.model)
            if eos_token_id is None
            else ((int(eos_token_id),) if isinstance(eos_token_id, int) else tuple(int(e) for e in eos_token_id))
        )
        pad = (
            pad_token_id
            if pad_token_id is not None
            else getattr(getattr(self.model, "generation_config", None), "pad_token_id", None)
        )
        pad = int(pad) if isinstance(pad, int) else (eos[0] if eos else 0)  # as model.generate pads
        generator = None
        if do_sample:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed) if seed is not None else generator.seed()
        sync_every = 1 if on_tokens is not None else self.sync_every

        # (not under inference_mode: the static cache and buffers outlive this call, and tensors made in that
        # mode cannot be updated in place outside it, so a Decoder used once under it would break later;
        # inference_mode(False) turns grad mode on, hence no_grad again)
        with torch.inference_mode(False), torch.no_grad(), decode_attention_scope(self.model, self.decode_attention):
            self._prepare()
            self.cache.reset()
            self._step_idx.zero_()
            self._sync()
            t0 = time.perf_counter()
            logits = self._logits(ids)
            kept = [logits.clone()] if output_logits else None
            self._tok.copy_(
                select_next(
                    logits, do_sample=do_sample, temperature=temperature, top_p=top_p, generator=generator
                ).view(-1, 1)
            )
            first = self._tok[:, 0].tolist()  # waits for the device: the time to the first token
            prefill_seconds = time.perf_counter() - t0

            rows: list[list[int]] = [[t] for t in first]
            done = [t in eos for t in first]
            emitted = 0
            if on_tokens is not None:
                on_tokens(rows[0][:1])
                emitted = 1
            t1 = time.perf_counter()
            steps = 0
            while steps < max_new_tokens - 1 and not all(done):
                todo = min(sync_every, max_new_tokens - 1 - steps)
                for _ in range(todo):
                    logits = self._replay()
                    if kept is not None:
                        kept.append(logits.clone())
                    if do_sample:
                        self._tok.copy_(
                            select_next(
                                logits, do_sample=True, temperature=temperature, top_p=top_p, generator=generator
                            ).view(-1, 1)
                        )
                # each step recorded the token it was fed (new tokens steps+1 .. steps+todo-1); the newest is in _tok
                block = torch.cat([self._out[:, steps + 1 : steps + todo], self._tok], dim=1).tolist()
                steps += todo
                for r, new in enumerate(block):
                    for t in new:
                        if done[r]:
                            break
                        rows[r].append(t)
                        done[r] = t in eos
                if on_tokens is not None and len(rows[0]) > emitted:
                    on_tokens(rows[0][emitted:])
                    emitted = len(rows[0])
            decode_seconds = time.perf_counter() - t1

            longest = max(len(r) for r in rows)
            new = torch.tensor([r + [pad] * (longest - len(r)) for r in rows], dtype=torch.long, device=self.device)
            return DecodeResult(
                torch.cat([ids, new], dim=1),
                longest,
                prefill_seconds,
                decode_seconds,
                "eos" if all(done) else "length",
                self.mode,
                None if kept is None else tuple(kept[:longest]),
                steps,
            )

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 64, **kwargs: Any) -> torch.Tensor:
        """``[B, T + new]`` token ids: the prompt followed by greedy (default) or sampled new tokens, as
        ``model.generate(input_ids, max_new_tokens=..., do_sample=...)`` returns them. Keyword arguments:
        ``do_sample``, ``temperature``, ``top_p``, ``seed``, ``eos_token_id``, ``pad_token_id``, ``on_tokens``,
        ``output_logits``, ``attention_mask`` (see :meth:`run`)."""
        return self.run(input_ids, max_new_tokens, **kwargs).sequences

    def __repr__(self) -> str:
        extra = f", fallback: {self.fallback_reason}" if self.fallback_reason else ""
        return (
            f"Decoder({type(self.model).__name__}, max_seq_len={self.max_seq_len}, batch_size={self.batch_size}, "
            f"mode={self.mode}{extra})"
        )
