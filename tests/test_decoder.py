"""The static-cache Decoder against transformers' own generate, on tiny random models (CPU, fp32)."""

import math
import warnings

import pytest
import torch
from helpers import VOCAB, CountOps, byte_tokenizer, make_tiny_llama
from transformers import (
    BertConfig,
    BertForMaskedLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    StaticCache,
    StaticLayer,
    T5Config,
    T5ForConditionalGeneration,
)

import actsparse as A
import actsparse.kernels as K
import actsparse.kernels.decode_attention as DA
from actsparse.engine import Decoder, forward_kwargs, hf, select_next
from actsparse.engine.hf import OneCounterLayer, make_static_cache
from actsparse.errors import DecoderError
from actsparse.generation import dense_view, generate

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


def _tiny(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    if arch == "llama":
        return make_tiny_llama(seed=seed)
    if arch == "mistral":
        return MistralForCausalLM(MistralConfig(**COMMON, sliding_window=4096)).eval()
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**COMMON)).eval()
    if arch == "mixtral":
        return MixtralForCausalLM(MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)).eval()
    raise ValueError(arch)


def _ids(n: int = 7, rows: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, n), generator=torch.Generator().manual_seed(seed))


def _calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (2, 24), generator=g) for _ in range(4)]


def _sparsify(model, sparsity=0.4):
    A.sparsify_(model, A.SparsifyConfig({".*layers.*": sparsity}), _calib(), progress=False)
    return model


def _hf(model, ids, n, **kw):
    with torch.no_grad():
        return model.generate(
            ids, max_new_tokens=n, do_sample=False, return_dict_in_generate=True, output_logits=True, **kw
        )


ARCHS = ["llama", "mistral", "qwen2", "mixtral"]


# ------------------------------------------------------------------------------------- vs transformers
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_and_logits_equal_hf_generate(arch):
    model = _tiny(arch)
    ids = _ids()
    ref = _hf(model, ids, 24)
    out = Decoder(model, max_seq_len=64).run(ids, 24, output_logits=True)
    assert out.mode == "eager" and out.stop_reason == "length" and out.new_tokens == 24
    assert torch.equal(out.sequences, ref.sequences)
    for got, want in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_sparsified_model_decodes_like_the_eager_loop(arch, monkeypatch):
    model = _sparsify(_tiny(arch))
    tok = byte_tokenizer()
    loop = generate(model, tok, "hello sparse world", max_new_tokens=20, engine="eager", measure_sparsity=False)
    graph = generate(model, tok, "hello sparse world", max_new_tokens=20, engine="graph", measure_sparsity=False)
    assert loop.engine == "loop" and graph.engine == "eager"  # the Decoder, eagerly: no CUDA here
    assert graph.token_ids == loop.token_ids and graph.text == loop.text
    # and the sparse model really differs from the dense one (the comparison is not vacuous)
    with dense_view(model):
        dense = generate(model, tok, "hello sparse world", max_new_tokens=20, engine="graph", measure_sparsity=False)
    assert dense.token_ids != graph.token_ids


def test_batch_of_equal_length_prompts_equals_hf_generate():
    model = _tiny("llama")
    ids = _ids(6, rows=3, seed=4)
    ref = _hf(model, ids, 12)
    got = Decoder(model, max_seq_len=32, batch_size=3).generate(ids, 12)
    assert torch.equal(got, ref.sequences)


@pytest.mark.parametrize("sync_every", [1, 5])
def test_stops_at_eos_like_hf_generate(sync_every):
    model = _tiny("llama")
    ids = _ids()
    free = Decoder(model, 64).generate(ids, 16, eos_token_id=[])[0, ids.shape[1] :].tolist()
    k = next(i for i in range(3, 16) if free[i] not in free[:i])  # first occurrence of some token
    model.generation_config.eos_token_id = free[k]
    ref = _hf(model, ids, 16).sequences
    dec = Decoder(model, 64, sync_every=sync_every)
    out = dec.run(ids, 16)
    assert out.stop_reason == "eos" and out.new_tokens == k + 1 and torch.equal(out.sequences, ref)
    streamed: list[int] = []
    dec.run(ids, 16, on_tokens=streamed.extend)
    assert streamed == free[: k + 1]


