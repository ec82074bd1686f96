"""Text generation from a (sparsified) causal LM: streaming, prefill/decode timing, measured sparsity.

:mod:`.loop` runs it (:func:`generate`, :func:`compare_generate`), :mod:`.prompt` turns prompts into tokens and
tokens into streamed text, :mod:`.results` holds what a generation returns.
"""

from .loop import compare_generate, decode_one_token, dense_view, generate, prefill
from .prompt import ENGINES, Detokenizer, check_settings, encode_prompt, resolve_engine
from .results import Comparison, GenerationResult, first_divergence

__all__ = [
    "GenerationResult",
    "Comparison",
    "generate",
    "compare_generate",
    "check_settings",
    "encode_prompt",
    "prefill",
    "decode_one_token",
    "dense_view",
    "first_divergence",
    "ENGINES",
    "resolve_engine",
    "Detokenizer",
]
