"""Calibration methods (SCAP, WINA, TEAL greedy, top-k) and the general sparsity rule they rely on."""

import copy
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import VOCAB, make_tiny_llama

import actsparse as A
from actsparse import SparseLinear, SparsityParams, ThresholdFileError
from actsparse.calibrate import StageContext, calibrate_thresholds
from actsparse.data import prepare_batches
from actsparse.eval import SparsityMonitor
from actsparse.eval.sweep import weighted_sparsity
from actsparse.io import import_scap_json
from actsparse.methods import method_from_spec
from actsparse.methods.scap import export_scap_json, kde_peaks, parse_scap_config
from actsparse.methods.teal import TealMethod
from actsparse.scope import resolve_targets
from actsparse.sparse_linear import drop_mask, sparsify_tensor

ALL = {A.TargetScope(patterns=[r".*_proj"]): 0.5}


def _lin(inp=16, out=8, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(inp, out)


class EmbLin(nn.Module):
    """Token ids → fixed activation rows → one Linear: a controlled input distribution for a calibration."""

    def __init__(self, rows: torch.Tensor, lin: nn.Linear):
        super().__init__()
        self.emb = nn.Embedding.from_pretrained(rows)
        self.proj = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
        self.proj.load_state_dict(lin.state_dict())

    def forward(self, input_ids):
        return self.proj(self.emb(input_ids))


def _output_errors(rows, lin, specs):
    """Sum of squared output errors vs dense on the calibration tokens (every row once), per method."""
    data = [torch.arange(rows.shape[0]).view(4, -1)]
    errs = {}
    for spec in specs:
        model = EmbLin(rows, lin)
        A.sparsify_activations(model, data, {"proj": 0.5}, method=spec, progress=False)
        assert _measure(model, data).sparsity()["proj"] == pytest.approx(0.5, abs=3e-3)
        with torch.no_grad():
            errs[spec] = float((model(data[0]) - lin(rows[data[0]])).pow(2).sum())
    return errs, model


def _measure(model, data):
    with SparsityMonitor(model) as mon, torch.no_grad():
        for x in data:
            model(x)
    return mon


# ------------------------------------------------------------------------------ the general rule
def test_shift_is_folded_into_the_output_exactly():
    lin = _lin()
    x = torch.randn(5, 16) + 0.7
    sl = SparseLinear.from_linear(lin, SparsityParams(0.4, shift=0.7))
    keep = (x - 0.7).abs() > 0.4
    assert 0.2 < keep.float().mean() < 0.8
    x_eff = torch.where(keep, x, torch.full_like(x, 0.7))  # dropped entries become the mode
    torch.testing.assert_close(sl(x), lin(x_eff), rtol=1e-5, atol=1e-5)
    xs = sl.sparsify_input(x)
    assert torch.equal(xs == 0, ~keep)
    torch.testing.assert_close(sl(x), F.linear(xs, lin.weight, lin.bias) + 0.7 * lin.weight.sum(1))


def test_zero_shift_equals_plain_thresholding_bitwise():
    lin = _lin()
    x = torch.randn(4, 16)
    plain, shifted = SparseLinear.from_linear(lin, 0.5), SparseLinear.from_linear(lin, SparsityParams(0.5, shift=0.0))
    assert shifted.is_plain and "act_shift" not in shifted.state_dict()
    assert torch.equal(plain(x), shifted(x))
    # and the general path with an explicit μ = 0 gives the same mask as the plain one
    for dtype in (torch.float16, torch.bfloat16):
        xd = x.to(dtype)
        assert torch.equal(sparsify_tensor(xd, torch.tensor(0.5), 0.0), sparsify_tensor(xd, torch.tensor(0.5)))


def test_scale_thresholds_the_weighted_score():
    x = torch.tensor([[1.0, 1.0, 0.2, 0.2]])
    s = torch.tensor([0.1, 2.0, 10.0, 1.0])  # scores 0.1, 2, 2, 0.2
    assert drop_mask(x, 0.5, scale=s).tolist() == [[True, False, False, True]]


def test_topk_keeps_exactly_k_highest_scores_per_token():
    lin = _lin(32)
    x = torch.randn(3, 7, 32)
    sl = SparseLinear.from_linear(lin, SparsityParams(topk=5))
    xs = sl.sparsify_input(x)
    assert ((xs != 0).sum(-1) == 5).all()
    kth = x.abs().topk(5, dim=-1).values[..., -1:]
    assert torch.equal(xs != 0, x.abs() >= kth)
    assert (SparseLinear.from_linear(lin, SparsityParams(topk=0)).sparsify_input(x) == 0).all()


@pytest.mark.parametrize(
    "params,match",
    [
        (SparsityParams(float("nan")), "NaN"),
        (SparsityParams(0.1, shift=math.inf), "finite"),
        (SparsityParams(0.1, scale=torch.ones(3)), "shape"),
        (SparsityParams(0.1, scale=-torch.ones(16)), ">= 0"),
        (SparsityParams(topk=17), "topk"),
    ],
)
def test_bad_params_are_refused(params, match):
    with pytest.raises(ValueError, match=match):
        SparseLinear.from_linear(_lin(), params)


def test_params_round_trip_through_files(tmp_path):
    model = make_tiny_llama()
    names = [n for n, m in model.named_modules() if n.endswith("up_proj") or n.endswith("down_proj")]
    params = {}
    for i, n in enumerate(names):
        k = dict(model.named_modules())[n].in_features
        params[n] = SparsityParams(
            0.1 * (i + 1), shift=0.01 * i, scale=torch.rand(k) + 0.5, topk=k // 2 if i == 1 else None, info={"note": i}
        )
    A.apply_thresholds(model, params)
    path = A.save_thresholds(model, str(tmp_path / "t.safetensors"))
    fresh = make_tiny_llama()
    A.load_thresholds(fresh, path)
    for n, layer in A.sparse_layers(fresh).items():
        got, want = layer.params, A.sparse_layers(model)[n].params
        assert got.threshold == want.threshold and got.shift == want.shift and got.topk == want.topk
        assert torch.equal(got.scale, want.scale) and got.info == want.info
    x = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(x).logits, fresh(x).logits)


