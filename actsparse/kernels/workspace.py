"""Zeroed int32 counters for the kernels' last-arriver reductions, one buffer per (user, device).

A kernel whose programs each count themselves in (``atomic_add``) and whose last arriver finishes the work
resets its counter to 0 before it exits, so a buffer allocated zeroed once stays zeroed between launches and
CUDA graph replays. Launches that share a buffer must not overlap (one stream), which the decode step's
sequential kernels satisfy; each user (``"gemv"``, ``"attention"``) gets its own buffer all the same.

A buffer is allocated (and zeroed) at the first call that needs it. Inside a CUDA graph capture that zeroing
would be recorded rather than run, so a first call there is refused: call the kernel once before capturing (the
warm-up that CUDA graphs want anyway; the Decoder does it). A buffer outgrown by a later call is kept alive, never
freed: a CUDA graph captured with it holds its address, and its replays would otherwise write into whatever
memory the allocator handed out next.
"""

from __future__ import annotations

import torch

from ..errors import UsageError

__all__ = ["counter_buffer"]

_BUFFERS: dict[tuple, torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []  # earlier buffers, which captured graphs may still address


def counter_buffer(device: torch.device, n: int, user: str) -> torch.Tensor:
    """At least ``n`` zeroed int32 counters on ``device`` for ``user`` (grown, never shrunk; reused)."""
    key = (user, device.type, device.index)
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise UsageError(
                f"the {user} kernel's counters are allocated at its first call, and this first call is inside a CUDA "
                "graph capture; run it once before capturing (a warm-up call)"
            )
        if buf is not None:
            _OUTGROWN.append(buf)
        buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _BUFFERS[key] = buf
    return buf
