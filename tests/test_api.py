import copy

import pytest
import torch

import actsparse as A
from actsparse import (
    AlreadySparsifiedError,
    DatasetError,
    IgnoredScope,
    QuantileMethod,
    SparseLinear,
    SparsifyConfig,
    TargetScope,
)

RECIPE = {TargetScope(patterns=[".*up_proj.*", ".*gate_proj.*"]): 0.3, TargetScope(patterns=[".*down_proj.*"]): 0.5}


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unmodified(model, before, x, ref):
    assert not any(isinstance(m, SparseLinear) for m in model.modules())
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(model(x).logits, ref)


def test_nncf_example_end_to_end(tiny_llama, calib_data):
    x = calib_data[0]
    dense = tiny_llama(x).logits
    out = A.sparsify_activations(
        tiny_llama, calib_data, RECIPE, ignored_scope=IgnoredScope(patterns=[r".*layers\.0\..*"]), progress=False
    )
    assert out is tiny_llama
    names = sorted(A.sparse_layers(tiny_llama))
    assert names == [f"model.layers.1.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")]
    assert tiny_llama.model.layers[1].mlp.down_proj.target_sparsity == 0.5
    assert "model.layers.1.mlp.up_proj.act_threshold" in tiny_llama.state_dict()
    sparse = tiny_llama(x).logits
    assert not torch.equal(sparse, dense)
    A.remove_sparsity(tiny_llama)
    assert torch.equal(tiny_llama(x).logits, dense)
    assert not A.sparse_layers(tiny_llama)


def test_torchao_style_config_with_string_patterns_and_method(tiny_llama, calib_data):
    cfg = SparsifyConfig({".*down_proj.*": 0.5}, method="quantile", method_options={"statistic": "ema"})
    assert cfg.method == QuantileMethod(statistic="ema")
    A.sparsify_(tiny_llama, cfg, calib_data, progress=False)
    assert len(A.sparse_layers(tiny_llama)) == 2


def test_unknown_method_lists_registered():
    with pytest.raises(ValueError, match="registered methods: attribution, quantile"):
        SparsifyConfig({".*": 0.5}, method="nope")
    with pytest.raises(ValueError, match="unknown statistic"):
        QuantileMethod(statistic="mean")
    with pytest.raises(ValueError, match="no option"):
        SparsifyConfig({".*": 0.5}, method_options={"alpha": 1})


@pytest.mark.parametrize(
    "make",
    [
        lambda d: [x[0] for x in d],  # 1-D tensors
        lambda d: d,  # 2-D tensors
        lambda d: [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in d],
        lambda d: [x[0].tolist() for x in d],  # lists of ints
        lambda d: (x for x in d),  # a one-shot generator
    ],
)
def test_dataset_forms(tiny_llama, calib_data, make):
    A.sparsify_activations(tiny_llama, make(calib_data), RECIPE, progress=False)
    assert len(A.sparse_layers(tiny_llama)) == 6


def test_nncf_dataset_like_object(tiny_llama, calib_data):
    class NNCFDatasetLike:
        def __init__(self, items, transform):
            self.items, self.transform = items, transform

        def get_inference_data(self):
            return (self.transform(i) for i in self.items)

    ds = NNCFDatasetLike([x.tolist() for x in calib_data], lambda ids: {"input_ids": torch.tensor(ids)})
    A.sparsify_activations(tiny_llama, ds, RECIPE, progress=False)
    assert len(A.sparse_layers(tiny_llama)) == 6


@pytest.mark.parametrize(
    "dataset, message",
    [
        ([], "empty"),
        (None, "dataset is required"),
        (["some text"], "tokenize"),
        ("some text", "string"),
        ([torch.randn(2, 8)], "integers"),
        ([{"ids": torch.zeros(1, 4, dtype=torch.long)}], "input_ids"),
        ([3.5], "unsupported item"),
        (42, "iterable"),
        (
            [{"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.zeros(1, 4, dtype=torch.long)}],
            "no real tokens",
        ),
    ],
)
def test_bad_datasets_raise_clear_errors_and_leave_model_unmodified(tiny_llama, calib_data, dataset, message):
    x, before = calib_data[0], _state(tiny_llama)
    ref = tiny_llama(x).logits
    with pytest.raises(DatasetError, match=message):
        A.sparsify_activations(tiny_llama, dataset, RECIPE, progress=False)
    _assert_unmodified(tiny_llama, before, x, ref)


@pytest.mark.parametrize(
    "scopes",
    [
        {TargetScope(patterns=[".*up_proj.*"]): 1.2},
        {TargetScope(patterns=[".*nothing.*"]): 0.3},
    ],
)
def test_bad_scopes_leave_model_unmodified(tiny_llama, calib_data, scopes):
    x, before = calib_data[0], _state(tiny_llama)
    ref = tiny_llama(x).logits
    with pytest.raises(ValueError):
        A.sparsify_activations(tiny_llama, calib_data, scopes, progress=False)
    _assert_unmodified(tiny_llama, before, x, ref)


def test_sparsify_twice_is_an_error(tiny_llama, calib_data):
    A.sparsify_activations(tiny_llama, calib_data, RECIPE, progress=False)
    thresholds = {n: m.act_threshold.clone() for n, m in A.sparse_layers(tiny_llama).items()}
    with pytest.raises(AlreadySparsifiedError, match="remove_sparsity"):
        A.sparsify_activations(tiny_llama, calib_data, RECIPE, progress=False)
    assert all(torch.equal(m.act_threshold, thresholds[n]) for n, m in A.sparse_layers(tiny_llama).items())


def test_sparsity_zero_and_one(tiny_llama, calib_data):
    x = calib_data[0]
    dense = tiny_llama(x).logits
    A.sparsify_activations(tiny_llama, calib_data, {TargetScope(patterns=[".*_proj"]): 0.0}, progress=False)
    assert torch.equal(tiny_llama(x).logits, dense)  # sparsity 0 is an exact identity
    A.remove_sparsity(tiny_llama)
    A.sparsify_activations(tiny_llama, calib_data, {TargetScope(patterns=[".*down_proj"]): 1.0}, progress=False)
    # all down_proj inputs zeroed: the MLPs contribute nothing
    mlp_out = []
    h = tiny_llama.model.layers[0].mlp.register_forward_hook(lambda m, a, o: mlp_out.append(o))
    tiny_llama(x)
    h.remove()
    assert torch.count_nonzero(mlp_out[0]) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(calib_data, dtype):
    from helpers import make_tiny_llama

    model = make_tiny_llama().to(dtype)
    A.sparsify_activations(model, calib_data, RECIPE, progress=False)
    sl = model.model.layers[0].mlp.down_proj
    assert sl.act_threshold.dtype == torch.float32 and sl.weight.dtype == dtype
    out = model(calib_data[0]).logits
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_model_copy_is_independent(tiny_llama, calib_data):
    A.sparsify_activations(tiny_llama, calib_data, RECIPE, progress=False)
    clone = copy.deepcopy(tiny_llama)
    A.remove_sparsity(clone)
    assert len(A.sparse_layers(tiny_llama)) == 6 and not A.sparse_layers(clone)


def test_state_dict_round_trip_between_sparsified_models(calib_data):
    from helpers import make_tiny_llama

    a, b = make_tiny_llama(), make_tiny_llama()
    A.sparsify_activations(a, calib_data, RECIPE, progress=False)
    A.sparsify_activations(b, calib_data[:1], RECIPE, progress=False)
    b.load_state_dict(a.state_dict())
    x = calib_data[0]
    assert torch.equal(a(x).logits, b(x).logits)
