"""fuse_norms: decoder layers whose RMSNorms run in the q/k/v and gate/up GEMVs and whose residual adds run in
o_proj's and down_proj's (CPU: Triton's interpreter).

On the CPU the op forms the norm with :func:`actsparse.kernels.reference.rms_norm` (transformers' arithmetic) and
adds the residual in torch, so fused layers give the class forward's output bit for bit; the CUDA kernel's
in-load norm and epilogue add are tested on the GPU (tests/test_cuda_gemv.py -k "norm or residual", and
tests/test_decoder_gpu.py for the Decoder).
"""

import functools
import types

import pytest
import torch
import torch.nn as nn
from helpers import VOCAB, make_tiny_llama, random_norm_gains
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, StaticCache
from transformers.utils.output_capturing import install_output_capuring_hook

import actsparse as A
import actsparse.kernels as K
from actsparse.engine import Decoder, fuse_glu, fuse_norms, norms_fused, unfuse_norms
from actsparse.engine import decoder as decoder_module
from actsparse.errors import UsageError
from actsparse.generation import dense_view
from actsparse.kernels.reference import rms_norm, sparse_gemv_reference

pytest.importorskip("actsparse.kernels.triton_gemv", reason="triton is not installed")

DT = torch.bfloat16
LAYERS = ["model.layers.0", "model.layers.1"]


class FusedCalls(TorchDispatchMode):
    """Counts ``actsparse::sparse_gemv`` launches given a norm weight / a residual (what the dispatcher sees)."""

    def __init__(self):
        super().__init__()
        self.counts = {"norm": 0, "residual": 0, "plain": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) == "actsparse.sparse_gemv":
            named = {a.name: v for a, v in zip(func._schema.arguments, args)} | (kwargs or {})
            kind = [k for k in ("norm", "residual") if named.get("norm_weight" if k == "norm" else k) is not None]
            for k in kind or ["plain"]:
                self.counts[k] += 1
        return func(*args, **(kwargs or {}))


def _model(layers=2, kernels=True, glu=True):
    model = make_tiny_llama(layers=layers, hidden=256, inter=512).to(DT)  # widths of whole 256-column blocks
    random_norm_gains(model)  # (ones would hide a norm applied twice or not at all)
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, VOCAB, (2, 16), generator=g) for _ in range(2)]
    A.sparsify_(model, A.SparsifyConfig({".*layers.*": 0.5}), data, progress=False)
    if kernels:
        K.enable_kernels(model, backend="triton")
        if glu:
            fuse_glu(model, require_cuda=False)
    return model


def _arch_model(arch):
    """A tiny sparse Qwen2 (biased q/k/v), Mistral (sliding window) or Llama with int8 weights (torchao) with
    Llama's layer shape, kernels on."""
    cfg = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=1)
    cfg |= dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**cfg))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**cfg, sliding_window=4096))
    else:
        model = make_tiny_llama(layers=1, hidden=256, inter=512)
    model = random_norm_gains(model.eval().to(DT))
    if arch == "llama-int8":
        pytest.importorskip("torchao")
        A.compress_weights(model, "int8_asym")
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, VOCAB, (2, 16), generator=g) for _ in range(2)]
    A.sparsify_(model, A.SparsifyConfig({".*layers.*": 0.5}), data, progress=False)
    K.enable_kernels(model, backend="triton")
    return model


