"""rotate_residual: the PCA basis folded into the weights leaves the dense model's function unchanged."""

import json

import pytest
import torch
import torch.nn as nn
from helpers import VOCAB, logits_of, make_tiny_llama, random_norm_gains, token_batches
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import actsparse as A
from actsparse.cli import main
from actsparse.errors import AlreadySparsifiedError, UsageError
from actsparse.io import read_thresholds
from actsparse.models import load_model
from actsparse.rotation import adapter_weights, rotation_of

_gains, _data, _logits = random_norm_gains, token_batches, logits_of


def _tied(bias: bool = False):
    return _gains(make_tiny_llama(seed=2, tie_word_embeddings=True, attention_bias=bias))


def _norm_inputs(model, data):
    """Per layer: the inputs of q_proj and gate_proj (after the fold: the normalized rotated residual)."""
    seen = {i: [] for i in range(len(model.model.layers))}
    hooks = [
        lin.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].reshape(-1, a[0].shape[-1]).double()))
        for i, layer in enumerate(model.model.layers)
        for lin in (layer.self_attn.q_proj, layer.mlp.gate_proj)
    ]
    with torch.no_grad():
        for b in data:
            model(b)
    for h in hooks:
        h.remove()
    return {i: torch.cat(x) for i, x in seen.items()}


def _off_diagonal(x):
    m2 = x.T @ x
    return float((m2 - torch.diag(m2.diagonal())).abs().max() / m2.diagonal().max())


@pytest.mark.parametrize("build", ["untied", "tied_with_biases"])
@pytest.mark.parametrize("k", [1, 2, None])
def test_dense_function_unchanged_and_inputs_decorrelated(build, k):
    model = _gains(make_tiny_llama(layers=3)) if build == "untied" else _tied(bias=True)
    n_layers = len(model.model.layers)
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(9))
    before = _logits(model, ids)
    emb_before = model.get_input_embeddings().weight.detach().clone()
    res = A.rotate_residual(model, _data(), layers_per_basis=k, progress=False)
    after = _logits(model, ids)
    assert (after - before).abs().max() / before.abs().max() < 1e-5
    q = res.basis.double()
    assert q.shape == (n_layers, 64, 64)
    eye = torch.eye(64, dtype=q.dtype)
    assert all(torch.allclose(b.T @ b, eye, atol=1e-6) for b in q)
    assert torch.all(res.variances[:, :-1] >= res.variances[:, 1:]) and res.tokens == 4 * 2 * 24
    assert 0.1 < res.energy_in_top(0.5) <= 1.0
    assert res.untied_head == (build != "untied") and A.rotation.rotation_of(model) == res.fingerprint
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight is not emb.weight
    assert torch.allclose(emb.weight.double(), emb_before.double() @ q[0], atol=1e-5)
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm"):
            assert torch.all(m.weight == 1)
    # one residual adapter between consecutive layers of different bases, none with one basis
    adapters = [m for m in model.modules() if isinstance(m, A.rotation.ResidualAdapter)]
    step = n_layers if k is None else k
    assert len(adapters) == (n_layers - 1) // step
    if k == 2:
        assert torch.equal(q[0], q[1]) and (n_layers < 3 or not torch.equal(q[1], q[2]))
    assert res.adapter_weights == A.rotation.adapter_weights(model) == len(adapters) * 64 * 64
    # q/k/v and gate/up now read principal coordinates: on the calibration data, the second moment of a
    # layer's inputs is diagonal (per layer), or of all layers' inputs pooled (one basis); a layer's own is
    # not diagonal in the shared basis
    seen = _norm_inputs(model, _data())
    pools = [list(range(i, min(i + step, n_layers))) for i in range(0, n_layers, step)]
    for pool in pools:
        assert _off_diagonal(torch.cat([seen[i] for i in pool])) < 1e-4
    if k is None:
        assert _off_diagonal(seen[0]) > 1e-2
    # and the rotated model sparsifies and runs with any method
    A.sparsify_(model, A.SparsifyConfig({r".*_proj": 0.5}), _data(2), progress=False)
    assert torch.isfinite(_logits(model, ids)).all()


