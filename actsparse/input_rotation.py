"""Online input rotations of rank r (LaRoSA's per-layer rotations, at a fraction of their decode cost).

LaRoSA rotates each projection input into the principal basis of its calibration activations before the
threshold test; a full ``[D, D]`` rotation costs as many bytes per token as a square projection, so at equal
bytes read it loses on small models (README, "Rotating the residual stream first"). Most of the gain comes
from the few directions that hold most of the energy: :func:`rotate_inputs` uses, per decoder layer and per
norm (the input of q/k/v, the input of gate/up), the orthogonal basis ``Q = I - Y·T·Yᵀ`` whose first ``rank``
columns are the top principal directions of that norm's output — the complete QR of those ``rank`` vectors, a
product of ``rank`` Householder reflections in compact-WY form (``Y`` ``[D, r]``, ``T`` ``[r, r]`` upper
triangular). The rest of the basis spans the remaining directions.

* the norm's output ``x`` becomes ``z = Qᵀx`` (per token row ``x - ((x·Y)·T)·Yᵀ``; an :class:`InputRotation` child of the
  norm, applied by a forward hook): two skinny products per token, ``2·D·r`` weights read;
* its readers take ``W ← W·Q``, so ``W·Q·Qᵀx = W·x``: the dense model computes the same function (float
  rounding only), and any sparsity method then calibrates on ``z``;
* :func:`input_rotation_weights` counts what the rotations read per token (float32, in weights of the
  readers' size); the sweep subtracts it from the skipped weights, so comparisons stay at equal bytes read.

Measured on the embedded model (``tools/rotation_sim.py --sparsity 0.5 --modes plain,layer2g,layer2g:16,
layer2g:64,layer2g:128``, dense-calibrated uniform thresholds, nothing charged): no rotation +71.9%, full
per-input rotations +23.7%, rank 16 +47.4%, rank 64 +31.9%, rank 128 +32.3%.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn as nn

from .data import prepare_batches
from .errors import UsageError
from .rotation import (
    INPUT_CONFIG_KEY,
    READS,
    extra_norms,
    hooked_pass,
    linear_of,
    rotation_of,
    structure_of,
    token_rows,
)
from .sparse_linear import check_not_sparsified

__all__ = [
    "rotate_inputs",
    "InputRotation",
    "InputRotationResult",
    "input_rotation_weights",
    "input_rotation_of",
    "compact_wy",
    "check_factors",
    "input_rotation_factors",
    "factors_fingerprint",
    "INPUT_CONFIG_KEY",
    "DEFAULT_RANK",
]

CHILD = "actsparse_input_rotation"  # the InputRotation's name as a child of its norm
DEFAULT_RANK = 64


class InputRotation(nn.Module):
    """``z = Qᵀx`` for ``Q = I - Y·T·Yᵀ`` (compact-WY Householder), in float32, returned in ``x``'s dtype.

    Computed as ``x - M·(Yᵀx)`` with ``M = Y·Tᵀ`` (formed once, float64 then float32): two ``[D, r]`` matrices
    read per token. For one token (decode) as two reductions that a compiler fuses into a few kernels, instead of
    matrix products launched one by one (what made the rotations launch-bound on the GPU)."""

    reflectors: torch.Tensor  # Y [D, r]
    factor: torch.Tensor  # T [r, r]
    back: torch.Tensor  # M = Y·Tᵀ [D, r] (derived, not saved)

    def __init__(self, y: torch.Tensor, t: torch.Tensor):
        super().__init__()
        self.register_buffer("reflectors", y.float().contiguous())
        self.register_buffer("factor", t.float().contiguous())
        self.register_buffer("back", self._back(), persistent=False)
        # M is derived: a load_state_dict of other Y and T must form it again (it is not in the state dict)
        self.register_load_state_dict_post_hook(InputRotation._reform_back)

    def _back(self) -> torch.Tensor:
        return (self.reflectors.double() @ self.factor.double().T).float().contiguous()

    @staticmethod
    def _reform_back(module: nn.Module, incompatible_keys: Any) -> None:
        assert isinstance(module, InputRotation)
        module.back = module._back().to(module.reflectors.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if xf.numel() == xf.shape[-1]:  # one token: u = Yᵀx and x - M·u as reductions
            u = (xf.unsqueeze(-1) * self.reflectors).sum(-2)
            z = xf - (u.unsqueeze(-2) * self.back).sum(-1)
        else:  # rows: xᵀQ = xᵀ - (xᵀY)·(T·Yᵀ) = xᵀ - (xᵀY)·Mᵀ
            z = xf - (xf @ self.reflectors) @ self.back.T
        return z.to(x.dtype)

    @property
    def values_read(self) -> int:
        """Float32 values read per token: ``Y`` and ``M``, ``2·D·r``."""
        return self.reflectors.numel() + self.back.numel()

    def _apply(self, fn, recurse=True):  # model.half() must not round Y, T and M: only their device follows
        saved = {name: self._buffers[name] for name in ("reflectors", "factor", "back")}
        super()._apply(fn, recurse)
        for name, old in saved.items():
            new = self._buffers[name]
            if old is not None and new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self


def _apply_rotation(norm: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return getattr(norm, CHILD)(output)


def compact_wy(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Y, T)`` with ``Q = I - Y·T·Yᵀ`` orthogonal and ``Q[:, :r] = v·diag(±1)`` for orthonormal columns
    ``v`` ``[D, r]`` (float64): LAPACK's Householder QR of ``v``, its reflectors in compact-WY form."""
    d, r = v.shape
    a, tau = torch.geqrf(v.double())
    y = torch.tril(a, -1) + torch.eye(d, r, dtype=torch.float64, device=v.device)
    t = torch.zeros(r, r, dtype=torch.float64, device=v.device)
    for j in range(r):  # LAPACK larft, forward and columnwise: H_1 ... H_r = I - Y T Yᵀ
        t[j, j] = tau[j]
        if j:
            t[:j, j] = -tau[j] * (t[:j, :j] @ (y[:, :j].T @ y[:, j]))
    return y, t


