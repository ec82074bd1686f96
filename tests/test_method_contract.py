"""The method contract: per-layer collectors and whole-model searches, hooks with defaults, one result object."""

import dataclasses
import math

import pytest
import torch

import actsparse as A
from actsparse.calibrate import calibrate_thresholds
from actsparse.data import prepare_batches
from actsparse.errors import CalibrationError
from actsparse.methods import MethodConfig
from actsparse.methods.base import _REGISTRY, register_method
from actsparse.rule import SparsityParams
from actsparse.stats import Collector, exact_quantile

MLP = {A.TargetScope(patterns=[r".*mlp\..*"]): 0.5}


@pytest.fixture
def registry():
    before = dict(_REGISTRY)
    yield
    _REGISTRY.clear()
    _REGISTRY.update(before)


class _Exact(Collector):
    """Keeps every |x| (tests only): the exact quantile, the reference for the engine's data flow."""

    def __init__(self, q):
        self.q, self.values = q, []

    def update(self, x):
        self.values.append(x.detach().abs().flatten())

    def result(self):
        return exact_quantile(torch.cat(self.values), self.q)


def test_a_per_layer_method_needs_only_a_collector(registry, tiny_llama, calib_data):
    @register_method("test-exact")
    @dataclasses.dataclass(frozen=True)
    class Exact(MethodConfig):
        def make_collector(self, layer_name, module, target_sparsity):
            return _Exact(target_sparsity)

    targets = A.scope.resolve_targets(tiny_llama, MLP)
    method = Exact()
    assert not method.searches()
    found = calibrate_thresholds(tiny_llama, prepare_batches(calib_data), targets, method, progress=False)
    assert found.targets == targets  # the default plan/allocate keep the request
    assert set(found.params) == set(targets) and all(math.isfinite(p.threshold) for p in found.params.values())
    # the first layer sees the dense model's inputs: its threshold is their exact median
    first = "model.layers.0.mlp.gate_proj"
    seen = []
    h = tiny_llama.get_submodule(first).register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().flatten()))
    with torch.no_grad():
        for x in calib_data:
            tiny_llama(x)
    h.remove()
    assert found.params[first].threshold == pytest.approx(exact_quantile(torch.cat(seen), 0.5), rel=1e-6)


def test_a_search_method_returns_every_layer_and_is_validated(registry, tiny_llama, calib_data):
    calls = []

    @register_method("test-search")
    @dataclasses.dataclass(frozen=True)
    class Search(MethodConfig):
        tau: float = 0.25
        drop_one: bool = False

        def searches(self):
            return True

        def calibrate_model(self, model, batches, targets, device, *, progress=True):
            calls.append(sorted(targets))
            names = sorted(targets)[1:] if self.drop_one else sorted(targets)
            return {n: SparsityParams(self.tau) for n in names}

    targets = A.scope.resolve_targets(tiny_llama, MLP)
    batches = prepare_batches(calib_data)
    found = calibrate_thresholds(tiny_llama, batches, targets, Search(), progress=False)
    assert calls == [sorted(targets)] and {p.threshold for p in found.params.values()} == {0.25}
    with pytest.raises(CalibrationError, match="returned no parameters"):
        calibrate_thresholds(tiny_llama, batches, targets, Search(drop_one=True), progress=False)
    with pytest.raises(ValueError, match="NaN"):
        calibrate_thresholds(tiny_llama, batches, targets, Search(tau=math.nan), progress=False)
    # a registered search runs through the public API like any method
    A.sparsify_(tiny_llama, A.SparsifyConfig(MLP, method="test-search"), calib_data, progress=False)
    assert all(m.act_threshold.item() == 0.25 for m in A.sparse_layers(tiny_llama).values())


def test_plan_and_allocate_results_are_the_fitted_targets(registry, tiny_llama, calib_data):
    @register_method("test-shift-targets")
    @dataclasses.dataclass(frozen=True)
    class Moves(MethodConfig):
        def make_collector(self, layer_name, module, target_sparsity):
            return _Exact(target_sparsity)

        def plan(self, model, batches, targets, device, *, progress=True):
            return dict.fromkeys(targets, 0.2)

        def allocate(self, stage):
            assert set(stage.targets.values()) == {0.2}  # after plan
            return {n: (0.1 if n.endswith("up_proj") else t) for n, t in stage.targets.items()}

    targets = A.scope.resolve_targets(tiny_llama, MLP)
    request = dict(targets)
    found = calibrate_thresholds(tiny_llama, prepare_batches(calib_data), targets, Moves(), progress=False)
    assert targets == request
    assert found.targets == {n: (0.1 if n.endswith("up_proj") else 0.2) for n in targets}
    A.sparsify_(tiny_llama, A.SparsifyConfig(MLP, method="test-shift-targets"), calib_data, progress=False)
    assert A.sparse_layers(tiny_llama)["model.layers.0.mlp.up_proj"].target_sparsity == 0.1


def test_defaults_say_what_is_missing():
    @dataclasses.dataclass(frozen=True)
    class Bare(MethodConfig):
        name = "bare"

    with pytest.raises(NotImplementedError, match="no per-layer collector"):
        Bare().make_collector("x", torch.nn.Linear(2, 2), 0.5)
    with pytest.raises(NotImplementedError, match="not a whole-model search"):
        Bare().calibrate_model(None, [], {}, torch.device("cpu"))
    assert Collector().next_pass() is False