def test_a_saved_basis_reproduces_the_rotation():
    model = _gains(make_tiny_llama(layers=3))
    res = A.rotate_residual(model, _data(), progress=False)
    fresh = _gains(make_tiny_llama(layers=3))
    again = A.rotate_residual(fresh, basis=res.basis, progress=False)
    ids = torch.randint(0, VOCAB, (1, 11), generator=torch.Generator().manual_seed(4))
    assert again.fingerprint == res.fingerprint and again.variances is None
    assert torch.allclose(_logits(fresh, ids), _logits(model, ids), atol=1e-5)
    for p_fresh, p_model in zip(fresh.parameters(), model.parameters()):
        assert torch.allclose(p_fresh, p_model, atol=1e-6)
    with pytest.raises(UsageError, match="already rotated"):
        A.rotate_residual(fresh, basis=res.basis, progress=False)
    for bad, match in [
        (res.basis[:2], "holds 2 bases for 3 layers"),
        (res.basis * 2, "not orthogonal"),
        (torch.eye(32), "32 wide"),
        (torch.full((64, 64), float("nan")), "finite"),
    ]:
        with pytest.raises(UsageError, match=match):
            A.rotate_residual(_gains(make_tiny_llama(layers=3)), basis=bad, progress=False)
    with pytest.raises(UsageError, match="one of them"):
        A.rotate_residual(fresh, _data(), basis=res.basis)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(UsageError, match="layers_per_basis"):
            A.rotate_residual(_gains(make_tiny_llama(layers=3)), _data(), layers_per_basis=bad)


def test_thresholds_only_load_on_the_same_rotation(tmp_path, calib_data):
    glob = _tied()
    A.rotate_residual(glob, _data(2), layers_per_basis=None, progress=False)
    A.sparsify_(glob, A.SparsifyConfig({r".*_proj": 0.5}), calib_data, progress=False)
    path = A.save_thresholds(glob, str(tmp_path / "rot.safetensors"))
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    # the rotated checkpoint (weights + config fingerprint) loads its thresholds; an unrotated model refuses
    A.save_pretrained(glob, str(tmp_path / "ckpt"))
    back = A.from_pretrained(str(tmp_path / "ckpt")).eval()
    assert back.get_output_embeddings().weight is not back.get_input_embeddings().weight
    assert torch.allclose(_logits(back, ids), _logits(glob, ids), atol=1e-5)
    plain = _tied()
    with pytest.raises(A.ThresholdFileError, match="rotated .*this model is not rotated"):
        A.load_thresholds(plain, path)
    assert not A.sparse_layers(plain)
    A.sparsify_(plain, A.SparsifyConfig({r".*_proj": 0.5}), calib_data, progress=False)
    plain_path = A.save_thresholds(plain, str(tmp_path / "plain.safetensors"))
    other = _tied()
    A.rotate_residual(other, _data(2), layers_per_basis=None, progress=False)
    with pytest.raises(A.ThresholdFileError, match="unrotated model, this model is rotated"):
        A.load_thresholds(other, plain_path)
    # a checkpoint reloaded from disk has the fingerprint but not the bases: its file says so on rotate=True
    A.remove_sparsity(back)
    A.sparsify_(back, A.SparsifyConfig({r".*_proj": 0.5}), calib_data, progress=False)
    again = A.save_thresholds(back, str(tmp_path / "again.safetensors"))
    assert A.read_rotation(again) is None and A.read_rotation(path).shape == (2, 64, 64)
    with pytest.raises(A.ThresholdFileError, match="holds no bases"):
        A.load_thresholds(_tied(), again, rotate=True)


