"""Attribution-based unit deactivation (seed 004): units, scores, IG, corrected GxO, masks, curves, MC, CLI."""

import csv
import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import VOCAB, byte_tokenizer, make_tiny_llama

from actsparse import SparsifyConfig, TargetScope, load_thresholds, save_thresholds, sparsify_
from actsparse.attribution import (
    ScoreBatch,
    calibrated_scores,
    find_unit_layers,
    gradient_drift,
    keep_masks,
    masked_nll,
    tradeoff_curves,
    unit_layers_for,
    unit_scores,
    unit_statistics,
)
from actsparse.attribution.scores import row_nll
from actsparse.cli import main
from actsparse.errors import DatasetError
from actsparse.eval.mc import load_mc, parse_mc, tokenize_mc
from actsparse.methods import method_from_spec
from actsparse.methods.attribution import AttributionMethod


def _batch(seed=0, rows=3, tokens=12):
    g = torch.Generator().manual_seed(seed)
    return ScoreBatch.from_ids(torch.randint(0, VOCAB, (rows, tokens), generator=g))


def _loss(model, batch, keep=None, scale=None):
    """Σ over rows of each row's mean NLL, with optional keep masks / per-unit gate scaling (reference path)."""
    handles = []
    if scale is not None:
        for la, s in scale:
            handles.append(
                la.module.register_forward_pre_hook(
                    lambda m, a, la=la, s=s: (a[0] * s.repeat_interleave(la.group).to(a[0].dtype),)
                )
            )
    try:
        with torch.no_grad():
            if keep is not None:
                from actsparse.attribution.scores import UnitHooks

                layers = [la for la, _ in keep]
                hooks = UnitHooks(layers)
                hooks.keep = {la.name: k for la, k in keep}
                with hooks.installed():
                    nll, _ = row_nll(model, batch)
            else:
                nll, _ = row_nll(model, batch)
    finally:
        for h in handles:
            h.remove()
    m = batch.label_mask.float()
    return float(((nll * m).sum(1) / m.sum(1)).sum())


# ------------------------------------------------------------------------------------------------- units
def test_find_unit_layers_llama():
    m = make_tiny_llama()
    layers = find_unit_layers(m)
    kinds = [(la.name, la.kind, la.n_units, la.group) for la in layers]
    assert kinds == [
        ("model.layers.0.self_attn.o_proj", "heads", 4, 16),
        ("model.layers.0.mlp.down_proj", "neurons", 128, 1),
        ("model.layers.1.self_attn.o_proj", "heads", 4, 16),
        ("model.layers.1.mlp.down_proj", "neurons", 128, 1),
    ]
    assert [la.kind for la in find_unit_layers(m, ("heads",))] == ["heads", "heads"]
    with pytest.raises(ValueError, match="unknown unit kind"):
        find_unit_layers(m, ("experts",))
    with pytest.raises(ValueError, match="no heads/neurons unit layers"):
        find_unit_layers(nn.Sequential(nn.Linear(2, 2)))


def test_gpt2_conv1d_units_are_scored():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    layers = find_unit_layers(m)
    assert [(la.kind, la.n_units, la.group) for la in layers] == [("heads", 4, 8), ("neurons", 128, 1)] * 2
    stats, _ = unit_statistics(m, layers, _batch())
    assert all(torch.isfinite(s.ga).all() and s.ga.shape == (3, la.n_units) for la, s in zip(layers, stats.values()))