def _rotary(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    angles = torch.randn(1, 1, model.config.hidden_size // model.config.num_attention_heads, generator=g)
    return angles.cos().to(DT), angles.sin().to(DT)


def _row(model, seed=0, rows=1):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(1, rows, model.config.hidden_size, generator=g)).to(DT)


def _decode(model, ids, steps=2):
    """Logits of a prefill and ``steps`` one-token steps on a static cache (greedy)."""
    cache = StaticCache(config=model.config, max_cache_len=32)
    n = ids.shape[1]
    out = []
    with torch.no_grad():
        logits = model(ids, cache=cache, use_cache=True).logits[:, -1]
        for i in range(steps):
            out.append(logits)
            tok = logits.argmax(-1, keepdim=True)
            logits = model(tok, cache=cache, use_cache=True, cache_position=torch.tensor([n + i])).logits[:, -1]
    return [*out, logits]


def test_fused_layers_decode_the_class_forwards_logits_bit_for_bit_with_the_norms_and_adds_in_the_gemvs():
    model = _model()
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    want = _decode(model, ids)
    assert fuse_norms(model) == []  # on the CPU no projection runs the CUDA kernel
    assert fuse_norms(model, require_cuda=False) == LAYERS == norms_fused(model)
    forwards = [vars(layer)["forward"] for layer in model.model.layers]
    assert fuse_norms(model, require_cuda=False) == LAYERS  # idempotent: the same forwards kept
    assert [vars(layer)["forward"] for layer in model.model.layers] == forwards
    with FusedCalls() as ops:
        got = _decode(model, ids)
    # 2 one-token steps x 2 layers: q/k/v and gate/up form the norm, o_proj and down_proj (gated) add the residual
    assert ops.counts == {"norm": 8, "residual": 8, "plain": 0}
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    unfuse_norms(model)
    assert norms_fused(model) == [] and "forward" not in vars(model.model.layers[0])
    assert "_residual_slot" not in vars(model.model.layers[0].self_attn.o_proj)


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "llama-int8"])
def test_qwen2_mistral_and_int8_layers_are_fused_and_decode_their_class_forwards_logits(arch):
    model = _arch_model(arch)
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    want = _decode(model, ids)
    assert fuse_norms(model, require_cuda=False) == ["model.layers.0"]
    with FusedCalls() as ops:
        got = _decode(model, ids)
    assert ops.counts == {"norm": 4, "residual": 4, "plain": 0}
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_without_glu_the_mlps_own_forward_runs_with_the_residual_added_in_down_proj():
    model = _model(glu=False)
    layer = model.model.layers[0]
    x, rotary = _row(model), _rotary(model)
    with torch.no_grad():
        want = layer(x, position_embeddings=rotary)
        assert fuse_norms(model, require_cuda=False) == LAYERS
        with FusedCalls() as ops:
            got = layer(x, position_embeddings=rotary)
    assert ops.counts == {"norm": 2, "residual": 2, "plain": 0}  # down_proj: of the product formed in torch
    assert torch.equal(got, want)


def test_prefill_batches_and_gradients_take_the_class_forward():
    model = _model(layers=1)
    fuse_norms(model, require_cuda=False)
    layer = model.model.layers[0]
    rotary = _rotary(model)
    prefill = _row(model, rows=4)
    cos, sin = (t.expand(1, 4, -1) for t in rotary)
    with torch.no_grad(), FusedCalls() as ops:
        fused = layer(prefill, position_embeddings=(cos, sin))
    assert ops.counts == {"norm": 0, "residual": 0, "plain": 0}  # several rows: the dense route, no kernel op
    with torch.no_grad():
        assert torch.equal(fused, type(layer).forward(layer, prefill, position_embeddings=(cos, sin)))
    model.requires_grad_(False)
    layer.input_layernorm.weight.requires_grad_(True)
    layer(_row(model), position_embeddings=rotary).float().sum().backward()  # the op has no backward
    assert layer.input_layernorm.weight.grad is not None


def test_hooks_keep_the_class_forward():
    model = _model()
    layers = model.model.layers
    seen = []
    handle = layers[0].input_layernorm.register_forward_hook(lambda m, i, o: seen.append(o))
    assert fuse_norms(model, require_cuda=False) == ["model.layers.1"]  # hooked at fusing time: left alone
    handle.remove()
    assert fuse_norms(model, require_cuda=False) == LAYERS
    layers[1].post_attention_layernorm.register_forward_hook(lambda m, i, o: seen.append(o))  # after fusing
    x, rotary = _row(model), _rotary(model)
    with torch.no_grad(), FusedCalls() as ops:
        got = layers[1](x, position_embeddings=rotary)
    assert ops.counts["norm"] == 0 and len(seen) == 1  # the hook saw the norm's output
    with torch.no_grad():
        assert torch.equal(got, type(layers[1]).forward(layers[1], x, position_embeddings=rotary))
    assert fuse_norms(model, require_cuda=False) == ["model.layers.0"]  # the hooked layer unfused


