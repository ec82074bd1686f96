"""Token- and word-level perplexity with a sliding window (fp32 log-softmax, fp64 sums)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

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
def perplexity(model: nn.Module, input_ids: torch.Tensor, *, context: int = 1024, stride: int | None = None,
               n_words: int | None = None, progress: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` on one token stream, HF-style sliding window.

    Windows of ``context`` tokens start every ``stride`` tokens (default: ``stride = context``, no
    overlap); each token is scored once, in the first window that scores it, with at least
    ``context - stride`` tokens of history after the first window. Token perplexity is
    ``exp(NLL / n_tokens)``; word perplexity (when ``n_words`` is given, e.g. from
    ``actsparse.data.count_words``) is ``exp(NLL / n_words)`` as in lm-eval.
    """
    ids = input_ids.reshape(-1)
    n = ids.numel()
    stride = context if stride is None else stride
    if context < 2:
        raise ValueError(f"context must be >= 2, got {context}")
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in [1, context={context}], got {stride}")
    if n < 2:
        raise ValueError(f"need at least 2 tokens to compute perplexity, got {n}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, scored, prev_end = 0.0, 0, 0
    starts = list(range(0, n - 1, stride))
    try:
        for begin in tqdm(starts, desc="perplexity", unit="window", disable=not progress):
            end = min(begin + context, n)
            first = max(prev_end, begin + 1)  # first token index scored in this window
            if first >= end:
                continue
            window = ids[begin:end].unsqueeze(0).to(device)
            kwargs = {"use_cache": False} if hasattr(model, "config") else {}
            logits = model(window, **kwargs).logits[0]
            pred = logits[first - begin - 1:end - begin - 1].float()
            target = ids[first:end].to(device)
            nll += F.cross_entropy(pred, target, reduction="sum").double().item()
            scored += end - first
            prev_end = end
            if end == n:
                break
    finally:
        model.train(was_training)
    word = math.exp(nll / n_words) if n_words else None
    return PerplexityResult(math.exp(nll / scored), word, nll, scored, n_words, context, stride)
