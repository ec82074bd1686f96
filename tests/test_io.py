import json
import os
import pickle

import pytest
import torch

import actsparse as A
from actsparse import AlreadySparsifiedError, TargetScope, ThresholdFileError
from actsparse.io import THRESHOLDS_FILENAME, read_thresholds

RECIPE = {TargetScope(patterns=[".*up_proj.*", ".*gate_proj.*"]): 0.3, TargetScope(patterns=[".*down_proj.*"]): 0.5}


@pytest.fixture
def sparse_llama(tiny_llama, calib_data):
    return A.sparsify_activations(tiny_llama, calib_data, RECIPE, progress=False)


def test_save_load_round_trip_is_exact(sparse_llama, calib_data, tmp_path):
    from helpers import make_tiny_llama

    path = A.save_thresholds(sparse_llama, str(tmp_path / "t.safetensors"))
    fresh = make_tiny_llama()
    A.load_thresholds(fresh, path)
    a, b = A.sparse_layers(sparse_llama), A.sparse_layers(fresh)
    assert list(a) == list(b)
    for n in a:
        assert torch.equal(a[n].act_threshold, b[n].act_threshold)
        assert b[n].target_sparsity == a[n].target_sparsity and b[n].method == "quantile"
    x = calib_data[0]
    assert torch.equal(sparse_llama(x).logits, fresh(x).logits)
    _, header = read_thresholds(path)
    assert header["library_version"] == A.__version__ and header["model"]["model_type"] == "llama"
    assert header["layers"]["model.layers.0.mlp.down_proj"]["target_sparsity"] == 0.5


def test_load_onto_another_model_is_refused(sparse_llama, tmp_path):
    from helpers import make_tiny_llama

    path = A.save_thresholds(sparse_llama, str(tmp_path / "t.safetensors"))
    wider = make_tiny_llama(inter=96)
    with pytest.raises(ThresholdFileError, match="another model.*shape"):
        A.load_thresholds(wider, path)
    assert not A.sparse_layers(wider)
    deeper = make_tiny_llama(layers=3)  # same layer names and shapes, different architecture
    with pytest.raises(ThresholdFileError, match="another architecture"):
        A.load_thresholds(deeper, path)
    assert not A.sparse_layers(deeper)
    A.load_thresholds(deeper, path, strict=False)
    assert len(A.sparse_layers(deeper)) == 6


def test_load_onto_sparsified_model_is_refused(sparse_llama, tmp_path):
    path = A.save_thresholds(sparse_llama, str(tmp_path / "t.safetensors"))
    with pytest.raises(AlreadySparsifiedError):
        A.load_thresholds(sparse_llama, path)


def test_truncated_file(sparse_llama, tiny_llama, tmp_path):
    path = A.save_thresholds(sparse_llama, str(tmp_path / "t.safetensors"))
    data = open(path, "rb").read()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) - 10])
    A.remove_sparsity(sparse_llama)
    with pytest.raises(ThresholdFileError, match="not a valid safetensors"):
        A.load_thresholds(sparse_llama, str(bad))
    assert not A.sparse_layers(sparse_llama)


def test_pickle_file_is_refused_without_unpickling(tiny_llama, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    p = tmp_path / "evil.safetensors"
    p.write_bytes(pickle.dumps(Evil()))
    torch_file = tmp_path / "model.pt"
    torch.save({"x": torch.zeros(1)}, torch_file)
    for bad in (p, torch_file):
        with pytest.raises(ThresholdFileError, match="not a valid safetensors"):
            A.load_thresholds(tiny_llama, str(bad))
    assert not marker.exists()


def test_foreign_safetensors_and_missing_file(tiny_llama, tmp_path):
    from safetensors.torch import save_file

    p = str(tmp_path / "weights.safetensors")
    save_file({"w": torch.zeros(2)}, p)
    with pytest.raises(ThresholdFileError, match="not an actsparse thresholds file"):
        A.load_thresholds(tiny_llama, p)
    with pytest.raises(ThresholdFileError, match="does not exist"):
        A.load_thresholds(tiny_llama, str(tmp_path / "nope.safetensors"))


def test_newer_format_version_is_refused(sparse_llama, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = A.save_thresholds(sparse_llama, str(tmp_path / "t.safetensors"))
    with safe_open(path, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    header = json.loads(meta["actsparse"])
    header["format_version"] = 99
    save_file(tensors, path, metadata={"actsparse": json.dumps(header)})
    with pytest.raises(ThresholdFileError, match="upgrade"):
        read_thresholds(path)


def test_writes_are_atomic(sparse_llama, tmp_path, monkeypatch):
    path = str(tmp_path / "t.safetensors")
    A.save_thresholds(sparse_llama, path)
    original = open(path, "rb").read()

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        A.save_thresholds(sparse_llama, path)
    assert open(path, "rb").read() == original
    assert os.listdir(tmp_path) == ["t.safetensors"]


def test_save_requires_sparse_layers(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="sparsify it"):
        A.save_thresholds(tiny_llama, str(tmp_path / "t.safetensors"))


def test_hf_save_pretrained_from_pretrained_round_trip(sparse_llama, calib_data, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = str(tmp_path / "ckpt")
    A.save_pretrained(sparse_llama, folder)
    assert os.path.isfile(os.path.join(folder, THRESHOLDS_FILENAME))
    loaded = A.from_pretrained(folder)
    x = calib_data[0]
    assert torch.equal(loaded(x).logits, sparse_llama(x).logits)
    # the HF checkpoint itself is a clean dense model loadable by plain transformers
    dense = AutoModelForCausalLM.from_pretrained(folder)
    assert not A.sparse_layers(dense)
    assert not any(k.endswith("act_threshold") for k in dense.state_dict())
    A.load_thresholds(dense, folder)  # a folder works as the path
    assert torch.equal(dense(x).logits, sparse_llama(x).logits)
