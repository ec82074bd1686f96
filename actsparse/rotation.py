"""PCA rotations of the residual stream, folded into the weights (LaRoSA's rotated activations, SliceGPT's folding).

Magnitude thresholds drop the entries of a layer input that are small *in the basis the model happens to use*.
In the basis of the input's principal directions the energy concentrates in fewer coordinates, and the same
fraction of zeros loses far less (LaRoSA). :func:`rotate_residual` puts the residual stream of a pre-norm
decoder (Llama, Mistral, Qwen2/3, SmolLM) seen by layer ``l`` into an orthogonal basis ``Q_l`` computed from
calibration data, and folds it into the weights, so that the dense model computes the same function:

* every RMSNorm gain ``g`` moves into the layers that read the norm (``W ← W·diag(g)``, ``g ← 1``): an
  RMSNorm without a gain commutes with a rotation (``rms(Qᵀr) = rms(r)``);
* layer ``l``'s readers of the residual (q/k/v, gate/up) take ``W ← W·Q_l``, its writers (o_proj, down_proj)
  ``W ← Q_lᵀ·W`` (and their bias); the token embeddings ``E ← E·Q_0``, the output head ``W ← W·diag(g)·Q_L``;
* between layers whose bases differ, a :class:`ResidualAdapter` changes the basis of the residual stream
  (``Q_{l+1}ᵀ Q_l``, one ``[D, D]`` matmul per token, a forward hook on layer ``l``): that is the decode cost
  of per-layer bases, and :func:`adapter_weights` counts it (the sweep subtracts it from the skipped weights);
* a tied output head gets its own weight (it now differs from the embeddings by the final norm's gain).

``Q_l``'s columns are the eigenvectors of the second moment ``Σ n(r) n(r)ᵀ`` of the normalized residual
``n(r) = r / rms(r)`` at layer ``l``'s attention and MLP norm inputs (``layers_per_basis=1``, the default);
``layers_per_basis=k`` pools ``k`` consecutive layers into one basis (an adapter every ``k`` layers: ``1/k``
of the cost), ``None`` all of them (one basis, no adapters, nothing extra per token: measured no better than
no rotation on the embedded model, because the principal directions move from layer to layer). Afterwards q/k/v and
gate/up read the rotated coordinates and any sparsity method calibrates on them as usual; o_proj and
down_proj inputs (after attention, after SiLU·up) are unchanged. In float32 the dense logits change by float
rounding only; in fp16/bf16 the folded weights are rounded once more. Rotate before compressing weights or
sparsifying. The model's config records the bases' fingerprint (``config.actsparse_rotation``);
``save_thresholds`` keeps the bases themselves, and ``load_thresholds(model, path, rotate=True)`` folds them
into the original checkpoint (``save_pretrained`` cannot keep the adapters: they are no Hugging Face modules).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .data import prepare_batches
from .errors import UsageError
from .forward import call_model
from .offload import model_device
from .sparse_linear import check_not_sparsified

__all__ = [
    "rotate_residual",
    "RotationResult",
    "READS",
    "WRITES",
    "CONFIG_KEY",
    "INPUT_CONFIG_KEY",
    "basis_fingerprint",
    "rotation_of",
    "rotation_basis",
    "check_basis",
    "ResidualAdapter",
    "adapter_weights",
    "linear_of",
    "structure_of",
    "token_rows",
    "hooked_pass",
    "extra_norms",
]

CONFIG_KEY = "actsparse_rotation"  # model.config attribute: the fingerprint of the folded basis
ADAPTERS_CONFIG_KEY = "actsparse_rotation_adapters"  # the weights its residual adapters read (0: one basis)
INPUT_CONFIG_KEY = "actsparse_input_rotation"  # the same for actsparse.input_rotation's rank-r input rotations

READS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}  # fmt: skip
WRITES = ("self_attn.o_proj", "mlp.down_proj")


@dataclass
class RotationResult:
    """What :func:`rotate_residual` did: the basis (columns, by decreasing variance), the variances along
    it, the calibration tokens, and whether the output head was untied from the embeddings."""

    basis: torch.Tensor  # [L, D, D] float32: layer l's basis (columns), orthogonal
    variances: torch.Tensor | None  # [L, D] or [1, D]: eigenvalues, decreasing (None: bases given)
    tokens: int
    untied_head: bool
    fingerprint: str
    adapter_weights: int  # weights the residual adapters read per token

    def energy_in_top(self, fraction: float) -> float:
        """The mean share (over the bases) of the normalized residual's energy in the top ``fraction`` of the
        coordinates."""
        if self.variances is None:
            raise UsageError("the basis was given, not computed: its variances are unknown")
        k = max(1, round(fraction * self.variances.shape[-1]))
        return float((self.variances[:, :k].sum(-1) / self.variances.sum(-1)).mean())


def basis_fingerprint(basis: torch.Tensor) -> str:
    """A short hash of the basis as saved (float32 bytes)."""
    return hashlib.sha256(basis.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def rotation_of(model: nn.Module) -> str | None:
    """The fingerprint of the basis folded into ``model`` (from its config), or None when not rotated. A config
    that names residual adapters on a model without them (Hugging Face's own ``save_pretrained`` of a per-layer
    rotation: folded weights, the adapters dropped on reload) is an error: that model computes another function."""
    cfg = getattr(model, "config", None)
    fp = getattr(cfg, CONFIG_KEY, None)
    if not isinstance(fp, str):
        return None
    adapters = getattr(cfg, ADAPTERS_CONFIG_KEY, None)
    if isinstance(adapters, int) and adapters > 0 and adapter_weights(model) == 0:
        raise UsageError(
            f"the model's config names a per-layer residual rotation ({CONFIG_KEY} = {fp}, {adapters} adapter "
            "weights) but it holds no adapters: a checkpoint saved without them (they are no Hugging Face modules) "
            "computes another function; load the original checkpoint and the thresholds file with "
            "actsparse.load_thresholds(model, path, rotate=True)"
        )
    return fp


def rotation_basis(model: nn.Module) -> torch.Tensor | None:
    """The basis itself, when this model object was rotated in this process (a reloaded checkpoint has only
    the fingerprint)."""
    basis = getattr(model, "_actsparse_rotation_basis", None)
    return basis if isinstance(basis, torch.Tensor) else None


def check_basis(basis: Any, dim: int | None = None) -> str | None:
    """What is wrong with ``basis`` as a rotation (square float, finite, orthogonal, ``dim`` wide), or None."""
    if not isinstance(basis, torch.Tensor) or basis.dim() != 2 or basis.shape[0] != basis.shape[1]:
        return f"expected a square [D, D] tensor, got {tuple(getattr(basis, 'shape', ()))}"
    if dim is not None and basis.shape[0] != dim:
        return f"is {basis.shape[0]} wide, the model's residual stream {dim}"
    if not basis.is_floating_point() or not torch.isfinite(basis).all():
        return "expected finite floating-point values"
    q = basis.double()
    err = float((q.T @ q - torch.eye(q.shape[0], dtype=q.dtype, device=q.device)).abs().max())
    if err > 1e-4:
        return f"is not orthogonal (max |QᵀQ - I| = {err:.2g})"
    return None


# ------------------------------------------------------------------------------------------ checks
def _rms_eps(norm: nn.Module, where: str) -> float:
    """The norm's epsilon after checking, numerically, that it computes ``weight · x / sqrt(mean(x²) + eps)``."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    weight = getattr(norm, "weight", None)
    if not isinstance(eps, float) or not isinstance(weight, torch.Tensor) or getattr(norm, "bias", None) is not None:
        raise UsageError(
            f"{where} ({type(norm).__name__}) is not an RMSNorm with a gain and an epsilon: rotate_residual "
            "supports pre-norm decoders whose norms compute weight * x / rms(x) (Llama, Mistral, Qwen2/3)"
        )
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(2, weight.numel(), generator=g)).to(weight.device, weight.dtype)
    with torch.no_grad():
        got = norm(x).float()
        want = weight.float() * x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    tol = 1e-4 if weight.dtype == torch.float32 else 3e-2
    if not torch.allclose(got, want, rtol=tol, atol=tol):
        raise UsageError(
            f"{where} ({type(norm).__name__}) does not compute weight * x / rms(x) (e.g. Gemma's (1 + weight)): "
            "its gain cannot be folded, so the residual stream cannot be rotated"
        )
    return eps


