"""MoE expert layers: fused transformers-5 experts (Mixtral, Qwen-MoE) and old-style per-expert Linears."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import actsparse as A
from actsparse import CalibrationError, IgnoredScope, ScopeError, TargetScope, ThresholdFileError
from actsparse.eval import SparsityMonitor
from actsparse.eval.sweep import weighted_sparsity
from actsparse.io import model_fingerprint
from actsparse.moe import UnfusedExperts, UnsupportedExpertsError, fuse_experts, fused_experts, unfuse_experts
from actsparse.scope import resolve_targets

VOCAB, H, I, E, K = 100, 32, 64, 4, 2  # noqa: E741 (hidden, intermediate, experts, top-k)
EXPERTS = {TargetScope(patterns=[r".*experts\..*"]): 0.5}


def make_mixtral(seed: int = 0, experts: int = E, impl: str | None = "eager", inter: int = I, layers: int = 2):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=H,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=experts,
        num_experts_per_tok=K,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        experts_implementation=impl,
    )
    return MixtralForCausalLM(cfg).eval()


def make_qwen2_moe(seed: int = 0, moe_inter: int = 48):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2MoeConfig(
        vocab_size=VOCAB,
        hidden_size=H,
        intermediate_size=I,
        moe_intermediate_size=moe_inter,
        shared_expert_intermediate_size=40,
        num_experts=E,
        num_experts_per_tok=K,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        experts_implementation="eager",
    )
    return Qwen2MoeForCausalLM(cfg).eval()


def make_qwen3_moe(seed: int = 0):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=H,
        intermediate_size=I,
        moe_intermediate_size=96,
        num_experts=E,
        num_experts_per_tok=K,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        experts_implementation="eager",
    )
    return Qwen3MoeForCausalLM(cfg).eval()


@pytest.fixture
def mixtral():
    return make_mixtral()


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (2, 24), generator=g) for _ in range(4)]


def _snapshot(model):
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        dict(model.named_modules()),
        {k: v.clone() for k, v in model.state_dict().items()},
    )


def _assert_unmodified(model, snap, x, ref):
    structure, modules, state = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == structure
    assert all(m is modules[n] for n, m in model.named_modules())  # the very same module objects
    now = model.state_dict()
    assert list(now) == list(state) and all(torch.equal(now[k], state[k]) for k in state)
    assert torch.equal(model(x).logits, ref)


@torch.no_grad()
def routed_inputs(model, blocks: dict[str, nn.Module], route, data):
    """{block name: (block inputs [tokens, H], their experts [tokens, k])} over all of ``data``, found
    independently of actsparse: pre-hooks on the MoE blocks, routing by calling the block's own router."""
    seen = {n: [] for n in blocks}

    def hook(name, module, args):
        x = args[0].reshape(-1, args[0].shape[-1])
        seen[name].append((x, route(module, x)))

    handles = [b.register_forward_pre_hook(lambda m, a, n=n: hook(n, m, a)) for n, b in blocks.items()]
    try:
        for x in data:
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {n: (torch.cat([x for x, _ in v]), torch.cat([i for _, i in v])) for n, v in seen.items()}


def hf_route(block, x):
    return block.gate(x)[2]


def kth_abs(values: torch.Tensor, q: float) -> float:
    """The ceil(q·n)-th smallest |value|: the value whose bin the histogram quantile lands in."""
    v = values.abs().reshape(-1).float()
    return v.kthvalue(max(1, math.ceil(q * v.numel()))).values.item()


# ------------------------------------------------------------------------------------------------ unfusing


@pytest.mark.parametrize("make", [make_mixtral, lambda: make_qwen2_moe(moe_inter=32), make_qwen3_moe])
def test_unfused_forward_and_state_dict_are_exactly_the_original(make, data):
    model = make()
    x = data[0]
    ref, state, fp = model(x).logits, {k: v.clone() for k, v in model.state_dict().items()}, model_fingerprint(model)
    n_params = sum(p.numel() for p in model.parameters())
    originals = {n: model.get_submodule(n) for n in fused_experts(model)}
    assert list(originals) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]

    assert unfuse_experts(model) == list(originals)
    ex = model.model.layers[1].mlp.experts
    assert isinstance(ex, UnfusedExperts) and len(ex) == E
    i = ex.intermediate_dim
    fused = originals["model.layers.1.mlp.experts"]
    for e in range(E):  # views of the 3D storage, not copies
        assert ex[e].gate_proj.weight.data_ptr() == fused.gate_up_proj[e, :i].data_ptr()
        assert ex[e].up_proj.weight.data_ptr() == fused.gate_up_proj[e, i:].data_ptr()
        assert ex[e].down_proj.weight.data_ptr() == fused.down_proj[e].data_ptr()
        assert type(ex[e].down_proj) is nn.Linear and ex[e].down_proj.in_features == i
    assert torch.equal(model(x).logits, ref)  # bit for bit, fp32
    now = model.state_dict()
    assert list(now) == list(state) and all(torch.equal(now[k], state[k]) for k in state)
    assert sum(p.numel() for p in model.parameters()) == n_params  # nothing counted twice
    assert model_fingerprint(model) == fp

    assert fuse_experts(model) == list(originals)
    assert all(model.get_submodule(n) is m for n, m in originals.items())
    assert torch.equal(model(x).logits, ref)


@pytest.mark.parametrize("make", [lambda: make_mixtral(impl=None), lambda: make_qwen2_moe(moe_inter=40)])
def test_unfused_forward_agrees_to_rounding_otherwise(make, data):
    # against transformers' default grouped_mm experts; and with an intermediate size that is no multiple of
    # the CPU's vector width, where SiLU on the separate gate output rounds its tail elements differently
    model = make()
    ref = model(data[0]).logits
    unfuse_experts(model)
    torch.testing.assert_close(model(data[0]).logits, ref, rtol=1e-5, atol=1e-5)


def test_conversion_copy_and_load_state_dict_keep_experts_views(mixtral, data):
    x = data[0]
    other = make_mixtral()
    unfuse_experts(mixtral)
    mixtral.to(torch.float64)
    other.to(torch.float64)
    ex = mixtral.model.layers[0].mlp.experts
    assert ex.is_tied() and ex[2].down_proj.weight.dtype == torch.float64
    assert torch.equal(mixtral(x).logits, other(x).logits)

    import copy

    clone = copy.deepcopy(mixtral)
    assert clone.model.layers[0].mlp.experts.is_tied()
    assert clone.model.layers[0].mlp.experts[0].gate_proj.weight.data_ptr() != ex[0].gate_proj.weight.data_ptr()

    third = make_mixtral(seed=3).to(torch.float64)
    unfuse_experts(third)
    third.load_state_dict(other.state_dict())  # HF's fused keys into an unfused model
    assert third.model.layers[1].mlp.experts.is_tied()
    assert torch.equal(third(x).logits, other(x).logits)


def test_replaced_expert_weights_are_what_state_dict_conversion_and_fuse_give(mixtral, data):
    x = data[0]
    original = mixtral.model.layers[0].mlp.experts
    unfuse_experts(mixtral)
    ex = mixtral.model.layers[0].mlp.experts
    new = torch.randn(H, I)
    ex[1].down_proj.weight = nn.Parameter(new.clone())  # no longer a view of the fused storage
    assert not ex.is_tied()
    assert torch.equal(mixtral.state_dict()["model.layers.0.mlp.experts.down_proj"][1], new)
    ref = mixtral(x).logits
    mixtral.to(torch.float64).to(torch.float32)
    assert ex.is_tied() and torch.equal(ex[1].down_proj.weight, new)
    fuse_experts(mixtral)
    assert mixtral.model.layers[0].mlp.experts is original and torch.equal(original.down_proj[1], new)
    assert torch.equal(mixtral(x).logits, ref)


def test_sparse_gemv_kernels_on_expert_layers(data):
    from actsparse.kernels.linear import enable_kernels
    from actsparse.kernels.ops import triton_available

    if not triton_available("cpu"):
        pytest.skip("Triton (or its interpreter) is not available")
    model = make_mixtral(inter=256, layers=1).to(torch.bfloat16)  # 256 rows: the weight becomes the packed view
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    A.sparsify_activations(model, data[:2], EXPERTS, progress=False)
    x = torch.tensor([[5]])  # decode: one token, one row per routed expert
    ref = model(x).logits
    assert len(enable_kernels(model)) == E * 3 and not model.model.layers[0].mlp.experts.is_tied()
    torch.testing.assert_close(model(x).logits, ref, rtol=2e-2, atol=2e-2)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in dense.items())
    A.remove_sparsity(model)
    assert type(model.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in dense.items())


def test_unsupported_fused_layouts_are_refused_and_left_alone(data):
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    model = GptOssForCausalLM(
        GptOssConfig(
            vocab_size=VOCAB,
            hidden_size=H,
            intermediate_size=H,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            num_local_experts=E,
            num_experts_per_tok=K,
            max_position_embeddings=128,
        )
    ).eval()
    x = data[0]
    snap, ref = _snapshot(model), model(x).logits
    with pytest.raises(UnsupportedExpertsError, match="transposed.*biases|biases.*transposed"):
        unfuse_experts(model)
    with pytest.raises(ScopeError, match="GptOssExperts.*cannot split"):
        A.sparsify_activations(model, data, EXPERTS, progress=False)
    _assert_unmodified(model, snap, x, ref)
    A.sparsify_activations(model, data, {TargetScope(patterns=[r".*q_proj"]): 0.5}, progress=False)
    assert len(A.sparse_layers(model)) == 2 and type(model.model.layers[0].mlp.experts).__name__ == "GptOssExperts"


# ------------------------------------------------------------------------------------------------- scopes


def test_scopes_resolve_to_per_expert_linears(mixtral):
    unfuse_experts(mixtral)
    down = resolve_targets(mixtral, {TargetScope(patterns=[".*experts.*down_proj"]): 0.5})
    assert list(down) == [f"model.layers.{li}.mlp.experts.{e}.down_proj" for li in range(2) for e in range(E)]
    # the dense MLP recipe applies unchanged (Mixtral's router `mlp.gate` is not a Linear)
    recipe = resolve_targets(
        mixtral,
        {TargetScope(patterns=[".*up_proj.*", ".*gate_proj.*"]): 0.3, TargetScope(patterns=[".*down_proj.*"]): 0.5},
    )
    assert len(recipe) == 2 * E * 3


@pytest.mark.parametrize(
    "scope, message",
    [
        (
            TargetScope(patterns=[r".*experts\.gate_up_proj"]),
            r"matches no module.*r'\.\*experts\\\.\\d\+\\\.gate_proj'",
        ),
        (TargetScope(names=["model.layers.0.mlp.experts"]), r"only non-Linear modules \(UnfusedExperts\).*split"),
    ],
)
def test_scope_on_the_fused_weights_names_the_per_expert_pattern(mixtral, data, scope, message):
    x = data[0]
    snap, ref = _snapshot(mixtral), mixtral(x).logits
    with pytest.raises(ScopeError, match=message):
        A.sparsify_activations(mixtral, data, {scope: 0.5}, progress=False)
    _assert_unmodified(mixtral, snap, x, ref)


# ------------------------------------------------------------------------------------------- calibration


def _check_routed_calibration(model, blocks, route, data, experts_of, names):
    """Layer-0 thresholds are the quantile of |x| over exactly the routed tokens (computed here from the
    dense model), and every expert layer reaches its 50% on the calibration data, counting only routed tokens."""
    dense = routed_inputs(model, {n: b for n, b in blocks.items() if ".0." in n + "."}, route, data)
    A.sparsify_activations(model, data, {TargetScope(patterns=[names]): 0.5}, progress=False)
    sparse = A.sparse_layers(model)
    ((b0, (x, idx)),) = dense.items()
    differs = []
    for e, (gate_name, down_name, gate, up) in enumerate(experts_of(model.get_submodule(b0))):
        xe = x[(idx == e).any(-1)]
        tau = sparse[f"{b0}.experts.{e}.{gate_name}"].params.threshold
        assert tau == pytest.approx(kth_abs(xe, 0.5), rel=1e-3)
        differs.append(abs(kth_abs(x, 0.5) / tau - 1))
        xs = xe.masked_fill(xe.abs() <= tau, 0)  # the sequential input of down: gate/up already sparsified
        z = F.silu(F.linear(xs, gate.weight)) * F.linear(xs, up.weight)
        assert sparse[f"{b0}.experts.{e}.{down_name}"].params.threshold == pytest.approx(kth_abs(z, 0.5), rel=1e-3)
    assert max(differs) > 1e-2  # the all-token quantile would be another threshold: routing matters here

    routed = routed_inputs(model, blocks, route, data)  # on the sparsified model, as the monitor sees it
    with SparsityMonitor(model) as mon, torch.no_grad():
        for x in data:
            model(x)
    sparsity = mon.sparsity()
    assert set(sparsity) == set(sparse)
    for name, layer in sparse.items():
        block = next(b for b in blocks if name.startswith(b + "."))
        e = int(name[len(block) :].split(".")[2])
        n_tokens = int((routed[block][1] == e).any(-1).sum())
        assert mon.total[name] == n_tokens * layer.in_features  # only the tokens routed to this expert
        assert sparsity[name] == pytest.approx(0.5, abs=0.03), name


def _hf_experts(block):
    for ex in block.experts:
        yield "gate_proj", "down_proj", ex.gate_proj, ex.up_proj


def test_calibration_counts_only_routed_tokens(mixtral, data):
    blocks = {f"model.layers.{i}.mlp": layer.mlp for i, layer in enumerate(mixtral.model.layers)}
    _check_routed_calibration(mixtral, blocks, hf_route, data, _hf_experts, r".*experts\..*")
    assert {type(layer.mlp.experts) for layer in mixtral.model.layers} == {UnfusedExperts}


def test_expert_without_calibration_tokens_is_a_clear_error(mixtral, data):
    one_token = [torch.tensor([[7]])]  # top-2 of 4: two experts per layer see nothing
    x = data[0]
    snap, ref = _snapshot(mixtral), mixtral(x).logits
    with pytest.raises(CalibrationError, match=r"experts\.\d\..*saw no calibration tokens.*more tokens.*IgnoredScope"):
        A.sparsify_activations(mixtral, one_token, EXPERTS, progress=False)
    _assert_unmodified(mixtral, snap, x, ref)

    # the fix it names: ignore the experts that got no token (layer 0: routing known from the dense model)
    ((_, idx),) = routed_inputs(mixtral, {"b": mixtral.model.layers[0].mlp}, hf_route, one_token).values()
    unused = sorted(set(range(E)) - set(idx.flatten().tolist()))
    ignored = IgnoredScope(patterns=[rf"model\.layers\.0\.mlp\.experts\.{e}\." for e in unused])
    A.sparsify_activations(
        mixtral,
        one_token,
        {TargetScope(patterns=[r"model\.layers\.0\.mlp\.experts\..*"]): 0.5},
        ignored,
        progress=False,
    )
    assert sorted({int(n.split(".")[5]) for n in A.sparse_layers(mixtral)}) == sorted(idx.flatten().tolist())


def test_greedy_allocation_keeps_experts_its_token_subset_missed_at_their_target(data):
    # greedy measures costs on the first greedy_tokens tokens: 4 tokens reach only some of 8 experts; the
    # others (reached by the later batches) keep their target and the routed ones share the rest of the budget
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 100, (1, 4), generator=g)] + [
        torch.randint(0, 100, (2, 24), generator=g) for _ in range(4)
    ]
    model = make_mixtral(experts=8)
    A.sparsify_activations(
        model, batches, EXPERTS, method=A.methods.method_from_spec("teal", greedy_tokens=4), progress=False
    )
    targets = {n: m.target_sparsity for n, m in A.sparse_layers(model).items()}
    assert len(targets) == 2 * 8 * 3
    ((_, idx),) = routed_inputs(model, {"b": model.model.layers[0].mlp}, hf_route, batches[:1]).values()
    missed = set(range(8)) - set(idx.flatten().tolist())
    assert missed and all(
        targets[n] == 0.5 for n in targets if n.startswith("model.layers.0.") and int(n.split(".")[5]) in missed
    )
    assert any(targets[n] != 0.5 for n in targets if n.startswith("model.layers.0."))  # the others were allocated
    assert weighted_sparsity(model, targets) == pytest.approx(0.5, abs=1e-6)


def test_experts_the_first_batch_misses_are_calibrated_sequentially_like_the_others():
    # groups come from tracing the first batch; an expert it routes no token to used to be calibrated with its
    # gate/up/down in one group (down_proj fitted on inputs with gate/up still dense): order-dependent thresholds
    g = torch.Generator().manual_seed(1)
    small = torch.randint(0, 100, (1, 2), generator=g)  # reaches at most 4 of 8 experts per layer
    big = [torch.randint(0, 100, (2, 24), generator=g) for _ in range(4)]

    def thresholds(batches):
        model = make_mixtral(experts=8)
        A.sparsify_(model, A.SparsifyConfig({r".*experts\..*": 0.5}), batches, progress=False)
        return {n: float(m.act_threshold) for n, m in A.sparse_layers(model).items()}

    first, last = thresholds([small, *big]), thresholds([*big, small])
    assert first == last


def test_qwen2_moe_routed_and_shared_experts(data):
    model = make_qwen2_moe()
    x = data[0]
    ref = model(x).logits
    A.sparsify_activations(
        model,
        data,
        {TargetScope(patterns=[r".*mlp\.experts\..*"]): 0.5, TargetScope(patterns=[r".*shared_expert\..*"]): 0.3},
        progress=False,
    )
    names = list(A.sparse_layers(model))
    assert len(names) == 2 * (E * 3 + 3) and "model.layers.0.mlp.shared_expert.up_proj" in names
    assert not torch.equal(model(x).logits, ref)
    A.remove_sparsity(model)
    assert type(model.model.layers[0].mlp.experts).__name__ == "Qwen2MoeExperts"
    assert torch.equal(model(x).logits, ref)


# ------------------------------------------------------------------------------------- save, load, remove


def test_save_load_thresholds_into_a_fresh_fused_model(mixtral, data, tmp_path):
    x = data[0]
    layer1_experts = mixtral.model.layers[1].mlp.experts
    A.sparsify_activations(
        mixtral,
        data,
        {**EXPERTS, TargetScope(patterns=[r".*self_attn\.[qkv]_proj"]): 0.3},
        IgnoredScope(patterns=[r"model\.layers\.1\.mlp\..*"]),
        progress=False,
    )
    # only experts that hold sparsified layers stay unfused; layer 1's are the original module again
    assert isinstance(mixtral.model.layers[0].mlp.experts, UnfusedExperts)
    assert mixtral.model.layers[1].mlp.experts is layer1_experts
    path = A.save_thresholds(mixtral, str(tmp_path / "t.safetensors"))

    fresh = make_mixtral()
    A.load_thresholds(fresh, path)  # strict: the architecture fingerprint matches too
    assert list(A.sparse_layers(fresh)) == list(A.sparse_layers(mixtral))
    assert type(fresh.model.layers[1].mlp.experts).__name__ == "MixtralExperts"
    assert torch.equal(fresh(x).logits, mixtral(x).logits)

    bigger = make_mixtral(experts=E + 2)
    snap, ref = _snapshot(bigger), bigger(x).logits
    with pytest.raises(ThresholdFileError, match="another architecture"):
        A.load_thresholds(bigger, path)
    _assert_unmodified(bigger, snap, x, ref)


def test_save_pretrained_round_trip(mixtral, data, tmp_path):
    from transformers import AutoModelForCausalLM

    x = data[0]
    dense_state = {k: v.clone() for k, v in mixtral.state_dict().items()}
    A.sparsify_activations(mixtral, data, EXPERTS, progress=False)
    state = mixtral.state_dict()
    assert all(torch.equal(state[k], v) for k, v in dense_state.items())
    assert set(state) - set(dense_state) == {n + ".act_threshold" for n in A.sparse_layers(mixtral)}

    A.save_pretrained(mixtral, str(tmp_path / "ckpt"))
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt"))  # plain transformers: the dense model
    loaded = plain.state_dict()
    assert list(loaded) == list(dense_state) and all(torch.equal(loaded[k], v) for k, v in dense_state.items())
    back = A.from_pretrained(str(tmp_path / "ckpt"), experts_implementation="eager")
    assert torch.equal(back(x).logits, mixtral(x).logits)


def test_remove_sparsity_restores_the_fused_modules(mixtral, data):
    x = data[0]
    originals = [layer.mlp.experts for layer in mixtral.model.layers]
    snap, ref = _snapshot(mixtral), mixtral(x).logits
    A.sparsify_activations(mixtral, data, EXPERTS, progress=False)
    assert not torch.equal(mixtral(x).logits, ref)
    with pytest.raises(A.AlreadySparsifiedError, match="remove_sparsity"):
        fuse_experts(mixtral)
    A.remove_sparsity(mixtral)
    assert [layer.mlp.experts for layer in mixtral.model.layers] == originals
    _assert_unmodified(mixtral, snap, x, ref)


def test_error_during_calibration_leaves_the_model_unmodified(mixtral, data):
    x = data[0]
    snap, ref = _snapshot(mixtral), mixtral(x).logits
    # a token id outside the vocabulary: refused after the experts were unfused, before calibration
    with pytest.raises(A.DatasetError, match="vocabulary"):
        A.sparsify_activations(mixtral, data + [torch.tensor([[1, VOCAB + 5]])], EXPERTS, progress=False)
    _assert_unmodified(mixtral, snap, x, ref)


# ------------------------------------------------------------------------- old style: one Linear per expert


class OldExpert(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w2, self.w3 = (
            nn.Linear(H, I, bias=False),
            nn.Linear(I, H, bias=False),
            nn.Linear(H, I, bias=False),
        )

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class OldSparseMoeBlock(nn.Module):
    """transformers-4 Mixtral style: ``block_sparse_moe.gate`` (a Linear router) and ``experts.{e}.w1/w2/w3``."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(OldExpert() for _ in range(E))

    def route(self, x):
        weights, idx = torch.topk(F.softmax(self.gate(x), dim=-1), K, dim=-1)
        return weights / weights.sum(-1, keepdim=True), idx

    def forward(self, h):
        x = h.reshape(-1, H)
        weights, idx = self.route(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, pos = torch.where(idx == e)
            if tok.numel():
                out.index_add_(0, tok, expert(x[tok]) * weights[tok, pos, None])
        return out.view_as(h)


class OldLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(H)
        self.block_sparse_moe = OldSparseMoeBlock()

    def forward(self, h):
        return h + self.block_sparse_moe(self.norm(h))


class OldMoeLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, H)
        self.layers = nn.ModuleList(OldLayer() for _ in range(2))
        self.lm_head = nn.Linear(H, VOCAB, bias=False)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        return SimpleNamespace(logits=self.lm_head(h))


def _old_experts(block):
    for ex in block.experts:
        yield "w1", "w2", ex.w1, ex.w3


def test_old_style_per_expert_linears_work_through_the_same_api(data, tmp_path):
    model = OldMoeLM().eval()
    assert not fused_experts(model)
    blocks = {f"layers.{i}.block_sparse_moe": layer.block_sparse_moe for i, layer in enumerate(model.layers)}
    _check_routed_calibration(
        model, blocks, lambda b, x: b.route(x)[1], data, _old_experts, r".*block_sparse_moe\.experts\..*"
    )
    assert len(A.sparse_layers(model)) == 2 * E * 3
    path = A.save_thresholds(model, str(tmp_path / "t.safetensors"))
    fresh = OldMoeLM().eval()
    A.load_thresholds(fresh, path)
    assert torch.equal(fresh(data[0]).logits, model(data[0]).logits)
    with pytest.raises(CalibrationError, match=r"experts\.\d\.w\d.*IgnoredScope"):
        A.sparsify_activations(
            OldMoeLM().eval(), [torch.tensor([[7]])], {TargetScope(patterns=[r".*experts\..*"]): 0.5}, progress=False
        )
