"""Helpers shared by the tests: tiny random models and a byte-level tokenizer (fixtures are in conftest.py)."""

import torch
import torch.utils._python_dispatch
from transformers import LlamaConfig, LlamaForCausalLM

__all__ = ["VOCAB", "CountOps", "make_tiny_llama", "byte_tokenizer", "random_norm_gains", "token_batches", "logits_of"]

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


def random_norm_gains(model, seed: int = 5):
    """Random positive RMSNorm gains in place (a fresh model has ones, which would hide a missing fold)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g) * 1.5)
    return model


def token_batches(n: int = 4, seed: int = 1) -> list:
    """``n`` seeded [2, 24] batches of random token ids."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 24), generator=g) for _ in range(n)]


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids).logits


class CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that run (by name, e.g. ``"actsparse.sparse_gemv"``) while active: what the dispatcher
    sees, not our Python."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))