def linear_of(root: nn.Module, path: str, where: str) -> nn.Linear:
    """The plain ``nn.Linear`` at ``root.<path>`` with floating-point weights in memory (what a rotation can
    fold into), else a UsageError naming ``where``."""
    m: Any = root
    for part in path.split("."):
        m = getattr(m, part, None)
    if not isinstance(m, nn.Linear):
        raise UsageError(
            f"{where}.{path} is {'missing' if m is None else type(m).__name__}: rotations need plain "
            "nn.Linear q/k/v/o and gate/up/down projections (dense MLPs, no fused or MoE layers)"
        )
    w = m.weight
    if type(w.data) is not torch.Tensor or not w.is_floating_point() or w.device.type == "meta":
        raise UsageError(
            f"{where}.{path} has {'offloaded' if w.device.type == 'meta' else 'compressed'} weights: rotate "
            "a model with plain floating-point weights in memory, before compress_weights"
        )
    return m


def structure_of(model: nn.Module) -> tuple[nn.Module, list[nn.Module], nn.Embedding, nn.Linear]:
    """``(base, decoder layers, input embeddings, output head)`` of a Hugging Face causal LM, else a UsageError."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers = getattr(base, "layers", None)
    hf = cast(Any, model)  # a Hugging Face PreTrainedModel, checked below
    emb = hf.get_input_embeddings() if hasattr(hf, "get_input_embeddings") else None
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if not isinstance(layers, nn.ModuleList) or not isinstance(emb, nn.Embedding) or not isinstance(head, nn.Linear):
        raise UsageError(
            f"{type(model).__name__} is not a decoder the rotations know: it needs <base>.layers (a ModuleList "
            "of decoder layers), input embeddings and a linear output head (a Hugging Face causal LM)"
        )
    final = getattr(base, "norm", None)
    if final is None:
        raise UsageError(f"{type(model).__name__} has no final norm <base>.norm to fold into the output head")
    return cast(nn.Module, base), list(layers), emb, head


def _check(model: nn.Module) -> tuple[nn.Module, list[nn.Module], nn.Embedding, nn.Linear]:
    base, layers, emb, head = structure_of(model)
    _rms_eps(cast(nn.Module, base.norm), "the final norm")
    for i, layer in enumerate(layers):
        where = f"layer {i}"
        for norm_name, readers in READS.items():
            norm = getattr(layer, norm_name, None)
            if norm is None:
                raise UsageError(f"{where} has no {norm_name}: rotate_residual needs pre-norm decoder layers")
            _rms_eps(norm, f"{where}.{norm_name}")
            for r in readers:
                linear_of(layer, r, where)
        for w in WRITES:
            linear_of(layer, w, where)
        extra = extra_norms(layer)
        if extra:  # e.g. Gemma2's post-feedforward norms: they act on what the layer writes to the residual
            raise UsageError(
                f"{where} has more norms than input_layernorm and post_attention_layernorm ({', '.join(extra)}): "
                "norms on the residual branches do not commute with a rotation"
            )
    linear_of(model, _head_path(model, head), "the model")
    return base, layers, emb, head


def extra_norms(layer: nn.Module) -> list[str]:
    """The decoder layer's norm children other than the two of :data:`READS` (Gemma2's pre/post-feedforward
    norms, say): where they exist, the two norms do not simply feed q/k/v and gate/up."""
    return [n for n, _ in layer.named_children() if "norm" in n.lower() and n not in READS]


def _head_path(model: nn.Module, head: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is head)


# --------------------------------------------------------------------------------------- statistics
@torch.no_grad()
def _second_moments(model: nn.Module, layers: list[nn.Module], batches, progress: bool) -> tuple[torch.Tensor, int]:
    """``[L, D, D]``: per layer, ``Σ n(r) n(r)ᵀ`` (float64) over the real tokens at its attention and MLP norm
    inputs; and the token count."""
    d = cast(Any, layers[0]).input_layernorm.weight.numel()
    H = torch.zeros(len(layers), d, d, dtype=torch.float64)
    state: dict[str, Any] = {"mask": None}

    def hook(i: int, eps: float):
        def h(module: nn.Module, args: tuple) -> None:
            r = token_rows(args[0].float(), state["mask"])
            n = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps)
            H[i] += (n.T @ n).double().cpu()

        return h

    eps = [[_rms_eps(getattr(layer, n), n) for n in READS] for layer in layers]  # (raises before any hook)
    handles = [
        getattr(layer, norm_name).register_forward_pre_hook(hook(i, eps[i][j]))
        for i, layer in enumerate(layers)
        for j, norm_name in enumerate(READS)
    ]
    return H, hooked_pass(model, batches, state, handles, "rotation statistics", progress)


def token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x`` ``[..., D]`` as rows ``[n, D]``: only the real tokens where ``mask`` (the batch's token mask) fits."""
    return x[mask.to(x.device)] if mask is not None and mask.shape == x.shape[:-1] else x.reshape(-1, x.shape[-1])


