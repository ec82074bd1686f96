import io
import json
import math
import re

import pytest
import torch
from helpers import VOCAB, byte_tokenizer, make_tiny_llama

import actsparse as A
from actsparse.cli import main
from actsparse.cli.format import format_side_by_side
from actsparse.eval import SparsityMonitor
from actsparse.generation import Detokenizer, compare_generate, dense_view, first_divergence, generate
from actsparse.generation.loop import _pick
from actsparse.models import load_model

PROMPT = "hello world"


@pytest.fixture
def tok():
    return byte_tokenizer()


def _calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (2, 24), generator=g) for _ in range(4)]


def _sparsified(sparsity: float, scope: str = ".*layers.*"):
    model = make_tiny_llama()
    A.sparsify_(model, A.SparsifyConfig({scope: sparsity}), _calib(), progress=False)
    return model


def _hf_greedy(model, tok, prompt: str, n: int) -> list[int]:
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False)[0, ids.shape[1] :].tolist()


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------- generation
def test_greedy_with_identity_thresholds_equals_model_generate(tok):
    model = make_tiny_llama()
    ref = _hf_greedy(model, tok, PROMPT, 24)
    A.apply_thresholds(model, {n: -math.inf for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    r = generate(model, tok, PROMPT, max_new_tokens=24)
    assert r.sparse and r.token_ids == ref and len(ref) == 24
    assert r.text == tok.decode(ref, skip_special_tokens=True) and r.stop_reason == "length"
    assert r.prompt_tokens == len(tok(PROMPT)["input_ids"]) and not r.chat
    assert all(v == 0.0 for v in r.decode_sparsity.values()) and len(r.decode_sparsity) == 15


def test_stops_at_eos_like_model_generate(tok):
    model = make_tiny_llama()
    first = generate(model, tok, PROMPT, max_new_tokens=12, stop_at_eos=False).token_ids
    k = next(i for i in range(2, 12) if first[i] not in first[:i])  # a token not generated before it
    model.generation_config.eos_token_id = first[k]
    r = generate(model, tok, PROMPT, max_new_tokens=12)
    assert r.token_ids == first[: k + 1] == _hf_greedy(model, tok, PROMPT, 12) and r.stop_reason == "eos"
    assert generate(model, tok, PROMPT, max_new_tokens=12, stop_at_eos=False).token_ids == first


def test_streamed_chunks_concatenate_to_the_text(tok):
    model = _sparsified(0.3)
    for seed in range(3):  # random bytes: incomplete UTF-8 sequences must be held back, then flushed
        chunks: list[str] = []
        r = generate(
            model, tok, PROMPT, max_new_tokens=40, do_sample=True, seed=seed, stop_at_eos=False, stream=chunks.append
        )
        assert "".join(chunks) == r.text and len(chunks) > 1 and all(chunks)


def test_detokenizer_holds_back_split_characters(tok):
    text = "naïve € 😀!"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text.encode())  # one token per byte: multi-byte characters are split
    chunks: list[str] = []
    d = Detokenizer(tok, chunks.append)
    for i in ids:
        d.push(i)
    assert d.finish() == text == "".join(chunks)
    assert not any("\ufffd" in c for c in chunks) and "😀" in chunks


def test_sampling_is_seeded_and_top_p_near_zero_is_greedy(tok):
    model = make_tiny_llama()
    greedy = generate(model, tok, PROMPT, max_new_tokens=16, stop_at_eos=False).token_ids
    s0 = generate(model, tok, PROMPT, max_new_tokens=16, do_sample=True, seed=0, stop_at_eos=False).token_ids
    assert s0 == generate(model, tok, PROMPT, max_new_tokens=16, do_sample=True, seed=0, stop_at_eos=False).token_ids
    assert s0 != generate(model, tok, PROMPT, max_new_tokens=16, do_sample=True, seed=1, stop_at_eos=False).token_ids
    assert s0 != greedy
    nucleus = generate(model, tok, PROMPT, max_new_tokens=16, do_sample=True, top_p=1e-6, seed=3, stop_at_eos=False)
    assert nucleus.token_ids == greedy


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.tensor([0.5, 0.3, 0.2, 1e-9]).log()
    g = torch.Generator().manual_seed(0)
    draws = lambda p: {_pick(logits, True, 1.0, p, g) for _ in range(200)}  # noqa: E731
    assert draws(0.4) == {0} and draws(0.6) == {0, 1} and draws(0.9) == {0, 1, 2}
    assert _pick(logits, False, 1.0, 0.5, None) == 0


def test_tokens_per_second_comes_from_the_decode_time(tok):
    model = make_tiny_llama()
    r = generate(model, tok, PROMPT, max_new_tokens=20, stop_at_eos=False)
    assert r.new_tokens == 20 and r.prefill_seconds > 0 and r.decode_seconds > 0
    assert r.decode_tokens_per_s == pytest.approx(19 / r.decode_seconds) and r.decode_tokens_per_s > 0
    d = r.to_dict()
    assert d["decode_tokens_per_s"] == r.decode_tokens_per_s and d["new_tokens"] == 20 and not d["sparse"]
    one = generate(model, tok, PROMPT, max_new_tokens=1)
    assert one.new_tokens == 1 and one.decode_seconds == 0 and one.decode_tokens_per_s is None


def test_chat_template_only_when_asked(tok):
    model = make_tiny_llama()
    assert not generate(model, tok, PROMPT, max_new_tokens=2).chat
    with pytest.raises(ValueError, match="no chat template"):
        generate(model, tok, PROMPT, max_new_tokens=2, chat=True)
    assert not generate(model, tok, PROMPT, max_new_tokens=2, chat=None).chat  # auto: no template, no chat
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    for chat in (True, None):
        r = generate(model, tok, PROMPT, max_new_tokens=2, chat=chat)
        assert r.chat and r.prompt_tokens == len(f"<user>{PROMPT}<assistant>")
    plain = generate(model, tok, PROMPT, max_new_tokens=2)  # completion unless asked
    assert not plain.chat and plain.prompt_tokens == len(PROMPT)


# --------------------------------------------------------------------------------------- sparsity
def test_decode_sparsity_is_near_the_calibrated_target(tok):
    r = generate(_sparsified(0.5), tok, PROMPT, max_new_tokens=32, stop_at_eos=False)
    assert len(r.decode_sparsity) == 14 and set(r.target_sparsity.values()) == {0.5}
    assert abs(r.mean_sparsity("decode") - 0.5) < 0.05 and abs(r.mean_sparsity("prefill") - 0.5) < 0.1
    assert set(r.sparsity_by_type()) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_measured_sparsity_equals_the_fraction_below_threshold(tok):
    """Independently: one full pass over prompt + fed tokens, |x| <= τ counted per position range."""
    model = _sparsified(0.4)
    r = generate(model, tok, PROMPT, max_new_tokens=24, stop_at_eos=False)
    layers = A.sparse_layers(model)
    seen: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, n=n: seen.__setitem__(n, args[0].detach()))
        for n, m in layers.items()
    ]
    ids = torch.tensor([tok(PROMPT)["input_ids"] + r.token_ids[:-1]])
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    p = r.prompt_tokens
    for n, m in layers.items():
        small = seen[n].abs() <= m.act_threshold
        assert r.decode_sparsity[n] == pytest.approx(small[0, p:].float().mean().item(), abs=1e-3), n
        assert r.prefill_sparsity[n] == pytest.approx(small[0, :p].float().mean().item(), abs=1e-3), n


