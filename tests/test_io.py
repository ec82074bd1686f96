import json
import os
import pickle
import sys

import numpy as np
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

    monkeypatch.setattr("actsparse.io.save_file", boom)
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


def _folder_state(folder):
    """Every file's bytes and permission bits."""
    return {
        e.name: (open(e.path, "rb").read(), os.stat(e.path).st_mode & 0o777) for e in os.scandir(folder) if e.is_file()
    }


def test_save_pretrained_checks_everything_before_the_first_write(sparse_llama, tmp_path):
    folder = str(tmp_path / "ckpt")
    A.save_pretrained(sparse_llama, folder)
    before = _folder_state(folder)
    with pytest.raises(TypeError, match="tokenizer must be a Hugging Face tokenizer"):
        A.save_pretrained(sparse_llama, folder, tokenizer="gpt2")
    layer = A.sparse_layers(sparse_llama)["model.layers.0.mlp.down_proj"]
    layer.calibration = {"note": torch.ones(2)}  # a value no JSON holds
    with pytest.raises(ValueError, match="cannot save these thresholds.*nothing was written"):
        A.save_pretrained(sparse_llama, folder)
    layer.calibration, layer.target_sparsity = {}, 30.0  # a value the reader refuses
    with pytest.raises(ValueError, match="target_sparsity"):
        A.save_pretrained(sparse_llama, folder)
    assert _folder_state(folder) == before


def test_a_save_pretrained_failing_part_way_never_pairs_new_weights_with_old_thresholds(
    sparse_llama, calib_data, tmp_path, monkeypatch
):
    from helpers import make_tiny_llama

    folder = str(tmp_path / "ckpt")
    A.save_pretrained(sparse_llama, folder)
    before = _folder_state(folder)
    other = A.sparsify_activations(
        make_tiny_llama(seed=1), calib_data, {TargetScope(patterns=[".*down_proj.*"]): 0.9}, progress=False
    )

    def fails_at_once(*args, **kwargs):
        raise OSError("no space left on device")

    # fails before writing anything: the folder is as it was, thresholds included
    monkeypatch.setattr(type(other), "save_pretrained", fails_at_once)
    with pytest.raises(OSError, match="no space"):
        A.save_pretrained(other, folder)
    assert _folder_state(folder) == before
    monkeypatch.undo()

    class Tokenizer:  # fails after the weights are written
        def save_pretrained(self, folder):
            raise OSError("no space left on device")

    with pytest.raises(OSError, match="no space") as e:
        A.save_pretrained(other, folder, tokenizer=Tokenizer())
    assert sys.version_info < (3, 11) or any("save again" in n for n in e.value.__notes__)  # (add_note: 3.11)
    after = _folder_state(folder)
    assert THRESHOLDS_FILENAME not in after and after["model.safetensors"][0] != before["model.safetensors"][0]
    assert after["model.safetensors"][1] == before["model.safetensors"][1]  # transformers' 0600 undone
    assert sorted(os.listdir(folder)) == sorted(after)  # no stash left behind
    with pytest.raises(ThresholdFileError, match="does not exist"):
        A.from_pretrained(folder)


