"""Versioned JSON sparsify configs: round trips, strict reading, and the CLI's --config/--save-config."""

import json
import os

import pytest
import torch
from helpers import make_tiny_llama

import actsparse as A
from actsparse.cli import main
from actsparse.config import CONFIG_FORMAT, CONFIG_VERSION, config_from_dict, load_config, save_config
from actsparse.errors import ConfigFileError
from actsparse.io import read_thresholds
from actsparse.methods import method_from_spec, registered_methods

NON_DEFAULT = {
    "quantile": {"statistic": "ema", "ema_alpha": 0.3},
    "teal": {"step": 0.1, "greedy_tokens": None},
    "scap": {"mode": "median", "modes": {".*down_proj": "zero"}},
    "wina": {"topk": True},
    "sparsing-law": {"metric": "fat", "epsilon": 0.02},
    "attribution": {"metric": "gxo", "n_steps": 4},
}


def _config(method):
    return A.SparsifyConfig(
        {
            A.TargetScope(patterns=[".*up_proj.*"]): 0.3,
            A.TargetScope(names=["model.layers.0.mlp.down_proj"], patterns=[".*down_proj$"]): 0.5,
        },
        A.IgnoredScope(patterns=[".*layers\\.1\\.mlp\\.up_proj"], validate=False),
        method,
    )


@pytest.mark.parametrize("name", registered_methods())
def test_every_method_round_trips_through_the_file(name, tmp_path):
    config = _config(method_from_spec(name, **NON_DEFAULT.get(name, {})))
    path = save_config(config, tmp_path / "c.json")
    data = json.loads(open(path, encoding="utf-8").read())
    assert data["format"] == CONFIG_FORMAT and data["version"] == CONFIG_VERSION
    back = load_config(path)
    assert back.method == config.method and type(back.method) is type(config.method)
    assert back.target_sparsity_by_scope == config.target_sparsity_by_scope
    assert back.ignored_scope == config.ignored_scope
    assert A.SparsifyConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


def test_a_loaded_config_calibrates_the_same_thresholds(calib_data, tmp_path):
    config = A.SparsifyConfig({".*(up|down)_proj": 0.4}, None, A.TealMethod(step=0.1))
    a = A.sparsify_(make_tiny_llama(), config, calib_data, progress=False)
    b = A.sparsify_(
        make_tiny_llama(), A.SparsifyConfig.load(config.save(str(tmp_path / "c.json"))), calib_data, progress=False
    )
    ta = {n: m.act_threshold for n, m in A.sparse_layers(a).items()}
    tb = {n: m.act_threshold for n, m in A.sparse_layers(b).items()}
    assert ta.keys() == tb.keys() and len(ta) == 4
    assert all(torch.equal(ta[n], tb[n]) for n in ta)


def _good():
    return _config("quantile").to_dict()


def _edit(**changes):
    d = _good()
    for k, v in changes.items():
        if v is None:
            d.pop(k)
        else:
            d[k] = v
    return d


@pytest.mark.parametrize(
    "data, message",
    [
        (_edit(version=CONFIG_VERSION + 1), "upgrade actsparse"),
        (_edit(version="1"), "positive integer"),
        (_edit(format="nncf.config"), "not an actsparse sparsify config"),
        (_edit(format=None), "missing key(s) ['format']"),
        (_edit(extra=1), "unknown key(s) ['extra']"),
        (_edit(targets=[]), "non-empty list"),
        (_edit(targets=[{"patterns": [".*up_proj"], "sparsity": 1.5}]), "sparsity must be a number in [0, 1]"),
        (_edit(targets=[{"patterns": [".*up_proj"], "sparsity": True}]), "sparsity must be a number in [0, 1]"),
        (_edit(targets=[{"patterns": [".*up_proj"], "sparsity": 0.3, "sparsty": 0.3}]), "unknown key(s) ['sparsty']"),
        (_edit(targets=[{"patterns": "up_proj", "sparsity": 0.3}]), "list of strings"),
        (_edit(targets=[{"patterns": ["("], "sparsity": 0.3}]), "targets[0]"),
        (_edit(targets=[{"sparsity": 0.3}]), "at least one name or pattern"),
        (_edit(ignored_scope={"pattern": ["x"]}), "unknown key(s) ['pattern']"),
        (_edit(method={"name": "teal", "stepp": 0.1}), "no option(s) ['stepp']"),
        (_edit(method={"name": "nope"}), "unknown calibration method 'nope'"),
        (_edit(method={"name": "teal", "step": -1}), "step must be in (0, 1]"),
        (_edit(method="quantile"), 'expected {"name"'),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_bad_configs_name_the_field(data, message):
    with pytest.raises(ConfigFileError) as e:
        config_from_dict(data)
    assert message in str(e.value)


def test_unreadable_files_and_unwritable_configs(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\x80\x81 not json")
    with pytest.raises(ConfigFileError, match="not UTF-8 text"):
        load_config(bad)
    bad.write_text('{"format": ')
    with pytest.raises(ConfigFileError, match="not valid JSON"):
        load_config(bad)
    with pytest.raises(ConfigFileError, match="does not exist"):
        load_config(tmp_path / "missing.json")
    # a method option JSON cannot hold: a clear error, and no file (not even a partial one) is written
    config = A.SparsifyConfig({".*up_proj": 0.3}, None, A.SparsingLawMethod(metric="topk", p=float("nan")))
    with pytest.raises(ConfigFileError, match="JSON cannot hold"):
        config.save(str(tmp_path / "nan.json"))
    assert os.listdir(tmp_path) == ["bad.json"]


def test_cli_config_file_equals_the_flags_and_is_recorded(tiny_model_dir, text_file, tmp_path, capsys):
    common = [
        "--model",
        tiny_model_dir,
        "--data",
        text_file,
        "--no-progress",
        "--calib-samples",
        "2",
        "--calib-seq-len",
        "32",
    ]
    flags, cfg = str(tmp_path / "flags.safetensors"), str(tmp_path / "cfg.json")
    assert (
        main(
            [
                "calibrate",
                *common,
                "--scope",
                ".*down_proj.*=0.5",
                "--method",
                "teal",
                "--option",
                "step=0.1",
                "--save-config",
                cfg,
                "--out",
                flags,
            ]
        )
        == 0
    )
    saved = load_config(cfg)
    assert saved.method == A.TealMethod(step=0.1)
    from_file = str(tmp_path / "file.safetensors")
    assert main(["calibrate", *common, "--config", cfg, "--out", from_file]) == 0
    (ta, _), (tb, hb) = read_thresholds(flags), read_thresholds(from_file)
    assert ta == tb and len(ta) == 2
    assert config_from_dict(hb["extra"]["calibration"]["config"]).to_dict() == saved.to_dict()  # recorded
    capsys.readouterr()
    assert main(["calibrate", *common, "--config", cfg, "--scope", ".*up_proj.*=0.3", "--out", from_file]) == 2
    assert "--config holds the scopes and the method; drop --scope" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(_edit(version=99)))
    assert main(["calibrate", "--config", str(broken), "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "upgrade actsparse" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "x.safetensors")