def test_replayed_sparsity_matches_a_live_monitor(tok):
    model = _sparsified(0.4)
    with SparsityMonitor(model) as live:  # hooks on every timed step: the prompt, then one token at a time
        plain = generate(model, tok, PROMPT, max_new_tokens=16, stop_at_eos=False, measure_sparsity=False)
    r = generate(model, tok, PROMPT, max_new_tokens=16, stop_at_eos=False)
    assert plain.token_ids == r.token_ids and not plain.decode_sparsity
    p, d = r.prompt_tokens, r.new_tokens - 1
    for n, v in live.sparsity().items():
        assert v == pytest.approx((r.prefill_sparsity[n] * p + r.decode_sparsity[n] * d) / (p + d), abs=1e-3), n


# ---------------------------------------------------------------------------------------- compare
def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2, 3], [1, 2]) == 2 and first_divergence([], [4]) == 0


def test_compare_reports_the_first_divergence(tok):
    dense_ref = _hf_greedy(make_tiny_llama(), tok, PROMPT, 24)
    model = _sparsified(0.3)
    sparse_ref = _hf_greedy(model, tok, PROMPT, 24)
    expected = next((i for i, (a, b) in enumerate(zip(dense_ref, sparse_ref)) if a != b), None)
    assert expected is not None  # the case must actually diverge
    layers = A.sparse_layers(model)
    c = compare_generate(model, tok, PROMPT, max_new_tokens=24)
    assert c.dense.token_ids == dense_ref and c.sparse.token_ids == sparse_ref
    assert c.first_divergence == expected and c.to_dict()["first_divergence"] == expected
    assert not c.dense.sparse and not c.dense.decode_sparsity and c.sparse.sparse
    assert abs(c.sparse.mean_sparsity() - 0.3) < 0.05
    assert A.sparse_layers(model) == layers  # the same SparseLinear objects are back in place


