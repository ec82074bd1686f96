"""actsparse.engine.hf: the call binding the fused forwards (norms.py, rope.py) share, the cache's name."""

from __future__ import annotations

import logging

import torch
import transformers.utils.logging as tlog
from helpers import make_tiny_llama

from actsparse.engine.hf import bind_call, forward_kwargs, output_cache

NAMES = ("hidden_states", "position_embeddings", "attention_mask", "cache")


def test_positional_and_keyword_arguments_are_bound_by_name_and_the_rest_kept_apart():
    named, extra = bind_call(NAMES, ("h", "pe"), {"attention_mask": "m", "use_cache": True})
    assert named == {"hidden_states": "h", "position_embeddings": "pe", "attention_mask": "m"}
    assert extra == {"use_cache": True}


def test_the_old_cache_name_is_taken_as_the_new_one_only_where_the_forward_has_the_new():
    named, extra = bind_call(NAMES, ("h",), {"past_key_values": "c"})
    assert named == {"hidden_states": "h", "cache": "c"} and extra == {}
    named, extra = bind_call(("hidden_states", "past_key_values"), ("h",), {"past_key_values": "c"})
    assert named == {"hidden_states": "h", "past_key_values": "c"} and extra == {}


def test_a_call_bound_otherwise_is_left_to_the_class_forward():
    assert bind_call(NAMES, ("h", "pe", "m", "c", "extra"), {}) is None  # more positional arguments than names
    assert bind_call(NAMES, ("h",), {"hidden_states": "h2"}) is None  # given twice
    assert bind_call(NAMES, ("h", "pe", "m", "c"), {"past_key_values": "c2"}) is None  # twice, by its old name
    assert bind_call(NAMES, ("h",), {"cache": "c", "past_key_values": "c2"}) is None  # by both names


def test_the_returned_cache_is_read_under_its_current_name_without_the_deprecation_warning(caplog):
    """Reading ``output.past_key_values`` in transformers >= 5.2x warns that the name is deprecated (once per
    process: the lm-eval scorer printed it in every zero-shot run); ``output_cache`` reads ``cache`` there."""
    model = make_tiny_llama()
    out = model(torch.tensor([[1, 2, 3]]), **forward_kwargs(model, None))
    tlog.warning_once.cache_clear()  # (a warning given once already in this process would not show again)
    with caplog.at_level(logging.WARNING):
        cache = output_cache(out)
    assert cache is not None and cache.get_seq_length() == 3
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()], caplog.records
