"""Next-token selection on the device: greedy argmax, or temperature + nucleus (top-p) sampling.

One definition for every generation path (the CUDA-graph decoder, the eager loop): batched over rows,
no host synchronisation, draws from a ``torch.Generator`` so that the same seed gives the same tokens.
"""

from __future__ import annotations

import math

import torch

from ..errors import UsageError

__all__ = ["select_next", "check_sampling"]


def check_sampling(do_sample: bool, temperature: float, top_p: float) -> None:
    """``ValueError`` for out-of-range sampling settings (they are ignored when ``do_sample`` is False)."""
    if not do_sample:
        return
    if not (
        isinstance(temperature, (int, float))
        and not isinstance(temperature, bool)
        and math.isfinite(temperature)
        and temperature > 0
    ):
        raise UsageError(f"temperature must be > 0, got {temperature!r} (use greedy decoding for 'temperature 0')")
    if not (isinstance(top_p, (int, float)) and not isinstance(top_p, bool) and 0 < top_p <= 1):
        raise UsageError(f"top_p must be in (0, 1], got {top_p!r}")


def select_next(
    logits: torch.Tensor,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token of each row of ``logits`` ``[B, vocab]``: ``[B]`` int64 on the logits' device.

    Greedy picks the argmax of the fp32 logits (as ``model.generate(do_sample=False)``); sampling divides
    by ``temperature``, keeps the smallest set of most likely tokens whose probability reaches ``top_p``
    (the first token always), and draws from what is left with ``generator``.
    """
    logits = logits.float()
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= top_p  # the mass before it already reaches top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).view(-1)