def test_compare_identical_when_nothing_is_dropped(tok):
    model = make_tiny_llama()
    A.apply_thresholds(model, {"model.layers.0.mlp.down_proj": -math.inf})
    c = compare_generate(model, tok, PROMPT, max_new_tokens=8, stop_at_eos=False)
    assert c.first_divergence is None and c.dense.token_ids == c.sparse.token_ids


def test_dense_view_restores_the_model_on_error():
    model = _sparsified(0.3)
    layers = A.sparse_layers(model)
    with pytest.raises(RuntimeError, match="boom"), dense_view(model):
        assert not A.sparse_layers(model)
        raise RuntimeError("boom")
    assert A.sparse_layers(model) == layers


def test_side_by_side_fits_the_width():
    left, right = "alpha beta gamma " * 12 + "\nsecond line", "one two three " * 3
    lines = format_side_by_side(left, right, width=61)
    assert lines[0].startswith("dense") and "| sparse" in lines[0]
    assert all(len(line) <= 61 for line in lines) and lines[1] == "-" * 29 + "-+-" + "-" * 29
    assert all(line[29:31] == " |" for line in lines[2:])
    assert " ".join(line[:29] for line in lines[2:]).split() == left.split()
    assert " ".join(line[32:] for line in lines[2:]).split() == right.split()


# ------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "prompt, kwargs, message",
    [
        ("", {}, "prompt is empty"),
        ("   \n", {}, "prompt is empty"),
        (PROMPT, {"max_new_tokens": 0}, "max_new_tokens"),
        (PROMPT, {"max_new_tokens": -3}, "max_new_tokens"),
        (PROMPT, {"do_sample": True, "temperature": 0.0}, "temperature"),
        (PROMPT, {"do_sample": True, "top_p": 1.5}, "top_p"),
        (PROMPT, {"max_new_tokens": 600}, "exceeds the model's 512 positions"),
        (PROMPT, {"engine": "eager", "attention": "kernel"}, "attention='kernel' runs in the graph engine"),
        (PROMPT, {"engine": "graph", "attention": "flash"}, "attention must be one of auto, kernel, model"),
    ],
)
def test_bad_input_raises_and_leaves_the_model_alone(tok, prompt, kwargs, message):
    model = _sparsified(0.3)
    before, layers = _state(model), A.sparse_layers(model)
    with pytest.raises(ValueError, match=message):
        generate(model, tok, prompt, **kwargs)
    with pytest.raises(ValueError, match=message):
        compare_generate(model, tok, prompt, **kwargs)
    after = model.state_dict()
    assert A.sparse_layers(model) == layers and all(torch.equal(v, after[k]) for k, v in before.items())


def test_graph_engine_with_the_decode_attention_kernel_gives_the_same_tokens(tok):
    # the kernel takes fp16/bf16 (here in Triton's interpreter); fp16, as bf16 rounding flips this random
    # model's near-tied logits at step 5 (0.461 vs 0.459: 0.006 apart in bf16, 0.0004 in fp16)
    model = _sparsified(0.3).to(torch.float16)
    want = generate(model, tok, PROMPT, max_new_tokens=8, engine="graph", attention="model")
    got = generate(model, tok, PROMPT, max_new_tokens=8, engine="graph", attention="kernel")
    assert got.token_ids == want.token_ids
    assert A.engine.attention_of(model) == "sdpa"  # switched for the generation only
    with pytest.raises(ValueError, match="pass attention= to the Decoder you give as decoder="):
        generate(model, tok, PROMPT, decoder=A.engine.Decoder(model, 64), attention="auto")


