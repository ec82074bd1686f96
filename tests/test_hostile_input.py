"""Hostile and broken input never leaks: only the library's own errors, one line each, nothing modified.

Hypothesis mutates valid files of the three formats we read (thresholds headers, sparsify configs, SCAP JSON)
and calibration datasets; fixed cases cover paths (folders, FIFOs, devices, symlink loops, deep nesting,
huge numbers) and the files we write (modes, symlinks, temp files of killed saves). Derandomized, so CI
replays the same cases.
"""

import copy
import json
import math
import os
import pathlib
import stat
import subprocess
import sys

import pytest
import torch
from helpers import VOCAB, make_tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import actsparse as A
import actsparse.cli as cli
from actsparse.cli import main
from actsparse.config import config_from_dict, load_config
from actsparse.errors import (
    ActSparseError,
    ConfigFileError,
    DatasetError,
    ModelLoadError,
    ScopeError,
    ThresholdFileError,
    UsageError,
)
from actsparse.fileio import atomic_write
from actsparse.io import read_thresholds
from actsparse.methods.scap import read_scap_json
from actsparse.models import load_model

FUZZ = settings(
    max_examples=60, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)


def _paths(d, prefix=()):
    """Every (path of keys) in a nested dict, the dict itself included."""
    yield prefix
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _paths(v, (*prefix, k))


def _mutate(doc, data):
    """A copy of ``doc`` with one drawn change: a value replaced, a key removed or an unknown key added."""
    doc = copy.deepcopy(doc)
    paths = list(_paths(doc))
    path = data.draw(st.sampled_from(paths), label="path")
    action = data.draw(st.sampled_from(["replace", "delete", "add"]), label="action")
    value = data.draw(json_values, label="value")
    if not path:
        return value if action == "replace" else doc
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if action == "replace":
        parent[path[-1]] = value
    elif action == "delete":
        del parent[path[-1]]
    elif isinstance(parent[path[-1]], dict):
        parent[path[-1]]["unexpected_key"] = value
    else:
        parent[path[-1]] = value
    return doc


