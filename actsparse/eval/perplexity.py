"""Token- and word-level perplexity with a sliding window (fp32 log-softmax, fp64 sums)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import UsageError
from ..forward import eval_mode
from ..offload import model_device

__all__ = ["PerplexityResult", "perplexity"]


@dataclass
class PerplexityResult:
    token_perplexity: float
    word_perplexity: float | None
    nll_sum: float
    n_tokens: int  # tokens scored (all but the first)
    n_words: int | None
    context: int
    stride: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    context: int = 1024,
    stride: int | None = None,
    n_words: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on one token stream, HF-style sliding window.

    Every token but the first is scored exactly once. Each window scores the next ``stride`` tokens
    (at most ``context - 1``; default ``context - 1``: windows overlap by one token, like lm-eval's
    rolling windows) and feeds as much history as fits in ``context``, so a scored token sees at
    least ``context - stride`` tokens before it (fewer only at the start). Token perplexity is
    ``exp(NLL / n_tokens)``; word perplexity (when ``n_words`` is given, e.g. from
    ``actsparse.data.count_words``) is ``exp(NLL / n_words)`` as in lm-eval.
    """
    ids = input_ids.reshape(-1)
    n = ids.numel()
    if context < 2:
        raise UsageError(f"context must be >= 2, got {context}")
    stride = context - 1 if stride is None else stride
    if not 1 <= stride <= context:
        raise UsageError(f"stride must be in [1, context={context}], got {stride}")
    stride = min(stride, context - 1)
    if n < 2:
        raise UsageError(f"need at least 2 tokens to compute perplexity, got {n}")
    device = model_device(model)
    kwargs = {"use_cache": False} if hasattr(model, "config") else {}
    spans = []  # (window begin, first scored token, end)
    start = 1
    while start < n:
        end = min(start + stride if start > 1 else context, n)
        spans.append((max(0, end - context), start, end))
        start = end
    nll = 0.0
    with eval_mode(model):
        for begin, first, end in tqdm(spans, desc="perplexity", unit="window", disable=not progress):
            logits = model(ids[begin:end].unsqueeze(0).to(device), **kwargs).logits[0]
            pred = logits[first - begin - 1 : end - begin - 1].float()
            nll += F.cross_entropy(pred, ids[first:end].to(pred.device), reduction="sum").double().item()
    scored = n - 1
    word = _exp(nll / n_words) if n_words else None
    return PerplexityResult(_exp(nll / scored), word, nll, scored, n_words, context, stride)


def _exp(x: float) -> float:
    """``exp(x)``, ``inf`` past float range (a word perplexity of text with few spaces, a broken model)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf
