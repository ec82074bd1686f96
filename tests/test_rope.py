"""fuse_rope: attention modules whose decode steps rotate, write the cache and attend in one kernel
(actsparse.kernels.decode_attention.decode_attention_rope; on the CPU in Triton's interpreter).

The kernel rotates as transformers rounds and writes the same keys and values, so a Decoder with fused modules
gives the unfused Decoder's logits bit for bit. The compiled, graph-captured step runs on the GPU
(tests/test_decoder_gpu.py).
"""

import pytest
import torch
from helpers import VOCAB, CountOps, make_tiny_llama
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.models.llama import modeling_llama

import actsparse as A
import actsparse.kernels as K
from actsparse.engine import Decoder, fuse_rope, rope_fused, unfuse_rope, use_decode_attention
from actsparse.engine import decoder as decoder_module
from actsparse.engine import norms as norms_module

pytest.importorskip("actsparse.kernels.triton_gemv", reason="triton is not installed")

ATTNS = ["model.layers.0.self_attn", "model.layers.1.self_attn"]


def _model(sparse=False):
    model = make_tiny_llama(hidden=128, inter=256).to(torch.bfloat16)  # head dim 32
    if sparse:
        g = torch.Generator().manual_seed(1)
        data = [torch.randint(0, VOCAB, (2, 16), generator=g) for _ in range(2)]
        A.sparsify_(model, A.SparsifyConfig({".*layers.*": 0.5}), data, progress=False)
        K.enable_kernels(model, backend="triton")
    return model


def _ids(n=7, rows=1, seed=0):
    return torch.randint(0, VOCAB, (rows, n), generator=torch.Generator().manual_seed(seed))


def _run(model, rope, steps=8, **kw):
    """A Decoder's run and the ops it ran (not counted for a compiled step: dynamo refuses a dispatch mode)."""
    dec = Decoder(model, 64, attention="kernel", rope=rope, **kw)
    if dec.compile:
        return dec.run(_ids(), steps, output_logits=True), {}
    with CountOps() as ops:
        out = dec.run(_ids(), steps, output_logits=True)
    return out, ops.counts


def test_the_decoder_with_rope_gives_the_logits_without_it_and_runs_one_kernel_per_layer_and_step():
    model = _model()
    plain, plain_ops = _run(model, rope=False)
    assert rope_fused(model) == []
    fused, ops = _run(model, rope=True)
    assert rope_fused(model) == ATTNS
    assert ops.get("actsparse.decode_attention_rope") == 2 * 7  # 2 layers x 7 one-token steps (prefill: SDPA)
    assert "actsparse.decode_attention" not in ops and plain_ops.get("actsparse.decode_attention") == 2 * 7
    # the kernel writes the caches: two index_copy_ per layer and step fewer (the prefill's and the Decoder's remain)
    assert plain_ops["aten.index_copy_"] - ops["aten.index_copy_"] == 2 * 2 * 7
    assert torch.equal(fused.sequences, plain.sequences)
    assert all(torch.equal(a, b) for a, b in zip(fused.logits, plain.logits))
    again, _ = _run(model, rope=False)  # rope=False restores the class forward
    assert rope_fused(model) == [] and torch.equal(again.sequences, plain.sequences)


def test_a_compiled_step_with_rope_gives_the_eager_logits_and_the_compiled_step_without_it():
    model = _model()
    eager, _ = _run(model, rope=True)
    compiled, _ = _run(model, rope=True, compile=True, cuda_graph=False, fallback=False)
    plain, _ = _run(model, rope=False, compile=True, cuda_graph=False, fallback=False)
    assert torch.equal(compiled.sequences, eager.sequences) and torch.equal(plain.sequences, eager.sequences)
    for a, b, c in zip(compiled.logits, eager.logits, plain.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)  # (the Decoder compiles with eager's bf16 rounding)