def test_thresholds_keep_per_layer_bases_and_rotate_the_original_checkpoint(tmp_path, calib_data):
    per = _gains(make_tiny_llama(layers=4))
    res = A.rotate_residual(per, _data(2), layers_per_basis=2, progress=False)  # 2 bases, one adapter
    A.sparsify_(per, A.SparsifyConfig({r".*_proj": 0.5}), calib_data, progress=False)
    path = A.save_thresholds(per, str(tmp_path / "per.safetensors"))
    with safe_open(path, framework="pt") as st:
        assert st.get_tensor("rotation.bases").shape == (2, 64, 64)  # each distinct basis once
        assert st.get_tensor("rotation.index").tolist() == [0, 0, 1, 1]
        assert json.loads(st.metadata()["actsparse"])["format_version"] == 5
    assert torch.equal(A.read_rotation(path), res.basis)
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    plain = _gains(make_tiny_llama(layers=4))  # the original checkpoint
    before = _logits(plain, ids)
    with pytest.raises(A.ThresholdFileError, match="pass rotate=True"):
        A.load_thresholds(plain, path)
    assert torch.equal(_logits(plain, ids), before) and not A.sparse_layers(plain)
    A.load_thresholds(plain, path, rotate=True)
    assert rotation_of(plain) == res.fingerprint and adapter_weights(plain) == 64 * 64
    assert torch.equal(_logits(plain, ids), _logits(per, ids))  # the same sparse model, to the bit (the fold
    # uses the float32 basis the file keeps, so a threshold test cannot flip on a rounding difference)
    auto = _gains(make_tiny_llama(layers=4))  # "auto" (the CLI's): rotates the original, as rotate=True does
    A.load_thresholds(auto, path, rotate="auto")
    assert rotation_of(auto) == res.fingerprint and torch.allclose(_logits(auto, ids), _logits(per, ids), atol=1e-5)
    with pytest.raises(UsageError, match="rotate must be True, False or 'auto'"):
        A.load_thresholds(_gains(make_tiny_llama(layers=4)), path, rotate="yes")
    A.remove_sparsity(plain)  # the rotated model object itself loads the file as it is
    with pytest.raises(UsageError, match="rotated already.*without rotate=True"):
        A.load_thresholds(plain, path, rotate=True)
    A.load_thresholds(plain, path)
    assert torch.allclose(_logits(plain, ids), _logits(per, ids), atol=1e-5)
    # a layer the thresholds cannot swap is refused before the rotation folds: the model stays as it was
    odd = _gains(make_tiny_llama(layers=4))
    odd.model.layers[2].mlp.up_proj.__class__ = type("MyLinear", (nn.Linear,), {})
    with pytest.raises(UsageError, match="expected a torch.nn.Linear, got MyLinear"):
        A.load_thresholds(odd, path, rotate=True)
    assert rotation_of(odd) is None and adapter_weights(odd) == 0
    assert torch.equal(_logits(odd, ids), before)
    # a file of the unrotated model has nothing to rotate with
    flat = make_tiny_llama(layers=4)
    A.sparsify_(flat, A.SparsifyConfig({r".*_proj": 0.5}), calib_data, progress=False)
    flat_path = A.save_thresholds(flat, str(tmp_path / "flat.safetensors"))
    with pytest.raises(UsageError, match="calibrated on the unrotated model"):
        A.load_thresholds(make_tiny_llama(layers=4), flat_path, rotate=True)
    unrotated = make_tiny_llama(layers=4)
    A.load_thresholds(unrotated, flat_path, rotate="auto")  # nothing to rotate: loads as it is
    assert rotation_of(unrotated) is None and len(A.sparse_layers(unrotated)) == len(A.sparse_layers(flat))
    # the adapters are no HF modules: save_pretrained refuses before writing anything, naming the way that works
    with pytest.raises(UsageError, match="rotate=True"):
        A.save_pretrained(per, str(tmp_path / "ckpt"))
    assert not (tmp_path / "ckpt").exists()