def test_batch_rows_stopping_at_eos_are_padded():
    model = _tiny("llama")
    ids = _ids(5, rows=2, seed=7)
    free = Decoder(model, 64, batch_size=2).generate(ids, 10, eos_token_id=[])[:, 5:]
    eos = int(free[0, 2])
    got = Decoder(model, 64, batch_size=2).run(ids, 10, eos_token_id=eos, pad_token_id=VOCAB - 1)
    row0 = got.sequences[0, 5:].tolist()
    first = row0.index(eos)
    assert row0[: first + 1] == free[0, : first + 1].tolist() and set(row0[first + 1 :]) <= {VOCAB - 1}


def test_finished_rows_are_padded_with_the_first_eos_like_hf_generate():
    model = _tiny("llama")
    ids = _ids(6, rows=2, seed=7)
    free = Decoder(model, 64, batch_size=2).generate(ids, 12, eos_token_id=[])[:, 6:]
    first = int(free[0, 2])
    low = min(t for t in range(VOCAB) if t not in free.flatten().tolist())  # never produced, below `first`
    assert low < first
    model.generation_config.eos_token_id = [first, low]  # a list, as Llama-3-Instruct's; no pad token
    model.generation_config.pad_token_id = None
    ref = _hf(model, ids, 12, attention_mask=torch.ones_like(ids)).sequences
    got = Decoder(model, 64, batch_size=2).generate(ids, 12)
    assert torch.equal(got, ref) and first in got[0, 9:].tolist()  # padded with `first`, not the lower `low`


def test_steps_run_past_the_eos_within_a_block_count_in_the_rate():
    model = _tiny("llama")
    ids = _ids()
    free = Decoder(model, 64).generate(ids, 16, eos_token_id=[])[0, ids.shape[1] :].tolist()
    k = next(i for i in range(1, 16) if free[i] not in free[:i])
    out = Decoder(model, 64, sync_every=16).run(ids, 16, eos_token_id=free[k])
    assert out.new_tokens == k + 1 and out.decode_steps == 15  # the block ran to its end before the host looked
    assert out.decode_tokens_per_s == pytest.approx(15 / out.decode_seconds)


def test_a_decoder_used_under_inference_mode_or_autocast_works_outside_it():
    model = _tiny("llama")
    ids = _ids()
    ref = _hf(model, ids, 8).sequences
    with torch.inference_mode():
        dec = Decoder(model, 32)
        assert torch.equal(dec.generate(ids, 8), ref)
    assert torch.equal(dec.generate(ids, 8), ref)  # its buffers are no inference tensors
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = dec.generate(ids, 8)
    assert torch.equal(dec.generate(ids, 8), ref)  # the cache made under autocast (bf16) is made again
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(dec.generate(ids, 8), under)


def test_generation_config_processors_that_greedy_decoding_skips_are_warned_about():
    model = _tiny("llama")
    ids = _ids()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default config: nothing to say
        plain = Decoder(model, 32).generate(ids, 8)
    first = int(plain[0, ids.shape[1]])
    model.generation_config.repetition_penalty = 1.05  # as Qwen2.5-Instruct ships
    model.generation_config.suppress_tokens = [first]
    with pytest.warns(
        UserWarning, match=rf"repetition_penalty=1.05, suppress_tokens=\[{first}\]; .* the Decoder does not"
    ):
        dec = Decoder(model, 32)
    with pytest.warns(UserWarning, match="the eager loop does not"):
        generate(model, byte_tokenizer(), "hi", max_new_tokens=2, engine="eager", measure_sparsity=False)
    # what the warning is about: model.generate suppresses the token, the Decoder (argmax) does not
    assert torch.equal(dec.generate(ids, 8), plain) and _hf(model, ids, 8).sequences[0, ids.shape[1]] != first


