import json
import os
import re

import pytest

import actsparse as A
from actsparse.cli import main


def _run(capsys, argv):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_calibrate_then_eval_with_json(tiny_model_dir, text_file, tmp_path, capsys):
    out = str(tmp_path / "th.safetensors")
    common = ["--model", tiny_model_dir, "--data", text_file, "--no-progress"]
    code, stdout, _ = _run(
        capsys,
        [
            "calibrate",
            *common,
            "--scope",
            ".*down_proj.*=0.5",
            "--scope",
            ".*up_proj.*=0.3",
            "--calib-samples",
            "6",
            "--calib-seq-len",
            "32",
            "--calib-batch-size",
            "4",
            "--out",
            out,
            "--json",
        ],
    )
    assert code == 0
    cal = json.loads(stdout)
    assert cal["layers"] == 4 and cal["calibration_tokens"] == 6 * 32 and cal["out"] == out
    code, stdout, _ = _run(capsys, ["eval", *common, "--thresholds", out, "--context", "64", "--json"])
    assert code == 0
    res = json.loads(stdout)
    assert res["token_perplexity"] > 1 and res["word_perplexity"] > res["token_perplexity"]
    assert set(res["by_type"]) == {"up_proj", "down_proj"}
    assert res["by_type"]["down_proj"]["target"] == 0.5
    assert abs(res["by_type"]["down_proj"]["measured"] - 0.5) < 0.1
    code, stdout, _ = _run(capsys, ["eval", *common, "--context", "64", "--json"])  # dense
    dense = json.loads(stdout)
    assert "measured_sparsity" not in dense and dense["token_perplexity"] != res["token_perplexity"]


def test_eval_table_and_per_layer(tiny_model_dir, text_file, tmp_path, capsys):
    out = str(tmp_path / "th.safetensors")
    common = ["--model", tiny_model_dir, "--data", text_file, "--no-progress"]
    assert main(["calibrate", *common, "--calib-samples", "2", "--calib-seq-len", "32", "--out", out]) == 0
    capsys.readouterr()
    code, stdout, _ = _run(capsys, ["eval", *common, "--thresholds", out, "--context", "64", "--per-layer"])
    assert code == 0
    assert "gate_proj" in stdout and "model.layers.1.mlp.down_proj" in stdout and "token ppl" in stdout
    rows = {line.split()[0]: line.split()[1:] for line in stdout.splitlines() if line.startswith(("dense ", "sparse "))}
    assert set(rows) == {"dense", "sparse"} and rows["sparse"][-1].endswith("%")  # the dense baseline beside it
    code, stdout, _ = _run(capsys, ["eval", *common, "--thresholds", out, "--context", "64", "--json"])
    with_base = json.loads(stdout)
    code, stdout, _ = _run(capsys, ["eval", *common, "--context", "64", "--json"])
    dense = json.loads(stdout)
    assert with_base["dense"]["token_perplexity"] == pytest.approx(dense["token_perplexity"])
    assert with_base["delta_token_ppl_percent"] == pytest.approx(
        100 * (with_base["token_perplexity"] / dense["token_perplexity"] - 1)
    )
    code, stdout, _ = _run(capsys, ["eval", *common, "--thresholds", out, "--context", "64", "--json", "--no-baseline"])
    assert code == 0 and "dense" not in json.loads(stdout)
    folder = str(tmp_path / "new") + os.sep  # a folder that does not exist yet, named so by its trailing /
    assert main(["calibrate", *common, "--calib-samples", "2", "--calib-seq-len", "32", "--out", folder]) == 0
    assert os.listdir(folder) == ["actsparse_thresholds.safetensors"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["calibrate", "--scope", ".*nothing.*=0.3", "--calib-samples", "2", "--calib-seq-len", "16"],
            "matches no module",
        ),
        (["calibrate", "--scope", ".*up_proj.*=1.5", "--calib-samples", "2", "--calib-seq-len", "16"], r"\[0, 1\]"),
        (["eval", "--thresholds", "missing.safetensors"], "does not exist"),
    ],
)
def test_errors_are_one_line_and_exit_2(tiny_model_dir, text_file, tmp_path, capsys, argv, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, [*argv, "--model", tiny_model_dir, "--data", text_file, "--no-progress"])
    assert code == 2
    assert "error:" in err and re.search(message, err)
    assert not (tmp_path / "thresholds.safetensors").exists()


def test_bad_scope_syntax_is_an_argparse_error(capsys):
    assert main(["calibrate", "--scope", "up_proj"]) == 2
    err = capsys.readouterr().err
    assert "PATTERN=SPARSITY" in err and len(err.strip().splitlines()) == 1  # one line, no usage block


