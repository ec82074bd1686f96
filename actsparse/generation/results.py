"""What a generation returns: the text, tokens, timings and measured sparsity; dense-vs-sparse comparisons."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import UsageError
from ..eval.sparsity import summarize_by_type

__all__ = ["GenerationResult", "Comparison", "first_divergence"]


@dataclass
class GenerationResult:
    """One generation: the text, its tokens, timings and measured sparsity.

    ``prefill_seconds`` is the time to first token (prompt forward + picking the first token);
    ``decode_seconds`` the time of the remaining ``new_tokens - 1`` single-token steps. Sparsity maps
    layer names to the measured fraction of zero inputs (empty for a dense model; ``decode_sparsity`` is
    empty too when only one token was generated, as no decode step ran).
    """

    prompt: str
    chat: bool
    prompt_tokens: int
    text: str
    token_ids: list[int]
    tokens: list[str]
    stop_reason: str  # "eos" or "length"
    prefill_seconds: float
    decode_seconds: float
    sparse: bool
    prefill_sparsity: dict[str, float] = field(default_factory=dict)
    decode_sparsity: dict[str, float] = field(default_factory=dict)
    target_sparsity: dict[str, float | None] = field(default_factory=dict)
    engine: str = "loop"  # how decode steps ran: "graph" (CUDA graph), "compile", "eager" (Decoder) or "loop"
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def decode_tokens_per_s(self) -> float | None:
        """``(new_tokens - 1) / decode_seconds``: tokens per second after the first (``None`` without decode steps)."""
        steps = self.new_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else None

    def mean_sparsity(self, phase: str = "decode") -> float | None:
        """Unweighted mean over layers of the measured sparsity of ``phase`` ("decode" or "prefill")."""
        values = self._phase(phase)
        return sum(values.values()) / len(values) if values else None

    def sparsity_by_type(self, phase: str = "decode") -> dict[str, float]:
        """Mean measured sparsity per projection type (``up_proj``, ...) of ``phase``."""
        return summarize_by_type(self._phase(phase))

    def _phase(self, phase: str) -> dict[str, float]:
        if phase not in ("decode", "prefill"):
            raise UsageError(f"phase must be 'decode' or 'prefill', got {phase!r}")
        return self.decode_sparsity if phase == "decode" else self.prefill_sparsity

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            new_tokens=self.new_tokens,
            decode_tokens_per_s=self.decode_tokens_per_s,
            mean_decode_sparsity=self.mean_sparsity("decode"),
            mean_prefill_sparsity=self.mean_sparsity("prefill"),
            decode_sparsity_by_type=self.sparsity_by_type("decode"),
        )
        return out


@dataclass
class Comparison:
    """Dense and sparse generations of the same prompt with the same settings."""

    dense: GenerationResult
    sparse: GenerationResult

    @property
    def first_divergence(self) -> int | None:
        """Index of the first new token where the two differ (``None`` if identical); see :func:`first_divergence`."""
        return first_divergence(self.dense.token_ids, self.sparse.token_ids)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dense": self.dense.to_dict(),
            "sparse": self.sparse.to_dict(),
            "first_divergence": self.first_divergence,
        }


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """The first index where ``a`` and ``b`` differ; ``min(len)`` when one is a proper prefix of the other
    (one stopped early at EOS); ``None`` when they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))