def test_malformed_scale_in_file_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = make_tiny_llama()
    A.sparsify_activations(model, [torch.randint(0, VOCAB, (1, 16))], {".*up_proj": 0.5}, method="wina", progress=False)
    path = A.save_thresholds(model, str(tmp_path / "t.safetensors"))
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("act_scale"))
    tensors[key] = tensors[key][:3]
    save_file(tensors, path, metadata=meta)
    with pytest.raises(ThresholdFileError, match="scale"):
        A.load_thresholds(make_tiny_llama(), path)


# ------------------------------------------------------------------------------ calibration methods
@pytest.mark.parametrize("spec", ["quantile", "scap-median", "scap-kde", "wina", "teal-uniform", "teal-greedy"])
def test_every_method_hits_its_targets_on_calibration_data(tiny_llama, calib_data, spec):
    # the calibration hooks must apply exactly the rule SparseLinear applies, or later layers drift
    A.sparsify_activations(tiny_llama, calib_data, ALL, method=spec, progress=False)
    mon = _measure(tiny_llama, calib_data)
    measured, targets = mon.sparsity(), mon.targets()
    for n in measured:
        assert measured[n] == pytest.approx(targets[n], abs=3e-3), n
    assert weighted_sparsity(tiny_llama, measured) == pytest.approx(0.5, abs=3e-3)