def test_bad_data_spec(tiny_model_dir, capsys):
    code, _, err = _run(capsys, ["eval", "--model", tiny_model_dir, "--data", "no/such/file.txt"])
    assert code == 2 and "neither 'embedded'" in err


def test_version(capsys):
    assert main(["--version"]) == 0
    assert A.__version__ in capsys.readouterr().out


def test_scap_config_export_and_eval_import(tiny_model_dir, text_file, tmp_path, capsys):
    common = ["--model", tiny_model_dir, "--data", text_file, "--no-progress"]
    out, js = str(tmp_path / "th.safetensors"), str(tmp_path / "calibrated_thresholds.json")
    code, stdout, _ = _run(
        capsys,
        [
            "calibrate",
            *common,
            "--scap-config",
            "up,median,0.4,down,zero,0.5",
            "--calib-samples",
            "4",
            "--calib-seq-len",
            "32",
            "--out",
            out,
            "--export-scap",
            js,
            "--json",
        ],
    )
    assert code == 0
    cal = json.loads(stdout)
    assert cal["method"]["name"] == "scap" and cal["layers"] == 4 and cal["scap_json"] == js
    entries = json.load(open(js))
    assert {e["demode_method"] for e in entries.values()} == {"median", "zero"}
    results = []
    for extra in (["--thresholds", out], ["--scap-json", js]):
        code, stdout, _ = _run(capsys, ["eval", *common, *extra, "--context", "64", "--json"])
        assert code == 0
        results.append(json.loads(stdout))
    assert results[0]["token_perplexity"] == results[1]["token_perplexity"]
    assert results[0]["measured_sparsity"] == results[1]["measured_sparsity"]


def test_method_and_options_from_the_command_line(tiny_model_dir, text_file, tmp_path, capsys):
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
        "--out",
        str(tmp_path / "t.safetensors"),
        "--json",
    ]
    code, stdout, _ = _run(
        capsys, ["calibrate", *common, "--method", "teal-greedy", "--option", "step=0.1", "--scope", r".*_proj=0.4"]
    )
    assert code == 0
    m = json.loads(stdout)["method"]
    assert (m["name"], m["allocation"], m["step"]) == ("teal", "greedy", 0.1)
    for argv, message in [
        (["--method", "nope"], "unknown calibration method"),
        (["--method", "teal", "--option", "speed=3"], "no option"),
        (["--method", "teal", "--option", "step=abc"], r"bad option value in \{'step': 'abc'\}"),
        (["--scap-config", "up,zero"], "triplets"),
        (["--scap-config", "up,zero,0.3", "--scope", ".*=0.2"], "not both"),
    ]:
        code, _, err = _run(capsys, ["calibrate", *common, *argv])
        assert code == 2 and re.search(message, err), (argv, err)
    # the KEY=VALUE syntax is argparse's to refuse (exit 2, one line), with the sweep specs' message
    assert main(["calibrate", *common, "--option", "step"]) == 2
    assert "argument --option: expected KEY=VALUE, e.g. step=0.1, got 'step'" in capsys.readouterr().err