def hooked_pass(model: nn.Module, batches, state: dict[str, Any], handles: list, desc: str, progress: bool) -> int:
    """Run ``model`` over ``batches`` (``state["mask"]``: the current batch's token mask, for the hooks), then
    remove ``handles`` (also on error); returns the real tokens seen."""
    tokens = 0
    try:
        device = model_device(model)
        for b in tqdm(batches, desc=desc, disable=not progress):
            state["mask"] = b.token_mask
            call_model(model, b, device)
            tokens += b.n_tokens
    finally:
        for h in handles:
            h.remove()
    return tokens


# ---------------------------------------------------------------------------------------------- fold
class ResidualAdapter(nn.Module):
    """The change of basis of the residual stream between two layers rotated differently: ``h ← h·Aᵀ`` with
    ``A = Q_{l+1}ᵀ Q_l`` (a forward hook on layer ``l`` applies it to the layer's output). One ``[D, D]``
    matmul per token: its weights are read at every step and count against the skipped ones."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(h, self.weight)


ADAPTER = "actsparse_residual_adapter"  # the adapter's name as a child of its decoder layer


def _apply_adapter(layer: nn.Module, args: tuple, output: Any) -> Any:
    adapter = getattr(layer, ADAPTER)
    if isinstance(output, tuple):
        return (adapter(output[0]), *output[1:])
    return adapter(output)


def adapter_weights(model: nn.Module) -> int:
    """The weights the residual adapters of a rotated model read per token (0 for one shared basis)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, ResidualAdapter))


