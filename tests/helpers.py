"""Helpers shared by the tests: tiny random models and a byte-level tokenizer (fixtures are in conftest.py)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

__all__ = ["VOCAB", "make_tiny_llama", "byte_tokenizer"]

VOCAB = 256


def make_tiny_llama(layers: int = 2, seed: int = 0, hidden: int = 64, inter: int = 128, **config) -> LlamaForCausalLM:
    """A random tiny Llama (4 heads, 2 KV heads, untied head); ``config`` overrides LlamaConfig fields."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        **{
            "vocab_size": VOCAB,
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "tie_word_embeddings": False,
            **config,
        }
    )
    return LlamaForCausalLM(cfg).eval()


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)
