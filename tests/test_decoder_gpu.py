"""The Decoder's CUDA-graph path on a GPU: compiled + captured decode against the eager computation.

Runs only where CUDA is available (the GPU machine: ``python -m pytest -q tests/test_decoder_gpu.py``);
the CPU suite covers the same code eagerly and compiled without graphs (tests/test_decoder.py).
"""

import pytest
import torch
from helpers import VOCAB, byte_tokenizer, make_tiny_llama

import actsparse as A
import actsparse.kernels as K
from actsparse.engine import Decoder, fused_groups, norms_fused, rope_fused
from actsparse.generation import compare_generate, generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def _model(dtype, sparsity=None, kernels=False):
    torch.manual_seed(0)
    model = make_tiny_llama(hidden=256, inter=512, layers=2).to("cuda", dtype)
    if sparsity is not None:
        g = torch.Generator().manual_seed(1)
        data = [torch.randint(0, VOCAB, (2, 32), generator=g).cuda() for _ in range(4)]
        A.sparsify_(model, A.SparsifyConfig({".*layers.*": sparsity}), data, progress=False)
    if kernels:
        assert len(K.enable_kernels(model)) == 14
    return model


def _ids(n=9, seed=0):
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed)).cuda()


def test_graph_decoder_equals_hf_generate_fp32():
    model = _model(torch.float32)
    ids = _ids()
    ref = model.generate(ids, max_new_tokens=32, do_sample=False)
    dec = Decoder(model, 64, fallback=False)
    assert dec.mode == "graph" and torch.equal(dec.generate(ids, 32), ref)


def test_a_recapture_after_a_full_length_run_rewinds_its_warm_up_steps():
    # the capture's warm-up steps used to write the output and cache positions the last run reached: after a
    # run to max_seq_len, past their ends (an out-of-bounds index_copy_ on the device)
    model = _model(torch.float32)
    ids = _ids(4)
    dec = Decoder(model, 12, fallback=False)
    ref = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(dec.generate(ids, 8, eos_token_id=[]), ref)  # 4 + 8 = max_seq_len
    handle = model.model.layers[0].register_forward_hook(lambda *a: None)  # a structural change: recapture
    assert torch.equal(dec.generate(ids, 8, eos_token_id=[]), ref)
    torch.cuda.synchronize()
    assert dec.mode == "graph" and dec.fallback_reason is None
    handle.remove()


def test_graph_decoder_fuses_dense_projections_and_keeps_the_tokens():
    model = _model(torch.bfloat16)
    ids = _ids()
    unfused = Decoder(model, 64, compile=False, cuda_graph=False).run(ids, 32, output_logits=True)
    dec = Decoder(model, 64, fallback=False)  # graph mode: fused q/k/v and gate/up by default
    graph = dec.run(ids, 32, output_logits=True)
    assert dec.fuse and len(fused_groups(model)) == 4
    fused_eager = Decoder(model, 64, compile=False, cuda_graph=False).run(ids, 32, output_logits=True)
    torch.testing.assert_close(graph.logits[1], fused_eager.logits[1], rtol=0, atol=0)  # same GEMMs, same bits
    torch.testing.assert_close(graph.logits[0], unfused.logits[0], rtol=2e-2, atol=2e-2)  # fused ≈ separate
    assert torch.equal(graph.sequences, fused_eager.sequences)


def test_graph_decoder_with_kernels_equals_the_eager_decoder():
    model = _model(torch.bfloat16, 0.5, kernels=True)
    ids = _ids()
    eager = Decoder(model, 64, compile=False, cuda_graph=False).run(ids, 32, output_logits=True)
    graph = Decoder(model, 64, fallback=False).run(ids, 32, output_logits=True)
    assert graph.mode == "graph" and eager.mode == "eager"
    # the compiled step rounds as eager does and the kernel is the same op: the same logits, hence the same tokens
    torch.testing.assert_close(graph.logits[1], eager.logits[1], rtol=0, atol=0)
    same = next(
        (i for i, (a, b) in enumerate(zip(graph.sequences[0].tolist(), eager.sequences[0].tolist())) if a != b), None
    )
    assert same is None, f"first difference at position {same}"