def input_rotation_weights(model: nn.Module) -> int:
    """What the input rotations of ``model`` read per token, in weights of its readers' size (float32 ``Y`` and
    ``T`` count twice against bf16 weights): what comparisons at equal bytes subtract; 0 without any."""
    total = 0
    for layer, norm, readers in _norm_pairs(model):
        rot = getattr(norm, CHILD, None)
        if isinstance(rot, InputRotation):
            w = getattr(layer.get_submodule(readers[0]), "weight", None)
            size = w.element_size() if isinstance(w, torch.Tensor) and type(w.data) is torch.Tensor else 1
            total += rot.values_read * rot.reflectors.element_size() // max(size, 1)
    return total


def input_rotation_of(model: nn.Module) -> str | None:
    """The fingerprint of the input rotations folded into ``model`` (from its config), or None. A config that
    names them on a model without them (a plain ``save_pretrained`` checkpoint: folded weights, no hooks) is
    an error: that model computes another function."""
    fp = getattr(getattr(model, "config", None), INPUT_CONFIG_KEY, None)
    if not isinstance(fp, str):
        return None
    if not any(isinstance(m, InputRotation) for m in model.modules()):
        raise UsageError(
            f"the model's config names input rotations ({INPUT_CONFIG_KEY} = {fp}) but it holds none: a checkpoint "
            "saved without them (their hooks are no Hugging Face modules) computes another function; load the "
            "original checkpoint and the thresholds file with actsparse.load_thresholds(model, path, rotate=True)"
        )
    return fp


@dataclass
class InputRotationResult:
    """What :func:`rotate_inputs` did: the rank, the calibration tokens, the mean share of each norm output's
    energy in its top ``rank`` directions, and the weights the rotations read per token."""

    rank: int
    tokens: int
    energy_in_rank: float
    weights_read: int
    fingerprint: str