def test_a_tokenizers_unpadded_inputs_unpack_into_generate_and_padding_is_refused():
    model = _tiny("llama")
    ids = _ids()
    dec = Decoder(model, 32)
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
    }  # what tokenizer(..., return_tensors="pt") gives
    assert torch.equal(dec.generate(**inputs, max_new_tokens=6), _hf(model, ids, 6).sequences)
    padded = torch.ones_like(ids)
    padded[0, 0] = 0
    with pytest.raises(DecoderError, match="attention_mask has padding"):
        dec.generate(ids, 6, attention_mask=padded)
    with pytest.raises(DecoderError, match="shape of input_ids"):
        dec.generate(ids, 6, attention_mask=torch.ones(1, 3))


def test_sampling_is_seeded_and_matches_the_eager_loop():
    model = _sparsify(_tiny("llama"), 0.3)
    tok = byte_tokenizer()
    kw = dict(max_new_tokens=24, do_sample=True, temperature=0.9, top_p=0.8, stop_at_eos=False, measure_sparsity=False)
    a = generate(model, tok, "abc", seed=3, engine="graph", **kw)
    b = generate(model, tok, "abc", seed=3, engine="graph", **kw)
    c = generate(model, tok, "abc", seed=4, engine="graph", **kw)
    loop = generate(model, tok, "abc", seed=3, engine="eager", **kw)
    assert a.token_ids == b.token_ids == loop.token_ids != c.token_ids


def test_select_next_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    g = torch.Generator().manual_seed(0)
    seen = {tuple(select_next(logits, do_sample=True, top_p=0.7, generator=g).tolist()) for _ in range(300)}
    assert {r[0] for r in seen} == {0, 1} and {r[1] for r in seen} == {3, 2}  # 0.5 + 0.3 reach 0.7
    assert select_next(logits).tolist() == [0, 3]


# ------------------------------------------------------------------------------------- compiled step
def _count_gemv_backend(counts):
    def backend(gm, example_inputs):
        counts.append(sum(1 for n in gm.graph.nodes if "actsparse.sparse_gemv" in str(n.target)))
        return gm.forward

    return backend


@pytest.mark.parametrize("stacked", [False, True], ids=["separate", "stacked-kv"])
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_the_cache_layers_share_one_position_counter_and_hold_what_transformers_holds(arch, stacked, monkeypatch):
    """make_static_cache's layers share one counter (advanced once per forward, by the first layer): the same
    keys, values, logits and lengths as transformers' StaticCache, prefill and steps; and a decode step mutates
    one counter, not one per layer."""
    monkeypatch.setattr(hf, "STACKED_KV", stacked)
    model = _tiny(arch)
    ours, theirs = make_static_cache(model.config, 32), StaticCache(config=model.config, max_cache_len=32)
    assert all(type(layer) is OneCounterLayer for layer in ours.layers)
    ids = _ids(5)
    with torch.no_grad():
        for step in range(4):
            feed = ids if step == 0 else ids[:, step : step + 1]
            a = model(feed, **forward_kwargs(model, ours)).logits
            b = model(feed, **forward_kwargs(model, theirs)).logits
            assert torch.equal(a, b)
            assert int(ours.get_seq_length()) == int(theirs.get_seq_length()) == 5 + step
            for la, lb in zip(ours.layers, theirs.layers, strict=True):
                assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)
    assert len({id(layer.cumulative_length) for layer in ours.layers}) == 1
    for layer in ours.layers:  # STACKED_KV: keys and values are the halves of one buffer
        assert (layer.keys.untyped_storage().data_ptr() == layer.values.untyped_storage().data_ptr()) == stacked
    if StaticLayer.__dict__.get("crop") is not None:  # (transformers >= 5.2x: static layers crop their counter)
        ours.crop(-2), theirs.crop(-2)
        assert int(ours.get_seq_length()) == int(theirs.get_seq_length()) == 6  # moved back once, not per layer
    with CountOps() as ops, torch.no_grad():
        model(ids[:, :1], **forward_kwargs(model, ours))
    assert ops.counts.get("aten.add_", 0) == 1  # transformers' layers: one per layer
    ours.reset()
    assert int(ours.get_seq_length()) == 0