def test_hooks_keep_the_class_forward_but_transformers_output_capturing_ones():
    model = _model()
    with torch.no_grad():  # installs transformers' output-capturing hooks on the layers and attentions, for good
        model(_ids(), output_hidden_states=True)
    assert all(m._forward_hooks for m in model.model.layers)
    _, ops = _run(model, rope=True)
    assert ops.get("actsparse.decode_attention_rope") == 2 * 7
    handle = model.model.layers[1].self_attn.register_forward_hook(lambda m, i, o: None)
    _, ops = _run(model, rope=True)
    assert ops.get("actsparse.decode_attention_rope") == 7  # the hooked attention takes the class forward
    handle.remove()


def test_a_module_with_a_forward_of_its_own_is_left_alone():
    model = _model()
    attn = model.model.layers[0].self_attn
    own = attn.forward
    vars(attn)["forward"] = lambda *a, **k: own(*a, **k)  # e.g. accelerate's wrapper
    assert fuse_rope(model) == ATTNS[1:]
    unfuse_rope(model)
    assert "forward" in vars(attn)


def test_rope_with_sparse_kernels_and_fused_norms_gives_the_logits_without_it(monkeypatch):
    model = _model(sparse=True)
    # the Decoder fuses norms only for the CUDA kernel; here the Triton kernel in the interpreter stands in
    monkeypatch.setattr(decoder_module, "fuse_norms", lambda m: norms_module.fuse_norms(m, require_cuda=False))
    plain, _ = _run(model, rope=False, norms=True)
    fused, ops = _run(model, rope=True, norms=True)
    assert ops.get("actsparse.decode_attention_rope") == 2 * 7
    assert torch.equal(fused.sequences, plain.sequences)
    assert all(torch.equal(a, b) for a, b in zip(fused.logits, plain.logits))


def test_calls_the_kernel_does_not_serve_take_the_class_forward():
    model = _model()
    ids = _ids(9, rows=2, seed=3)
    with torch.no_grad():
        want = model(ids).logits
        gen = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
    assert fuse_rope(model) == ATTNS
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)  # SDPA, prefill, a batch: the class forward
        before = use_decode_attention(model)
        with CountOps() as ops:  # the decode attention, but transformers' dynamic cache: the class forward
            got = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
        A.engine.restore_attention(model, before)
    assert "actsparse.decode_attention_rope" not in ops.counts and torch.equal(got, gen)
    unfuse_rope(model)
    assert rope_fused(model) == [] and all("forward" not in vars(m) for m in model.modules())


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_qwen2_and_mistral_attentions_are_fused_and_give_the_logits_without_it(arch):
    cfg = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    cfg |= dict(num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    if arch == "qwen2":  # (biased q/k/v; its forward passes its sliding window on)
        model = Qwen2ForCausalLM(Qwen2Config(**cfg))
    else:  # (a window longer than the Decoder's cache: full static layers)
        model = MistralForCausalLM(MistralConfig(**cfg, sliding_window=4096))
    model = model.eval().to(torch.bfloat16)
    plain, _ = _run(model, rope=False)
    fused, ops = _run(model, rope=True)
    assert rope_fused(model) == ATTNS and ops.get("actsparse.decode_attention_rope") == 2 * 7
    assert torch.equal(fused.sequences, plain.sequences)
    assert all(torch.equal(a, b) for a, b in zip(fused.logits, plain.logits))


class _ScaledAttention(modeling_llama.LlamaAttention):
    """An attention whose forward is not Llama's (it scales the output): must keep its own forward."""

    def forward(self, *args, **kwargs):
        out, weights = super().forward(*args, **kwargs)
        return 2 * out, weights


def test_attentions_that_are_not_llamas_or_rotate_otherwise_are_left_alone(monkeypatch):
    model = _model()
    attn = model.model.layers[0].self_attn
    attn.__class__ = _ScaledAttention
    assert fuse_rope(model) == ATTNS[1:]
    unfuse_rope(model)
    attn.__class__ = modeling_llama.LlamaAttention

    def interleaved(q, k, cos, sin, unsqueeze_dim=1):  # GPT-J's pairing of neighbours: another rotation
        def rot(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)

        c, s = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * c + rot(q) * s, k * c + rot(k) * s

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", interleaved)
    assert fuse_rope(model) == []
    monkeypatch.undo()
    assert fuse_rope(model) == ATTNS
