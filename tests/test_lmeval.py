"""lm-eval on the in-memory (sparsified) model, fully offline: a tiny custom multiple-choice task written here."""

import json
import logging
import os
import sys

import pytest
import torch
import yaml
from helpers import byte_tokenizer, make_tiny_llama

import actsparse as A
from actsparse.cli import main
from actsparse.errors import UsageError
from actsparse.eval import SparsityMonitor
from actsparse.eval.lmeval import LMEVAL_INSTALL, _LMEvalNoise, check_tasks, mean_accuracy, run_lm_eval
from actsparse.eval.loglik import continuation_logliks
from actsparse.eval.zeroshot import lm_eval_tasks_dir

TASK = "actsparse_tiny_mc"
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
NOUNS = ["apple", "sky", "leaf", "sun", "grape", "carrot", "night", "snow", "ocean", "stone", "cloud", "fire"]


def _items() -> list[dict]:
    """12 questions with 3-4 choices of different lengths (so acc and acc_norm can differ)."""
    g = torch.Generator().manual_seed(0)
    items = []
    for i, noun in enumerate(NOUNS):
        k = 3 + i % 2
        picks = torch.randperm(len(COLORS), generator=g)[:k].tolist()
        items.append(
            {
                "question": f"What color is the {noun} number {i}?",
                "choices": [COLORS[j] for j in picks],
                "label": int(torch.randint(0, k, (1,), generator=g)),
            }
        )
    return items


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny model: one thread is ~1 ms a forward; two threads on a busy 2-core machine can be 50x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def task_dir(tmp_path, offline):
    """A folder with the custom task YAML (dataset_path: json, local JSONL data); returns (folder, items)."""
    import yaml

    items = _items()
    data = tmp_path / "tiny_mc.jsonl"
    data.write_text("\n".join(json.dumps(it) for it in items), encoding="utf-8")
    folder = tmp_path / "tasks"
    folder.mkdir()
    cfg = {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(tmp_path / "hf-cache")},
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }
    (folder / "tiny_mc.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return str(folder), items


def _tokenizer():
    tok = byte_tokenizer()
    tok.eos_token = "Ā"  # lm-eval needs a BOS or EOS token; the byte tokenizer has none
    return tok


def own_scores(model, tok, items) -> tuple[float, float, list[tuple[torch.Tensor, int]], list[list[float]]]:
    """(acc, acc_norm, forwarded inputs, per-choice log-likelihoods) from the model's own log-probabilities:
    each choice scores the sum of log p(continuation token) after "Question: ...\\nAnswer:" and a space.
    The inputs come with the first position that is new for the shared-prefix scorer (0 for an item's first
    choice, which carries the context, else the context's last token)."""
    hits = hits_norm = 0
    inputs, all_lls = [], []
    for it in items:
        ctx = tok(f"Question: {it['question']}\nAnswer:", add_special_tokens=False)["input_ids"]
        lls = []
        for j, c in enumerate(it["choices"]):
            cont = tok(" " + c, add_special_tokens=False)["input_ids"]
            x = torch.tensor([ctx + cont])[:, :-1]  # lm-eval drops the last token too
            with torch.no_grad():
                logp = model(x).logits.float().log_softmax(-1)[0, len(ctx) - 1 :]
            lls.append(float(logp.gather(-1, torch.tensor(cont)[:, None]).sum()))
            inputs.append((x, 0 if j == 0 else len(ctx) - 1))
        norm = [ll / len(c) for ll, c in zip(lls, it["choices"])]
        hits += max(range(len(lls)), key=lls.__getitem__) == it["label"]
        hits_norm += max(range(len(norm)), key=norm.__getitem__) == it["label"]
        all_lls.append(lls)
    return hits / len(items), hits_norm / len(items), inputs, all_lls


def test_accuracy_matches_own_loglikelihoods_dense_and_sparse(task_dir, calib_data, caplog):
    folder, items = task_dir
    model, tok = make_tiny_llama(), _tokenizer()

    with caplog.at_level(logging.WARNING):
        dense = run_lm_eval(model, tok, [TASK], include_path=folder)
    # lm-eval's warnings about what actsparse does on purpose (an in-memory model, the few-shot count) are dropped
    said = [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "pretrained" in m or "num_fewshot" in m], said
    acc, acc_norm, _, dense_lls = own_scores(model, tok, items)
    m = dense["tasks"][TASK]
    assert m["acc"]["value"] == pytest.approx(acc, abs=1e-12)
    assert m["acc_norm"]["value"] == pytest.approx(acc_norm, abs=1e-12)
    assert m["acc"]["stderr"] > 0 and dense["samples"][TASK] == len(items) and dense["num_fewshot"][TASK] == 0
    assert "measured_sparsity" not in dense
    assert tok.pad_token is None  # lm-eval set a pad token on its own copy, not ours
    json.dumps(dense)  # JSON-able

    A.sparsify_(model, A.SparsifyConfig({r".*_proj": 0.8}), calib_data)
    limit = 9
    acc, acc_norm, inputs, sparse_lls = own_scores(model, tok, items[:limit])
    assert sparse_lls != dense_lls[:limit]  # the thresholds change the scores
    for scorer, batch in (("shared-prefix", 4), ("hflm", 1)):
        sparse = run_lm_eval(model, tok, TASK, include_path=folder, limit=limit, scorer=scorer, batch_size=batch)
        m = sparse["tasks"][TASK]
        assert sparse["samples"][TASK] == limit and sparse["scorer"] == scorer
        assert m["acc"]["value"] == pytest.approx(acc, abs=1e-12), scorer
        assert m["acc_norm"]["value"] == pytest.approx(acc_norm, abs=1e-12), scorer
        # the sparsity measured during lm-eval's forward passes = the tokens it ran through a SparsityMonitor:
        # every full sequence (hflm); each context once, then each choice's tokens (shared-prefix, no padding)
        with SparsityMonitor(model) as mon, torch.no_grad():
            for x, first in inputs:
                mask = torch.arange(x.shape[1])[None] >= (first if scorer == "shared-prefix" else 0)
                with mon.counting(mask):
                    model(x)
        expected = mon.sparsity()
        assert set(sparse["measured_sparsity"]) == set(expected) and len(expected) == 14
        for name, v in expected.items():
            assert sparse["measured_sparsity"][name] == pytest.approx(v, abs=1e-9), (scorer, name)
        assert all(v > 0.5 for v in expected.values())
    assert set(sparse["by_type"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert sparse["by_type"]["down_proj"]["layers"] == 2 and sparse["by_type"]["down_proj"]["target"] == 0.8
    json.dumps(sparse)


def _full_pass(model, ctx, cont) -> tuple[float, bool]:
    x = torch.tensor([ctx + cont])[:, :-1]
    with torch.no_grad():
        logp = model(x).logits.float().log_softmax(-1)[0, len(ctx) - 1 :]
    return float(logp.gather(-1, torch.tensor(cont)[:, None]).sum()), bool(
        (logp.argmax(-1) == torch.tensor(cont)).all()
    )


@pytest.mark.parametrize("sparse", [False, True])
def test_shared_prefix_logliks_equal_one_full_pass_per_choice(sparse, calib_data):
    model = make_tiny_llama()
    if sparse:
        A.sparsify_(model, A.SparsifyConfig({r".*_proj": 0.6}), calib_data)
    g = torch.Generator().manual_seed(3)

    def ids(n):
        return torch.randint(0, 200, (n,), generator=g).tolist()

    # contexts of 1..19 tokens (one-token contexts run without a cache), 1..4 continuations of 1..6 tokens
    groups = [(ids(n), [ids(1 + (n * k) % 6) for k in range(1 + n % 4)]) for n in (7, 1, 19, 3, 1, 12, 2)]
    # a continuation the model predicts greedily: its own argmax tokens after the context
    ctx = groups[0][0]
    with torch.no_grad():
        nxt = int(model(torch.tensor([ctx])).logits[0, -1].argmax())
        nxt2 = int(model(torch.tensor([ctx + [nxt]])).logits[0, -1].argmax())
    groups[0][1].append([nxt, nxt2])
    batched = continuation_logliks(model, groups)
    alone = [continuation_logliks(model, [gr])[0] for gr in groups]
    for (ctx, conts), got, one in zip(groups, batched, alone):
        for cont, (ll, greedy), (ll1, greedy1) in zip(conts, got, one, strict=True):
            ref_ll, ref_greedy = _full_pass(model, ctx, cont)
            assert ll == pytest.approx(ref_ll, abs=1e-4) and ll1 == pytest.approx(ref_ll, abs=1e-4)
            assert greedy == ref_greedy == greedy1
    assert batched[0][-1][1] is True and not all(greedy for _, greedy in batched[2])
    with pytest.raises(UsageError, match="non-empty"):
        continuation_logliks(model, [([1, 2], [[]])])


def test_scorer_names_are_checked(task_dir):
    folder, _ = task_dir
    with pytest.raises(UsageError, match="scorer must be one of shared-prefix, hflm"):
        run_lm_eval(make_tiny_llama(), _tokenizer(), TASK, include_path=folder, scorer="fast")


def test_unknown_task_names_close_matches_and_the_fix(task_dir, capsys, caplog):
    folder, _ = task_dir
    for task in ("lambada_openai", "piqa"):  # the user's own definitions of two built-in tasks
        mine = {"task": task, "dataset_path": "json", "output_type": "loglikelihood", "test_split": "test"}
        with open(os.path.join(folder, f"mine_{task}.yaml"), "w", encoding="utf-8") as f:
            json.dump(mine, f)
    # every call names piqa (served from the offline data) and the folder: one index of lm-eval's built-in
    # tasks (≈11 s on the CI box) serves them all
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError) as e:
        check_tasks([TASK + "x", "piqa"], include_path=folder)
    # the offline data's seven tasks (and their tags) replace lm-eval's on purpose: not warned; the user's tasks
    # replacing lm-eval's lambada_openai and the offline piqa are (the user's folder comes last: it wins)
    overrides = sorted({r.getMessage() for r in caplog.records if "overrides existing task" in r.getMessage()})
    assert [m.split("'")[1] for m in overrides] == ["lambada_openai", "piqa"], overrides
    assert all(m.split(" overrides")[0].endswith(".yaml") and folder in m.split(" overrides")[0] for m in overrides)
    assert "actsparse-zeroshot-" in overrides[1].split(" overrides")[1], overrides
    msg = str(e.value)
    assert f"did you mean: {TASK}" in msg and "--include-path" in msg and "lm-eval ls tasks" in msg
    assert "'piqa'" not in msg
    with pytest.raises(ValueError, match=r"task: 'arc_eazy' \(did you mean: arc_easy"):
        check_tasks("arc_eazy,piqa", include_path=folder)
    assert check_tasks(f" piqa , {TASK},piqa", include_path=folder) == ["piqa", TASK]
    with pytest.raises(ValueError, match="no lm-eval tasks"):
        check_tasks(" , ")
    with pytest.raises(ValueError, match="not a folder"):
        check_tasks(TASK, include_path=folder + "/missing")
    # the CLI checks the names before it loads the model (this model path does not exist)
    assert main(["eval", "--model", "no/such/model", "--tasks", "arc_eazy,piqa", "--include-path", folder]) == 2
    err = capsys.readouterr().err
    assert "actsparse eval: error: unknown lm-eval task" in err and "arc_easy" in err and len(err.splitlines()) == 1


def test_missing_lm_eval_names_the_install_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    with pytest.raises(ImportError, match=LMEVAL_INSTALL.replace("[", r"\[").replace("]", r"\]")):
        run_lm_eval(make_tiny_llama(), _tokenizer(), ["piqa"])
    assert main(["eval", "--model", "no/such/model", "--tasks", "piqa"]) == 2
    assert "pip install 'actsparse[lmeval]'" in capsys.readouterr().err


def test_model_and_tokenizer_unchanged_on_error(task_dir, calib_data, monkeypatch):
    import lm_eval

    folder, _ = task_dir
    model, tok = make_tiny_llama(), _tokenizer()
    A.sparsify_(model, A.SparsifyConfig({r".*down_proj": 0.5}), calib_data)
    model.train()

    def boom(*args, **kwargs):
        raise RuntimeError("lm-eval failed")

    monkeypatch.setattr(lm_eval, "simple_evaluate", boom)
    with pytest.raises(RuntimeError, match="lm-eval failed"):
        run_lm_eval(model, tok, [TASK], include_path=folder)
    assert model.training and tok.pad_token is None
    assert all(not m._forward_pre_hooks for m in A.sparse_layers(model).values())  # the monitor's hooks are gone
    for bad, match in [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": "auto"}, "batch_size"),
        ({"limit": 0}, "limit"),
        ({"num_fewshot": -1}, "num_fewshot"),
    ]:
        with pytest.raises(ValueError, match=match):
            run_lm_eval(model, tok, [TASK], include_path=folder, **bad)
    with pytest.raises(ValueError, match="BOS or EOS"):
        run_lm_eval(model, byte_tokenizer(), [TASK], include_path=folder)


def test_cli_eval_tasks_json_and_table(task_dir, calib_data, tmp_path, capsys):
    folder, items = task_dir
    model_dir = tmp_path / "tiny"
    model, tok = make_tiny_llama(), _tokenizer()
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    A.sparsify_(model, A.SparsifyConfig({r".*up_proj": 0.4, r".*down_proj": 0.6}), calib_data)
    th = str(tmp_path / "th.safetensors")
    A.save_thresholds(model, th)

    common = ["eval", "--model", str(model_dir), "--thresholds", th, "--tasks", TASK, "--include-path", folder]
    assert main([*common, "--limit", "6", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    acc, acc_norm, _, _ = own_scores(model, tok, items[:6])  # the CLI's model = this one, reloaded
    assert res["tasks"][TASK]["acc"]["value"] == pytest.approx(acc, abs=1e-12)
    assert res["tasks"][TASK]["acc_norm"]["value"] == pytest.approx(acc_norm, abs=1e-12)
    assert res["samples"] == {TASK: 6} and res["thresholds"] == th
    assert set(res["by_type"]) == {"up_proj", "down_proj"} and res["by_type"]["down_proj"]["target"] == 0.6
    assert 0 < res["by_type"]["up_proj"]["measured"] < res["by_type"]["down_proj"]["measured"]

    assert main([*common, "--limit", "6", "--lm-eval-scorer", "hflm", "--json"]) == 0
    res_hflm = json.loads(capsys.readouterr().out)
    assert res_hflm["scorer"] == "hflm" and res["scorer"] == "shared-prefix"
    assert res_hflm["tasks"][TASK]["acc"]["value"] == pytest.approx(acc, abs=1e-12)

    assert main([*common, "--limit", "3", "--per-layer"]) == 0
    out = capsys.readouterr().out
    assert "lm-eval" in out and "3-shot" not in out and "0-shot, limit 3" in out
    rows = [line.split() for line in out.splitlines()]
    assert [TASK, "acc"] in [r[:2] for r in rows] and [TASK, "acc_norm"] in [r[:2] for r in rows]
    assert any(r[:2] == [TASK, "acc"] and r[3] == "±" and r[-1] == "3" for r in rows)
    assert "measured sparsity during the lm-eval run:" in out and "model.layers.1.mlp.down_proj" in out
    assert any(r[:3] == ["down_proj", "2", "0.600"] for r in rows)


def test_cli_lm_eval_options_need_tasks(tmp_path, capsys):
    assert main(["eval", "--model", "no/such/model", "--limit", "5", "--num-fewshot", "1"]) == 2
    err = capsys.readouterr().err
    assert "--num-fewshot, --limit apply only to lm-eval" in err and "--tasks" in err
    assert main(["eval", "--model", "no/such/model", "--lm-eval-scorer", "hflm"]) == 2
    assert "--lm-eval-scorer apply only to lm-eval" in capsys.readouterr().err
    for flag, value, message in [
        ("--limit", "0", "fraction below 1"),
        ("--lm-eval-batch-size", "0", ">= 1"),
        ("--num-fewshot", "-1", ">= 0"),
    ]:
        assert main(["eval", "--tasks", "piqa", flag, value]) == 2
        err = capsys.readouterr().err
        assert flag in err and message in err, err


def _record(msg, *args):
    return logging.LogRecord("lm_eval.x", logging.WARNING, __file__, 1, msg, args, None)


def test_the_lm_eval_warnings_kept_and_dropped(tmp_path):
    """What the filter on lm-eval's loggers lets through, with and without the offline task folder."""
    offline, user = str(tmp_path / "offline"), str(tmp_path / "user")
    builtin = os.path.join(lm_eval_tasks_dir(), "piqa", "piqa.yaml")
    fewshot = "Overwriting default num_fewshot of %s from %s to %s"
    override = "Task '%s' from %s overrides existing task from %s"
    agg = "[Task: %s] metric acc is defined, but aggregation is not. using default aggregation=mean"
    for quiet in (_LMEvalNoise(()), _LMEvalNoise((offline,))):
        assert not quiet.filter(_record("`pretrained` model kwarg is not of type `str`. Many other ..."))
        assert not quiet.filter(_record(fewshot, "piqa", None, 0))  # no default: nothing changes
        assert not quiet.filter(_record(fewshot, "piqa", 0, 0))
        assert quiet.filter(_record(fewshot, "bbh", 3, 0))  # a few-shot default overridden: said
        assert quiet.filter(_record("Something else entirely"))
        assert quiet.filter(_record(agg % "my_task"))
        assert quiet.filter(_record(override, "piqa", f"{user}/piqa.yaml", builtin))  # the user's replaces lm-eval's
    quiet = _LMEvalNoise((offline,))
    assert not quiet.filter(_record(override, "piqa", f"{offline}/piqa.yaml", builtin))
    assert quiet.filter(_record(override, "piqa", f"{offline}/piqa.yaml", f"{user}/piqa.yaml"))
    assert not quiet.filter(_record(override, "ai2_arc", None, None))  # a tag the offline tasks re-register
    assert quiet.filter(_record(override, "my_tag", None, None))
    assert not quiet.filter(_record(agg % "boolq"))
    assert _LMEvalNoise(()).filter(_record(override, "piqa", f"{offline}/piqa.yaml", builtin))  # no offline folder
    assert _LMEvalNoise(()).filter(_record(agg % "boolq"))


def test_a_run_outside_a_git_repository_prints_no_git_error(task_dir, tmp_path, monkeypatch, capfd):
    """lm-eval records ``git describe`` of the working folder and let git's stderr through: "fatal: not a git
    repository" on every run from a folder outside one."""
    folder, _ = task_dir
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # (tmp_path inside a repository: not one)
    run_lm_eval(make_tiny_llama(), _tokenizer(), TASK, include_path=folder, limit=2)
    assert "not a git repository" not in capfd.readouterr().err


def test_mean_accuracy_leaves_out_group_rows(task_dir, tmp_path):
    folder, items = task_dir
    cfg = yaml.safe_load(open(os.path.join(folder, "tiny_mc.yaml"), encoding="utf-8"))
    few = tmp_path / "few.jsonl"
    few.write_text("\n".join(json.dumps(it) for it in items[:5]), encoding="utf-8")
    cfg.update(task="actsparse_tiny_few", dataset_kwargs={**cfg["dataset_kwargs"], "data_files": {"test": str(few)}})
    (tmp_path / "tasks" / "tiny_few.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    group = {
        "group": "actsparse_tiny_group",
        "task": [TASK, "actsparse_tiny_few"],
        "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
        "metadata": {"version": 1.0},
    }
    (tmp_path / "tasks" / "tiny_group.yaml").write_text(yaml.safe_dump(group), encoding="utf-8")
    r = run_lm_eval(make_tiny_llama(), _tokenizer(), "actsparse_tiny_group", include_path=folder)
    assert r["groups"] == ["actsparse_tiny_group"] and set(r["samples"]) == {TASK, "actsparse_tiny_few"}
    leaves = [r["tasks"][n]["acc"]["value"] for n in (TASK, "actsparse_tiny_few")]
    assert r["tasks"]["actsparse_tiny_group"]["acc"]["value"] != pytest.approx(sum(leaves) / 2)  # (size-weighted)
    assert mean_accuracy(r)[0] == pytest.approx(sum(leaves) / 2)  # the subtasks once each, not the group again
