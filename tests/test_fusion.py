"""Dense q/k/v and gate/up as one GEMM (actsparse.engine.fusion) on tiny random HF models (CPU, fp32)."""

import pytest
import torch
from helpers import VOCAB, make_tiny_llama

import actsparse as A
import actsparse.kernels as K
from actsparse.engine import Decoder, fuse_projections, fused_groups, unfuse_projections
from actsparse.generation import dense_view


def _ids(n=7, seed=0):
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _gemm_calls(model, ids):
    """F.linear calls during one forward, by weight shape."""
    calls = []
    orig = torch.nn.functional.linear

    def spy(x, w, b=None):
        calls.append(tuple(w.shape))
        return orig(x, w, b)

    torch.nn.functional.linear = spy
    try:
        with torch.no_grad():
            model(ids)
    finally:
        torch.nn.functional.linear = orig
    return calls


def test_fused_model_computes_the_same_logits_with_one_gemm_per_group_and_no_weight_copy():
    model = make_tiny_llama(layers=2, hidden=64, inter=128)
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
    before = _gemm_calls(model, ids)
    storage = sum(p.numel() for p in model.parameters())
    groups = fuse_projections(model)
    assert groups == fused_groups(model) and len(groups) == 4  # q/k/v and gate/up of both blocks
    attn = model.model.layers[0].self_attn
    q, k, v = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
    base = q.untyped_storage().data_ptr()
    assert k.untyped_storage().data_ptr() == base == v.untyped_storage().data_ptr()  # views of one tensor
    assert sum(p.numel() for p in model.parameters()) == storage
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    after = _gemm_calls(model, ids)
    assert len(after) == len(before) - 2 * 3  # per block: 3 -> 1 for q/k/v, 2 -> 1 for gate/up
    assert (64 + 2 * 32, 64) in after and (2 * 128, 64) in after  # the fused shapes (2 kv heads of 16)
    unfuse_projections(model)
    assert fused_groups(model) == [] and len(_gemm_calls(model, ids)) == len(before)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_unfused_weights_own_their_storage_again_so_the_model_saves(tmp_path):
    model = make_tiny_llama(layers=1, hidden=64, inter=128)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fuse_projections(model)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()
    unfuse_projections(model)
    assert attn.q_proj.weight.untyped_storage().data_ptr() != attn.v_proj.weight.untyped_storage().data_ptr()
    assert attn.q_proj.weight.untyped_storage().nbytes() == attn.q_proj.weight.numel() * 4
    model.save_pretrained(tmp_path)  # and it saves and reloads as the model it was
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    back = type(model).from_pretrained(tmp_path)
    for k, v in back.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_fusing_again_keeps_intact_groups_and_replans_changed_ones():
    model = make_tiny_llama(layers=2, hidden=64, inter=128)
    fuse_projections(model)
    attn0 = model.model.layers[0].self_attn
    group = vars(attn0.q_proj)["_fused"][0]
    ptr = attn0.q_proj.weight.data_ptr()
    assert len(fuse_projections(model)) == 4
    assert vars(attn0.q_proj)["_fused"][0] is group and attn0.q_proj.weight.data_ptr() == ptr  # kept, no copy
    # sparsify block 0's attention: its q/k/v group is no longer all plain Linear layers
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, VOCAB, (2, 16), generator=g) for _ in range(2)]
    A.sparsify_(model, A.SparsifyConfig({r"model\.layers\.0\.self_attn\.q_proj": 0.5}), calib, progress=False)
    groups = fuse_projections(model)
    assert "model.layers.0.self_attn.q_proj" not in {n for grp in groups for n in grp} and len(groups) == 3
    assert "_fused" not in vars(attn0.k_proj)  # the rest of that group runs alone again
    ids = _ids()
    with torch.no_grad():
        got = model(ids).logits
    unfuse_projections(model)
    with torch.no_grad():
        torch.testing.assert_close(got, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_replaced_weight_or_training_runs_the_member_alone():
    model = make_tiny_llama(layers=1, hidden=64, inter=128)
    fuse_projections(model)
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 3, 64)
    mlp.up_proj.weight = torch.nn.Parameter(torch.randn(128, 64))  # replaced after fusing
    with torch.no_grad():
        mlp.gate_proj(x)  # computes the fused outputs (with the old up weight) ...
        got = mlp.up_proj(x)  # ... which up_proj must not take
    torch.testing.assert_close(got, torch.nn.functional.linear(x, mlp.up_proj.weight))
    model2 = make_tiny_llama(layers=1, hidden=64, inter=128)
    fuse_projections(model2)
    out = model2(_ids()).logits.sum()  # gradients enabled: every layer alone, autograd reaches each weight
    out.backward()
    attn = model2.model.layers[0].self_attn
    assert all(p.grad is not None for p in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight))


@pytest.mark.parametrize("compile", [False, True])
def test_decoder_with_fusion_gives_hf_generate_tokens(compile):
    model = make_tiny_llama(layers=2, hidden=64, inter=128)
    ids = _ids()
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=16, do_sample=False)
    dec = Decoder(model, 64, fuse=True, compile=compile, backend="aot_eager", fallback=False)
    assert torch.equal(dec.generate(ids, 16), ref)
    assert len(fused_groups(model)) == 4
    assert not Decoder(make_tiny_llama(layers=1), 64).fuse  # off by default without the CUDA graph


def test_the_dense_view_of_a_packed_model_fuses_without_copying_or_staling_the_kernels():
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # kernels: CUDA, or the interpreter on CPU
    model = make_tiny_llama(layers=1, hidden=64, inter=256).to(dev, torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, VOCAB, (2, 16), generator=g).to(dev) for _ in range(2)]
    A.sparsify_(model, A.SparsifyConfig({".*layers.*": 0.5}), calib, progress=False)
    assert len(K.enable_kernels(model)) == 7
    with dense_view(model):  # q/k/v widths of 64 and 32: packed copies, the layers keep their own weights,
        # which fusing would move (the packed layers are checked against them); gate/up (256 wide) are views
        assert fuse_projections(model) == [("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")]
    assert K.stale_kernels(model) == []
    model = make_tiny_llama(layers=1, hidden=512, inter=512).to(dev, torch.bfloat16)  # all widths 256·k: views
    A.sparsify_(model, A.SparsifyConfig({".*layers.*": 0.5}), calib, progress=False)
    assert len(K.enable_kernels(model)) == 7
    attn = model.model.layers[0].self_attn
    ptr = attn.q_proj.weight.data_ptr()
    with dense_view(model):
        assert len(fuse_projections(model)) == 2  # the plain views: q/k/v and gate/up, in the packed memory
        q = model.model.layers[0].self_attn.q_proj
        assert q.weight.data_ptr() == ptr and not q.weight.is_contiguous()  # no copy
        ids = _ids().to(dev)
        with torch.no_grad():
            got = model(ids).logits
        unfuse_projections(model)
        with torch.no_grad():
            torch.testing.assert_close(got, model(ids).logits, rtol=2e-2, atol=2e-2)
    assert K.stale_kernels(model) == [] and attn.q_proj.weight.data_ptr() == ptr