@pytest.mark.parametrize("spec", ["quantile+topk", "wina+topk", "scap-median+topk"])
def test_topk_option_gives_exact_per_token_sparsity(tiny_llama, calib_data, spec):
    A.sparsify_activations(tiny_llama, calib_data, ALL, method=spec, progress=False)
    layers = A.sparse_layers(tiny_llama)
    assert all(m.params.topk == m.in_features // 2 for m in layers.values())
    x = torch.randint(0, VOCAB, (1, 9))  # any input, not only calibration data
    mon = _measure(tiny_llama, [x])
    assert all(v == 0.5 for v in mon.sparsity().values())


def test_scap_zero_equals_plain_quantile(tiny_llama, calib_data):
    targets = A.scope.resolve_targets(tiny_llama, ALL)
    batches = prepare_batches(calib_data)
    q = calibrate_thresholds(tiny_llama, batches, targets, method_from_spec("quantile"), progress=False).params
    z = calibrate_thresholds(tiny_llama, batches, targets, method_from_spec("scap"), progress=False).params
    assert {n: p.threshold for n, p in q.items()} == {n: p.threshold for n, p in z.items()}
    assert all(p.shift == 0.0 for p in z.values())


def test_scap_median_is_the_median_of_the_first_layers_input(tiny_llama, calib_data):
    name = "model.layers.0.self_attn.q_proj"
    seen = []
    h = dict(tiny_llama.named_modules())[name].register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1)))
    with torch.no_grad():
        for x in calib_data:
            tiny_llama(x)
    h.remove()
    x = torch.cat(seen)
    A.sparsify_activations(tiny_llama, calib_data, {name: 0.4}, method="scap-median", progress=False)
    p = A.sparse_layers(tiny_llama)[name].params
    assert p.shift == pytest.approx(x.quantile(0.5).item(), rel=2e-3, abs=1e-4)
    assert p.info["demode_method"] == "median"
    assert p.threshold == pytest.approx((x - p.shift).abs().quantile(0.4).item(), rel=2e-3)


def test_kde_finds_the_peak_of_a_skewed_mixture():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(60000, generator=g) * 0.3 + 2.0, torch.randn(40000, generator=g) * 0.8 - 1.0])
    x = x[torch.randperm(x.numel(), generator=g)]
    peaks = kde_peaks(x)
    assert len(peaks) == 3 and all(abs(p - 2.0) < 0.05 for p in peaks)
    assert abs(x.median().item() - 2.0) > 0.2  # the median is clearly off the mode here


def test_mode_centering_gives_lower_output_error_on_shifted_activations():
    lin = _lin(64, 32)
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(200, 64, generator=g) * 0.2 + 1.5  # activations centred far from zero
    errs, _ = _output_errors(rows, lin, ("scap", "scap-median"))
    assert errs["scap-median"] < 0.2 * errs["scap"]


@pytest.mark.parametrize(
    "text,match",
    [
        ("up,zero", "triplets"),
        ("up,zero,0.3,up,zero,0.4", "twice"),
        ("up,mean,0.3", "unknown mode"),
        ("up,zero,x", "not a number"),
        ("up,zero,1.5", r"\[0, 1\)"),
        ("u p!,zero,0.3", "not a name"),
        ("", "triplets"),
    ],
)
def test_bad_scap_config_strings(text, match):
    with pytest.raises(ValueError, match=match):
        parse_scap_config(text)


def test_scap_config_string_and_json_round_trip(tiny_llama, calib_data, tmp_path):
    scopes, method = parse_scap_config("up,zero,0.35,gate,median,0.35,down,kde,0.55")
    assert method.mode_for("model.layers.0.mlp.down_proj") == "kde"
    A.sparsify_activations(tiny_llama, calib_data, scopes, method=method, progress=False)
    layers = A.sparse_layers(tiny_llama)
    assert sorted({n.rsplit(".", 1)[1] for n in layers}) == ["down_proj", "gate_proj", "up_proj"]
    assert layers["model.layers.1.mlp.down_proj"].target_sparsity == 0.55
    assert layers["model.layers.1.mlp.down_proj"].params.shift != 0.0
    path = export_scap_json(tiny_llama, str(tmp_path / "calibrated_thresholds.json"))
    entry = json.load(open(path))["model.layers.0.mlp.down_proj"]
    assert set(entry) == {"module_name", "demode_method", "mode", "threshold", "target_sparsity", "hook_type"}
    assert entry["demode_method"] == "kde"
    fresh = make_tiny_llama()
    import_scap_json(fresh, path)
    for n, m in A.sparse_layers(fresh).items():
        a, b = m.params, layers[n].params
        assert (a.threshold, a.shift) == (b.threshold, b.shift)
    path2 = export_scap_json(fresh, str(tmp_path / "again.json"))
    assert open(path).read() == open(path2).read()
    x = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, tiny_llama(x).logits)


