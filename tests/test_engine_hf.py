"""actsparse.engine.hf's call binding, which the fused forwards (norms.py, rope.py) share."""

from __future__ import annotations

from actsparse.engine.hf import bind_call

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