def _set(p: nn.Parameter | torch.Tensor, value: torch.Tensor) -> None:
    p.data = value.to(p.dtype).contiguous()


@torch.no_grad()
def _fold(
    model: nn.Module, base: nn.Module, layers: list[nn.Module], emb: nn.Embedding, head: nn.Linear, qs: torch.Tensor
) -> bool:
    """Fold the bases ``qs`` ``[L, D, D]`` (float64) into the weights; adapters where consecutive ones differ."""

    def on(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return q.to(t.device)

    def read(lin: nn.Linear, gain: torch.Tensor, q: torch.Tensor) -> None:
        w = lin.weight.double() * gain.double().to(lin.weight.device)[None, :]
        _set(lin.weight, w @ on(q, w))

    for i, layer in enumerate(layers):
        q = qs[i]
        for norm_name, readers in READS.items():
            norm = getattr(layer, norm_name)
            for r in readers:
                read(cast(nn.Linear, layer.get_submodule(r)), norm.weight, q)
            norm.weight.fill_(1.0)
        for w_name in WRITES:
            lin = cast(nn.Linear, layer.get_submodule(w_name))
            _set(lin.weight, on(q, lin.weight).T @ lin.weight.double())
            if lin.bias is not None:
                _set(lin.bias, on(q, lin.bias).T @ lin.bias.double())
        if i + 1 < len(layers) and not torch.equal(qs[i + 1], q):
            w = cast(nn.Linear, layer.get_submodule(WRITES[0])).weight
            layer.add_module(ADAPTER, ResidualAdapter((qs[i + 1].T @ q).to(w.device, w.dtype)))
            layer.register_forward_hook(_apply_adapter)
    untied = head.weight is emb.weight
    if untied:  # the head will differ from the embeddings by the final gain: give it its own weight
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
        for cfg in {id(c): c for c in _configs(model)}.values():
            cfg.tie_word_embeddings = False
    final = cast(Any, base).norm
    read(head, final.weight, qs[-1])
    final.weight.fill_(1.0)
    _set(emb.weight, emb.weight.double() @ on(qs[0], emb.weight))
    return untied


def _configs(model: nn.Module) -> list[Any]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return []
    out = [cfg]
    text = getattr(cfg, "get_text_config", None)
    if callable(text):
        out.append(text())
    return out


def rotate_residual(
    model: nn.Module,
    data: Iterable[Any] | None = None,
    *,
    layers_per_basis: int | None = 1,
    basis: torch.Tensor | None = None,
    progress: bool = True,
) -> RotationResult:
    """Rotate ``model``'s residual stream into the principal basis of its normalized activations, in place.

    ``data``: calibration batches as for :func:`~actsparse.sparsify_` (token-id tensors, dicts with
    ``input_ids``/``attention_mask``); or ``basis``: saved bases ``[L, D, D]`` (or one ``[D, D]`` for every
    layer) to fold as they are. ``layers_per_basis``: 1 (default) = one basis per decoder layer, from that
    layer's own inputs, with a residual adapter between layers; ``k``: one per ``k`` consecutive layers;
    ``None``: one for all layers, no adapter (free, but measured no better than no rotation, see the README). The dense model computes the same function
    afterwards; sparsify it next with any method. Everything is checked before the first weight changes: an
    unsupported, sparsified or already rotated model, or compressed weights, raise and leave it unmodified.
    """
    if (data is None) == (basis is None):
        raise UsageError("rotate_residual takes calibration data or saved bases (basis=...), one of them")
    check_not_sparsified(model, "rotating the residual stream")
    if rotation_of(model) is not None or getattr(getattr(model, "config", None), INPUT_CONFIG_KEY, None):
        raise UsageError(
            "the model is already rotated (rotate_residual or rotate_inputs): rotate a fresh copy of the model"
        )
    if layers_per_basis is not None and (
        isinstance(layers_per_basis, bool) or not isinstance(layers_per_basis, int) or layers_per_basis < 1
    ):
        raise UsageError(f"layers_per_basis must be an int >= 1 or None (one basis), got {layers_per_basis!r}")
    base, layers, emb, head = _check(model)
    d, n_layers = emb.weight.shape[1], len(layers)
    variances, tokens = None, 0
    if basis is not None:
        if not isinstance(basis, torch.Tensor) or basis.dim() not in (2, 3):
            raise UsageError(f"basis: expected [L, D, D] or [D, D], got {tuple(getattr(basis, 'shape', ()))}")
        given = basis.detach().double()  # where it is: folding on the weights' GPU stays there
        if given.dim() == 3 and given.shape[0] != n_layers:
            raise UsageError(f"basis holds {given.shape[0]} bases for {n_layers} layers")
        problem = next((p for q in (given if given.dim() == 3 else [given]) if (p := check_basis(q, d))), None)
        if problem:
            raise UsageError(f"basis {problem}")
        qs = given.expand(n_layers, d, d).clone() if given.dim() == 2 else given
    else:
        batches = prepare_batches(cast(Iterable[Any], data))
        H, tokens = _second_moments(model, layers, batches, progress)
        if tokens == 0:
            raise UsageError("rotate_residual got no calibration tokens")
        k = n_layers if layers_per_basis is None else layers_per_basis
        groups = torch.arange(n_layers) // k  # layer -> its basis
        H = torch.stack([H[groups == g].sum(0) for g in range(int(groups.max()) + 1)]) / (2 * tokens)
        if not torch.isfinite(H).all():
            raise UsageError("the calibration activations are not finite: cannot compute a rotation")
        eig, vectors = torch.linalg.eigh(H)
        eig, vectors = eig.flip(-1), vectors.flip(-1)  # decreasing variance
        qs = vectors[groups].float().double()  # the float32 basis that is saved: a reload folds the same values
        variances = eig.float().clamp_min(0)
    untied = _fold(model, base, layers, emb, head, qs)
    saved = qs.float().cpu().contiguous()
    fingerprint = basis_fingerprint(saved)
    for cfg in {id(c): c for c in _configs(model)}.values():
        setattr(cfg, CONFIG_KEY, fingerprint)
        setattr(cfg, ADAPTERS_CONFIG_KEY, adapter_weights(model))
    cast(Any, model)._actsparse_rotation_basis = saved  # for save_thresholds
    return RotationResult(saved, variances, tokens, untied, fingerprint, adapter_weights(model))
