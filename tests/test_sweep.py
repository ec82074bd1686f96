"""Sweep method specs ``NAME[:KEY=VALUE...]``: parsing, checks before any model work, labelled points."""

import pytest
import torch
from helpers import VOCAB

import actsparse.eval.sweep as sweep_mod
from actsparse import sparse_layers
from actsparse.cli.args import option_arg
from actsparse.eval.sweep import format_table, method_meta, run_sweep, sweep_methods, write_sweep
from actsparse.methods import parse_method_spec, parse_option
from actsparse.methods.teal import TealMethod


def _eval_ids(n: int = 96) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(2))


def test_spec_options_reach_the_method_object():
    methods = sweep_methods(["quantile", "teal-greedy:step=0.025:greedy_tokens=None", "teal: lazy=false :step=0.1"])
    assert list(methods) == ["quantile", "teal-greedy:step=0.025:greedy_tokens=None", "teal:lazy=false:step=0.1"]
    m = methods["teal-greedy:step=0.025:greedy_tokens=None"]
    assert isinstance(m, TealMethod)
    assert (m.allocation, m.step, m.greedy_tokens, m.lazy) == ("greedy", 0.025, None, True)
    m = methods["teal:lazy=false:step=0.1"]
    assert (m.step, m.lazy, m.greedy_tokens) == (0.1, False, 1024)
    assert methods["quantile"].name == "quantile"
    assert parse_method_spec("wina+topk:bins_per_octave=64") == ("wina+topk", {"bins_per_octave": 64})
    assert sweep_methods(["wina+topk:bins_per_octave=64"])["wina+topk:bins_per_octave=64"].topk is True
    meta = method_meta(["teal-greedy:step=0.025:greedy_tokens=null", "teal-greedy"])
    assert meta["teal-greedy:step=0.025:greedy_tokens=null"]["step"] == 0.025
    assert meta["teal-greedy:step=0.025:greedy_tokens=null"]["greedy_tokens"] is None
    assert meta["teal-greedy"]["step"] == 0.05


@pytest.mark.parametrize(
    "text, value",
    [
        ("step=0.025", 0.025),
        ("greedy_tokens=None", None),
        ("greedy_tokens=null", None),
        ("lazy=True", True),
        ("lazy=false", False),
        ("mode=kde", "kde"),
        ("probe_tokens=512", 512),
    ],
)
def test_sweep_specs_and_calibrate_options_read_values_alike(text, value):
    key = text.partition("=")[0]
    assert parse_option(text) == option_arg(text) == (key, value)  # one parser for --option and sweep specs
    assert parse_method_spec(f"teal-greedy:{text}") == ("teal-greedy", {key: value})


@pytest.mark.parametrize(
    "specs, match",
    [
        (
            ["quantile", "teal-greedy:stepp=0.025"],
            r"sweep method 'teal-greedy:stepp=0.025': .*no option\(s\) \['stepp'\]"
            r".*its options: .*'step'",
        ),
        (["teal-greedy:step=2"], r"'teal-greedy:step=2': step must be in \(0, 1\]"),
        (["teal-greedy:step=abc"], r"'teal-greedy:step=abc': .*bad option value in \{'step': 'abc'\}"),
        (["teal-greedy:step"], "expected KEY=VALUE, e.g. step=0.1, got 'step'"),
        (["teal:step=0.1:step=0.2"], "option 'step' is given twice"),
        (["nope:step=0.1"], "unknown calibration method 'nope'"),
        (["quantile", "teal-greedy:step=0.025", "teal-greedy: step=0.025"], "'teal-greedy:step=0.025' is given twice"),
        ([], "no methods"),
    ],
)
def test_bad_specs_fail_before_any_model_work(tiny_llama, calib_data, monkeypatch, specs, match):
    def no_model_work(*args, **kwargs):
        raise AssertionError("the model was run before the method specs were checked")

    monkeypatch.setattr(sweep_mod, "perplexity", no_model_work)
    monkeypatch.setattr(sweep_mod, "sparsify_", no_model_work)
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        run_sweep(tiny_llama, calib_data, _eval_ids(), specs, [0.3], progress=False)
    assert not sparse_layers(tiny_llama)
    after = tiny_llama.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_specs_must_be_a_list_of_strings():
    with pytest.raises(TypeError, match="list of specs"):
        sweep_methods("quantile")
    with pytest.raises(TypeError, match="spec strings"):
        sweep_methods([TealMethod()])


def test_two_variants_of_one_method_give_two_labelled_points(tiny_llama, calib_data, tmp_path):
    specs = ["teal-greedy:step=0.5", "teal-greedy:step=0.05:greedy_tokens=None"]
    dense, points = run_sweep(tiny_llama, calib_data, _eval_ids(), specs, [0.4], progress=False, per_layer=True)
    assert [p.method for p in points] == specs
    assert not sparse_layers(tiny_llama)  # the model ends dense
    coarse, fine = points
    # the step reached the method: steps of 0.5 can only allocate 0 or 0.5 (or the remainder) to a layer
    assert coarse.allocated != fine.allocated
    assert sum(abs(v - 0.5) < 1e-6 for v in coarse.allocated.values()) >= 1
    assert all(abs(p.measured - 0.4) < 0.1 for p in points)
    table = "\n".join(format_table(dense, points))
    assert all(s in table for s in specs)
    paths = write_sweep(str(tmp_path / "sw"), dense, points, {"methods": method_meta(specs), "title": "t"})
    rows = open(paths["csv"], encoding="utf-8").read().splitlines()
    assert [r.split(",")[0] for r in rows[2:]] == specs
