"""Prompts in, text out: settings checks, the engine choice, prompt encoding (chat template or completion),
and incremental detokenization for streaming."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from ..engine import check_sampling
from ..errors import UsageError
from ..offload import model_device

__all__ = ["ENGINES", "Stream", "check_settings", "resolve_engine", "encode_prompt", "encode_checked", "Detokenizer"]

ENGINES = ("auto", "graph", "eager")

Stream = Callable[[str], None]


def check_settings(
    prompt: str,
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    engine: str = "auto",
) -> None:
    """Raise ``ValueError`` for an empty prompt or out-of-range settings (before any model work)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise UsageError("the prompt is empty; give some text to continue")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    check_sampling(do_sample, temperature, top_p)
    if engine not in ENGINES:
        raise UsageError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")


def resolve_engine(model: nn.Module, engine: str = "auto") -> str:
    """``"graph"`` (the static-cache :class:`~actsparse.engine.Decoder`) or ``"eager"`` (the dynamic-cache
    loop): ``"auto"`` picks the decoder for a model on CUDA and the loop elsewhere."""
    if engine not in ENGINES:
        raise UsageError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "auto":
        return "graph" if model_device(model).type == "cuda" else "eager"
    return engine


def encode_prompt(tokenizer, prompt: str, chat: bool | None = False) -> tuple[torch.Tensor, bool]:
    """``([1, T] token ids, chat used)``. ``chat=None`` uses the chat template when the tokenizer has one."""
    template = getattr(tokenizer, "chat_template", None)
    if chat is None:
        chat = bool(template)
    if chat:
        if not template:
            raise UsageError(
                "chat=True but the tokenizer has no chat template; generate with chat=False (plain completion)"
            )
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template holds the special tokens
    else:
        ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise UsageError(f"the prompt {prompt!r} encodes to no tokens")
    return torch.tensor([ids], dtype=torch.long), chat


def encode_checked(
    model: nn.Module, tokenizer, prompt: str, chat: bool | None, max_new_tokens: int
) -> tuple[torch.Tensor, bool]:
    """:func:`encode_prompt`, refusing a prompt + ``max_new_tokens`` beyond the model's positions."""
    ids, chat = encode_prompt(tokenizer, prompt, chat)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and limit > 0 and ids.shape[1] + max_new_tokens > limit:
        raise UsageError(
            f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's {limit} positions"
        )
    return ids, chat


class Detokenizer:
    """Incremental text for streaming: emits the new suffix of the decoded text, holding it back while it ends
    in an incomplete UTF-8 sequence (U+FFFD) or while decoding more tokens rewrote earlier text."""

    def __init__(self, tokenizer, stream: Stream | None):
        self.tokenizer, self.stream = tokenizer, stream
        self.ids: list[int] = []
        self.emitted = ""

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token: int) -> None:
        self.ids.append(token)
        if self.stream is None:
            return
        text = self._text()
        if not text.endswith("\ufffd") and text.startswith(self.emitted) and len(text) > len(self.emitted):
            self.stream(text[len(self.emitted) :])
            self.emitted = text

    def finish(self) -> str:
        text = self._text()
        if self.stream is not None and text.startswith(self.emitted) and len(text) > len(self.emitted):
            self.stream(text[len(self.emitted) :])
            self.emitted = text
        return text
