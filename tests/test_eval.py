import json
import math

import pytest
import torch
import torch.nn.functional as F

import actsparse as A
from actsparse import TargetScope
from actsparse.data import count_words
from actsparse.eval import SparsityMonitor, perplexity, summarize_by_type
from actsparse.schema import json_safe


def _brute_force_nll(model, ids, context, stride):
    """One forward pass per token. Windows: the first scores tokens [1, context); each later one scores
    the next min(stride, context - 1) tokens, with the longest history that fits in `context`."""
    stride = min(stride, context - 1)
    n, total, start = ids.numel(), 0.0, 1
    while start < n:
        end = min(start + stride if start > 1 else context, n)
        begin = max(0, end - context)
        for t in range(start, end):
            logits = model(ids[begin:t].unsqueeze(0)).logits[0, -1].double()
            total -= F.log_softmax(logits, -1)[ids[t]].item()
        start = end
    return total


@pytest.mark.parametrize("context, stride", [(16, 16), (16, 15), (16, 8), (16, 5), (64, 64)])
def test_sliding_window_perplexity_matches_brute_force(tiny_llama, context, stride):
    ids = torch.randint(0, 256, (45,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = _brute_force_nll(tiny_llama, ids, context, stride)
    r = perplexity(tiny_llama, ids, context=context, stride=stride, n_words=20, progress=False)
    assert r.n_tokens == 44
    assert r.nll_sum == pytest.approx(ref, rel=1e-4)
    assert r.token_perplexity == pytest.approx(math.exp(ref / 44), rel=1e-4)
    assert r.word_perplexity == pytest.approx(math.exp(ref / 20), rel=1e-4)


def test_single_window_equals_full_sequence_loss(tiny_llama):
    ids = torch.randint(0, 256, (30,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss = tiny_llama(ids[None], labels=ids[None]).loss.item()  # HF's own mean NLL
    r = perplexity(tiny_llama, ids, context=64, progress=False)
    assert r.token_perplexity == pytest.approx(math.exp(loss), rel=1e-5)


def test_perplexity_argument_errors(tiny_llama):
    ids = torch.arange(10)
    with pytest.raises(ValueError, match="stride"):
        perplexity(tiny_llama, ids, context=8, stride=9)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(tiny_llama, ids[:1], context=8)


def test_count_words():
    assert count_words("  a b\n c\t d  ") == 4


def test_monitor_counts_the_zeros_the_layers_produce(tiny_llama, calib_data):
    A.sparsify_activations(tiny_llama, calib_data, {TargetScope(patterns=[".*down_proj"]): 0.5}, progress=False)
    layer = tiny_llama.model.layers[1].mlp.down_proj
    seen = []
    h = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    x = calib_data[2]
    with SparsityMonitor(tiny_llama) as mon:
        tiny_llama(x)
    h.remove()
    manual = (seen[0].abs() <= layer.act_threshold).double().mean().item()
    assert mon.sparsity()["model.layers.1.mlp.down_proj"] == pytest.approx(manual, abs=1e-12)
    assert summarize_by_type(mon.sparsity()).keys() == {"down_proj"}
    assert all(not m._forward_pre_hooks for m in tiny_llama.modules() if isinstance(m, A.SparseLinear))


def test_monitor_requires_sparse_layers(tiny_llama):
    with pytest.raises(ValueError, match="sparsify it first"):
        SparsityMonitor(tiny_llama)


def test_a_perplexity_past_float_range_is_inf_and_json_null(tiny_llama):
    ids = torch.randint(0, 256, (400,), generator=torch.Generator().manual_seed(0))
    r = perplexity(tiny_llama, ids, context=64, n_words=2, progress=False)  # text with two spaces: ~1000 nats a word
    assert r.word_perplexity == math.inf and math.isfinite(r.token_perplexity)
    assert json.loads(json.dumps(json_safe({"ppl": r.word_perplexity, "x": [math.nan, 1.5]}), allow_nan=False)) == {
        "ppl": None,
        "x": [None, 1.5],
    }