def test_edited_bases_in_a_thresholds_file_are_refused(tmp_path, calib_data):
    model = make_tiny_llama(layers=2)
    A.rotate_residual(model, _data(2), progress=False)
    A.sparsify_(model, A.SparsifyConfig({r".*_proj": 0.5}), calib_data, progress=False)
    path = A.save_thresholds(model, str(tmp_path / "rot.safetensors"))
    with safe_open(path, framework="pt") as st:
        meta, tensors = st.metadata(), {k: st.get_tensor(k) for k in st.keys()}  # noqa: SIM118
    for edit, match in [
        (lambda t: t.__setitem__("rotation.bases", t["rotation.bases"].flip(-1).contiguous()), "does not match"),
        (lambda t: t.__setitem__("rotation.bases", t["rotation.bases"] * 2), "not orthogonal"),
        (lambda t: t.__setitem__("rotation.index", torch.tensor([0, 5])), "indices into 2 bases"),
        (lambda t: t.pop("rotation.index"), "needs both"),
    ]:
        bad = dict(tensors)
        edit(bad)
        out = str(tmp_path / "bad.safetensors")
        save_file(bad, out, metadata=meta)
        with pytest.raises(A.ThresholdFileError, match=match):
            read_thresholds(out)


def test_cli_eval_rotates_the_original_checkpoint_for_rotated_thresholds(tiny_model_dir, text_file, tmp_path, capsys):
    model, _ = load_model(tiny_model_dir)
    A.rotate_residual(model, _data(2), progress=False)
    A.sparsify_(model, A.SparsifyConfig({r".*_proj": 0.5}), _data(2, seed=7), progress=False)
    path = A.save_thresholds(model, str(tmp_path / "rot.safetensors"))
    args = ["eval", "--model", tiny_model_dir, "--data", text_file, "--thresholds", path, "--no-progress"]
    assert main([*args, "--context", "64", "--json"]) == 0  # (an unrotated model would refuse the file)
    report = json.loads(capsys.readouterr().out)
    assert abs(report["by_type"]["up_proj"]["measured"] - 0.5) < 0.15


