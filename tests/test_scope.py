import pytest
import torch.nn as nn

from actsparse import IgnoredScope, ScopeError, TargetScope
from actsparse.scope import resolve_targets

UP = TargetScope(patterns=[".*up_proj.*"])


def test_patterns_and_names_resolve_in_module_order(tiny_llama):
    t = resolve_targets(
        tiny_llama,
        {TargetScope(patterns=[".*down_proj.*"]): 0.5, TargetScope(names=["model.layers.0.mlp.up_proj"]): 0.3},
    )
    assert list(t) == ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert t["model.layers.0.mlp.up_proj"] == 0.3 and t["model.layers.1.mlp.down_proj"] == 0.5


def test_target_scope_accepts_lists_and_is_hashable():
    a, b = TargetScope(patterns=[".*up_proj.*"]), TargetScope(patterns=(".*up_proj.*",))
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1


def test_patterns_use_re_match_like_nncf(tiny_llama):
    with pytest.raises(ScopeError, match="matches no module"):
        resolve_targets(tiny_llama, {TargetScope(patterns=["up_proj"]): 0.3})  # anchored at start


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.3", True])
def test_sparsity_outside_unit_interval(tiny_llama, bad):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        resolve_targets(tiny_llama, {UP: bad})


def test_unmatched_scope_lists_close_names(tiny_llama):
    with pytest.raises(ScopeError) as e:
        resolve_targets(tiny_llama, {TargetScope(names=["model.layers.0.mlp.up_prj"]): 0.3})
    assert "model.layers.0.mlp.up_proj" in str(e.value)
    with pytest.raises(ScopeError) as e:
        resolve_targets(tiny_llama, {TargetScope(patterns=[".*upproj.*"]): 0.3})
    assert "close names" in str(e.value) and "up_proj" in str(e.value)


def test_module_matched_by_two_scopes(tiny_llama):
    with pytest.raises(ScopeError, match="two target scopes"):
        resolve_targets(tiny_llama, {UP: 0.3, TargetScope(patterns=[".*mlp.*"]): 0.5})


def test_scope_matching_only_non_linear_modules(tiny_llama):
    with pytest.raises(ScopeError, match="only non-Linear modules.*LlamaRMSNorm"):
        resolve_targets(tiny_llama, {TargetScope(patterns=[".*layernorm"]): 0.3})


def test_mixed_match_keeps_only_linears(tiny_llama):
    t = resolve_targets(tiny_llama, {TargetScope(patterns=[r"model\.layers\.0\.mlp.*"]): 0.3})
    assert list(t) == [f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]


def test_ignored_scope_wins(tiny_llama):
    t = resolve_targets(tiny_llama, {UP: 0.3}, IgnoredScope(patterns=[r".*layers\.0\..*"]))
    assert list(t) == ["model.layers.1.mlp.up_proj"]


def test_ignored_by_type(tiny_llama):
    with pytest.raises(ScopeError, match="nothing left"):
        resolve_targets(tiny_llama, {UP: 0.3}, IgnoredScope(types=["Linear"]))


def test_everything_ignored(tiny_llama):
    with pytest.raises(ScopeError, match="nothing left to sparsify"):
        resolve_targets(tiny_llama, {UP: 0.3}, IgnoredScope(patterns=[".*"]))


def test_unmatched_ignored_entry_is_an_error_unless_validate_false(tiny_llama):
    with pytest.raises(ScopeError, match="IgnoredScope"):
        resolve_targets(tiny_llama, {UP: 0.3}, IgnoredScope(names=["nope"]))
    assert len(resolve_targets(tiny_llama, {UP: 0.3}, IgnoredScope(names=["nope"], validate=False))) == 2


def test_bad_regex_and_empty_scope():
    with pytest.raises(ScopeError, match="invalid regular expression"):
        TargetScope(patterns=["(unclosed"])
    with pytest.raises(ScopeError, match="at least one"):
        TargetScope()


def test_non_targetscope_key_and_empty_mapping(tiny_llama):
    with pytest.raises(ScopeError, match="TargetScope"):
        resolve_targets(tiny_llama, {".*up_proj.*": 0.3})
    with pytest.raises(ScopeError, match="non-empty"):
        resolve_targets(tiny_llama, {})


def test_model_without_linear():
    with pytest.raises(ScopeError, match="no nn.Linear"):
        resolve_targets(nn.Sequential(nn.ReLU()), {UP: 0.3})
