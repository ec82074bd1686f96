"""Big models: a model loaded with an accelerate device map, part of it offloaded to disk, must calibrate, apply,
save/load and evaluate exactly like the same model loaded plainly on the CPU."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import transformers
from helpers import byte_tokenizer, make_tiny_llama

import actsparse as A
import actsparse.models
from actsparse.cli import main
from actsparse.eval import perplexity
from actsparse.models import DEVICE_MAPS, load_model, parse_max_memory
from actsparse.offload import model_device

RECIPE = {A.TargetScope(patterns=[".*up_proj.*", ".*gate_proj.*"]): 0.3, A.TargetScope(patterns=[".*down_proj.*"]): 0.5}
# 4 blocks of 144.5 KiB (fp32) + embedding and head of 64 KiB: 706 KiB. With 400 KiB of CPU, accelerate keeps the
# embedding and block 0 in memory and sends blocks 1-3, the norm and the head to disk.
SPLIT = "cpu=400KiB"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("device-map") / "tiny-llama-4"
    make_tiny_llama(layers=4).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return str(d)


def offloaded(model_dir, tmp_path):
    model, _ = load_model(model_dir, device_map="auto", max_memory=SPLIT, offload_folder=str(tmp_path / "offload"))
    placed = model.hf_device_map
    assert placed["model.layers.0"] == "cpu" and placed["model.layers.3"] == "disk" and placed["lm_head"] == "disk"
    assert model.model.layers[3].mlp.down_proj.weight.device.type == "meta"  # read from disk on each forward
    return model


def thresholds(model):
    return {n: m.params for n, m in A.sparse_layers(model).items()}


@pytest.mark.parametrize("method", ["quantile", "scap-median", "wina"])
def test_offloaded_model_calibrates_and_evaluates_like_the_plain_one(model_dir, tmp_path, calib_data, method):
    plain, _ = load_model(model_dir)
    off = offloaded(model_dir, tmp_path)
    assert model_device(off) == torch.device("cpu")
    x = calib_data[0]
    with torch.no_grad():
        dense = plain(x).logits
        assert torch.allclose(off(x).logits, dense, atol=1e-5)
    A.sparsify_(plain, A.SparsifyConfig(RECIPE, method=method), calib_data, progress=False)
    A.sparsify_(off, A.SparsifyConfig(RECIPE, method=method), calib_data, progress=False)

    expected, got = thresholds(plain), thresholds(off)
    assert list(got) == list(expected) and len(got) == 12
    for n, p in expected.items():  # the same numbers: the calibration saw the same activations
        assert got[n].threshold == p.threshold and got[n].shift == p.shift, n
        assert (got[n].scale is None) == (p.scale is None) and (p.scale is None or torch.equal(got[n].scale, p.scale))
    layer = off.model.layers[3].mlp.down_proj
    assert isinstance(layer, A.SparseLinear) and layer.weight.device.type == "meta"  # still offloaded
    assert layer.act_threshold.device.type == "cpu"
    with torch.no_grad():
        sparse = plain(x).logits
        assert not torch.allclose(sparse, dense, atol=1e-3)
        assert torch.allclose(off(x).logits, sparse, atol=1e-5)
    ids = torch.cat(calib_data).reshape(-1)
    a = perplexity(plain, ids, context=32, progress=False)
    b = perplexity(off, ids, context=32, progress=False)
    assert math.isclose(a.token_perplexity, b.token_perplexity, rel_tol=1e-6)


def test_thresholds_round_trip_and_remove_sparsity_on_the_offloaded_model(model_dir, tmp_path, calib_data):
    off = offloaded(model_dir, tmp_path)
    x = calib_data[1]
    with torch.no_grad():
        dense = off(x).logits
        A.sparsify_activations(off, calib_data, RECIPE, progress=False)
        sparse = off(x).logits
        path = A.save_thresholds(off, str(tmp_path / "t.safetensors"))
        saved = thresholds(off)

        A.remove_sparsity(off)
        layer = off.model.layers[2].mlp.gate_proj
        assert not A.sparse_layers(off) and type(layer) is nn.Linear and layer.weight.device.type == "meta"
        assert torch.equal(off(x).logits, dense)

        A.load_thresholds(off, path)
        assert thresholds(off) == saved
        assert torch.equal(off(x).logits, sparse)

        plain, _ = load_model(model_dir)  # the file is the same as one calibrated without offload
        A.load_thresholds(plain, path)
        assert torch.allclose(plain(x).logits, sparse, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_with_cpu_offload_calibrates_like_the_model_on_the_gpu(model_dir, calib_data):
    plain, _ = load_model(model_dir, device="cuda")
    off, _ = load_model(model_dir, device_map="auto", max_memory={0: "400KiB", "cpu": "1GiB"})
    assert off.hf_device_map["model.layers.0"] == 0 and off.hf_device_map["model.layers.3"] == "cpu"
    assert model_device(off) == torch.device("cuda", 0)
    for m in (plain, off):
        A.sparsify_(m, A.SparsifyConfig(RECIPE, method="scap-median"), calib_data, progress=False)
    expected, got = thresholds(plain), thresholds(off)
    assert all(got[n].threshold == p.threshold and got[n].shift == p.shift for n, p in expected.items())
    layer = off.model.layers[3].mlp.down_proj  # weights rest in CPU memory, computed on the GPU
    assert layer.weight.device.type == "meta" and layer.act_threshold.device == torch.device("cuda", 0)
    x = calib_data[0].cuda()
    with torch.no_grad():
        assert torch.allclose(off(x).logits, plain(x).logits, atol=1e-5)


def test_a_map_that_needs_disk_without_an_offload_folder_is_a_clear_error(model_dir):
    need = sum(p.numel() * 4 for p in make_tiny_llama(layers=4).parameters())
    with pytest.raises(ValueError) as e:
        load_model(model_dir, device_map="auto", max_memory=SPLIT)
    msg = str(e.value)
    assert f"need {need / 2**20:.2f} MiB in float32" in msg and "allows 0.39 MiB (cpu=0.39 MiB)" in msg
    assert "model.layers.1" in msg and "--offload-folder DIR" in msg and "larger --max-memory" in msg


def test_a_map_that_fits_loads_without_offload(model_dir, calib_data):
    model, _ = load_model(model_dir, device_map="auto", max_memory={"cpu": "10MiB"})
    plain, _ = load_model(model_dir)
    assert all(p.device.type == "cpu" for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(calib_data[0]).logits, plain(calib_data[0]).logits)


def default_budget(monkeypatch, cpu: int) -> dict:
    """accelerate's get_max_memory() reports ``cpu`` bytes free and no GPU, at the place the defaults are taken
    (transformers >= 5 wraps accelerate's function, bound in its integrations module; 4 calls accelerate's).
    Returns the budget from_pretrained then takes."""
    import accelerate.utils
    import transformers.integrations.accelerate as hf_accelerate

    wrapped = hasattr(hf_accelerate, "accelerate_max_memory")
    where, name = (hf_accelerate, "accelerate_max_memory") if wrapped else (accelerate.utils, "get_max_memory")
    real = getattr(where, name)
    monkeypatch.setattr(where, name, lambda max_memory=None: {"cpu": cpu} if max_memory is None else real(max_memory))
    return (hf_accelerate.get_max_memory if wrapped else accelerate.utils.get_max_memory)(None)


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def test_auto_without_max_memory_checks_the_default_budget_before_loading(model_dir, tmp_path, monkeypatch, capsys):
    budget = default_budget(monkeypatch, 400 * 2**10)  # as SPLIT: blocks 1-3 would go to disk
    assert set(budget) == {"cpu"} and 300 * 2**10 <= budget["cpu"] <= 400 * 2**10  # transformers 5 keeps 10% back
    loads = []
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM,
        "from_pretrained",
        lambda *a, **k: loads.append(a) or pytest.fail("the weights were loaded"),
    )
    before = snapshot(model_dir)
    need = sum(p.numel() * 4 for p in make_tiny_llama(layers=4).parameters())
    for device_map in DEVICE_MAPS:
        with pytest.raises(ValueError) as e:
            load_model(model_dir, device_map=device_map)
        msg = str(e.value)
        assert "does not fit in the memory free on this machine" in msg, msg
        assert f"need {need / 2**20:.2f} MiB in float32" in msg and "no --max-memory given" in msg
        cpu = f"{int(budget['cpu']) / 2**20:.2f} MiB"
        assert "default budget" in msg and f"allows {cpu} (cpu={cpu})" in msg
        assert "model.layers.1" in msg and "--offload-folder DIR (offload_folder=)" in msg and "--max-memory" in msg
    assert not loads and snapshot(model_dir) == before and not list(tmp_path.iterdir())

    capsys.readouterr()
    assert main(["eval", "--model", model_dir, "--device-map", "auto", "--no-progress"]) == 2  # the CLI says the same
    err = capsys.readouterr().err
    assert "error:" in err and "--offload-folder DIR" in err and len(err.strip().splitlines()) == 1
    assert not loads and snapshot(model_dir) == before
    assert actsparse.models._default_max_memory("auto") == {"cpu": int(budget["cpu"])}  # planned with those


def test_auto_without_max_memory_loads_within_a_big_enough_default_budget(model_dir, tmp_path, calib_data, monkeypatch):
    plain, _ = load_model(model_dir)
    before = snapshot(model_dir)
    with torch.no_grad():
        dense = plain(calib_data[0]).logits
        default_budget(monkeypatch, 16 * 2**20)
        model, _ = load_model(model_dir, device_map="auto")
        assert all(p.device.type == "cpu" for p in model.parameters())
        assert torch.equal(model(calib_data[0]).logits, dense)
        monkeypatch.undo()

        model, _ = load_model(model_dir, device_map="auto")  # what this machine has: GPU 0 where there is one
        dev = model_device(model)
        assert all(p.device == dev for p in model.parameters())
        assert torch.allclose(model(calib_data[0].to(dev)).logits.cpu(), dense, atol=1e-5)
        # with an offload folder, the same tiny default budget offloads as SPLIT does
        default_budget(monkeypatch, 400 * 2**10)
        off, _ = load_model(model_dir, device_map="auto", offload_folder=str(tmp_path / "offload"))
        assert off.hf_device_map["model.layers.0"] == "cpu" and off.hf_device_map["model.layers.3"] == "disk"
        assert torch.allclose(off(calib_data[0]).logits, dense, atol=1e-5)
    assert snapshot(model_dir) == before


def test_single_gpu_default_budget_keeps_10_percent_back_like_accelerate(monkeypatch):
    import accelerate.utils
    import transformers.integrations.accelerate as hf_accelerate

    fake = {0: 10 * 2**30, "cpu": 100 * 2**30}
    for where, name in ((hf_accelerate, "accelerate_max_memory"), (accelerate.utils, "get_max_memory")):
        if hasattr(where, name):
            monkeypatch.setattr(where, name, lambda max_memory=None: dict(fake))
    auto, sequential = actsparse.models._default_max_memory("auto"), actsparse.models._default_max_memory("sequential")
    assert auto[0] == int(sequential[0] * 0.9) and auto["cpu"] == sequential["cpu"]


def test_parse_max_memory():
    assert parse_max_memory("cpu=1.5GiB, disk=100GB") == {"cpu": int(1.5 * 2**30), "disk": 100 * 10**9}
    assert parse_max_memory({"cpu": 1000, "mps": "2KiB"}) == {"cpu": 1000, "mps": 2048}
    assert parse_max_memory(None) is None


@pytest.mark.parametrize(
    "spec, match",
    [
        ("cpu:2GiB", "DEVICE=SIZE"),
        ("cpu=2G", "bad size '2G' for 'cpu'"),
        ("cpu=lots", "bad size"),
        ("gpu=1GiB", "unknown device 'gpu'"),
        ("cpu=1GiB,cpu=2GiB", "names 'cpu' twice"),
        (" , ", "empty"),
        (f"{torch.cuda.device_count()}=1GiB", "GPU(s)"),
    ],
)
def test_bad_max_memory(spec, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        parse_max_memory(spec)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"device_map": "fastest"}, "unknown device_map 'fastest'; choose one of auto, balanced, sequential"),
        ({"device_map": "auto", "device": "cpu"}, "not both"),
        ({"max_memory": "cpu=1GiB"}, "add device_map='auto'"),
        ({"offload_folder": "off"}, "add device_map='auto'"),
        ({"device_map": {"": "disk"}}, "offload_folder=DIR"),
        ({"device_map": {"": "cpu"}, "max_memory": "cpu=1GiB"}, "drop one of them"),
        ({"device_map": "auto", "max_memory": "cpu=1"}, "does not fit in max_memory"),
    ],
)
def test_bad_device_map_options(model_dir, kwargs, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        load_model(model_dir, **kwargs)


def test_cli_calibrate_and_eval_with_device_map(model_dir, text_file, tmp_path, capsys):
    common = ["--model", model_dir, "--data", text_file, "--no-progress", "--json"]
    spread = ["--device-map", "auto", "--max-memory", SPLIT, "--offload-folder", str(tmp_path / "offload")]
    calib = ["--calib-samples", "4", "--calib-seq-len", "32"]
    plain = ["--device", "cpu"]  # where the offloaded model computes (the default would be cuda where there is one)

    def run(argv):
        assert main(argv) == 0
        out = capsys.readouterr()
        return json.loads(out.out), out.err

    th_off, th_plain = str(tmp_path / "off.safetensors"), str(tmp_path / "plain.safetensors")
    cal_off, _ = run(["calibrate", *common, *spread, *calib, "--out", th_off])
    cal_plain, _ = run(["calibrate", *common, *plain, *calib, "--out", th_plain])
    assert cal_off["thresholds"] == cal_plain["thresholds"]

    ev_off, _ = run(["eval", *common, *spread, "--thresholds", th_off, "--context", "64"])
    ev_plain, _ = run(["eval", *common, *plain, "--thresholds", th_plain, "--context", "64"])
    assert math.isclose(ev_off["token_perplexity"], ev_plain["token_perplexity"], rel_tol=1e-6)
    assert ev_off["measured_sparsity"] == ev_plain["measured_sparsity"]
    assert main(["eval", *common[:-1], *spread, "--thresholds", th_off, "--context", "64"]) == 0  # the log says
    out = capsys.readouterr()
    assert "2 module(s) on cpu, 6 module(s) on disk" in out.err and "token ppl" in out.out

    # an explicit map from a JSON file: the one accelerate planned, dense this time
    placed = load_model(model_dir, device_map="auto", max_memory=SPLIT, offload_folder=str(tmp_path / "o"))[0]
    map_file = tmp_path / "map.json"
    map_file.write_text(json.dumps(placed.hf_device_map))
    dense_off, _ = run(
        ["eval", *common, "--device-map", str(map_file), "--offload-folder", str(tmp_path / "o2"), "--context", "64"]
    )
    dense_plain, _ = run(["eval", *common, *plain, "--context", "64"])
    assert math.isclose(dense_off["token_perplexity"], dense_plain["token_perplexity"], rel_tol=1e-6)
    assert dense_off["token_perplexity"] != ev_off["token_perplexity"]


def test_cli_device_map_errors(model_dir, text_file, capsys):
    common = ["eval", "--model", model_dir, "--data", text_file, "--no-progress"]
    assert main([*common, "--device-map", "auto", "--max-memory", SPLIT]) == 2  # needs disk: no folder given
    err = capsys.readouterr().err
    assert "error:" in err and "--offload-folder DIR" in err and len(err.strip().splitlines()) == 1
    assert main([*common, "--device-map", "auto", "--device", "cpu"]) == 2
    assert "not both" in capsys.readouterr().err
    for flag, value, match in [("--max-memory", "cpu=2G", "bad size '2G'"), ("--device-map", "fast", "JSON object")]:
        assert main([*common, flag, value]) == 2
        assert match in capsys.readouterr().err