class _GemmaNorm(nn.Module):
    """Gemma's RMSNorm: x / rms(x) * (1 + weight) -- its gain cannot be folded into W·diag(g) as such."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))
        self.eps = 1e-6

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)


def _plain(t):
    return t.dequantize() if type(t) is not torch.Tensor and hasattr(t, "dequantize") else t


def _state(model):
    return {k: _plain(v).clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "break_it, match",
    [
        (lambda m: setattr(m.model.layers[1], "post_attention_layernorm", _GemmaNorm(64)), "1 \\+ weight"),
        (lambda m: setattr(m.model.layers[0], "input_layernorm", nn.LayerNorm(64)), "not an RMSNorm"),
        (lambda m: setattr(m.model.layers[0], "post_feedforward_layernorm", nn.LayerNorm(64)), "more norms"),
        (lambda m: setattr(m.model.layers[0].mlp, "up_proj", nn.Identity()), "nn.Linear"),
        (lambda m: A.compress_weights(m, "int8_sym"), "compressed"),
    ],
)
def test_unsupported_models_fail_before_any_change(break_it, match):
    pytest.importorskip("torchao") if "compress" in match else None
    model = _gains(make_tiny_llama())
    break_it(model)
    state = _state(model)
    with pytest.raises(UsageError, match=match):
        A.rotate_residual(model, _data(1), progress=False)
    after = model.state_dict()
    assert all(torch.equal(_plain(after[k]), v) for k, v in state.items())


def test_a_sparsified_model_is_refused(calib_data):
    model = make_tiny_llama()
    A.sparsify_(model, A.SparsifyConfig({r".*up_proj": 0.5}), calib_data, progress=False)
    with pytest.raises(AlreadySparsifiedError, match="remove_sparsity"):
        A.rotate_residual(model, _data(1), progress=False)


@pytest.mark.parametrize(
    "rotate",
    [
        lambda m, d: A.rotate_residual(m, d, progress=False),  # per layer: adapters as forward hooks
        lambda m, d: A.rotate_inputs(m, d, rank=8, progress=False),  # forward hooks on the norms
    ],
    ids=["residual", "inputs"],
)
def test_the_decoder_runs_a_rotated_sparse_model_like_hf_generate(calib_data, rotate):
    model = _gains(make_tiny_llama(layers=3))
    rotate(model, _data())
    A.sparsify_(model, A.SparsifyConfig({r".*_proj": 0.5}), calib_data, progress=False)
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=12, do_sample=False)
    out = A.Decoder(model, max_seq_len=32).run(ids, 12)
    assert torch.equal(out.sequences, ref)


def test_cli_sweep_rotates_first_and_counts_the_adapters(tiny_model_dir, text_file, tmp_path, capsys):
    common = ["sweep", "--model", tiny_model_dir, "--data", text_file, "--no-progress", "--methods", "quantile"]
    common += ["--sparsity", "0.5", "--calib-samples", "4", "--calib-seq-len", "32", "--context", "64"]
    common += ["--eval-tokens", "300"]
    points = {}
    for flag in ([], ["--rotate"], ["--rotate", "global"]):
        out = tmp_path / f"sw{len(points)}"
        assert main([*common, *flag, "--out", str(out)]) == 0
        capsys.readouterr()
        data = json.loads((out / "sweep.json").read_text())
        points[" ".join(flag)] = (data["points"][0], data.get("rotation"))
    (plain, none), (rot, meta), (glob, gmeta) = points.values()
    assert none is None and meta["mode"] == 1 and gmeta["mode"] == "global" and gmeta["adapter_weights"] == 0
    # the tiny model: 2 layers of 64 wide -> one 64x64 adapter, subtracted from the skipped weights
    sizes = {"q_proj": 64 * 64, "k_proj": 64 * 32, "v_proj": 64 * 32, "o_proj": 64 * 64}
    sizes.update(gate_proj=64 * 128, up_proj=64 * 128, down_proj=64 * 128)

    def skipped(point):
        per = point["per_layer"]
        return sum(v * sizes[n.rsplit(".", 1)[-1]] for n, v in per.items()) / (2 * sum(sizes.values()))

    assert meta["adapter_weights"] == 64 * 64
    assert rot["measured"] == pytest.approx(skipped(rot) - 64 * 64 / (2 * sum(sizes.values())), abs=1e-9)
    assert glob["measured"] == pytest.approx(skipped(glob), abs=1e-9)
    assert plain["measured"] == pytest.approx(skipped(plain), abs=1e-9)
    assert main([*common, "--rotate", "0"]) == 2
    assert "number of layers >= 1 or 'global'" in capsys.readouterr().err


def test_a_per_layer_rotation_saved_without_its_adapters_is_refused(tmp_path):
    model = _gains(make_tiny_llama(layers=3, seed=2))
    A.rotate_residual(model, _data(2), progress=False)  # one basis per layer: adapters between them
    assert adapter_weights(model) > 0
    model.save_pretrained(str(tmp_path / "ck"))  # Hugging Face's own save: the adapters are no HF modules
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ck"))
    with pytest.raises(UsageError, match="holds no adapters.*rotate=True"):
        rotation_of(reloaded)
    one = _gains(make_tiny_llama(layers=3, seed=2))
    A.rotate_residual(one, _data(2), layers_per_basis=None, progress=False)  # one basis: no adapters needed
    one.save_pretrained(str(tmp_path / "one"))
    assert rotation_of(AutoModelForCausalLM.from_pretrained(str(tmp_path / "one"))) == rotation_of(one)