@pytest.mark.parametrize(
    "content,match",
    [
        ("not json", "not valid JSON"),
        ('{"model.layers.0.mlp.up_proj": {"mode": 0.1, "threshold": "0.5"}}', "threshold: expected a number"),
        (
            '{"model.layers.0.mlp.up_proj": {"mode": 0, "threshold": 1, "target_sparsity": 7}}',
            r"target_sparsity: 7 is outside \[0, 1\]",
        ),
        ("[]", "JSON object"),
        ('{"model.layers.0.mlp.up_proj": {"mode": 0.1}}', "threshold"),
        ('{"model.layers.9.mlp.up_proj": {"mode": 0, "threshold": 1}}', "fit"),
    ],
)
def test_bad_scap_json_is_refused_and_model_unchanged(tmp_path, content, match):
    model = make_tiny_llama()
    p = tmp_path / "c.json"
    p.write_text(content)
    with pytest.raises(ThresholdFileError, match=match):
        import_scap_json(model, str(p))
    assert not A.sparse_layers(model)


def test_wina_drops_the_entries_that_move_the_output_least():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        lin.weight.mul_(torch.logspace(-2, 1, 64))  # column norms spread over three decades
    errs, model = _output_errors(torch.randn(160, 64), lin, ("quantile", "wina"))
    assert errs["wina"] < 0.5 * errs["quantile"]
    assert torch.allclose(A.sparse_layers(model)["proj"].params.scale, lin.weight.norm(dim=0))


def test_greedy_puts_sparsity_where_it_costs_nothing(calib_data):
    model = make_tiny_llama()
    with torch.no_grad():  # o_proj of block 0 barely reaches the output: its input is free to drop
        model.model.layers[0].self_attn.o_proj.weight.mul_(1e-4)
    A.sparsify_activations(
        model, calib_data, ALL, method=TealMethod(allocation="greedy", max_sparsity=0.95), progress=False
    )
    layers = A.sparse_layers(model)
    assert layers["model.layers.0.self_attn.o_proj"].target_sparsity == pytest.approx(0.95)
    for i in range(2):
        block = {n: m for n, m in layers.items() if n.startswith(f"model.layers.{i}.")}
        assert weighted_sparsity(model, {n: m.target_sparsity for n, m in block.items()}) == pytest.approx(0.5)


def test_greedy_beats_uniform_on_block_output_error(calib_data):
    model = make_tiny_llama(layers=1)
    batches = prepare_batches(calib_data)
    errs = {}
    for allocation in ("uniform", "greedy"):
        targets = A.scope.resolve_targets(model, ALL)
        found = calibrate_thresholds(model, batches, targets, TealMethod(allocation=allocation), progress=False)
        assert targets == A.scope.resolve_targets(model, ALL)  # the request is not modified
        assert (found.targets != targets) == (allocation == "greedy")  # greedy moved sparsity between layers
        A.apply_thresholds(model, found.params)
        with torch.no_grad():
            sparse = [
                model.model.layers[0](model.model.embed_tokens(x), position_embeddings=_rope(model, x))
                for x in calib_data
            ]
        A.remove_sparsity(model)
        with torch.no_grad():
            dense = [
                model.model.layers[0](model.model.embed_tokens(x), position_embeddings=_rope(model, x))
                for x in calib_data
            ]
        errs[allocation] = sum(float((_t(s) - _t(d)).pow(2).sum()) for s, d in zip(sparse, dense))
    assert errs["greedy"] < errs["uniform"]


def _t(out):
    return out[0] if isinstance(out, tuple) else out


def _rope(model, x):
    pos = torch.arange(x.shape[1]).unsqueeze(0)
    return model.model.rotary_emb(model.model.embed_tokens(x), pos)