def _one_line(err: Exception) -> None:
    assert isinstance(err, ActSparseError), f"{type(err).__name__}: {err}"
    assert "\n" not in str(err) and str(err), repr(err)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    assert not A.sparse_layers(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (2, 16), generator=g) for _ in range(2)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A valid thresholds file: (path, header dict, tensors)."""
    model = make_tiny_llama()
    A.sparsify_(model, A.SparsifyConfig({".*mlp.*": 0.5}), _calib(), progress=False)
    path = A.save_thresholds(model, str(tmp_path_factory.mktemp("th") / "t.safetensors"))
    with safe_open(path, "pt") as f:
        header = json.loads(f.metadata()["actsparse"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    return path, header, tensors


def _write_thresholds(path, header, tensors):
    save_file(tensors, path, metadata={"actsparse": json.dumps(header)})


# ------------------------------------------------------------------------------------------- fuzzing
@FUZZ
@given(data=st.data())
def test_mutated_thresholds_headers_are_loaded_or_refused_cleanly(saved, tmp_path, data):
    _, header, tensors = saved
    bad = str(tmp_path / "m.safetensors")
    _write_thresholds(bad, _mutate(header, data), tensors)
    model = make_tiny_llama()
    before = _state(model)
    try:
        A.load_thresholds(model, bad)
    except Exception as e:  # noqa: BLE001 - the point: which exceptions get out
        _one_line(e)
        assert isinstance(e, ThresholdFileError)
        _unchanged(model, before)
    else:  # accepted: then every value it holds is one a good file could hold
        layers = A.sparse_layers(model)
        assert layers and all(m.target_sparsity is None or 0.0 <= m.target_sparsity <= 1.0 for m in layers.values())


@FUZZ
@given(data=st.data())
def test_mutated_threshold_tensors_are_refused_cleanly(saved, tmp_path, data):
    _, header, tensors = saved
    tensors = dict(tensors)
    key = data.draw(st.sampled_from(sorted(tensors)), label="tensor")
    bad_tensor = data.draw(
        st.sampled_from(
            [
                torch.tensor([1.0, 2.0]),
                torch.tensor(float("nan")).reshape(1),
                torch.zeros(0),
                torch.tensor([3], dtype=torch.int64),
                torch.ones(2, 2),
            ]
        ),
        label="value",
    )
    extra = data.draw(st.booleans(), label="stray tensor")
    tensors[key] = bad_tensor
    if extra:
        tensors["model.layers.0.mlp.up_proj.act_secret"] = torch.zeros(1)
    bad = str(tmp_path / "t.safetensors")
    _write_thresholds(bad, header, tensors)
    model = make_tiny_llama()
    before = _state(model)
    try:
        A.load_thresholds(model, bad)
    except Exception as e:  # noqa: BLE001
        _one_line(e)
        _unchanged(model, before)
    else:
        pytest.fail(f"a broken tensor was accepted: {key} = {bad_tensor!r} (stray tensor: {extra})")


@pytest.fixture(scope="module")
def config_dict():
    return A.SparsifyConfig(
        {".*up_proj.*": 0.3, ".*down_proj.*": 0.5}, A.IgnoredScope(patterns=[".*layers\\.0\\..*"]), "teal"
    ).to_dict()


@FUZZ
@given(data=st.data())
def test_mutated_configs_are_read_or_refused_cleanly(config_dict, data):
    doc = _mutate(config_dict, data)
    try:
        config = config_from_dict(doc)
    except Exception as e:  # noqa: BLE001
        _one_line(e)
        assert isinstance(e, ConfigFileError), type(e)
    else:
        assert all(0.0 <= v <= 1.0 for v in config.target_sparsity_by_scope.values())


@FUZZ
@given(data=st.data())
def test_mutated_scap_files_are_read_or_refused_cleanly(tmp_path, data):
    good = {
        "model.layers.0.mlp.up_proj": {
            "module_name": "model.layers.0.mlp.up_proj",
            "demode_method": "median",
            "mode": 0.1,
            "threshold": 0.3,
            "target_sparsity": 0.4,
            "hook_type": "pre_hook",
        }
    }
    path = tmp_path / "scap.json"
    path.write_text(json.dumps(_mutate(good, data)))
    try:
        params, targets = read_scap_json(str(path))
    except Exception as e:  # noqa: BLE001
        _one_line(e)
        assert isinstance(e, ThresholdFileError)
    else:
        for name, p in params.items():
            assert not math.isnan(p.threshold) and math.isfinite(p.shift)
            assert targets[name] is None or 0.0 <= targets[name] <= 1.0


dataset_items = st.one_of(
    st.lists(st.integers(min_value=-5, max_value=VOCAB + 5), max_size=6),
    st.builds(lambda n: torch.randint(0, VOCAB, (1, n)), st.integers(min_value=0, max_value=5)),
    st.builds(lambda n: torch.rand(1, n), st.integers(min_value=1, max_value=4)),
    st.just({"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.tensor([[1, 1]])}),
    st.just({"attention_mask": torch.tensor([[1]])}),
    st.text(max_size=5),
    st.none(),
)


@FUZZ
@given(items=st.lists(dataset_items, max_size=3))
def test_random_calibration_datasets_calibrate_or_are_refused_cleanly(items):
    model = make_tiny_llama(layers=1)
    before = _state(model)
    try:
        A.sparsify_(model, A.SparsifyConfig({".*mlp.*": 0.5}), items, progress=False)
    except Exception as e:  # noqa: BLE001
        _one_line(e)
        assert isinstance(e, DatasetError), type(e)
        _unchanged(model, before)
    else:
        assert A.sparse_layers(model)


# ---------------------------------------------------------------------------------------- paths, files
def _readers():
    model = make_tiny_llama()
    return [
        ("thresholds", lambda p: A.load_thresholds(model, p), ThresholdFileError),
        ("config", load_config, ConfigFileError),
        ("scap", read_scap_json, ThresholdFileError),
    ]


@pytest.mark.parametrize("case", ["missing", "folder", "fifo", "loop", "device", "empty", "binary", "deep", "digits"])
def test_bad_paths_and_contents_are_named(tmp_path, case):
    p = tmp_path / "f.json"
    if case == "folder":
        p.mkdir()
    elif case == "fifo":
        os.mkfifo(p)
    elif case == "loop":
        os.symlink(tmp_path / "f2.json", tmp_path / "f1.json")
        os.symlink(tmp_path / "f1.json", tmp_path / "f2.json")
        p = tmp_path / "f1.json"
    elif case == "device":
        p = "/dev/zero"
    elif case == "empty":
        p.write_text("")
    elif case == "binary":
        p.write_bytes(bytes(range(256)))
    elif case == "deep":
        p.write_text("[" * 100_000 + "]" * 100_000)
    elif case == "digits":
        p.write_text('{"targets": [{"sparsity": ' + "9" * 5000 + "}]}")
    expected = {
        "missing": "does not exist",
        "folder": "folder",
        "fifo": "FIFO",
        "loop": "symlink loop",
        "device": "device",
        "empty": "",
        "binary": "",
        "deep": "nested deeper",
        "digits": "digits",
    }[case]
    for name, read, error in _readers():
        if name == "thresholds" and case in ("deep", "digits"):
            continue  # JSON contents: the JSON readers' cases
        with pytest.raises(error) as e:
            read(str(p))
        _one_line(e.value)
        assert expected in str(e.value), (name, str(e.value))
        assert case != "device" or "--out" not in str(e.value)  # not "create it with --out zero"


def test_the_cli_prints_one_line_for_every_bad_file(saved, tmp_path, capsys, tiny_model_dir):
    _, header, tensors = saved
    variants = {
        "list header": [1, 2],
        "version 2.9": {**header, "format_version": 2.9},
        "no layers": {**header, "layers": {}},
        "string sparsity": {
            **header,
            "layers": {n: {**v, "target_sparsity": "0.5"} for n, v in header["layers"].items()},
        },
        "string in_features": {
            **header,
            "layers": {n: {**v, "in_features": str(v["in_features"])} for n, v in header["layers"].items()},
        },
    }
    capsys.readouterr()
    for label, h in variants.items():
        path = str(tmp_path / f"{label.replace(' ', '_')}.safetensors")
        _write_thresholds(path, h, tensors)
        code = main(["eval", "--model", tiny_model_dir, "--thresholds", path])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (label, err)
    with pytest.raises(ThresholdFileError, match="format_version: expected an integer, got float 2.9"):
        read_thresholds(str(tmp_path / "version_2.9.safetensors"))
    with pytest.raises(ThresholdFileError, match="layers: is empty"):
        read_thresholds(str(tmp_path / "no_layers.safetensors"))
    with pytest.raises(ThresholdFileError, match="target_sparsity: expected a number or null, got str '0.5'"):
        read_thresholds(str(tmp_path / "string_sparsity.safetensors"))


def test_a_real_bug_is_a_traceback_with_a_report_line(monkeypatch, capsys):
    def broken(args, config):
        raise KeyError("internal")

    monkeypatch.setitem(cli.COMMANDS, "eval", broken)
    assert main(["eval"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "please report" in err


# ------------------------------------------------------------------------------------------ writing
def test_a_replaced_file_keeps_its_mode_and_a_symlink_is_written_through(tmp_path):
    target = tmp_path / "real.json"
    target.write_text("old")
    os.chmod(target, 0o640)
    link = tmp_path / "link.json"
    os.symlink(target, link)

    def write(tmp):
        with open(tmp, "w") as f:
            f.write("new")

    atomic_write(str(link), write)
    assert os.path.islink(link) and target.read_text() == "new"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640
    fresh = tmp_path / "fresh.json"
    atomic_write(str(fresh), write)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o666 & ~mask


def test_temp_files_of_killed_saves_are_removed_by_the_next_save(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".t.json.actsparse-{dead_pid}-abc.tmp"
    live = tmp_path / f".t.json.actsparse-{os.getppid()}-abc.tmp"  # a running process: another save in flight
    other = tmp_path / ".tmp-unrelated"
    for f in (stale, live, other):
        f.write_text("x")
    atomic_write(str(tmp_path / "t.json"), lambda tmp: open(tmp, "w").write("{}"))
    assert not stale.exists() and live.exists() and other.exists()
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, other.name, "t.json"])


def test_writing_under_a_file_fails_before_anything_is_written(tmp_path, calib_data):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    model = make_tiny_llama()
    A.sparsify_(model, A.SparsifyConfig({".*mlp.*": 0.5}), calib_data, progress=False)
    with pytest.raises(UsageError, match="is a file, not a folder"):
        A.save_thresholds(model, str(blocker / "t.safetensors"))
    with pytest.raises(UsageError, match="is a folder"):
        A.export_scap_json(model, str(tmp_path))
    with pytest.raises(UsageError, match="expected a path"):
        A.save_thresholds(model, None)
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_a_deeply_nested_header_and_a_fractional_topk_are_refused(saved, tmp_path):
    _, header, tensors = saved
    deep = str(tmp_path / "deep.safetensors")
    save_file(tensors, deep, metadata={"actsparse": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(ThresholdFileError, match="nested deeper"):
        read_thresholds(deep)
    name = next(iter(header["layers"]))
    topk = str(tmp_path / "topk.safetensors")
    _write_thresholds(topk, header, {**tensors, f"{name}.act_topk": torch.tensor([3.7])})
    with pytest.raises(ThresholdFileError, match="act_topk: expected an integer tensor"):
        read_thresholds(topk)  # not truncated to 3


def test_a_truncated_weights_file_is_one_line_and_a_path_object_loads(tiny_model_dir, capsys):
    model, _ = load_model(pathlib.Path(tiny_model_dir))
    assert model.config.model_type == "llama"
    weights = os.path.join(tiny_model_dir, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_model(tiny_model_dir)
    capsys.readouterr()
    code = main(["eval", "--model", tiny_model_dir])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "internal error" not in err, err


def test_scopes_and_configs_of_the_wrong_type_are_one_clear_error():
    with pytest.raises(ScopeError, match="TargetScope names must be a string or a list of strings"):
        A.TargetScope(names=5)
    with pytest.raises(TypeError, match="ignored_scope must be an IgnoredScope"):
        A.SparsifyConfig({A.TargetScope(patterns=[".*up_proj.*"]): 0.5}, ignored_scope=".*lm_head.*")
    with pytest.raises(TypeError, match="keys must be TargetScope"):
        A.SparsifyConfig({(".*up_proj.*",): 0.5})
