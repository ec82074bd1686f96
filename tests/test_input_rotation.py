"""rotate_inputs: rank-r Householder rotations of the q/k/v and gate/up inputs, folded into their readers."""

import copy
import json

import pytest
import torch
from helpers import VOCAB, logits_of, make_tiny_llama, random_norm_gains, token_batches
from safetensors import safe_open
from safetensors.torch import save_file

import actsparse as A
import actsparse.input_rotation as IR
from actsparse.cli import main
from actsparse.errors import AlreadySparsifiedError, DatasetError, ThresholdFileError, UsageError
from actsparse.eval.sweep import weighted_sparsity
from actsparse.input_rotation import InputRotation, compact_wy, input_rotation_of, input_rotation_weights


def _model(seed=3, **config):
    # (the same seed: the same checkpoint); gains other than one: the rotation acts on the norm's output
    return random_norm_gains(make_tiny_llama(seed=seed, **config), seed)


_data, _logits = token_batches, logits_of


def _inputs(model, data, which="q_proj"):
    seen = []
    lin = [m for n, m in model.named_modules() if n.endswith(which)][0]
    h = lin.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    with torch.no_grad():
        for b in data:
            model(b)
    h.remove()
    return torch.cat(seen)


@pytest.mark.parametrize("r", [1, 5, 32])
def test_compact_wy_is_orthogonal_and_starts_with_the_given_vectors(r):
    g = torch.Generator().manual_seed(r)
    v = torch.linalg.qr(torch.randn(48, r, generator=g, dtype=torch.float64))[0]
    y, t = compact_wy(v)
    q = torch.eye(48, dtype=torch.float64) - y @ t @ y.T
    torch.testing.assert_close(q.T @ q, torch.eye(48, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(q[:, :r].abs(), v.abs(), atol=1e-10, rtol=0)  # the same columns up to sign
    assert torch.allclose((q[:, :r] * v).sum(0).abs(), torch.ones(r, dtype=torch.float64))
    assert torch.equal(t, torch.triu(t)) and y.shape == (48, r)


@pytest.mark.parametrize("shape", [(1, 1, 48), (48,), (2, 3, 48)])
def test_input_rotation_computes_q_transpose_x_for_one_token_and_for_many(shape):
    # one token takes the reductions' path, several the products': both are Qᵀx, in x's dtype
    g = torch.Generator().manual_seed(len(shape))
    y, t = compact_wy(torch.linalg.qr(torch.randn(48, 6, generator=g, dtype=torch.float64))[0])
    q = torch.eye(48, dtype=torch.float64) - y @ t @ y.T
    x = torch.randn(shape, generator=g)
    rot = InputRotation(y, t)
    z = rot(x)
    assert z.shape == x.shape and z.dtype == x.dtype
    torch.testing.assert_close(z.double(), x.double() @ q, atol=1e-5, rtol=1e-5)  # rows: zᵀ = xᵀQ
    assert rot(x.bfloat16()).dtype == torch.bfloat16 and rot.values_read == 2 * 48 * 6
    assert "back" not in rot.state_dict()  # derived from Y and T, not saved


def test_the_dense_function_is_unchanged_and_inputs_decorrelate_in_the_top_directions():
    model, data = _model(), _data()
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(9))
    before, x_before = _logits(model, ids), _inputs(model, data)
    res = A.rotate_inputs(model, data, rank=8, progress=False)
    torch.testing.assert_close(_logits(model, ids), before, atol=1e-5, rtol=1e-5)
    assert res.rank == 8 and res.tokens == 4 * 2 * 24 and 0 < res.energy_in_rank <= 1
    assert input_rotation_of(model) == res.fingerprint
    # q_proj now reads z = Qᵀx: the same norm as x, and the top-8 coordinates are the principal components
    z = _inputs(model, data)
    torch.testing.assert_close(z.norm(dim=1), x_before.norm(dim=1), atol=1e-4, rtol=1e-4)
    m = (z.T @ z)[:8, :8]
    off = (m - torch.diag(m.diagonal())).abs().max() / m.diagonal().abs().max()
    assert off < 1e-4, off
    top = torch.linalg.eigvalsh(x_before.T @ x_before).flip(0)[:8]
    torch.testing.assert_close(m.diagonal().sort(descending=True).values, top, rtol=1e-4, atol=1e-6)
    # what decode reads per token: per norm, Y twice and T
    layers, d = len(model.model.layers), model.config.hidden_size
    assert res.weights_read == input_rotation_weights(model) == layers * 2 * (2 * d * 8)
    assert sum(isinstance(m, InputRotation) for m in model.modules()) == 2 * layers


def test_the_rotations_stay_float32_and_count_twice_against_bfloat16_weights():
    model, data = _model(), _data()
    A.rotate_inputs(model, data, rank=4, progress=False)
    fp32_count = input_rotation_weights(model)
    before = [(r.reflectors.clone(), r.factor.clone()) for r in model.modules() if isinstance(r, InputRotation)]
    model.to(torch.bfloat16)
    rots = [m for m in model.modules() if isinstance(m, InputRotation)]
    assert all(torch.equal(r.reflectors, y) and torch.equal(r.factor, t) for r, (y, t) in zip(rots, before))
    assert all(r.reflectors.dtype == torch.float32 and r.factor.dtype == torch.float32 for r in rots)
    assert input_rotation_weights(model) == 2 * fp32_count  # 4-byte values against 2-byte weights
    ids = torch.randint(0, VOCAB, (1, 12))
    assert torch.isfinite(_logits(model, ids).float()).all()


def test_a_failure_during_the_fold_leaves_the_model_as_it_was(monkeypatch):
    model, data = _model(), _data()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    made = []

    class Failing(IR.InputRotation):
        def __init__(self, y, t):
            made.append(1)
            if len(made) == 3:
                raise RuntimeError("out of memory (injected)")
            super().__init__(y, t)

    monkeypatch.setattr(IR, "InputRotation", Failing)
    with pytest.raises(RuntimeError, match="injected"):
        A.rotate_inputs(model, data, rank=4, progress=False)
    assert len(made) == 3  # two norms were folded and hooked before the failure
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert input_rotation_of(model) is None
    assert all(not n._forward_hooks for n in model.modules() if type(n).__name__.endswith("RMSNorm"))


def test_layers_with_more_norms_and_checkpoints_without_the_rotations_are_refused(tmp_path):
    model, data = _model(), _data()
    model.model.layers[1].pre_feedforward_layernorm = torch.nn.LayerNorm(64)  # as Gemma2's layers have
    with pytest.raises(UsageError, match="more norms than"):
        A.rotate_inputs(model, data, rank=4, progress=False)
    assert input_rotation_of(model) is None
    saved = _model()
    A.rotate_inputs(saved, data, rank=4, progress=False)
    reloaded = _model()  # as a plain save_pretrained + from_pretrained gives it: the config key, no hooks
    reloaded.config.actsparse_input_rotation = saved.config.actsparse_input_rotation
    plain = _model()
    A.sparsify_(plain, A.SparsifyConfig({".*_proj": 0.5}), data, progress=False)
    path = str(tmp_path / "t.safetensors")
    A.save_thresholds(plain, path)
    with pytest.raises(UsageError, match="holds none"):
        A.load_thresholds(reloaded, path)
    with pytest.raises(UsageError, match="holds none"):
        A.rotate_inputs(reloaded, data, rank=4, progress=False)


def test_sparsifying_the_rotated_model_counts_the_rotations_against_the_skipped_weights():
    model, data = _model(), _data()
    A.rotate_inputs(model, data, rank=4, progress=False)
    A.sparsify_(model, A.SparsifyConfig({".*_proj": 0.5}), data, progress=False)
    names = [n for n, m in model.named_modules() if isinstance(m, A.SparseLinear)]
    measured = dict.fromkeys(names, 0.5)
    total = sum(model.get_submodule(n).weight.numel() for n in names)
    assert weighted_sparsity(model, measured) == pytest.approx(0.5 - input_rotation_weights(model) / total)


def test_bad_input_is_refused_before_any_change():
    model, data = _model(), _data()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for rank in (0, 64, 100, 2.0, True):
        with pytest.raises(UsageError, match="rank must be an int in"):
            A.rotate_inputs(model, data, rank=rank, progress=False)
    with pytest.raises(DatasetError, match="empty"):
        A.rotate_inputs(model, [], rank=4, progress=False)
    assert input_rotation_of(model) is None and not any(isinstance(m, InputRotation) for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    A.rotate_inputs(model, data, rank=4, progress=False)
    with pytest.raises(UsageError, match="already rotated"):
        A.rotate_inputs(model, data, rank=4, progress=False)
    with pytest.raises(UsageError, match="already rotated"):
        A.rotate_residual(model, data, progress=False)
    other = _model()
    A.rotate_residual(other, data, progress=False)
    with pytest.raises(UsageError, match="already rotated"):
        A.rotate_inputs(other, data, rank=4, progress=False)
    sparse = _model()
    A.sparsify_(sparse, A.SparsifyConfig({".*_proj": 0.5}), data, progress=False)
    with pytest.raises(AlreadySparsifiedError):
        A.rotate_inputs(sparse, data, rank=4, progress=False)


def test_compressed_weights_are_refused():
    pytest.importorskip("torchao")
    model, data = _model(), _data()
    A.compress_weights(model, "int8_sym")
    with pytest.raises(UsageError, match="compressed weights"):
        A.rotate_inputs(model, data, rank=4, progress=False)
    assert input_rotation_of(model) is None


def test_thresholds_keep_the_rotations_and_rotate_the_original_checkpoint(tmp_path):
    data = _data()
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(9))
    model = _model()
    A.rotate_inputs(model, data, rank=4, progress=False)
    A.sparsify_(model, A.SparsifyConfig({".*_proj": 0.5}), data, progress=False)
    want = _logits(model, ids)
    path = str(tmp_path / "r.safetensors")
    A.save_thresholds(model, path)
    y, t = A.read_input_rotation(path)
    assert y.shape == (4, 64, 4) and t.shape == (4, 4, 4)  # 2 layers x 2 norms
    fresh = _model()  # the original checkpoint
    with pytest.raises(ThresholdFileError, match="rotate=True"):
        A.load_thresholds(fresh, path)  # thresholds of z = Qᵀx do not apply to x
    assert input_rotation_of(fresh) is None and not any(isinstance(m, A.SparseLinear) for m in fresh.modules())
    A.load_thresholds(fresh, path, rotate=True)
    torch.testing.assert_close(_logits(fresh, ids), want, atol=1e-5, rtol=1e-5)
    assert input_rotation_of(fresh) == input_rotation_of(model)
    auto = _model()
    A.load_thresholds(auto, path, rotate="auto")  # the CLI's --thresholds
    torch.testing.assert_close(_logits(auto, ids), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(UsageError, match="save_pretrained cannot keep rotate_inputs"):
        A.save_pretrained(model, str(tmp_path / "ckpt"))
    assert not (tmp_path / "ckpt").exists()


def test_thresholds_of_unrotated_inputs_are_refused_on_a_rotated_model(tmp_path):
    data = _data()
    plain = _model()
    A.sparsify_(plain, A.SparsifyConfig({".*_proj": 0.5}), data, progress=False)
    path = str(tmp_path / "t.safetensors")
    A.save_thresholds(plain, path)
    model = _model()
    A.rotate_inputs(model, data, rank=4, progress=False)
    for rotate in (False, "auto", True):
        with pytest.raises(ThresholdFileError, match="calibrated on unrotated inputs"):
            A.load_thresholds(model, path, rotate=rotate)
    assert not any(isinstance(m, A.SparseLinear) for m in model.modules())


def _resave(path, out, edit):
    with safe_open(path, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(tensors, meta)
    save_file(tensors, out, metadata=meta)


def test_bad_saved_rotations_are_one_clear_error_each(tmp_path):
    data = _data()
    model = _model()
    A.rotate_inputs(model, data, rank=4, progress=False)
    A.sparsify_(model, A.SparsifyConfig({".*_proj": 0.5}), data, progress=False)
    good = str(tmp_path / "good.safetensors")
    A.save_thresholds(model, good)
    Y, T = "input_rotation.reflectors", "input_rotation.factors"

    def drop_t(ts, meta):
        del ts[T]

    def scale_y(ts, meta):
        ts[Y] = ts[Y] * 1.5  # no longer orthogonal

    def nudge_y(ts, meta):
        ts[Y] = ts[Y].clone()
        ts[Y][0, 5, 0] += 1e-3  # orthogonal enough? the fingerprint says edited

    def lower_t(ts, meta):
        ts[T] = ts[T].clone()
        ts[T][0, 2, 0] = 0.5

    def no_header(ts, meta):
        h = json.loads(meta["actsparse"])
        del h["model"]["input_rotation"]
        meta["actsparse"] = json.dumps(h)

    def no_tensors(ts, meta):
        del ts[Y], ts[T]

    cases = {
        drop_t: "need both tensors",
        scale_y: "orthogonal",
        nudge_y: "edited or corrupt",
        lower_t: "upper triangular",
        no_header: "names no input rotation",
        no_tensors: "they are missing",
    }
    for edit, message in cases.items():
        bad = str(tmp_path / f"{edit.__name__}.safetensors")
        _resave(good, bad, edit)
        with pytest.raises(ThresholdFileError, match=message):
            A.read_input_rotation(bad)
    fresh = _model()
    with pytest.raises(UsageError, match="factors hold 4 rotations, the model has 6"):
        A.rotate_inputs(_model(layers=3), factors=A.read_input_rotation(good), progress=False)
    with pytest.raises(UsageError, match="calibration data or saved factors"):
        A.rotate_inputs(fresh, data, factors=A.read_input_rotation(good), progress=False)
    assert input_rotation_of(fresh) is None


def test_cli_sweep_rotates_the_inputs_first_and_counts_their_weights(tiny_model_dir, text_file, tmp_path, capsys):
    common = ["sweep", "--model", tiny_model_dir, "--data", text_file, "--no-progress", "--methods", "quantile"]
    common += ["--sparsity", "0.5", "--calib-samples", "4", "--calib-seq-len", "32", "--context", "64"]
    common += ["--eval-tokens", "300"]
    assert main([*common, "--rotate-inputs", "4", "--out", str(tmp_path / "sw")]) == 0
    capsys.readouterr()
    data = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    point, rot = data["points"][0], data["input_rotation"]
    # the tiny model: 2 layers of 64 wide, 2 norms each: Y [64, 4] read twice and T [4, 4] per norm and token
    assert rot["rank"] == 4 and rot["weights_read"] == 2 * 2 * (2 * 64 * 4)
    sizes = {"q_proj": 64 * 64, "k_proj": 64 * 32, "v_proj": 64 * 32, "o_proj": 64 * 64}
    sizes.update(gate_proj=64 * 128, up_proj=64 * 128, down_proj=64 * 128)
    total = 2 * sum(sizes.values())
    skipped = sum(v * sizes[n.rsplit(".", 1)[-1]] for n, v in point["per_layer"].items())
    assert point["measured"] == pytest.approx((skipped - rot["weights_read"]) / total, abs=1e-9)
    assert main([*common, "--rotate-inputs", "0", "--out", str(tmp_path / "x")]) == 2
    assert "expected a rank >= 1" in capsys.readouterr().err
    assert main([*common, "--rotate", "--rotate-inputs", "4", "--out", str(tmp_path / "y")]) == 2
    assert "not both" in capsys.readouterr().err


def test_cli_calibrate_keeps_the_rotations_and_eval_folds_them(tiny_model_dir, text_file, tmp_path, capsys):
    out = str(tmp_path / "r.safetensors")
    common = ["--model", tiny_model_dir, "--data", text_file, "--no-progress"]
    calib = ["--calib-samples", "4", "--calib-seq-len", "32", "--scope", r".*_proj$=0.5"]
    assert main(["calibrate", *common, *calib, "--rotate-inputs", "4", "--out", out, "--json"]) == 0
    cal = json.loads(capsys.readouterr().out)
    assert cal["input_rotation"]["rank"] == 4 and A.read_input_rotation(out)[0].shape[-1] == 4
    assert main(["eval", *common, "--thresholds", out, "--context", "64", "--eval-tokens", "200", "--json"]) == 0
    rotated = json.loads(capsys.readouterr().out)
    # the same thresholds without their rotations would be refused; and the in-process model gives the same
    model, tok = A.models.load_model(tiny_model_dir)
    A.load_thresholds(model, out, rotate=True)
    ids = A.data.tokenize(tok, open(text_file).read())[:200]
    ppl = A.eval.perplexity(model, ids, context=64, progress=False).token_perplexity
    assert rotated["token_perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert main(["calibrate", *common, *calib, "--rotate-inputs", "x", "--out", out]) == 2
    assert "expected a rank >= 1" in capsys.readouterr().err


def test_load_state_dict_of_other_rotations_forms_their_derived_matrix_again():
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(9))
    a = random_norm_gains(make_tiny_llama(seed=3))
    b = copy.deepcopy(a)
    A.rotate_inputs(a, token_batches(seed=1), rank=8, progress=False)
    A.rotate_inputs(b, token_batches(seed=2), rank=8, progress=False)
    assert not torch.equal(logits_of(a, ids), logits_of(b, ids))
    b.load_state_dict(a.state_dict())  # M = Y·Tᵀ is not in the state dict: formed from the loaded Y and T
    assert torch.equal(logits_of(b, ids), logits_of(a, ids))