def test_greedy_lazy_and_plain_reach_the_same_budget(tiny_llama, calib_data):
    lazy = calibrate_thresholds(
        tiny_llama,
        prepare_batches(calib_data),
        A.scope.resolve_targets(tiny_llama, ALL),
        TealMethod(lazy=False),
        progress=False,
    )
    assert len(lazy.params) == 14 and lazy.targets.keys() == lazy.params.keys()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"allocation": "best"}, "allocation"),
        ({"step": 0}, "step"),
        ({"max_sparsity": 0}, "max_sparsity"),
        ({"greedy_tokens": 0}, "greedy"),
    ],
)
def test_bad_teal_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TealMethod(**kwargs)


def test_greedy_target_above_cap_is_a_clear_error(tiny_llama, calib_data):
    with pytest.raises(ValueError, match="max_sparsity"):
        A.sparsify_activations(
            tiny_llama,
            calib_data,
            {A.TargetScope(patterns=[r".*_proj"]): 0.9},
            method=TealMethod(max_sparsity=0.8),
            progress=False,
        )
    assert not A.sparse_layers(tiny_llama)


@pytest.mark.parametrize(
    "spec,match",
    [("magic", "unknown calibration method"), ("wina+fast", r"\+topk"), ("scap-turbo", "registered methods")],
)
def test_unknown_methods_list_the_registered_ones(spec, match):
    with pytest.raises(ValueError, match=match):
        method_from_spec(spec)


def test_stage_context_restores_params(tiny_llama, calib_data):
    seen = {}

    class Probe(TealMethod):
        def allocate(self, ctx):
            assert isinstance(ctx, StageContext)
            dense = ctx.outputs({})
            sparse = ctx.outputs({n: SparsityParams(math.inf) for n in ctx.names})
            again = ctx.outputs({})
            seen[ctx.names[0]] = (
                all(torch.equal(a, b) for a, b in zip(dense, again)),
                any(not torch.equal(a, b) for a, b in zip(dense, sparse)),
            )
            return dict(ctx.targets)

    A.sparsify_activations(tiny_llama, calib_data, ALL, method=Probe(allocation="uniform"), progress=False)
    assert len(seen) == 2 and all(v == (True, True) for v in seen.values())


# ------------------------------------------------------------------------------ Sparsing Law
def _peaky_llama():
    """A tiny random Llama whose perplexity reacts to its down_proj inputs (random init barely does)."""
    model = make_tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(20.0)
        model.lm_head.weight.mul_(10.0)
    return model


@pytest.mark.parametrize("p", [0.01, 0.03])
def test_pplp_hits_its_perplexity_ratio_on_calibration_data(calib_data, p):
    from actsparse.methods.sparsing_law import SparsingLawMethod, calibration_perplexity

    model = _peaky_llama()
    batches = prepare_batches(calib_data)
    dense = calibration_perplexity(model, batches, torch.device("cpu"))
    A.sparsify_activations(
        model, calib_data, {r".*down_proj": 0.0}, method=SparsingLawMethod(metric="pplp", p=p), progress=False
    )
    ratio = calibration_perplexity(model, batches, torch.device("cpu")) / dense
    assert ratio == pytest.approx(1 + p, abs=0.005)  # ±0.5 percentage points (the search stops at 0.1)
    layers = A.sparse_layers(model)
    infos = [m.params.info for m in layers.values()]
    assert len({i["cett"] for i in infos}) == 1 and infos[0]["ppl_ratio"] == pytest.approx(ratio, abs=1e-6)
    # thresholds are per layer (one shared CETT, different τ) and scaled by down_proj's column norms
    assert len({m.params.threshold for m in layers.values()}) == 2
    for m in layers.values():
        assert torch.allclose(m.params.scale, m.weight.detach().norm(dim=0))


def test_pplp_unreachable_target_is_a_clear_error(calib_data):
    from actsparse.methods.sparsing_law import SparsingLawMethod

    model = make_tiny_llama()  # random init: dropping down_proj inputs hardly moves perplexity
    with pytest.raises(A.CalibrationError, match="could not reach"):
        A.sparsify_activations(
            model, calib_data, {r".*down_proj": 0.0}, method=SparsingLawMethod(metric="pplp", p=0.5), progress=False
        )
    assert not A.sparse_layers(model)