def test_graph_decoder_with_fused_norms_equals_the_eager_decoder_with_them():
    model = _model(torch.bfloat16, 0.5, kernels=True)
    ids = _ids()
    # the eager step fuses the RMSNorms into the GEMVs as the graph's does: the same kernels, the same sums
    eager = Decoder(model, 64, compile=False, cuda_graph=False, norms=True).run(ids, 32, output_logits=True)
    graph = Decoder(model, 64, fallback=False, norms=True).run(ids, 32, output_logits=True)
    assert graph.mode == "graph" and norms_fused(model) == ["model.layers.0", "model.layers.1"]
    torch.testing.assert_close(graph.logits[1], eager.logits[1], rtol=0, atol=0)
    assert torch.equal(graph.sequences, eager.sequences)


def test_graph_decoder_with_fused_rope_equals_the_eager_decoder_with_it_and_the_tokens_without_it():
    model = _model(torch.bfloat16, 0.5, kernels=True)
    ids = _ids()
    eager = Decoder(model, 512, compile=False, cuda_graph=False, rope=True).run(ids, 32, output_logits=True)
    graph = Decoder(model, 512, fallback=False, rope=True).run(ids, 32, output_logits=True)
    assert graph.mode == "graph" and rope_fused(model) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    torch.testing.assert_close(graph.logits[1], eager.logits[1], rtol=0, atol=0)
    assert torch.equal(graph.sequences, eager.sequences)
    plain = Decoder(model, 512, fallback=False).run(ids, 32, output_logits=True)  # rope off: the rotary kernels
    assert rope_fused(model) == [] and torch.equal(plain.sequences, graph.sequences)


def test_graph_sampling_equals_the_eager_loop_and_streams():
    model = _model(torch.float32, 0.4)
    tok = byte_tokenizer()
    kw = dict(
        max_new_tokens=24, do_sample=True, temperature=0.8, top_p=0.9, seed=5, stop_at_eos=False, measure_sparsity=False
    )
    chunks: list[str] = []
    graph = generate(model, tok, "hello", engine="graph", stream=chunks.append, **kw)
    loop = generate(model, tok, "hello", engine="eager", **kw)
    assert graph.engine == "graph" and graph.token_ids == loop.token_ids and "".join(chunks) == graph.text


def test_compare_runs_both_through_one_graph_decoder():
    model = _model(torch.bfloat16, 0.5, kernels=True)
    c = compare_generate(model, byte_tokenizer(), "hello", max_new_tokens=16, engine="graph", stop_at_eos=False)
    assert c.dense.engine == c.sparse.engine == "graph"
    assert c.dense.decode_tokens_per_s > 0 and c.sparse.decode_tokens_per_s > 0
    ids = _ids()
    dec = Decoder(model, 64, fallback=False)
    before = dec.generate(ids, 8)
    with torch.no_grad():
        for m in A.sparse_layers(model).values():
            m.act_threshold.fill_(float("inf"))  # read live by the captured graph: no recapture needed
    after = dec.generate(ids, 8)
    assert not torch.equal(after, before)
    assert torch.equal(after, Decoder(model, 64, compile=False, cuda_graph=False).generate(ids, 8))


def test_graph_decoder_with_decode_attention_keeps_sdpas_tokens():
    model = _model(torch.bfloat16, 0.5, kernels=True)
    ids = _ids()
    ref = Decoder(model, 512, attention="model", fallback=False).run(ids, 32, output_logits=True)
    assert A.engine.attention_of(model) == "sdpa"
    dec = Decoder(model, 512, attention="auto", fallback=False)  # the kernel on CUDA
    assert dec.decode_attention and dec.mode == "graph"
    for _ in range(2):  # the second run replays the graph captured in the first, switched again for its length
        got = dec.run(ids, 32, output_logits=True)
        assert A.engine.attention_of(model) == "sdpa"
        assert torch.equal(got.sequences, ref.sequences)
        for a, b in zip(got.logits, ref.logits):
            torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2)
