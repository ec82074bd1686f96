"""Int8 weight-only compression (torchao) + activation sparsity."""

import copy
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import VOCAB, make_tiny_llama

import actsparse
from actsparse import IgnoredScope, SparsityParams, apply_thresholds, sparse_layers, sparsify_activations
from actsparse.quant import compress_weights, dense_weight, int8_codes, int8_layers

pytest.importorskip("torchao", reason="torchao is not installed (pip install 'actsparse[int8]')")

PROJ = (".q_proj", ".k_proj", ".v_proj", ".o_proj", ".gate_proj", ".up_proj", ".down_proj")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _state(model):
    return {
        k: (type(v), v.detach().clone() if type(v) in (torch.Tensor, nn.Parameter) else v.dequantize().clone())
        for k, v in model.state_dict().items()
    }


def _same_state(a, b):
    return a.keys() == b.keys() and all(a[k][0] is b[k][0] and torch.equal(a[k][1], b[k][1]) for k in a)


@pytest.mark.parametrize("mode", ["int8_asym", "int8_sym"])
def test_compress_weights_rounds_every_projection_to_its_nearest_code(mode):
    model = make_tiny_llama()
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = compress_weights(model, mode)
    assert sorted(names) == sorted(n for n in dense if n.endswith(PROJ))  # the output head stays dense
    assert int8_layers(model) == names and int8_codes(model.lm_head.weight) is None
    for n in names:
        w = dict(model.named_modules())[n].weight
        q, scale, zero = int8_codes(w)
        assert q.dtype == torch.int8 and scale.shape == (w.shape[0],)
        assert (zero is None) == (mode == "int8_sym")
        deq = (q.float() - (0 if zero is None else zero[:, None])) * scale[:, None]
        assert torch.equal(deq, dense_weight(w).float())
        # every weight sits within half a step of its code, and the codes span the row's range
        assert ((deq - dense[n]).abs() <= scale[:, None] / 2 * (1 + 1e-4) + 1e-7).all()
        assert int(q.max()) == 127 or mode == "int8_sym"
        # 8 bits instead of 32: the step is about the row's range / 255
        span = dense[n].amax(1).clamp(min=0) - dense[n].amin(1).clamp(max=0)
        bound = span / 255 if mode == "int8_asym" else 2 * dense[n].abs().amax(1) / 254
        assert (scale <= bound * 1.01 + 1e-9).all()


def test_compressed_model_sparsifies_calibrates_and_round_trips_thresholds(tmp_path, calib_data):
    model = make_tiny_llama()
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(5))
    dense = _logits(model, ids)
    compress_weights(model)
    int8 = _logits(model, ids)
    assert 0 < (int8 - dense).abs().max() < 0.05 * dense.abs().max()
    sparsify_activations(model, calib_data, {".*(up|gate|down)_proj": 0.5}, progress=False)
    layers = sparse_layers(model)
    assert len(layers) == 6 and all(int8_codes(m.weight) is not None for m in layers.values())
    # the forward is exactly the masked input through the dequantized int8 weight
    up = layers["model.layers.0.mlp.up_proj"]
    x = torch.randn(3, up.in_features)
    with torch.no_grad():
        ref = F.linear(x.masked_fill(x.abs() <= up.act_threshold, 0), dense_weight(up.weight), up.bias)
        assert torch.allclose(up(x), ref, atol=1e-6)
    # calibration ran on the int8 model's own activations: 50% of the calibration entries are dropped
    seen = []
    h = up.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    for b in calib_data:
        _logits(model, b)
    h.remove()
    frac = float((torch.cat(seen).abs() <= up.act_threshold).float().mean())
    assert abs(frac - 0.5) < 0.02
    sparse = _logits(model, ids)
    path = actsparse.save_thresholds(model, str(tmp_path / "t.safetensors"))
    other = make_tiny_llama()
    compress_weights(other)
    actsparse.load_thresholds(other, path)
    assert torch.equal(_logits(other, ids), sparse)
    actsparse.remove_sparsity(model)
    assert torch.equal(_logits(model, ids), int8)


