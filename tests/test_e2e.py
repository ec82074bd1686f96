"""End-to-end on the embedded SmolLM2-135M and Lee corpus (marked e2e; ~1-2 min on 2 cores)."""

import json

import pytest
import torch

import actsparse as A
from actsparse.cli import main
from actsparse.data import chunk_tokens, load_corpus, tokenize
from actsparse.eval import SparsityMonitor, perplexity

pytestmark = pytest.mark.e2e

RECIPE = {A.TargetScope(patterns=[".*up_proj.*", ".*gate_proj.*"]): 0.3, A.TargetScope(patterns=[".*down_proj.*"]): 0.5}


def test_embedded_model_sparsify_eval_save_load(embedded, tmp_path):
    model, tok = embedded
    corpus = load_corpus("embedded")
    assert corpus.calibration[:200] not in corpus.evaluation  # disjoint splits
    chunks = chunk_tokens(tok, corpus.calibration, 128, 8)
    ids = tokenize(tok, corpus.evaluation)[:1024]
    dense = perplexity(model, ids, context=512, progress=False).token_perplexity
    assert 10 < dense < 60
    try:
        A.sparsify_activations(model, [torch.cat(chunks[:4]), torch.cat(chunks[4:])], RECIPE, progress=False)
        assert len(A.sparse_layers(model)) == 90
        with SparsityMonitor(model) as mon:
            sparse = perplexity(model, ids, context=512, progress=False).token_perplexity
        assert dense < sparse < 1.3 * dense
        for name, s in mon.sparsity().items():
            assert abs(s - mon.targets()[name]) < 0.06, name
        path = A.save_thresholds(model, str(tmp_path / "smollm2.safetensors"))
        thresholds = {n: m.act_threshold.item() for n, m in A.sparse_layers(model).items()}
        A.remove_sparsity(model)
        A.load_thresholds(model, path)
        assert {n: m.act_threshold.item() for n, m in A.sparse_layers(model).items()} == thresholds
        # the README's checkpoint round trip: loaded from a GGUF file, the model still saves (its weights are
        # plain; transformers kept it marked GGUF-quantized and refused)
        A.save_pretrained(model, str(tmp_path / "ckpt"), tok)
        assert "quantization_config" not in json.loads((tmp_path / "ckpt" / "config.json").read_text())
        again = A.from_pretrained(str(tmp_path / "ckpt"))
        with torch.no_grad():
            assert torch.equal(again(ids[None, :64]).logits, model(ids[None, :64]).logits)
    finally:
        A.remove_sparsity(model)


def test_demo_command_prints_json(capsys):
    code = main(
        [
            "demo",
            "--no-progress",
            "--json",
            "--calib-samples",
            "4",
            "--calib-seq-len",
            "128",
            "--eval-tokens",
            "1024",
            "--context",
            "512",
        ]
    )
    assert code == 0
    res = json.loads(capsys.readouterr().out)
    assert res["dense"]["token_perplexity"] < res["sparse"]["token_perplexity"]
    assert res["delta_token_ppl_percent"] > 0
    assert set(res["sparse"]["by_type"]) == {"gate_proj", "up_proj", "down_proj"}
    assert res["sparse"]["by_type"]["down_proj"]["target"] == 0.5


def test_embedded_attribution_heads_and_neurons(embedded):
    from actsparse.attribution import ScoreBatch, find_unit_layers, tradeoff_curves

    model, tok = embedded
    corpus = load_corpus("embedded")
    layers = find_unit_layers(model)
    assert len(layers) == 60 and {(la.kind, la.n_units, la.group) for la in layers} == {
        ("heads", 9, 64),
        ("neurons", 1536, 1),
    }
    ev = [ScoreBatch.from_ids(torch.cat(chunk_tokens(tok, corpus.evaluation, 64, 2)))]
    cal = [ScoreBatch.from_ids(torch.cat(chunk_tokens(tok, corpus.calibration, 64, 2)))]
    pts = tradeoff_curves(
        model,
        layers,
        eval_batches=ev,
        calibration=cal,
        metrics=["magnitude", "gxo", "cor_gxo"],
        sparsities=[0.0, 0.3],
        units=["neurons"],
        progress=False,
    )
    ppl = {(p.mode, p.metric, p.sparsity): p.perplexity for p in pts}
    dense = ppl[("per-input", "magnitude", 0.0)]
    assert 10 < dense < 80
    for mode in ("per-input", "calibrated"):
        # deactivating 30% of the neurons costs something, and plain GxO (first order) costs far more than
        # magnitude on this model while the corrected score stays close to magnitude
        assert dense < ppl[(mode, "magnitude", 0.3)] < 8 * dense, ppl
        assert ppl[(mode, "gxo", 0.3)] > 5 * ppl[(mode, "magnitude", 0.3)], ppl
        assert ppl[(mode, "cor_gxo", 0.3)] < 1.5 * ppl[(mode, "magnitude", 0.3)], ppl
    assert not A.sparse_layers(model)  # hooks only: the model is left as it was