# ------------------------------------------------------------------------------------------------ scores
def test_statistics_match_an_independent_autograd_computation():
    m = make_tiny_llama()
    layers = find_unit_layers(m)
    batch = _batch()
    stats, _ = unit_statistics(m, layers, batch)
    # reference: retain the unit layers' inputs, one ordinary backward through the whole model
    saved = {}
    hs = [
        la.module.register_forward_pre_hook(
            lambda mod, a, la=la: saved.__setitem__(la.name, a[0]) or a[0].retain_grad()
        )
        for la in layers
    ]
    with torch.enable_grad():
        out = m(input_ids=batch.ids).logits
        nll = F.cross_entropy(out[:, :-1].float().transpose(1, 2), batch.labels, reduction="none")
        nll.mean(1).sum().backward()
    for h in hs:
        h.remove()
    m.zero_grad(set_to_none=True)
    for la in layers:
        a = saved[la.name].detach().double().view(3, 12, la.n_units, la.group)
        g = saved[la.name].grad.double().view(3, 12, la.n_units, la.group)
        s = stats[la.name]
        torch.testing.assert_close(s.ga, (g * a).sum((1, 3)), rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(s.g2, g.square().sum((1, 3)), rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(s.a2, a.square().sum((1, 3)), rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(
            unit_scores(s, "magnitude"), (a.square().sum((1, 3)) / 12).sqrt(), rtol=1e-5, atol=1e-9
        )
        torch.testing.assert_close(unit_scores(s, "gradient"), g.square().sum((1, 3)).sqrt(), rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(unit_scores(s, "snip"), (g * a).sum((1, 3)).abs(), rtol=1e-4, atol=1e-9)
        gnorm = g.square().sum((1, 2, 3)).sqrt()[:, None]
        torch.testing.assert_close(
            unit_scores(s, "cor_gxo", rho=0.7),
            -(g * a).sum((1, 3)) + 0.7 * gnorm * a.square().sum((1, 3)).sqrt(),
            rtol=1e-4,
            atol=1e-9,
        )


def test_gxo_is_the_first_order_loss_increase_of_deactivation():
    m = make_tiny_llama(seed=3).double()
    layers = find_unit_layers(m)
    batch = _batch(seed=4, rows=1)
    stats, _ = unit_statistics(m, layers, batch)
    eps = 1e-3
    for la in layers:
        gxo = unit_scores(stats[la.name], "gxo")[0]
        for u in gxo.abs().topk(2).indices.tolist():  # the units that matter most to first order
            lo, hi = torch.ones(la.n_units), torch.ones(la.n_units)
            lo[u], hi[u] = 1 - eps, 1 + eps
            # scale unit u by (1 ∓ eps): ΔL ≈ ±eps · gxo_u (central difference)
            fd = (_loss(m, batch, scale=[(la, lo)]) - _loss(m, batch, scale=[(la, hi)])) / (2 * eps)
            assert fd == pytest.approx(float(gxo[u]), rel=2e-2)


def test_integrated_gradients_satisfy_completeness_as_steps_grow():
    m = make_tiny_llama(seed=1)
    layers = find_unit_layers(m)
    batch = _batch(seed=2, rows=2)
    full = _loss(m, batch)
    off = _loss(m, batch, keep=[(la, torch.zeros(la.n_units, dtype=torch.bool)) for la in layers])
    errors = []
    for n in (1, 4, 32):
        stats, _ = unit_statistics(m, layers, batch, n_steps=n, ig_chunk=3)
        total = sum(float(-unit_scores(s, "ig").sum()) for s in stats.values())  # Σ IG_u
        errors.append(abs(total - (full - off)))
    assert errors[2] < 0.02 * abs(full - off)
    assert errors[2] < errors[1] < errors[0]


def test_ig_chunks_do_not_change_the_result():
    m = make_tiny_llama()
    layers = find_unit_layers(m)
    a, _ = unit_statistics(m, layers, _batch(), n_steps=5, ig_chunk=1)
    b, _ = unit_statistics(m, layers, _batch(), n_steps=5, ig_chunk=5)
    for n in a:
        torch.testing.assert_close(a[n].ig, b[n].ig, rtol=1e-4, atol=1e-9)


def test_scoring_leaves_parameters_untouched():
    m = make_tiny_llama()
    m.lm_head.weight.requires_grad_(False)
    before = {n: p.requires_grad for n, p in m.named_parameters()}
    unit_statistics(m, find_unit_layers(m), _batch(), n_steps=2)
    assert {n: p.requires_grad for n, p in m.named_parameters()} == before
    assert all(p.grad is None for p in m.parameters())


def test_unreached_unit_layer_is_an_error():
    m = make_tiny_llama()
    layers = find_unit_layers(m)
    stray = unit_layers_for(m, ["model.layers.0.mlp.up_proj"])[0]
    stray.module = nn.Linear(64, 8)  # never called by the model
    stray.name = "stray"
    with pytest.raises(ValueError, match="not reached"):
        unit_statistics(m, layers + [stray], _batch())


# ------------------------------------------------------------------------------ corrected GxO, provably
class _Bowl(nn.Module):
    """Four units a = (3, 0.2, 0.1, 0.05) summed by ``mlp.down_proj`` into z; logits (−(z−c)², 0) with the label on
    class 0, so L = softplus((z−c)²) has its minimum at z = c. c = Σa − 0.01: the dense gradient is tiny."""

    A = (3.0, 0.2, 0.1, 0.05)

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(2, 4)
        self.emb.weight.data = torch.tensor([[0.0] * 4, list(self.A)])
        self.mlp = nn.Module()
        self.mlp.down_proj = nn.Linear(4, 1, bias=False)
        self.mlp.down_proj.weight.data.fill_(1.0)
        self.c = sum(self.A) - 0.01

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        z = self.mlp.down_proj(self.emb(input_ids))[..., 0]
        return SimpleNamespace(logits=torch.stack([-((z - self.c) ** 2), torch.zeros_like(z)], -1))


def _bowl_loss(kept):
    z = sum(a for a, k in zip(_Bowl.A, kept) if k)
    return math.log1p(math.exp((z - (sum(_Bowl.A) - 0.01)) ** 2))  # softplus((z-c)^2): NLL of class 0


def test_plain_gxo_is_provably_off_and_corrected_gxo_is_not():
    m = _Bowl()
    layers = unit_layers_for(m, ["mlp.down_proj"])
    batch = ScoreBatch.from_ids(torch.tensor([[1, 0]]))
    stats, grads = unit_statistics(m, layers, batch, keep_grads=True)
    s = stats["mlp.down_proj"]
    gxo_keep = keep_masks({"mlp.down_proj": unit_scores(s, "gxo")}, 0.5)["mlp.down_proj"][0]
    # the dense gradient is ~0 and negative-sloped: GxO deactivates the two *largest* units
    assert gxo_keep.tolist() == [False, False, True, True]
    assert _bowl_loss(gxo_keep.tolist()) > 10
    # the seed's constant ρ = 0.5 ties every unit here (all g_u equal, ‖g‖ = 2|g_u|), so it cannot fix it either
    torch.testing.assert_close(
        unit_scores(s, "cor_gxo", 0.5), torch.zeros(1, 4, dtype=torch.float64), atol=1e-12, rtol=0
    )
    # measured drift: deactivating what GxO picked moves the gradient far away → the magnitude term dominates
    s.drift = gradient_drift(m, layers, batch, grads, {"mlp.down_proj": gxo_keep[None]})["mlp.down_proj"]
    keep = keep_masks({"mlp.down_proj": unit_scores(s, "cor_gxo", "auto")}, 0.5)["mlp.down_proj"][0]
    assert keep.tolist() == [True, True, False, False]
    best = min(
        _bowl_loss(k) for k in ([1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1])
    )
    assert _bowl_loss(keep.tolist()) == pytest.approx(best)  # the optimal pair, exactly
    # the same through the calibrated path (ρ_l measured on the calibration batch)
    cal = calibrated_scores(m, layers, [batch], "cor_gxo", rho="auto", sparsity=0.5, progress=False)
    assert keep_masks(cal, 0.5)["mlp.down_proj"].tolist() == [True, True, False, False]


# ------------------------------------------------------------------------------------------------- masks
def test_keep_masks_counts_ties_nan_and_errors():
    s = {"a": torch.tensor([[3.0, 1.0, 2.0, 1.0], [float("nan"), 5.0, 4.0, 6.0]]), "b": torch.arange(9.0)}
    k = keep_masks(s, 0.5)
    assert k["a"].tolist() == [[True, False, True, False], [False, True, False, True]]
    assert (~k["b"]).sum() == 5 and not k["b"][:5].any()  # ⌊0.5·9 + ½⌋ = 5 lowest
    assert (~keep_masks(s, {"a": 0.25, "b": 0.0})["a"]).sum(1).tolist() == [1, 1]
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            keep_masks(s, bad)


def test_masked_nll_equals_zeroed_weight_columns():
    m = make_tiny_llama()
    layers = find_unit_layers(m)
    batch = _batch()
    g = torch.Generator().manual_seed(5)
    keep = {la.name: torch.rand(la.n_units, generator=g) > 0.4 for la in layers}
    nll, n, correct = masked_nll(m, layers, batch, keep)
    ref = make_tiny_llama()
    for la in layers:  # independent implementation: drop the deactivated units' weight columns
        mod = dict(ref.named_modules())[la.name]
        mod.weight.data[:, ~keep[la.name].repeat_interleave(la.group)] = 0
    with torch.no_grad():
        logits = ref(input_ids=batch.ids).logits[:, :-1]
    ref_nll = F.cross_entropy(logits.transpose(1, 2), batch.labels, reduction="sum")
    assert nll == pytest.approx(float(ref_nll), rel=1e-5)
    assert n == batch.n_labels and correct == int((logits.argmax(-1) == batch.labels).sum())


# ---------------------------------------------------------------------------------- calibrated method
def test_attribution_method_static_masks_save_load_and_match_the_scores(tmp_path):
    m = make_tiny_llama()
    data = [_batch(seed=i).ids for i in range(2)]
    targets = {TargetScope(patterns=[r".*o_proj"]): 0.5, TargetScope(patterns=[r".*down_proj"]): 0.25}
    sparsify_(m, SparsifyConfig(targets, method=AttributionMethod(metric="gxo")), data, progress=False)
    layer = m.model.layers[0]
    s_heads, s_neur = layer.self_attn.o_proj.params.scale, layer.mlp.down_proj.params.scale
    assert s_heads.view(4, 16).eq(s_heads.view(4, 16)[:, :1]).all()  # whole heads
    assert int((s_heads.view(4, 16)[:, 0] == 0).sum()) == 2 and int((s_neur == 0).sum()) == 32
    ref = make_tiny_llama()
    layers = unit_layers_for(
        ref, [f"model.layers.{i}.{n}" for i in range(2) for n in ("self_attn.o_proj", "mlp.down_proj")]
    )
    scores = calibrated_scores(ref, layers, [ScoreBatch.from_ids(d) for d in data], "gxo", progress=False)
    keep = keep_masks(scores, {la.name: 0.5 if la.kind == "heads" else 0.25 for la in layers})
    assert torch.equal(s_neur.bool(), keep["model.layers.0.mlp.down_proj"])
    x = _batch(seed=9)
    with torch.no_grad():
        out = m(input_ids=x.ids).logits
    nll, _, _ = masked_nll(ref, layers, x, keep)
    ref_nll = F.cross_entropy(out[:, :-1].transpose(1, 2), x.labels, reduction="sum")
    assert nll == pytest.approx(float(ref_nll), rel=1e-5)
    path = save_thresholds(m, str(tmp_path / "attr.safetensors"))
    fresh = make_tiny_llama()
    load_thresholds(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=x.ids).logits, out)
    assert fresh.model.layers[0].mlp.down_proj.calibration["metric"] == "gxo"


@pytest.mark.parametrize(
    "options, match",
    [
        ({"metric": "saliency"}, "unknown attribution metric"),
        ({"n_steps": 0}, "n_steps"),
        ({"n_steps": -3}, "n_steps"),
        ({"rho": -1}, "rho"),
        ({"rho": "often"}, "rho"),
        ({"topk": True}, "topk"),
    ],
)
def test_attribution_method_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        method_from_spec("attribution", **options)


# -------------------------------------------------------------------------------------------- curves
def test_tradeoff_curves_shape_dense_point_and_errors():
    m = make_tiny_llama()
    layers = find_unit_layers(m)
    ev, cal = [_batch(seed=10)], [_batch(seed=11)]
    pts = tradeoff_curves(
        m,
        layers,
        eval_batches=ev,
        calibration=cal,
        metrics=["magnitude", "ig"],
        n_steps=2,
        sparsities=[0.0, 0.5],
        units=["heads", "both"],
        progress=False,
    )
    assert len(pts) == 2 * 2 * 2 * 2
    dense = [p for p in pts if p.sparsity == 0]
    nll, n, _ = masked_nll(m, layers, ev[0])
    assert all(p.perplexity == pytest.approx(math.exp(nll / n)) for p in dense)
    # the per-input magnitude point equals deactivating each row's lowest-magnitude heads by hand
    stats, _ = unit_statistics(m, layers, ev[0])
    keep = keep_masks({la.name: unit_scores(stats[la.name], "magnitude") for la in layers if la.kind == "heads"}, 0.5)
    nll, n, _ = masked_nll(m, layers, ev[0], keep)
    p = next(p for p in pts if (p.mode, p.units, p.metric, p.sparsity) == ("per-input", "heads", "magnitude", 0.5))
    assert p.perplexity == pytest.approx(math.exp(nll / n))
    for kw, match in [
        ({"sparsities": [1.0]}, r"\[0, 1\)"),
        ({"metrics": ["grad"]}, "unknown attribution metric"),
        ({"n_steps": 0}, "n_steps"),
        ({"units": ["layers"]}, "unit set"),
        ({"rho": -2}, "rho"),
    ]:
        with pytest.raises(ValueError, match=match):
            tradeoff_curves(m, layers, eval_batches=ev, calibration=cal, progress=False, **kw)
    with pytest.raises(ValueError, match="calibration"):
        tradeoff_curves(m, layers, eval_batches=ev, modes=["calibrated"], progress=False)


# ------------------------------------------------------------------------------------ multiple choice
def _mc_records():
    return [
        {"question": "what is one plus one?", "choices": ["two", "three", "a fish"], "label": 0},
        {"question": "which is a color?", "choices": ["table", "blue"], "label": 1},
        {"question": "pick the animal", "choices": ["cat", "stone", "rain", "glass"], "label": 0},
    ]


def test_mc_loading_and_errors(tmp_path):
    p = tmp_path / "mc.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in _mc_records()))
    assert [it.label for it in load_mc(str(p))] == [0, 1, 0]
    q = tmp_path / "mc.json"
    q.write_text(json.dumps(_mc_records()))
    assert len(load_mc(str(q))) == 3
    for bad, match in [
        ([{"question": "q", "choices": ["a", "b"]}], "missing label"),
        ([{"question": "q", "choices": ["a", "b"], "label": 2}], "label"),
        ([{"question": "q", "choices": ["a"], "label": 0}], ">= 2 strings"),
        ([], "no records"),
    ]:
        with pytest.raises(DatasetError, match=match):
            parse_mc(bad)
    with pytest.raises(DatasetError, match="neither"):
        load_mc(str(tmp_path / "missing.json"))


def test_mc_accuracy_matches_unpadded_log_likelihoods():
    m = make_tiny_llama(seed=7)
    tok = byte_tokenizer()
    items = parse_mc(_mc_records())
    ex = tokenize_mc(tok, items)
    pts = tradeoff_curves(
        m,
        find_unit_layers(m),
        mc_examples=ex,
        metrics=["magnitude"],
        sparsities=[0.0],
        units=["both"],
        modes=["per-input"],
        progress=False,
    )
    correct = 0
    for it in items:  # reference: each choice alone, no padding
        prompt = tok(f"Question: {it.question}\nAnswer:", add_special_tokens=False)["input_ids"]
        ll = []
        for c in it.choices:
            cont = tok(" " + c, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + cont])
            with torch.no_grad():
                logp = F.log_softmax(m(input_ids=ids).logits[0, :-1].float(), -1)
            ll.append(sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(cont)))
        correct += int(max(range(len(ll)), key=ll.__getitem__) == it.label)
    assert pts[0].mc_items == 3 and pts[0].mc_accuracy == pytest.approx(correct / 3)


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_attribution_writes_curves(tiny_model_dir, text_file, tmp_path, capsys):
    mc = tmp_path / "mc.jsonl"
    mc.write_text("\n".join(json.dumps(r) for r in _mc_records()))
    out = tmp_path / "curves"
    rc = main(
        [
            "attribution",
            "--model",
            tiny_model_dir,
            "--data",
            text_file,
            "--metrics",
            "magnitude,cor_gxo",
            "--sparsity",
            "0,0.5",
            "--eval-samples",
            "2",
            "--seq-len",
            "16",
            "--calib-samples",
            "2",
            "--calib-seq-len",
            "16",
            "--mc",
            str(mc),
            "--out",
            str(out),
            "--no-progress",
            "--rho",
            "auto",
        ]
    )
    assert rc == 0
    rows = list(csv.DictReader(open(out / "curves.csv")))
    assert len(rows) == 2 * 3 * 2 * 2 and all(r["mc_items"] == "3" for r in rows)
    assert all((out / f"curves_{u}.png").stat().st_size > 0 for u in ("heads", "neurons", "both"))
    assert "cor_gxo" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, match",
    [
        (["--metrics", "magnitude,saliency"], "unknown attribution metric"),
        (["--n-steps", "0"], "n_steps"),
        (["--sparsity", "0:1:0.5"], r"\[0, 1\)"),
        (["--rho", "lots"], "rho"),
        (["--no-corpus"], "--mc"),
    ],
)
def test_cli_attribution_bad_input(args, match, capsys, tmp_path):
    assert main(["attribution", "--out", str(tmp_path / "x"), *args]) == 2
    assert re.search(match, capsys.readouterr().err)