def test_sweep_writes_csv_json_png(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "sw"
    code, stdout, _ = _run(
        capsys,
        [
            "sweep",
            "--model",
            tiny_model_dir,
            "--data",
            text_file,
            "--no-progress",
            "--methods",
            "quantile,wina",
            "--sparsity",
            "0.3:0.5:0.2",
            "--calib-samples",
            "4",
            "--calib-seq-len",
            "32",
            "--context",
            "64",
            "--eval-tokens",
            "300",
            "--out",
            str(out),
        ],
    )
    assert code == 0
    assert "quantile" in stdout and "wina" in stdout and "dense" in stdout
    rows = (out / "sweep.csv").read_text().strip().splitlines()
    assert rows[0].startswith("method,target,measured") and len(rows) == 1 + 1 + 4
    data = json.loads((out / "sweep.json").read_text())
    pts = data["points"]
    assert [(p["method"], p["target"]) for p in pts] == [
        ("quantile", 0.3),
        ("quantile", 0.5),
        ("wina", 0.3),
        ("wina", 0.5),
    ]
    assert all(abs(p["measured"] - p["target"]) < 0.1 for p in pts)
    assert all(p["token_perplexity"] != data["dense_token_perplexity"] for p in pts)  # random model: any direction
    assert (out / "sweep.png").stat().st_size > 1000
    assert data["complete"] is True and data["stride"] == 63 and data["ignore"] == []


def test_a_sweep_that_fails_keeps_its_finished_points_and_replaces_an_older_sweep(
    tiny_model_dir, text_file, tmp_path, capsys
):
    out = tmp_path / "sw"
    out.mkdir()
    for name in ("sweep.csv", "sweep.json", "sweep.png"):  # an older sweep's files
        (out / name).write_text("old")
    args = ["sweep", "--model", tiny_model_dir, "--data", text_file, "--no-progress", "--sparsity", "0.3"]
    args += ["--calib-samples", "4", "--calib-seq-len", "32", "--context", "64", "--eval-tokens", "300"]
    # rank 16 of the tiny model's 64-wide layers reads more bytes than 30% sparsity saves: refused at its point
    code, _, err = _run(capsys, [*args, "--methods", "quantile,rsparse:rank=16", "--out", str(out)])
    assert code == 2 and "lower rank or the target" in err
    data = json.loads((out / "sweep.json").read_text())
    assert data["complete"] is False and [p["method"] for p in data["points"]] == ["quantile"]
    assert len((out / "sweep.csv").read_text().strip().splitlines()) == 1 + 1 + 1 and not (out / "sweep.png").exists()


def test_sweep_method_options_label_the_points(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "sw"
    specs = ["quantile", "teal-greedy:step=0.5", "teal-greedy:step=0.05:greedy_tokens=None"]
    code, stdout, _ = _run(
        capsys,
        [
            "sweep",
            "--model",
            tiny_model_dir,
            "--data",
            text_file,
            "--no-progress",
            "--methods",
            ",".join(specs),
            "--sparsity",
            "0.4",
            "--calib-samples",
            "4",
            "--calib-seq-len",
            "32",
            "--context",
            "64",
            "--eval-tokens",
            "300",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert code == 0
    result = json.loads(stdout)
    assert [p["method"] for p in result["points"]] == specs
    data = json.loads((out / "sweep.json").read_text())
    assert [p["method"] for p in data["points"]] == specs
    assert list(data["methods"]) == specs
    assert data["methods"][specs[1]]["step"] == 0.5 and data["methods"][specs[1]]["greedy_tokens"] == 1024
    assert data["methods"][specs[2]]["step"] == 0.05 and data["methods"][specs[2]]["greedy_tokens"] is None
    assert data["points"][1]["allocated"] != data["points"][2]["allocated"]  # the options reached calibration
    rows = (out / "sweep.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["dense", *specs]


@pytest.mark.parametrize(
    "methods, match",
    [
        ("quantile,teal-greedy:stepp=0.1", r"sweep method 'teal-greedy:stepp=0.1': .*no option\(s\) \['stepp'\]"),
        ("quantile,teal-greedy:step=0", r"'teal-greedy:step=0': step must be in \(0, 1\]"),
        ("teal-greedy:step=0.1,quantile,teal-greedy:step=0.1", "'teal-greedy:step=0.1' is given twice"),
    ],
)
def test_sweep_bad_method_spec_fails_before_the_model_loads(tmp_path, capsys, methods, match):
    code, _, err = _run(
        capsys,
        ["sweep", "--model", str(tmp_path / "no-such-model"), "--methods", methods, "--out", str(tmp_path / "sw")],
    )
    assert code == 2 and re.search(match, err), err
    assert err.count("\n") == 1 and not (tmp_path / "sw").exists()


@pytest.mark.parametrize(
    "text,match",
    [("0.7:0.2:0.1", "START:STOP:STEP"), ("0.2,1.0", r"\[0, 1\)"), ("a", "bad"), ("0.3,0.5,0.3", "0.3 is given twice")],
)
def test_sweep_bad_sparsity_list(tiny_model_dir, capsys, text, match):
    code, _, err = _run(capsys, ["sweep", "--model", tiny_model_dir, "--sparsity", text])
    assert code == 2 and re.search(match, err)


def test_calibrate_reports_activation_ratio_thresholds_and_plot(tiny_model_dir, text_file, tmp_path, capsys):
    png = tmp_path / "ratio.png"
    code, stdout, _ = _run(
        capsys,
        [
            "calibrate",
            "--model",
            tiny_model_dir,
            "--data",
            text_file,
            "--no-progress",
            "--method",
            "topk",
            "--scope",
            r".*down_proj=0.75",
            "--calib-samples",
            "4",
            "--calib-seq-len",
            "32",
            "--out",
            str(tmp_path / "t.safetensors"),
            "--plot",
            str(png),
            "--per-layer",
        ],
    )
    assert code == 0
    assert "average activation ratio on the calibration data: 0.250" in stdout  # top-k: exact
    assert "model.layers.1.mlp.down_proj" in stdout and png.stat().st_size > 1000