def test_topk_and_fat_metrics(tiny_llama, calib_data):
    from actsparse.methods.sparsing_law import SparsingLawMethod

    A.sparsify_activations(tiny_llama, calib_data, {r".*down_proj": 0.7}, method="topk", progress=False)
    assert all(
        m.params.topk == 128 - round(0.7 * 128) and m.params.scale is None for m in A.sparse_layers(tiny_llama).values()
    )
    A.remove_sparsity(tiny_llama)
    A.sparsify_activations(
        tiny_llama,
        calib_data,
        {r".*down_proj": 0.0},
        method=SparsingLawMethod(metric="fat", epsilon=0.02, column_norms=True),
        progress=False,
    )
    layer = A.sparse_layers(tiny_llama)["model.layers.0.mlp.down_proj"]
    assert layer.params.threshold == pytest.approx(0.02)
    x = torch.randn(3, 128)
    expected = (x.abs() * layer.weight.detach().norm(dim=0)) <= 0.02
    assert torch.equal(layer.sparsify_input(x) == 0, expected)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"metric": "pplp", "p": 0.0}, "p > 0"),
        ({"metric": "pplp", "p": -1}, "p > 0"),
        ({"metric": "rank"}, "unknown Sparsing Law metric"),
        ({"metric": "fat", "epsilon": -1.0}, "epsilon"),
    ],
)
def test_bad_sparsing_law_configs(kwargs, match):
    from actsparse.methods.sparsing_law import SparsingLawMethod

    with pytest.raises(ValueError, match=match):
        SparsingLawMethod(**kwargs)


# ------------------------------------------------------------------------------ block budgets
def test_segment_allocation_buys_the_cheapest_loss_per_weight():
    from actsparse.methods.budget import allocate_segments

    levels = [[0.25, 0.5, 0.75]] * 2
    # block 0 is cheap everywhere, block 1 expensive: block 0 goes to 0.75, block 1 gets the rest
    p = allocate_segments(levels, [[0.0, 0.1, 0.2], [0.0, 1.0, 3.0]], [1.0, 1.0], 0.5)
    assert p == pytest.approx([0.75, 0.25])
    # equal curves: both at the mean
    p = allocate_segments(levels, [[0.0, 1.0, 3.0]] * 2, [1.0, 1.0], 0.5)
    assert p == pytest.approx([0.5, 0.5])
    # a concave curve is convexified: its two segments are bought as one at the average price
    p = allocate_segments(levels, [[0.0, 1.0, 1.2], [0.0, 0.7, 1.6]], [1.0, 1.0], 0.5)
    assert p == pytest.approx([0.75, 0.25])  # block 0: one merged segment at 2.4 per unit < block 1 at 2.8
    # weights: a 3× larger block moves the mean 3× as much
    p = allocate_segments(levels, [[0.0, 0.1, 0.2], [0.0, 1.0, 3.0]], [3.0, 1.0], 0.5)
    assert 3 * p[0] + p[1] == pytest.approx(2.0) and p[0] == pytest.approx(7 / 12)


def _trained_llama():
    """A tiny Llama trained for a few seconds on arithmetic sequences: its loss reacts to sparsity
    monotonically (a random model's loss moves in random directions), plus matching calibration data."""
    model = make_tiny_llama()
    g = torch.Generator().manual_seed(0)

    def batch(n):
        start, step = torch.randint(0, VOCAB, (n, 1), generator=g), torch.randint(1, 4, (n, 1), generator=g)
        return (start + step * torch.arange(24)) % VOCAB

    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(80):
        x = batch(8)
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, [batch(2) for _ in range(4)]


def test_sensitivity_budgets_spare_the_sensitive_block():
    model, calib_data = _trained_llama()
    with torch.no_grad():  # block 1 barely writes to the residual stream: sparsifying it costs nothing
        model.model.layers[1].mlp.down_proj.weight.mul_(1e-4)
        model.model.layers[1].self_attn.o_proj.weight.mul_(1e-4)
    A.sparsify_activations(model, calib_data, ALL, method="teal-uniform-sens", progress=False)
    layers = A.sparse_layers(model)
    t0 = layers["model.layers.0.mlp.up_proj"].target_sparsity
    t1 = layers["model.layers.1.mlp.up_proj"].target_sparsity
    # the budget range is [t/2, max_raise·t]: block 1 takes 0.575, block 0 gives up the same amount
    assert t0 == pytest.approx(0.425) and t1 == pytest.approx(0.575)
    targets = {n: m.target_sparsity for n, m in layers.items()}
    assert weighted_sparsity(model, targets) == pytest.approx(0.5, abs=1e-3)  # the model-wide budget is kept
    measured = _measure(model, calib_data).sparsity()
    assert weighted_sparsity(model, measured) == pytest.approx(0.5, abs=5e-3)


