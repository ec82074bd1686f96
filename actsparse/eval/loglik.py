"""Log-likelihoods of continuations, each distinct context run once.

Multiple-choice tasks score every choice after the same context (ARC, HellaSwag and SciQ: four; their contexts
are most of the tokens). :func:`continuation_logliks` runs a batch of contexts (without their last token) once
into a KV cache, computing only the last position's logits, and then all of their continuations in one batch
on top of it: the same numbers as scoring ``context + continuation`` in full for each choice, up to float
rounding, for a fraction of the work.

Semantics (those of lm-eval's ``HFLM._loglikelihood_tokens``): the model sees ``(context + continuation)[:-1]``;
a continuation's log-likelihood is the sum of ``log p(c_t | context, c_<t)`` over its tokens (log-softmax in
float32), and it is *greedy* when every ``c_t`` is the argmax at its position. Rows are right-padded; the
attention mask hides the padding of shorter contexts from the continuations and the position ids continue
each context's own, so every scored position sees exactly its own tokens. Activation sparsity is per token,
so a sparsified model gives every real position the activations of the full pass. With a
:class:`~actsparse.eval.sparsity.SparsityMonitor`, only real tokens are counted (each context once).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine.hf import forward_kwargs, output_cache
from ..errors import UsageError
from ..offload import model_device
from ..sparse_linear import SparseLinear
from .sparsity import SparsityMonitor

__all__ = ["continuation_logliks", "Group"]

Group = tuple[Sequence[int], Sequence[Sequence[int]]]  # (context ids, [continuation ids, ...])


def _sparse_head(model: nn.Module) -> bool:
    """Whether the output layer is sparsified (then every position's input is measured, as in a full pass:
    no ``logits_to_keep``)."""
    try:
        head = model.get_output_embeddings()  # type: ignore[operator]
    except (AttributeError, NotImplementedError, TypeError):
        head = None
    return isinstance(head, SparseLinear)


def _counting(monitor: SparsityMonitor | None, mask: torch.Tensor):
    return monitor.counting(mask) if monitor is not None else contextlib.nullcontext()


@torch.no_grad()
def continuation_logliks(
    model: nn.Module, groups: Sequence[Group], *, monitor: SparsityMonitor | None = None
) -> list[list[tuple[float, bool]]]:
    """``[[(sum of log-probs, greedy) per continuation] per group]`` for a batch of ``(context, continuations)``.

    Contexts and continuations are non-empty token-id lists. Contexts of one token and longer ones are run in
    separate calls (a row of padding alone has nothing to attend to).
    """
    if not groups:
        return []
    for ctx, conts in groups:
        if not ctx or not conts or any(not c for c in conts):
            raise UsageError("continuation_logliks needs non-empty contexts, each with non-empty continuations")
    short = [i for i, (ctx, _) in enumerate(groups) if len(ctx) == 1]
    if short and len(short) < len(groups):
        long = [i for i in range(len(groups)) if len(groups[i][0]) > 1]
        out: list[list[tuple[float, bool]]] = [[] for _ in groups]
        for part in (long, short):
            for i, scored in zip(part, continuation_logliks(model, [groups[i] for i in part], monitor=monitor)):
                out[i] = scored
        return out

    dev = model_device(model)
    owner = [g for g, (_, conts) in enumerate(groups) for _ in conts]
    conts = [list(c) for _, cs in groups for c in cs]
    plen = [len(ctx) - 1 for ctx, _ in groups]
    width = max(len(c) for c in conts)
    cache, prefix_mask = None, torch.zeros(len(groups), 0, dtype=torch.long)
    if max(plen) > 0:
        ids = torch.zeros(len(groups), max(plen), dtype=torch.long)
        prefix_mask = torch.zeros_like(ids)
        for g, (ctx, _) in enumerate(groups):
            ids[g, : plen[g]] = torch.tensor(list(ctx[:-1]))
            prefix_mask[g, : plen[g]] = 1
        with _counting(monitor, prefix_mask):
            kw = forward_kwargs(model, None, last_only=not _sparse_head(model))
            cache = output_cache(model(input_ids=ids.to(dev), attention_mask=prefix_mask.to(dev), **kw))
        if owner != list(range(len(groups))):
            cache.batch_select_indices(torch.tensor(owner, device=dev))
    rows = torch.zeros(len(conts), width, dtype=torch.long)
    suffix_mask = torch.zeros_like(rows)
    for i, c in enumerate(conts):
        rows[i, : len(c)] = torch.tensor([groups[owner[i]][0][-1], *c[:-1]])
        suffix_mask[i, : len(c)] = 1
    mask = torch.cat([prefix_mask[owner], torch.ones_like(rows)], dim=1)  # right padding: never attended to
    positions = torch.tensor(plen)[owner][:, None] + torch.arange(width)[None, :]
    with _counting(monitor, suffix_mask):
        logits = model(
            input_ids=rows.to(dev),
            attention_mask=mask.to(dev),
            position_ids=positions.to(dev),
            **{**forward_kwargs(model, cache, last_only=False), "use_cache": False},
        ).logits
    logp = F.log_softmax(logits.float(), dim=-1)
    answers: list[list[tuple[float, bool]]] = [[] for _ in groups]
    for i, c in enumerate(conts):
        target = torch.tensor(c, device=logp.device)
        lp = logp[i, : len(c)]
        greedy = bool((lp.argmax(dim=-1) == target).all())
        answers[owner[i]].append((float(lp.gather(1, target[:, None]).sum()), greedy))
    return answers