def test_transformers_output_capturing_hooks_leave_the_layers_fused_and_record_the_class_forwards_outputs():
    model = _model()
    ids = torch.randint(0, VOCAB, (1, 1), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # the first call asking for hidden states installs transformers' hooks, for good
        want = model(ids, output_hidden_states=True, use_cache=False)
    assert sum(len(m._forward_hooks) for m in model.model.layers.modules()) >= 2
    assert fuse_norms(model, require_cuda=False) == LAYERS
    with torch.no_grad(), FusedCalls() as ops:
        got = model(ids, output_hidden_states=True, use_cache=False)
    assert ops.counts["norm"] == 4  # q/k/v and gate/up of both layers formed their norms
    assert len(got.hidden_states) == 3 and torch.equal(got.logits, want.logits)
    assert all(torch.equal(a, b) for a, b in zip(got.hidden_states, want.hidden_states))
    # one recording the attention's output[0] (the residual added by o_proj) would see something else: unfused
    install_output_capuring_hook(model.model.layers[1].self_attn, "attn_out", 0)
    assert fuse_norms(model, require_cuda=False) == ["model.layers.0"]


class _ScaledLayer(nn.Module):
    """A decoder layer whose forward scales the attention's output: must keep its own forward."""

    def __init__(self, layer):
        super().__init__()
        self.self_attn, self.mlp = layer.self_attn, layer.mlp
        self.input_layernorm, self.post_attention_layernorm = layer.input_layernorm, layer.post_attention_layernorm

    def forward(self, hidden_states, position_embeddings=None, **kwargs):
        h, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states), position_embeddings=position_embeddings, **kwargs
        )
        h = hidden_states + 0.5 * h
        return h + self.mlp(self.post_attention_layernorm(h))


def test_only_llama_layers_with_llama_rmsnorms_and_packed_groups_are_fused():
    model = _model()
    layers = model.model.layers
    layers[0].post_attention_layernorm = nn.LayerNorm(256).to(DT)  # another norm
    assert fuse_norms(model, require_cuda=False) == ["model.layers.1"]
    layers[1] = _ScaledLayer(layers[1])  # another forward
    assert fuse_norms(model, require_cuda=False) == []
    assert fuse_norms(_model(kernels=False), require_cuda=False) == []
    dense = _model(kernels=False)
    K.enable_kernels(dense, backend="triton", fuse=False)  # every layer packed alone: no group forms the norm
    assert fuse_norms(dense, require_cuda=False) == []


def test_an_attention_that_projects_another_input_is_refused_at_the_call_and_leaves_nothing_behind():
    model = _model(layers=1)
    layer = model.model.layers[0]
    assert fuse_norms(model, require_cuda=False) == ["model.layers.0"]
    attn = layer.self_attn
    own = type(attn).forward

    def rescaled(self, hidden_states, **kwargs):  # projects a copy: the outputs left for hidden_states go unused
        return own(self, hidden_states * 1.0, **kwargs)

    vars(attn)["forward"] = types.MethodType(rescaled, attn)
    x, rotary = _row(model), _rotary(model)
    with torch.no_grad(), pytest.raises(UsageError, match="fused decoder layer.*unfuse_norms"):
        layer(x, position_embeddings=rotary)
    shared = attn.q_proj._kernel_group[0]
    assert shared.pending is None and not shared.left
    assert vars(attn.o_proj)["_residual_slot"].tensor is None

    def failing(self, hidden_states, **kwargs):  # takes q's output, then fails: nothing may be left either
        self.q_proj(hidden_states)
        raise RuntimeError("attention failed")

    vars(attn)["forward"] = types.MethodType(failing, attn)
    with torch.no_grad(), pytest.raises(RuntimeError, match="attention failed"):
        layer(x, position_embeddings=rotary)
    assert shared.pending is None and not shared.left
    assert vars(attn.o_proj)["_residual_slot"].tensor is None
    vars(attn)["forward"] = types.MethodType(rescaled, attn)
    o_in = torch.randn(1, 1, 256, generator=torch.Generator().manual_seed(9)).to(DT)
    with torch.no_grad():  # o_proj alone adds nothing (no residual left in its slot)
        assert torch.equal(attn.o_proj(o_in), K.sparse_gemv(o_in, attn.o_proj._packed)[0])
    unfuse_norms(model)
    with torch.no_grad():
        assert torch.equal(
            layer(x, position_embeddings=rotary), type(layer).forward(layer, x, position_embeddings=rotary)
        )


def test_a_projection_whose_call_stays_dense_gets_the_residual_added_in_torch():
    model = _model(layers=1)
    layer = model.model.layers[0]
    assert fuse_norms(model, require_cuda=False) == ["model.layers.0"]
    o = layer.self_attn.o_proj
    o.weight = nn.Parameter(o.weight.detach().clone(), requires_grad=False)  # replaced: eagerly it stays dense
    x, rotary = _row(model), _rotary(model)
    with torch.no_grad(), FusedCalls() as ops:
        got = layer(x, position_embeddings=rotary)
    assert ops.counts == {"norm": 2, "residual": 1, "plain": 0}  # down_proj's add in the kernel, o_proj's not
    assert vars(o)["_residual_slot"].tensor is None
    with torch.no_grad():
        assert torch.equal(got, type(layer).forward(layer, x, position_embeddings=rotary))


def test_the_decoder_fuses_norms_with_the_cuda_kernel_only_and_without_the_graph_restores_the_class_forward():
    model = _model(layers=1)
    ids = torch.randint(0, VOCAB, (1, 4), generator=torch.Generator().manual_seed(3))
    fuse_norms(model, require_cuda=False)
    dec = Decoder(model, 16)  # norms as fuse, off without the CUDA graph: the layers' own forwards
    assert not dec.norms and Decoder(model, 16, fuse=True).norms
    a = dec.run(ids, 3)
    assert norms_fused(model) == []
    fuse_norms(model, require_cuda=False)
    b = Decoder(model, 16, norms=True).run(ids, 3)  # requires the CUDA kernel: none runs on the CPU
    assert norms_fused(model) == []
    assert torch.equal(a.sequences, b.sequences)


def test_the_op_forms_the_norm_and_adds_the_residual_as_the_reference_defines_them():
    model = _model(layers=1)
    packed = model.model.layers[0].self_attn.q_proj._packed
    g = torch.Generator().manual_seed(7)
    h = (3 * torch.randn(256, generator=g)).to(DT)
    w = (1 + 0.3 * torch.randn(256, generator=g)).to(DT)
    r = torch.randn(packed.padded_out, generator=g).to(DT)
    want = sparse_gemv_reference(h, packed, norm=(w, 1e-5), residual=r)
    for reduce in ("kernel", "consumer"):
        for a, b in zip(K.sparse_gemv(h, packed, reduce=reduce, norm=(w, 1e-5), residual=r), packed.split(want)):
            assert torch.equal(a, b)
    normed = torch.cat(K.sparse_gemv(rms_norm(h, w, 1e-5), packed))
    assert torch.equal(torch.cat(K.sparse_gemv(h, packed, norm=(w, 1e-5))), normed)


def test_the_op_refuses_a_bad_norm_or_residual():
    model = _model(layers=1)
    packed = model.model.layers[0].mlp.down_proj._packed
    up = torch.randn(512).to(DT)
    w = torch.ones(512, dtype=DT)
    with pytest.raises(UsageError, match="norm and gate are two ways"):
        K.sparse_gemv(up, packed, gate=up, norm=(w, 1e-5))
    with pytest.raises(UsageError, match=r"the norm's weight must be a \[512\] torch.bfloat16"):
        K.sparse_gemv(up, packed, norm=(w.float(), 1e-5))
    with pytest.raises(UsageError, match="the norm's eps must be a finite number >= 0"):
        K.sparse_gemv(up, packed, norm=(w, float("nan")))
    with pytest.raises(UsageError, match="norm must be a \\(weight, eps\\) pair"):
        K.sparse_gemv(up, packed, norm=w)
    with pytest.raises(UsageError, match=r"residual must be a \[256\] torch.bfloat16 tensor"):
        K.sparse_gemv(up, packed, residual=torch.zeros(63, dtype=DT))


def test_the_compiled_decode_step_with_fused_norms_is_one_graph_with_the_norms_and_adds_in_its_gemvs(monkeypatch):
    """The Decoder's compiled step (fullgraph) traces the fused layers: 4 GEMVs per layer, the norms and residuals
    passed to them, and nothing else changed (the same logits as the eager fused Decoder). On the CPU the Decoder's
    own fuse_norms requires the CUDA kernel; here it is given require_cuda=False."""
    monkeypatch.setattr(decoder_module, "fuse_norms", functools.partial(fuse_norms, require_cuda=False))
    model = _model(layers=1)
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    eager = Decoder(model, 32, norms=True).run(ids, 3, output_logits=True)
    assert norms_fused(model) == ["model.layers.0"]
    graphs: list[dict] = []

    def backend(gm, example_inputs):
        gemvs = [n for n in gm.graph.nodes if "actsparse.sparse_gemv" in str(n.target)]
        schemas = [n.target.default._schema for n in gemvs]  # (dynamo's nodes call the op's packet)
        named = [{a.name: v for a, v in zip(sch.arguments, n.args)} | n.kwargs for sch, n in zip(schemas, gemvs)]
        graphs.append({k: sum(a.get(k) is not None for a in named) for k in ("norm_weight", "residual", "gate")})
        graphs[-1]["gemvs"] = len(gemvs)
        return gm.forward

    out = Decoder(model, 32, compile=True, backend=backend, fallback=False, norms=True).run(ids, 3, output_logits=True)
    # (glu follows fuse, off without the CUDA graph: down_proj takes the MLP's product, and the residual)
    assert graphs == [{"norm_weight": 2, "residual": 2, "gate": 0, "gemvs": 4}]
    assert torch.equal(out.sequences, eager.sequences)
    for a, b in zip(out.logits, eager.logits):
        assert torch.equal(a, b)


def test_positional_arguments_and_the_old_cache_name_bind_as_the_class_forward_binds_them():
    model = _model(layers=1)
    layer = model.model.layers[0]
    x, rotary = _row(model), _rotary(model)
    with torch.no_grad():
        want = type(layer).forward(layer, x, position_embeddings=rotary)
        fuse_norms(model, require_cuda=False)
        for call in (
            lambda: layer(x, None, None, None, False, rotary),  # every argument by position
            lambda: layer(hidden_states=x, past_key_values=None, position_embeddings=rotary),  # the old name
        ):
            with FusedCalls() as ops:
                assert torch.equal(call(), want)
            assert ops.counts["norm"] == 2


def test_modules_swapped_or_a_member_replaced_after_fusing_take_the_class_forward():
    model = _model(layers=1)
    layer = model.model.layers[0]
    fuse_norms(model, require_cuda=False)
    x, rotary = _row(model), _rotary(model)

    def check(expect_fused):
        with torch.no_grad(), FusedCalls() as ops:
            got = layer(x, position_embeddings=rotary)
            assert torch.equal(got, type(layer).forward(layer, x, position_embeddings=rotary))
        assert (ops.counts["norm"] > 0) == expect_fused

    with dense_view(model):  # plain Linears in the sparse layers' places (compare_generate's dense side)
        check(False)
    norm = layer.post_attention_layernorm
    layer.post_attention_layernorm = type(norm)(256, eps=1e-5).to(DT)  # another norm module: its gains are ones
    check(False)
    layer.post_attention_layernorm = norm
    check(True)
    k = layer.self_attn.k_proj
    k.weight = nn.Parameter(k.weight.detach().clone(), requires_grad=False)  # k's call would stay dense
    check(False)


def test_a_forward_wrapped_around_the_fused_one_survives_unfusing():
    """accelerate (offloading) wraps the instance forward; unfusing must not strip its wrapper."""
    model = _model(layers=1)
    layer = model.model.layers[0]
    fuse_norms(model, require_cuda=False)
    inner, calls = vars(layer)["forward"], []

    def wrapper(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    vars(layer)["forward"] = wrapper
    unfuse_norms(model)
    x, rotary = _row(model), _rotary(model)
    with torch.no_grad(), FusedCalls() as ops:
        got = layer(x, position_embeddings=rotary)
    assert vars(layer)["forward"] is wrapper and calls == [1] and ops.counts["norm"] == 0
    with torch.no_grad():
        assert torch.equal(got, type(layer).forward(layer, x, position_embeddings=rotary))
