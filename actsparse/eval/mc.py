"""Multiple-choice accuracy (TruthfulQA-MC style): question, choices, label; log-likelihood scoring.

Each choice is scored by the sum of its tokens' log-probabilities after the prompt
``"Question: {question}\\nAnswer:"`` and a space; ``accuracy`` takes the best sum, ``accuracy_norm`` the best
sum per character of the choice (lm-eval's ``acc`` / ``acc_norm``).

Datasets: a JSON list or JSONL file of objects with ``question``, ``choices`` (list of strings) and ``label``
(index of the correct choice), or ``hf:NAME[:CONFIG][@SPLIT]`` with the same columns (``datasets`` needed).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import DatasetError

__all__ = ["MCItem", "MCExample", "load_mc", "parse_mc", "tokenize_mc", "mc_scores", "PROMPT"]

PROMPT = "Question: {question}\nAnswer:"


@dataclass
class MCItem:
    question: str
    choices: list[str]
    label: int


def parse_mc(records: Iterable[Any], where: str = "dataset") -> list[MCItem]:
    """Validate records into :class:`MCItem` s (clear errors name the record and the missing field)."""
    items = []
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise DatasetError(
                f"{where} record {i}: expected an object with question/choices/label, got {type(r).__name__}"
            )
        missing = [k for k in ("question", "choices", "label") if k not in r]
        if missing:
            raise DatasetError(
                f"{where} record {i}: missing {', '.join(missing)} (has {sorted(r)}); a multiple-"
                f"choice set needs 'question', 'choices' (list of strings) and 'label' (int)"
            )
        q, ch, lab = r["question"], r["choices"], r["label"]
        if not isinstance(q, str) or not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) for c in ch):
            raise DatasetError(f"{where} record {i}: 'question' must be a string and 'choices' a list of >= 2 strings")
        if isinstance(lab, bool) or not isinstance(lab, int) or not 0 <= lab < len(ch):
            raise DatasetError(
                f"{where} record {i}: 'label' must be an int index into its {len(ch)} choices, got {lab!r}"
            )
        items.append(MCItem(q, list(ch), lab))
    if not items:
        raise DatasetError(f"{where} has no records")
    return items


def load_mc(spec: str) -> list[MCItem]:
    """A JSON list / JSONL file, or ``hf:NAME[:CONFIG][@SPLIT]``."""
    if spec.startswith("hf:"):
        try:
            from datasets import load_dataset
        except ImportError:
            raise DatasetError("HF datasets need the 'datasets' package: pip install datasets") from None
        body, _, split = spec[3:].partition("@")
        name, _, config = body.partition(":")
        ds = load_dataset(name, config or None, split=split or "validation")
        return parse_mc((dict(r) for r in ds), spec)
    if not os.path.isfile(spec):
        raise DatasetError(f"multiple-choice data {spec!r} is neither an existing JSON/JSONL file nor hf:NAME")
    with open(spec, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
        records = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise DatasetError(f"{spec}: neither JSON nor JSONL ({e})") from None
    return parse_mc(records, spec)


@dataclass
class MCExample:
    """One tokenized item: ``prompt`` ids ``[1, P]``; ``rows`` ``[C, T]`` prompt+choice ids (right-padded),
    ``attention`` ``[C, T]``; ``choice_mask`` ``[C, T-1]`` marks the label positions that are choice tokens."""

    prompt: torch.Tensor
    rows: torch.Tensor
    attention: torch.Tensor
    choice_mask: torch.Tensor
    chars: list[int]
    label: int


def tokenize_mc(tokenizer, items: list[MCItem], pad_id: int | None = None) -> list[MCExample]:
    pad = pad_id if pad_id is not None else (tokenizer.pad_token_id or tokenizer.eos_token_id or 0)
    out = []
    for it in items:
        prompt = tokenizer(PROMPT.format(question=it.question), add_special_tokens=False)["input_ids"]
        conts = [tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in it.choices]
        if not prompt or any(not c for c in conts):
            raise DatasetError(f"question {it.question[:40]!r}: empty prompt or choice after tokenization")
        width = len(prompt) + max(len(c) for c in conts)
        rows = torch.full((len(conts), width), pad, dtype=torch.long)
        att = torch.zeros_like(rows, dtype=torch.bool)
        cmask = torch.zeros(len(conts), width - 1, dtype=torch.bool)
        for i, c in enumerate(conts):
            n = len(prompt) + len(c)
            rows[i, :n] = torch.tensor(prompt + c)
            att[i, :n] = True
            cmask[i, len(prompt) - 1 : n - 1] = True  # label t (predicted at position t) = token t+1
        out.append(MCExample(torch.tensor([prompt]), rows, att, cmask, [len(c) for c in it.choices], it.label))
    return out


def mc_scores(loglik: torch.Tensor, example: MCExample) -> tuple[bool, bool]:
    """``(correct, correct_norm)`` from the choices' summed log-likelihoods ``[C]``."""
    chars = torch.tensor(example.chars, dtype=torch.float64)
    return int(loglik.argmax()) == example.label, int((loglik / chars).argmax()) == example.label