def test_compare_needs_a_sparse_model(tok):
    with pytest.raises(ValueError, match="no SparseLinear"):
        compare_generate(make_tiny_llama(), tok, PROMPT, max_new_tokens=2)


def test_thresholds_for_another_model_are_refused_and_model_unchanged(tok, tmp_path):
    other = make_tiny_llama(hidden=32, inter=64)
    A.sparsify_(other, A.SparsifyConfig({".*mlp.*": 0.5}), _calib(), progress=False)
    path = A.save_thresholds(other, str(tmp_path / "other.safetensors"))
    model = make_tiny_llama()
    ref = generate(model, tok, PROMPT, max_new_tokens=8).token_ids
    with pytest.raises(A.ThresholdFileError, match="another model"):
        A.load_thresholds(model, path)
    r = generate(model, tok, PROMPT, max_new_tokens=8)
    assert not r.sparse and r.token_ids == ref


# -------------------------------------------------------------------------------------------- CLI
def _run(capsys, argv):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def thresholds(tiny_model_dir, text_file, tmp_path):
    out = str(tmp_path / "th.safetensors")
    assert (
        main(
            [
                "calibrate",
                "--model",
                tiny_model_dir,
                "--data",
                text_file,
                "--no-progress",
                "--scope",
                ".*down_proj.*=0.5",
                "--scope",
                ".*up_proj.*=0.3",
                "--calib-samples",
                "4",
                "--calib-seq-len",
                "32",
                "--out",
                out,
                "--json",
            ]
        )
        == 0
    )
    return out


def test_cli_generate_with_thresholds_json(tiny_model_dir, thresholds, capsys):
    capsys.readouterr()
    code, stdout, _ = _run(
        capsys,
        [
            "generate",
            "--model",
            tiny_model_dir,
            "--thresholds",
            thresholds,
            "--prompt",
            PROMPT,
            "--max-new-tokens",
            "12",
            "--json",
        ],
    )
    assert code == 0
    res = json.loads(stdout)  # nothing streamed into the JSON
    assert res["thresholds"] == thresholds and res["sparse"] and res["new_tokens"] == len(res["token_ids"])
    assert res["decode_tokens_per_s"] is None or res["decode_tokens_per_s"] > 0
    assert set(res["decode_sparsity_by_type"]) <= {"up_proj", "down_proj"} and len(res["target_sparsity"]) == 4
    assert res["settings"]["max_new_tokens"] == 12 and "calibration" not in res


def test_cli_generate_streams_text_and_summary(tiny_model_dir, thresholds, capsys, monkeypatch):
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPT + "\n"))
    code, stdout, _ = _run(
        capsys,
        ["generate", "--model", tiny_model_dir, "--thresholds", thresholds, "--prompt", "-", "--max-new-tokens", "10"],
    )
    assert code == 0
    model, tok = load_model(tiny_model_dir)
    A.load_thresholds(model, thresholds)
    expected = generate(model, tok, PROMPT, max_new_tokens=10)
    assert stdout.startswith(expected.text + "\n")
    assert "time to first token" in stdout and "tokens/s" in stdout and "measured sparsity (decode)" in stdout


def test_cli_generate_engines_give_the_same_tokens(tiny_model_dir, thresholds, capsys):
    runs = {}
    for engine in ("eager", "graph"):
        code, stdout, _ = _run(
            capsys,
            [
                "generate",
                "--model",
                tiny_model_dir,
                "--thresholds",
                thresholds,
                "--prompt",
                PROMPT,
                "--max-new-tokens",
                "12",
                "--engine",
                engine,
                "--json",
            ],
        )
        assert code == 0
        runs[engine] = json.loads(stdout)
    assert runs["eager"]["engine"] == "loop" and runs["graph"]["engine"] == "eager"  # no CUDA: the Decoder eagerly
    assert runs["eager"]["token_ids"] == runs["graph"]["token_ids"]
    assert runs["eager"]["decode_sparsity"].keys() == runs["graph"]["decode_sparsity"].keys()
    code, stdout, _ = _run(
        capsys,
        [
            "generate",
            "--model",
            tiny_model_dir,
            "--thresholds",
            thresholds,
            "--prompt",
            PROMPT,
            "--max-new-tokens",
            "6",
            "--engine",
            "graph",
            "--compare",
        ],
    )
    assert code == 0 and "static cache" in stdout  # the footer says how both ran
    assert main(["generate", "--model", tiny_model_dir, "--prompt", PROMPT, "--engine", "fast"]) == 2
    assert "invalid choice: 'fast'" in capsys.readouterr().err