def test_user_lowrank_factors_of_any_layout_save_and_load(tiny_llama, calib_data, tmp_path):
    from helpers import make_tiny_llama

    name = "model.layers.0.mlp.down_proj"
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(4, 64, generator=g).t(), torch.randn(128, 4, generator=g).t()  # transposed views
    A.apply_thresholds(tiny_llama, {name: A.SparsityParams(0.1, lowrank=(u, v))})
    path = A.save_thresholds(tiny_llama, str(tmp_path / "t.safetensors"))
    fresh = A.load_thresholds(make_tiny_llama(), path)
    assert torch.equal(A.sparse_layers(fresh)[name].act_lr_u, u) and torch.equal(
        A.sparse_layers(fresh)[name].act_lr_v, v
    )
    assert torch.equal(fresh(calib_data[0]).logits, tiny_llama(calib_data[0]).logits)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"target_sparsity": {"model.layers.0.mlp.up_proj": 30}}, ValueError, "did you mean 0.3"),
        ({"target_sparsity": {"model.layers.0.mlp.up_proj": float("nan")}}, ValueError, "must be in"),
        ({"target_sparsity": [0.5]}, TypeError, "target_sparsity must be a dict"),
        ({"method": 3}, TypeError, "method must be a method name"),
    ],
)
def test_apply_thresholds_refuses_what_the_file_reader_would(tiny_llama, kwargs, error, match):
    with pytest.raises(error, match=match):
        A.apply_thresholds(tiny_llama, {"model.layers.0.mlp.up_proj": 0.1}, **kwargs)
    assert not A.sparse_layers(tiny_llama)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"topk": 2.5}, "topk .* must be a whole number"),
        ({"topk": True}, "topk .* must be a whole number"),
        ({"threshold": "0.1"}, "threshold .* must be a number"),
        ({"threshold": torch.ones(2)}, "threshold .* must be a number"),
        ({"scale": [1.0] * 64}, "scale .* must be a torch.Tensor"),
        ({"lowrank": torch.ones(2, 2)}, "low-rank factors .* must be a tuple"),
    ],
)
def test_sparsity_params_of_the_wrong_type_are_one_clear_error(tiny_llama, params, match):
    params = {"threshold": 0.1} | params
    with pytest.raises(ValueError, match=match):
        A.apply_thresholds(tiny_llama, {"model.layers.0.mlp.up_proj": A.SparsityParams(**params)})
    assert not A.sparse_layers(tiny_llama)


def test_extra_must_be_a_dict_of_json_values(sparse_llama, tmp_path):
    path = str(tmp_path / "t.safetensors")
    with pytest.raises(TypeError, match="extra must be a dict"):
        A.save_thresholds(sparse_llama, path, extra=[1, 2])
    with pytest.raises(ValueError, match="cannot save these thresholds"):
        A.save_thresholds(sparse_llama, path, extra={"when": object()})
    assert os.listdir(tmp_path) == []


def test_a_path_ending_in_a_separator_is_a_folder(sparse_llama, tmp_path):
    path = A.save_thresholds(sparse_llama, str(tmp_path / "out") + os.sep)
    assert path == os.path.join(str(tmp_path / "out") + os.sep, THRESHOLDS_FILENAME) and os.path.isfile(path)
    assert read_thresholds(path)[1]["layers"]
    with pytest.raises(ValueError, match="ends with a separator"):
        A.SparsifyConfig({TargetScope(patterns=[".*up_proj.*"]): 0.5}).save(str(tmp_path / "cfg") + os.sep)


def test_a_long_file_name_is_written_atomically(sparse_llama, tmp_path):
    name = "t" * 240 + ".safetensors"  # 252 bytes: the file system's limit is 255, the temp name is longer
    path = A.save_thresholds(sparse_llama, str(tmp_path / name))
    A.save_thresholds(sparse_llama, path)  # replacing it works too
    assert os.listdir(tmp_path) == [name] and read_thresholds(path)[1]["layers"]


def test_save_pretrained_writes_through_a_thresholds_link_and_keeps_its_mode(sparse_llama, tmp_path):
    folder = str(tmp_path / "ckpt")
    A.save_pretrained(sparse_llama, folder)
    path = os.path.join(folder, THRESHOLDS_FILENAME)
    blob = str(tmp_path / "blob")  # as the Hub cache links a snapshot's files to blobs
    os.replace(path, blob)
    os.symlink(blob, path)
    os.chmod(blob, 0o640)
    A.save_pretrained(sparse_llama, folder)
    assert os.path.islink(path) and os.stat(blob).st_mode & 0o777 == 0o640
    assert read_thresholds(path)[1]["layers"] and sorted(os.listdir(tmp_path)) == ["blob", "ckpt"]


def test_integer_topk_of_any_integer_type_is_accepted(tiny_llama):
    for k in (np.int64(3), torch.tensor(3)):
        A.remove_sparsity(tiny_llama)
        A.apply_thresholds(tiny_llama, {"model.layers.0.mlp.up_proj": A.SparsityParams(topk=k)})
        assert int(A.sparse_layers(tiny_llama)["model.layers.0.mlp.up_proj"].act_topk) == 3