def test_layers_on_another_device_share_a_counter_of_their_own():
    """A model split over devices: the first layer on each device advances that device's counter."""
    layers = make_static_cache(_tiny("llama").config, 16).layers + [OneCounterLayer(16, {})]
    layers[1]._counters = layers[0]._counters
    kv = torch.zeros(1, 2, 3, 4)
    layers[0].update(kv, kv)
    layers[1].update(kv.to("meta"), kv.to("meta"))
    assert layers[0]._advances and layers[1]._advances  # each the first on its device
    assert layers[0].cumulative_length.device.type == "cpu" and layers[1].cumulative_length.device.type == "meta"
    assert int(layers[0].get_seq_length()) == 3


def test_stacks_outside_the_list_keep_transformers_counters():
    config = _tiny("llama").config
    config.model_type = "llama4_text"  # reads each layer's length before its update (attention temperature)
    assert not any(isinstance(layer, OneCounterLayer) for layer in make_static_cache(config, 16).layers)


def test_compiled_step_with_a_stacked_kv_cache_gives_the_eager_tokens(monkeypatch):
    monkeypatch.setattr(hf, "STACKED_KV", True)
    model = _tiny("llama")
    ids = _ids()
    dec = Decoder(model, 64, compile=True, backend="aot_eager", fallback=False)
    assert torch.equal(dec.generate(ids, 12), _hf(model, ids, 12).sequences)
    assert all(layer._kv is not None for layer in dec.cache.layers)  # (the compiled step wrote the stacked buffer)


def test_compiled_step_traces_fullgraph_dense_and_sparse():
    model = _tiny("llama")
    ids = _ids()
    ref = _hf(model, ids, 12).sequences
    dec = Decoder(model, 64, compile=True, backend="aot_eager", fallback=False)
    assert dec.mode == "compile" and torch.equal(dec.generate(ids, 12), ref)
    _sparsify(model)
    eager = Decoder(model, 64).generate(ids, 12)
    assert torch.equal(dec.generate(ids, 12), eager)  # modules swapped: the same Decoder recompiled


def test_compiled_step_with_kernels_is_one_graph_with_one_launch_per_group():
    torch.manual_seed(0)
    model = make_tiny_llama(hidden=64, inter=256).to(torch.bfloat16)
    _sparsify(model)
    packed = K.enable_kernels(model)
    assert len(packed) == 14
    ids = _ids()
    eager = Decoder(model, 64).run(ids, 6, output_logits=True)
    counts: list[int] = []
    out = Decoder(model, 64, compile=True, backend=_count_gemv_backend(counts), fallback=False).run(
        ids, 6, output_logits=True
    )
    # one graph (fullgraph) with q/k/v, o, gate/up, down: 4 launches per block, 2 blocks
    assert counts == [8]
    assert torch.equal(out.sequences, eager.sequences)
    for a, b in zip(out.logits, eager.logits):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_thresholds_changed_in_place_reach_the_captured_step():
    model = _sparsify(_tiny("llama"), 0.3)
    ids = _ids()
    dec = Decoder(model, 64, compile=True, backend="aot_eager", fallback=False)
    before = dec.generate(ids, 10)
    for m in A.sparse_layers(model).values():
        m.act_threshold.fill_(math.inf)  # every input dropped: the logits are the lm_head of the residual
    after = dec.generate(ids, 10)
    assert torch.equal(after, Decoder(model, 64).generate(ids, 10)) and not torch.equal(after, before)


