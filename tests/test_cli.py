import json
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
    code, stdout, _ = _run(capsys, ["calibrate", *common, "--scope", ".*down_proj.*=0.5", "--scope",
                                    ".*up_proj.*=0.3", "--calib-samples", "6", "--calib-seq-len", "32",
                                    "--calib-batch-size", "4", "--out", out, "--json"])
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
    code, stdout, _ = _run(capsys, ["eval", *common, "--thresholds", out, "--context", "64", "--per-layer"])
    assert code == 0
    assert "gate_proj" in stdout and "model.layers.1.mlp.down_proj" in stdout and "token perplexity" in stdout


@pytest.mark.parametrize("argv, message", [
    (["calibrate", "--scope", ".*nothing.*=0.3", "--calib-samples", "2", "--calib-seq-len", "16"],
     "matches no module"),
    (["calibrate", "--scope", ".*up_proj.*=1.5", "--calib-samples", "2", "--calib-seq-len", "16"], r"\[0, 1\]"),
    (["eval", "--thresholds", "missing.safetensors"], "does not exist"),
])
def test_errors_are_one_line_and_exit_2(tiny_model_dir, text_file, tmp_path, capsys, argv, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, [*argv, "--model", tiny_model_dir, "--data", text_file, "--no-progress"])
    assert code == 2
    assert "error:" in err and re.search(message, err)
    assert not (tmp_path / "thresholds.safetensors").exists()


def test_bad_scope_syntax_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        main(["calibrate", "--scope", "up_proj"])
    assert "PATTERN=SPARSITY" in capsys.readouterr().err


def test_bad_data_spec(tiny_model_dir, capsys):
    code, _, err = _run(capsys, ["eval", "--model", tiny_model_dir, "--data", "no/such/file.txt"])
    assert code == 2 and "neither 'embedded'" in err


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert A.__version__ in capsys.readouterr().out