def test_shifted_and_weight_aware_methods_read_dequantized_weights(calib_data):
    model = make_tiny_llama()
    compress_weights(model, "int8_sym")
    down = "model.layers.1.mlp.down_proj"
    apply_thresholds(model, {down: SparsityParams(0.1, shift=0.05)})
    layer = sparse_layers(model)[down]
    x = torch.randn(4, layer.in_features)
    w = dense_weight(layer.weight)
    with torch.no_grad():
        d = x - 0.05
        ref = F.linear(d.masked_fill(d.abs() <= 0.1, 0), w) + 0.05 * w.sum(1)
        assert torch.allclose(layer(x), ref, atol=1e-5)
    actsparse.remove_sparsity(model)
    for method in ("wina", "scap-median"):
        sparsify_activations(model, calib_data, {".*down_proj": 0.4}, method=method, progress=False)
        assert len(sparse_layers(model)) == 2
        actsparse.remove_sparsity(model)


def test_compress_weights_scopes_and_output_head():
    model = make_tiny_llama()
    names = compress_weights(model, patterns=[".*mlp.*"], ignored_scope=IgnoredScope(patterns=[".*layers.1.*"]))
    assert names == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    other = make_tiny_llama()
    assert "lm_head" in compress_weights(other, include_output_head=True)


def test_bad_compression_requests_leave_the_model_unchanged(calib_data):
    model = make_tiny_llama()
    before = _state(model)
    with pytest.raises(ValueError, match="unknown weight mode 'int4'"):
        compress_weights(model, "int4")
    with pytest.raises(ValueError, match="only non-Linear modules"):
        compress_weights(model, patterns=[".*embed_tokens"])  # an nn.Embedding: not supported
    with pytest.raises(ValueError, match="matches no module"):
        compress_weights(model, patterns=[".*mlp.w1"])
    assert _same_state(before, _state(model))

    class Fancy(nn.Linear):  # a Linear subclass (e.g. another library's quantized layer)
        pass

    fancy = make_tiny_llama()
    fancy.model.layers[0].mlp.up_proj.__class__ = Fancy
    with pytest.raises(ValueError, match="plain torch.nn.Linear layers only.*Fancy"):
        compress_weights(fancy)
    assert int8_layers(fancy) == []

    sparse = copy.deepcopy(model)
    sparsify_activations(sparse, calib_data, {".*up_proj": 0.3}, progress=False)
    with pytest.raises(ValueError, match="before sparsifying"):
        compress_weights(sparse)
    assert int8_layers(sparse) == []
    compress_weights(model)
    with pytest.raises(ValueError, match="already hold int8 weights"):
        compress_weights(model, "int8_sym")


def test_missing_torchao_names_the_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    model = make_tiny_llama()
    with pytest.raises(ImportError, match=r"actsparse\[int8\]"):
        compress_weights(model)
    assert int8_layers(model) == []


def test_demo_int8_prints_seed_000s_four_rows(tiny_model_dir, text_file, capsys):
    from actsparse.cli import main

    common = [
        "--model",
        tiny_model_dir,
        "--data",
        text_file,
        "--no-progress",
        "--calib-samples",
        "4",
        "--calib-seq-len",
        "32",
        "--context",
        "64",
        "--eval-tokens",
        "256",
    ]
    assert main(["demo", *common, "--int8", "--json"]) == 0
    r = __import__("json").loads(capsys.readouterr().out)
    assert r["int8_mode"] == "int8_asym"
    ppl = {k: r[k]["token_perplexity"] for k in ("dense", "sparse", "int8", "int8_sparse")}
    assert len(set(ppl.values())) == 4  # four different models
    # the int8 thresholds were calibrated on the int8 model: different from the dense model's, same targets
    assert r["int8_sparse"]["target_sparsity"] == r["sparse"]["target_sparsity"]
    assert r["int8_sparse"]["measured_sparsity"] != r["sparse"]["measured_sparsity"]
    assert main(["demo", *common, "--int8", "--weights", "int8_sym"]) == 0
    out = capsys.readouterr().out
    for row in ("dense", "sparse", "int8-sym", "int8-sym+sparse"):
        assert re.search(rf"^{re.escape(row)}\s+\d+\.\d+\s+\d+\.\d+", out, re.M), row


def test_fused_moe_experts_are_left_dense_with_a_warning():
    from test_moe import make_mixtral

    model = make_mixtral()
    experts = {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." in n}
    with pytest.warns(UserWarning, match="fused MoE expert weights .* stay in full precision"):
        names = compress_weights(model)
    assert names and all(".experts." not in n for n in names)
    assert all(torch.equal(p, experts[n]) for n, p in model.named_parameters() if n in experts)