@pytest.mark.parametrize("method", ["teal-uniform-sens", "teal-greedy-sens"])
def test_sensitivity_budgets_keep_a_dense_block_dense_and_clip_no_layer(calib_data, method):
    # block 0 kept dense: its budget stays 0 (it used to divide by its zero mean)
    model = make_tiny_llama()
    dense_first = {
        A.TargetScope(patterns=[r"model\.layers\.0\..*_proj"]): 0.0,
        A.TargetScope(patterns=[r".*layers\.1\..*_proj"]): 0.5,
    }
    A.sparsify_activations(model, calib_data, dense_first, method=method, progress=False)
    targets = {n: m.target_sparsity for n, m in A.sparse_layers(model).items()}
    assert all(t == 0.0 for n, t in targets.items() if ".layers.0." in n)
    assert weighted_sparsity(model, targets) == pytest.approx(weighted_sparsity(model, _requested(model, dense_first)))
    # down_proj at 0.9 next to gate/up at 0.3: a block budget above its mean would push down_proj past the
    # 0.95 cap, and the clipped part used to be lost from the model-wide mean
    model = make_tiny_llama(layers=4)
    skewed = {A.TargetScope(patterns=[r".*(gate|up)_proj"]): 0.3, A.TargetScope(patterns=[r".*down_proj"]): 0.9}
    A.sparsify_activations(model, calib_data, skewed, method=method, progress=False)
    targets = {n: m.target_sparsity for n, m in A.sparse_layers(model).items()}
    assert max(targets.values()) <= 0.95 + 1e-9
    assert weighted_sparsity(model, targets) == pytest.approx(weighted_sparsity(model, _requested(model, skewed)))


def _requested(model, scopes):
    return resolve_targets(model, scopes, None)


def test_searched_budgets_move_sparsity_to_the_free_block_and_keep_the_mean():
    model, calib_data = _trained_llama()
    with torch.no_grad():  # block 1 barely writes to the residual stream: sparsifying it costs nothing
        model.model.layers[1].mlp.down_proj.weight.mul_(1e-4)
        model.model.layers[1].self_attn.o_proj.weight.mul_(1e-4)
    method = TealMethod(allocation="uniform", block_budget="search", search_steps=12, search_delta=0.1)
    before = copy.deepcopy(model)
    A.sparsify_activations(model, calib_data, ALL, method=method, progress=False)
    layers = A.sparse_layers(model)
    t0 = layers["model.layers.0.mlp.up_proj"].target_sparsity
    t1 = layers["model.layers.1.mlp.up_proj"].target_sparsity
    assert t1 > 0.6 and t0 < 0.4  # accepted moves all went one way: into the block that costs nothing
    targets = {n: m.target_sparsity for n, m in layers.items()}
    assert weighted_sparsity(model, targets) == pytest.approx(0.5, abs=1e-6)  # the model-wide budget is kept
    # the search is seeded: the same model and data give the same budgets
    again = copy.deepcopy(before)
    A.sparsify_activations(again, calib_data, ALL, method=method, progress=False)
    assert {n: m.target_sparsity for n, m in A.sparse_layers(again).items()} == targets
    # started from the sensitivity budgets (block 1 at 0.575, the top of their range), it goes further
    both = TealMethod(allocation="uniform", block_budget="sensitivity+search", search_steps=12, search_delta=0.1)
    A.sparsify_activations(before, calib_data, ALL, method=both, progress=False)
    layers = A.sparse_layers(before)
    assert layers["model.layers.1.mlp.up_proj"].target_sparsity > 0.575 + 0.05
    targets = {n: m.target_sparsity for n, m in layers.items()}
    assert weighted_sparsity(before, targets) == pytest.approx(0.5, abs=1e-6)