def _norm_outputs(model: nn.Module, norms: list[nn.Module], batches, progress: bool) -> tuple[torch.Tensor, int]:
    """``[N, D, D]``: ``Σ x xᵀ`` (float64) of each norm's output over the real tokens; and the token count."""
    d = cast(Any, norms[0]).weight.numel()
    H = torch.zeros(len(norms), d, d, dtype=torch.float64)
    state: dict[str, Any] = {"mask": None}

    def hook(i: int):
        def h(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            x = token_rows(out.float(), state["mask"])
            H[i] += (x.T @ x).double().cpu()

        return h

    handles = [n.register_forward_hook(hook(i)) for i, n in enumerate(norms)]
    with torch.no_grad():
        return H, hooked_pass(model, batches, state, handles, "input rotation statistics", progress)


def _norm_pairs(model: nn.Module) -> list[tuple[nn.Module, nn.Module, tuple[str, ...]]]:
    """Every (decoder layer, norm, names of its readers), in layer order (no checks)."""
    try:
        _, layers, _, _ = structure_of(model)
    except UsageError:
        return []
    return [
        (layer, n, readers) for layer in layers for name, readers in READS.items() if (n := getattr(layer, name, None))
    ]


def _readers(model: nn.Module) -> list[tuple[nn.Module, list[nn.Linear]]]:
    """Every (norm, the Linears that read its output) pair of the decoder layers, checked."""
    _, layers, _, _ = structure_of(model)
    pairs = []
    for i, layer in enumerate(layers):
        for norm_name, readers in READS.items():
            norm = getattr(layer, norm_name, None)
            if not isinstance(getattr(norm, "weight", None), torch.Tensor):
                raise UsageError(f"layer {i} has no {norm_name} with a weight: rotate_inputs needs pre-norm layers")
            assert norm is not None  # (checked above)
            pairs.append((norm, [linear_of(layer, r, f"layer {i}") for r in readers]))
        extra = extra_norms(layer)
        if extra:  # e.g. Gemma2: post_attention_layernorm normalizes the attention output, not gate/up's input
            raise UsageError(
                f"layer {i} has more norms than input_layernorm and post_attention_layernorm ({', '.join(extra)}): "
                "rotate_inputs needs Llama-style layers where those two feed q/k/v and gate/up"
            )
    return pairs


def check_factors(y: Any, t: Any, n: int | None = None, d: int | None = None) -> str | None:
    """What is wrong with saved factors ``Y [N, D, r]``, ``T [N, r, r]`` (float, finite, T upper triangular,
    ``I - Y·T·Yᵀ`` orthogonal, ``N``/``D`` as given), or None."""
    if not isinstance(y, torch.Tensor) or not isinstance(t, torch.Tensor) or y.dim() != 3 or t.dim() != 3:
        return "expected [N, D, r] reflectors and [N, r, r] factors"
    if y.shape[0] != t.shape[0] or t.shape[1:] != (y.shape[2], y.shape[2]) or not 1 <= y.shape[2] < y.shape[1]:
        return f"shapes {tuple(y.shape)} and {tuple(t.shape)} do not fit [N, D, r] and [N, r, r] with 1 <= r < D"
    if n is not None and y.shape[0] != n:
        return f"hold {y.shape[0]} rotations, the model has {n} inputs to rotate (two per decoder layer)"
    if d is not None and y.shape[1] != d:
        return f"are {y.shape[1]} wide, the model's inputs {d}"
    if not (y.is_floating_point() and t.is_floating_point()) or not (
        torch.isfinite(y).all() and torch.isfinite(t).all()
    ):
        return "expected finite floating-point values"
    yd, td = y.double(), t.double()
    if not torch.equal(td, torch.triu(td)):
        return "T is not upper triangular"
    # QᵀQ = I  <=>  T + Tᵀ = Tᵀ (YᵀY) T  (r x r: cheap)
    gram = yd.transpose(1, 2) @ yd
    err = float((td + td.transpose(1, 2) - td.transpose(1, 2) @ gram @ td).abs().max())
    if err > 1e-4:
        return f"do not make an orthogonal basis (max |T + Tᵀ - Tᵀ·YᵀY·T| = {err:.2g})"
    return None


def rotate_inputs(
    model: nn.Module,
    data: Iterable[Any] | None = None,
    *,
    rank: int = DEFAULT_RANK,
    factors: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: bool = True,
) -> InputRotationResult:
    """Rotate the q/k/v and gate/up inputs of every decoder layer by rank-``rank`` Householder bases, in place.

    ``data``: calibration batches as for :func:`~actsparse.sparsify_`; or ``factors``: saved ``(Y [N, D, r],
    T [N, r, r])`` (:func:`actsparse.io.read_input_rotation`; N = two per layer, q/k/v input then gate/up)
    to fold as they are. ``rank``: the principal directions each basis puts first (``1 <= rank < D``; the decode
    cost per norm is ``2·D·rank`` weights). The dense model computes the same function afterwards;
    sparsify it next with any method. Everything is checked before the first weight changes: an unsupported,
    sparsified or already rotated model, compressed weights, a bad rank or bad factors raise and leave it
    unmodified.
    """
    if (data is None) == (factors is None):
        raise UsageError("rotate_inputs takes calibration data or saved factors (factors=...), one of them")
    check_not_sparsified(model, "rotating the layer inputs")
    if input_rotation_of(model) is not None or rotation_of(model) is not None:
        raise UsageError(
            "the model is already rotated (rotate_inputs or rotate_residual): rotate a fresh copy of the model"
        )
    pairs = _readers(model)
    d = cast(Any, pairs[0][0]).weight.numel()
    energy, tokens = math.nan, 0
    if factors is not None:
        if not isinstance(factors, tuple) or len(factors) != 2:
            raise UsageError("factors: expected a (Y, T) pair of tensors")
        if (problem := check_factors(*factors, n=len(pairs), d=d)) is not None:
            raise UsageError(f"factors {problem}")
        wys = list(zip(factors[0].double(), factors[1].double()))
        rank = int(factors[0].shape[2])
    else:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank < d:
            raise UsageError(f"rank must be an int in [1, {d - 1}] (the inputs are {d} wide), got {rank!r}")
        batches = prepare_batches(cast(Iterable[Any], data))
        H, tokens = _norm_outputs(model, [p[0] for p in pairs], batches, progress)
        if tokens == 0:
            raise UsageError("rotate_inputs got no calibration tokens")
        if not torch.isfinite(H).all():
            raise UsageError("the calibration activations are not finite: cannot compute a rotation")
        wys, shares = [], []
        for h in H:  # one norm at a time (memory), keeping its top `rank` directions
            eig, vectors = torch.linalg.eigh(h / tokens)
            eig, top = eig.flip(-1).clamp_min(0), vectors.flip(-1)[:, :rank]  # decreasing variance
            shares.append(float(eig[:rank].sum() / eig.sum().clamp_min(1e-30)))
            y, t = compact_wy(top)
            wys.append((y.float().double(), t.float().double()))  # as saved: a reload folds the same values
        del H
        energy = sum(shares) / len(shares)
    originals: list[tuple[nn.Linear, torch.Tensor]] = []  # kept until the fold is complete: undo on error
    hooks = []
    try:
        with torch.no_grad():
            for (norm, readers), (y, t) in zip(pairs, wys):
                for lin in readers:  # W <- W·Q = W - ((W·Y)·T)·Yᵀ
                    w = lin.weight.double()
                    yd, td = y.to(w.device), t.to(w.device)
                    originals.append((lin, lin.weight.data))
                    lin.weight.data = (w - ((w @ yd) @ td) @ yd.T).to(lin.weight.dtype).contiguous()
                norm.add_module(CHILD, InputRotation(y, t).to(cast(Any, norm).weight.device))
                hooks.append(norm.register_forward_hook(_apply_rotation))
    except BaseException:
        for lin, data in originals:
            lin.weight.data = data
        for h in hooks:
            h.remove()
        for norm, _ in pairs:
            norm._modules.pop(CHILD, None)
        raise
    del originals
    saved = input_rotation_factors(model)
    assert saved is not None  # every norm got its rotation above
    fingerprint = factors_fingerprint(*saved)
    cfg = getattr(model, "config", None)
    if cfg is not None:
        setattr(cfg, INPUT_CONFIG_KEY, fingerprint)
    return InputRotationResult(rank, tokens, energy, input_rotation_weights(model), fingerprint)


def input_rotation_factors(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(Y [N, D, r], T [N, r, r])`` float32 on CPU of an input-rotated model (layer order, q/k/v input then
    gate/up input), what ``save_thresholds`` keeps; None without input rotations."""
    rots = [getattr(norm, CHILD, None) for _, norm, _ in _norm_pairs(model)]
    if not rots or any(not isinstance(r, InputRotation) for r in rots):
        return None
    rs = cast(list[InputRotation], rots)
    return (
        torch.stack([r.reflectors.detach().float().cpu() for r in rs]).contiguous(),
        torch.stack([r.factor.detach().float().cpu() for r in rs]).contiguous(),
    )


def factors_fingerprint(y: torch.Tensor, t: torch.Tensor) -> str:
    """The fingerprint :func:`rotate_inputs` records for these factors (float32 bytes, rotation by rotation)."""
    digest = hashlib.sha256()
    for yi, ti in zip(y.float().contiguous(), t.float().contiguous()):
        digest.update(yi.cpu().numpy().tobytes())
        digest.update(ti.cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
