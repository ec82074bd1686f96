"""Other libraries' log noise that does not concern an actsparse user, silenced where actsparse causes it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

__all__ = ["quiet_torchao"]


@contextlib.contextmanager
def quiet_torchao() -> Iterator[None]:
    """torchao, when installed, logs a warning per optional CUDA extension it cannot load on a CPU-only machine,
    and torch one per Enum torchao registers; transformers imports torchao with its model classes. Neither
    concerns the user: both loggers are raised to ERROR for the block."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