# ------------------------------------------------------------------------------------- fallbacks, errors
def test_a_forward_that_does_not_trace_falls_back_to_eager_with_one_warning():
    model = _tiny("llama")
    model.model.layers[0].register_forward_pre_hook(lambda m, a: torch._dynamo.graph_break())  # not one graph
    ids = _ids()
    ref = _hf(model, ids, 8).sequences
    with pytest.warns(UserWarning, match="decodes eagerly") as rec:
        dec = Decoder(model, 64, compile=True, backend="aot_eager")
        got = dec.generate(ids, 8)
    assert len(rec) == 1 and dec.mode == "eager" and dec.fallback_reason and torch.equal(got, ref)
    with pytest.raises(DecoderError, match="cannot capture"):
        Decoder(model, 64, compile=True, backend="aot_eager", fallback=False).generate(ids, 8)


def test_sliding_window_longer_than_the_window_decodes_eagerly_and_correctly():
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**COMMON, sliding_window=16)).eval()
    ids = _ids()
    ref = _hf(model, ids, 24).sequences  # 31 positions: past the window
    with pytest.warns(UserWarning, match="sliding-window"):
        dec = Decoder(model, 64, compile=True, backend="aot_eager")
    assert dec.mode == "eager" and torch.equal(dec.generate(ids, 24), ref)
    with pytest.raises(DecoderError, match="max_seq_len <= 16"):
        Decoder(model, 64, compile=True, fallback=False)
    inside = Decoder(model, 16, compile=True, backend="aot_eager", fallback=False)  # within the window: fine
    assert torch.equal(inside.generate(ids, 9), _hf(model, ids, 9).sequences)


def test_bad_inputs_are_refused_with_the_fix():
    model = _tiny("llama")
    with pytest.raises(DecoderError, match="exceeds max_seq_len=16; build the Decoder with a larger"):
        Decoder(model, 16).generate(_ids(10), 7)
    with pytest.raises(DecoderError, match="batch_size=2"):
        Decoder(model, 64).generate(_ids(rows=2), 4)
    with pytest.raises(DecoderError, match=r"\[0, 256\)"):
        Decoder(model, 64).generate(torch.tensor([[1, 256]]), 4)
    with pytest.raises(DecoderError, match="integer tensor"):
        Decoder(model, 64).generate(torch.ones(1, 3), 4)
    with pytest.raises(DecoderError, match="max_new_tokens"):
        Decoder(model, 64).generate(_ids(), 0)
    with pytest.raises(DecoderError, match="512 positions"):
        Decoder(model, 1024)
    with pytest.raises(DecoderError, match="cuda_graph=False"):
        Decoder(model, 64, cuda_graph=True)
    with pytest.raises(DecoderError, match="Hugging Face causal LM"):
        Decoder(torch.nn.Linear(2, 2))
    bert = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(DecoderError, match="decodes causal LMs.*BertForMaskedLM is not one"):
        Decoder(bert, 16)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_ff=64, num_layers=1, num_heads=2))
    with pytest.raises(DecoderError, match="T5ForConditionalGeneration is an encoder-decoder model"):
        Decoder(t5, 16)
    with pytest.raises(ValueError, match="top_p"):
        Decoder(model, 64).generate(_ids(), 4, do_sample=True, top_p=0)
    with pytest.raises(ValueError, match="engine"):
        generate(model, byte_tokenizer(), "hi", engine="fast")


def test_weights_edited_after_enable_kernels_are_refused():
    torch.manual_seed(0)
    model = make_tiny_llama(hidden=64, inter=256).to(torch.bfloat16)
    _sparsify(model)
    K.enable_kernels(model)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(2)
    with pytest.raises(DecoderError, match="enable_kernels"):
        Decoder(model, 64).generate(_ids(), 4)
    K.enable_kernels(model)  # re-packed: fine again
    Decoder(model, 64).generate(_ids(), 4)