def test_bad_block_budget():
    with pytest.raises(ValueError, match="block_budget"):
        TealMethod(block_budget="random")
    with pytest.raises(ValueError, match="max_raise"):
        TealMethod(block_budget="sensitivity", max_raise=3.0)
    for bad in (0, 1.5, True):
        with pytest.raises((ValueError, TypeError), match="search_steps"):
            TealMethod(block_budget="search", search_steps=bad)
    for bad in (0.0, 0.6):
        with pytest.raises(ValueError, match="search_delta"):
            TealMethod(block_budget="search", search_delta=bad)


def test_scoring_and_allocation_compose_teal_greedy_with_wina_scores(calib_data, tmp_path):
    from actsparse.methods.wina import column_norms

    # uniform allocation with WINA scores is exactly the wina method
    wina, teal = make_tiny_llama(), make_tiny_llama()
    A.sparsify_activations(wina, calib_data, ALL, method="wina", progress=False)
    A.sparsify_activations(teal, calib_data, ALL, method=TealMethod(allocation="uniform", score="wina"), progress=False)
    for n, m in A.sparse_layers(wina).items():
        t = A.sparse_layers(teal)[n]
        assert m.params.threshold == t.params.threshold and torch.equal(m.params.scale, t.params.scale)
    # greedy with WINA scores: per-layer allocations that meet each block's weighted target, scored by the norms
    model = make_tiny_llama()
    with torch.no_grad():  # a layer whose input barely matters: greedy gives it the most sparsity
        model.model.layers[0].self_attn.o_proj.weight.mul_(1e-4)
    config = A.SparsifyConfig(ALL, method="teal-greedy", method_options={"score": "wina", "max_sparsity": 0.95})
    A.sparsify_(model, config, calib_data, progress=False)
    layers = A.sparse_layers(model)
    o = layers["model.layers.0.self_attn.o_proj"]
    assert o.target_sparsity == pytest.approx(0.95)
    assert torch.allclose(o.params.scale, column_norms(o.weight))
    for i in range(2):
        block = {n: m for n, m in layers.items() if n.startswith(f"model.layers.{i}.")}
        assert weighted_sparsity(model, {n: m.target_sparsity for n, m in block.items()}) == pytest.approx(0.5)
    with SparsityMonitor(model) as mon, torch.no_grad():  # the calibration data is sparsified as allocated
        for x in calib_data:
            model(x)
    for n, m in layers.items():
        assert mon.sparsity()[n] == pytest.approx(m.target_sparsity, abs=0.03), n
    # recorded with the config and the thresholds
    path = A.save_thresholds(model, str(tmp_path / "t.safetensors"))
    assert A.SparsifyConfig.from_dict(config.to_dict()).method.score == "wina"
    fresh = make_tiny_llama()
    A.load_thresholds(fresh, path)
    assert torch.equal(A.sparse_layers(fresh)["model.layers.0.self_attn.o_proj"].params.scale, o.params.scale)
    with pytest.raises(ValueError, match="unknown score 'rotated'"):
        TealMethod(score="rotated")


@pytest.mark.parametrize("name", ["quantile", "teal", "wina", "scap", "rsparse"])
def test_every_histogram_method_checks_its_resolution(name):
    for bad in (0, -3, 15):
        with pytest.raises(ValueError, match="bins_per_octave must be >= 16"):
            method_from_spec(name, bins_per_octave=bad)
    assert method_from_spec(name, bins_per_octave=16).bins_per_octave == 16


@pytest.mark.parametrize("method", ["teal-greedy-sens", "pplp"])
def test_non_finite_activations_name_the_layer_in_every_statistics_pass(calib_data, method):
    model = make_tiny_llama()
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[3] = float("nan")
    with pytest.raises(A.CalibrationError, match=r"NaN/inf.*model\.layers\.1\.mlp"):
        A.sparsify_activations(model, calib_data, ALL, method=method, progress=False)
    assert not A.sparse_layers(model)