def test_cli_compare(tiny_model_dir, thresholds, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "70")
    capsys.readouterr()
    code, stdout, _ = _run(
        capsys,
        [
            "generate",
            "--model",
            tiny_model_dir,
            "--thresholds",
            thresholds,
            "--prompt",
            PROMPT,
            "--max-new-tokens",
            "8",
            "--compare",
        ],
    )
    assert code == 0
    lines = stdout.splitlines()
    assert lines[0].startswith("dense") and "| sparse" in lines[0] and len(lines[1]) <= 70
    assert "decode tokens/s" in stdout and "first divergence:" in stdout
    code, stdout, _ = _run(
        capsys,
        [
            "generate",
            "--model",
            tiny_model_dir,
            "--thresholds",
            thresholds,
            "--prompt",
            PROMPT,
            "--max-new-tokens",
            "8",
            "--compare",
            "--json",
        ],
    )
    res = json.loads(stdout)
    assert code == 0 and set(res) >= {"dense", "sparse", "first_divergence"}
    assert res["first_divergence"] == first_divergence(res["dense"]["token_ids"], res["sparse"]["token_ids"])


def test_cli_generate_calibrates_without_thresholds(tiny_model_dir, text_file, capsys):
    code, stdout, err = _run(
        capsys,
        [
            "generate",
            "--model",
            tiny_model_dir,
            "--data",
            text_file,
            "--no-progress",
            "--calib-samples",
            "2",
            "--calib-seq-len",
            "32",
            "--prompt",
            PROMPT,
            "--max-new-tokens",
            "4",
            "--no-stream",
        ],
    )
    assert code == 0 and "measured sparsity" in stdout
    said = err.index("no --thresholds given: the model is calibrated first")
    assert said < err.index("loaded ") and "--out thresholds.safetensors" in err  # up front, with how to reuse
    assert "calibration data: 2 windows x 32 tokens" in err
    code, stdout, _ = _run(
        capsys,
        ["generate", "--model", tiny_model_dir, "--dense", "--prompt", PROMPT, "--max-new-tokens", "4", "--json"],
    )
    res = json.loads(stdout)
    assert code == 0 and not res["sparse"] and "calibration" not in res and res["new_tokens"] >= 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt", ""], "prompt is empty"),
        (["--prompt", PROMPT, "--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
        (["--prompt", PROMPT, "--temperature", "0.7"], "only with --sample"),
        (["--prompt", PROMPT, "--sample", "--top-p", "0"], r"top_p must be in \(0, 1\]"),
        (["--prompt", PROMPT, "--thresholds", "missing.safetensors"], "does not exist"),
        (["--prompt", PROMPT, "--dense", "--compare"], "--dense generates without sparsity"),
        (["--prompt", PROMPT, "--dense", "--chat"], "no chat template"),
        (["--prompt", PROMPT, "--engine", "eager", "--attention", "kernel"], "--attention kernel runs in the graph"),
    ],
)
def test_cli_errors_exit_2(tiny_model_dir, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, ["generate", "--model", tiny_model_dir, *extra])
    assert code == 2 and "actsparse generate: error:" in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1 and re.search(message, err)


def test_cli_refuses_thresholds_for_another_model(tiny_model_dir, tmp_path, capsys):
    other = make_tiny_llama(hidden=32, inter=64)
    A.sparsify_(other, A.SparsifyConfig({".*mlp.*": 0.5}), _calib(), progress=False)
    path = A.save_thresholds(other, str(tmp_path / "other.safetensors"))
    code, _, err = _run(capsys, ["generate", "--model", tiny_model_dir, "--thresholds", path, "--prompt", PROMPT])
    assert code == 2 and "made for another model" in err