def test_offloaded_model_decodes_eagerly():
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = _tiny("llama")
    ids = _ids()
    ref = _hf(model, ids, 6).sequences
    add_hook_to_module(
        model.model.layers[1],
        AlignDevicesHook(execution_device="cpu", offload=True, weights_map=model.model.layers[1].state_dict()),
    )
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        dec = Decoder(model, 64, compile=True, backend="aot_eager")
    assert any("offloaded" in str(w.message) for w in rec) and dec.mode == "eager"
    assert torch.equal(dec.generate(ids, 6), ref)


# ------------------------------------------------------------------------------------- decode attention
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_decode_attention_kernel_gives_sdpas_tokens_and_runs_every_decode_step(arch):
    model = _tiny(arch).to(torch.bfloat16)  # the kernel takes fp16/bf16 (here in Triton's interpreter)
    ids = _ids()
    ref = Decoder(model, 64, attention="model").run(ids, 10, output_logits=True)
    assert A.engine.attention_of(model) == "sdpa"
    dec = Decoder(model, 64, attention="kernel")
    for _ in range(2):  # the second run re-switches for its length, as the first did
        with CountOps() as ops:
            out = dec.run(ids, 10, output_logits=True)
        assert A.engine.attention_of(model) == "sdpa"  # switched for the run only
        # one call per layer and decode step (the prompt's prefill runs SDPA): 2 layers x 9 one-token steps
        assert ops.counts.get("actsparse.decode_attention") == 2 * 9
        assert torch.equal(out.sequences, ref.sequences)
        for got, want in zip(out.logits, ref.logits):
            torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)  # bf16 rounding of the probabilities


def test_decode_attention_scope_restores_the_model_after_an_error():
    model = _tiny("llama")
    with pytest.raises(RuntimeError, match="boom"), A.engine.decode_attention_scope(model):
        assert A.engine.attention_of(model) == A.engine.ATTENTION
        raise RuntimeError("boom")
    assert A.engine.attention_of(model) == "sdpa"
    with A.engine.decode_attention_scope(model, enabled=False):
        assert A.engine.attention_of(model) == "sdpa"
    A.engine.use_decode_attention(model)  # switched by the user: a scope leaves it switched
    with A.engine.decode_attention_scope(model):
        pass
    assert A.engine.attention_of(model) == A.engine.ATTENTION
    A.engine.restore_attention(model, "sdpa")
    assert A.engine.attention_of(model) == "sdpa"


def test_decode_attention_choices_and_refusals():
    model = _tiny("llama")
    with pytest.raises(DecoderError, match="attention must be one of auto, kernel, model"):
        Decoder(model, 64, attention="flash")
    assert not Decoder(model, 64).decode_attention  # the default, auto, on the CPU: no kernel to switch to
    assert not Decoder(model, 64, attention="model").decode_attention
    assert A.engine.attention_of(model) == "sdpa"
    model.set_attn_implementation("eager")
    with pytest.raises(DecoderError, match="runs 'eager' attention.*attn_implementation='sdpa'.*attention='model'"):
        Decoder(model, 64, attention="kernel")
    assert A.engine.attention_of(model) == "eager"  # refused before any change


def test_decode_steps_give_the_kernel_a_mask_of_the_written_positions(monkeypatch):
    """Skipping needs transformers to pass the static cache's mask (not None, which would read every block)."""
    seen = []
    launch = DA._launch

    def spy(q, k, v, mask, scale):
        seen.append(None if mask is None else (tuple(mask.shape), mask.dtype, int(mask.sum())))
        return launch(q, k, v, mask, scale)

    monkeypatch.setattr(DA, "_launch", spy)
    Decoder(_tiny("llama").to(torch.bfloat16), 64, attention="kernel").run(_ids(7), 4)
    assert seen == [((1, 1, 1, 64), torch.bool, n) for n in (8, 8, 9, 9, 10, 10)]  # 2 layers x 3 steps
