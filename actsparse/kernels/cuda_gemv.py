"""The CUDA C++ sparse GEMV (``csrc/sgemv.cu``): built with nvcc at first use, cached, called through ctypes.

Same semantics as the Triton kernel and the torch reference (:mod:`.packing`), for what the decoder runs:
one input row, the plain ``[K, N_pad]`` layout, fp16/bf16 activations with weights of their dtype or int8
codes (per-column scale, optional zero point), ``K`` up to :data:`MAX_K`, a GPU of compute capability 9.0 or
later (it reduces split-K partial sums through thread-block clusters' distributed shared memory: one launch,
deterministic, no workspace). Everything else (blocked layouts, fp32, older GPUs, no nvcc) runs the Triton
kernel; :func:`unavailable_reason` says why a device cannot take this one.

Measured on an H200 against the Triton kernel and graph-timed cuBLAS (``benchmarks/exp_cuda.py --variants``,
benchmarks/README.md), bf16, the five Llama-2/3 GEMV shapes: 3.8-4.4 µs per call at 100% sparsity (Triton
4.8-5.9), ×1.50-1.80 over cuBLAS at 50%, 1-13% faster than cuBLAS at 0%; Llama-2-7B decode ×1.56-1.58 at 50%.

The build: ``nvcc -O3 -arch=sm_XY -shared`` of the one source file into
``$ACTSPARSE_CACHE/cuda/sgemv-sm_XY-<hash>.so`` (default cache ``~/.cache/actsparse``; the hash covers the
source, the flags and nvcc's version), written atomically, reused by later processes. nvcc is found
through ``$CUDA_HOME``/``$CUDA_PATH``, then ``PATH``, then ``/usr/local/cuda``.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UsageError
from ..fileio import atomic_write
from .packing import PackedGemv
from .reference import check_norm

__all__ = [
    "CudaConfig",
    "choose_cuda_config",
    "cuda_config",
    "candidate_configs",
    "tune_config",
    "tune_cache_path",
    "read_tune_cache",
    "sparse_gemv_cuda",
    "supports",
    "unavailable_reason",
    "build_library",
    "MAX_K",
]

SOURCE = Path(__file__).resolve().parent / "csrc" / "sgemv.cu"
ROWS_PER_BLOCK = 2048  # JMAX * NT in the source: the input slice one block lists in shared memory
MAX_CLUSTER = 16
MAX_K = ROWS_PER_BLOCK * MAX_CLUSTER
BLOCK_NS = (256, 128, 64)
_DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1}
_FLAGS = ("-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC")
# Programmatic dependent launch for every call whose config does not say (True: a GEMV's successor launches
# when the GEMV's weight stream is done, and waits for its results). Measured on an H100 in a chain of GEMVs
# (benchmarks/exp_cuda.py --variants default,pdl-early): -0.5 to -0.6 us per call at 100% and 50% sparsity, and
# the 0% stream 0.2-0.6 us faster too (the successor launching at the kernel's start instead slowed it up to 5%);
# in the Llama-2-7B decoder with fused norms (four GEMVs in a row per layer): +1.4 to +3.0% (bench_generate.py
# --backends cuda,cuda-pdl --norms off,on, measured while PDL was off by default; cuda-nopdl is that baseline
# now). Kernels around ours that do not ask for it launch as before.
PDL = True


@dataclass(frozen=True)
class CudaConfig:
    block_n: int  # output columns per block (64, 128 or 256)
    cluster: int  # blocks per cluster = the split of K (1..16, a power of two)
    pdl: bool | None = None  # programmatic dependent launch (None: the module's PDL)

    def __post_init__(self):
        if self.block_n not in BLOCK_NS or self.cluster not in (1, 2, 4, 8, 16):
            raise UsageError(f"CudaConfig: block_n in {BLOCK_NS}, cluster in 1, 2, 4, 8, 16; got {self}")


def choose_cuda_config(k: int, n: int, sm_count: int) -> CudaConfig:
    """The launch rule: the smallest cluster whose input slices fit a block (``ROWS_PER_BLOCK``), then the
    widest tile that still gives about two blocks per SM (≥ 1.9 × SMs: 4096x4096 takes 256 blocks on 132
    SMs), else the configuration with the most blocks. Measured on an H200 (``benchmarks/exp_cuda.py``): within
    2% of the best of 20-40 configurations at 0% and 50% on the five Llama-2/Llama-3 shapes of its tables, but
    27-36% off on Llama-3-8B's q/k/v and gate/up (``_TUNED`` holds the measured choice there)."""
    best: tuple[int, CudaConfig] | None = None
    for cl in (1, 2, 4, 8, 16):
        if math.ceil(k / cl) > ROWS_PER_BLOCK:
            continue
        for bn in BLOCK_NS:
            if n % bn or bn % cl:
                continue
            blocks = n // bn * cl
            if blocks >= 1.9 * sm_count:
                return CudaConfig(bn, cl)
            if best is None or blocks > best[0]:
                best = (blocks, CudaConfig(bn, cl))
    if best is None:
        raise UsageError(f"the CUDA sparse GEMV takes K <= {MAX_K} and N_pad a multiple of 64, got {k}x{n}")
    return best[1]


# Measured exceptions to the rule, per GPU (compute capability, SMs) and (K, N_pad): block_n, cluster. H100/H200
# (9.0, 132 SMs), bf16, benchmarks/exp_cuda.py --sweep (results/exp_cuda_sweep_llama3_h200.json): the rule's
# 384 and 448 blocks lose 27-36% at 50% on Llama-3-8B's q/k/v and gate/up; on the five shapes of
# exp_cuda_variants_h200.json the rule is within 2% of the best.
_TUNED: dict[tuple[int, int, int], dict[tuple[int, int], tuple[int, int]]] = {
    (9, 0, 132): {
        (4096, 6144): (256, 8),  # 10.51 µs at 50%, 15.49 at 0% (rule 64/4: 14.32, 19.24; cuBLAS 16.73)
        (4096, 28672): (256, 2),  # 31.29 at 50%, 56.93 at 0% (rule 128/2: 40.17, 70.38; cuBLAS 56.11)
    }
}
_CONFIGS: dict[tuple, CudaConfig] = {}


def candidate_configs(k: int, n: int, sm_count: int = 132) -> list[CudaConfig]:
    """What :func:`tune_config` times for ``K x N_pad``: every ``(block_n, cluster)`` the kernel takes with
    64-1100 blocks (all it takes where none has), always including the launch rule's choice."""
    valid = [
        CudaConfig(bn, cl)
        for bn in BLOCK_NS
        for cl in (1, 2, 4, 8, 16)
        if math.ceil(k / cl) <= ROWS_PER_BLOCK and n % bn == 0 and bn % cl == 0
    ]
    if not valid:
        raise UsageError(f"the CUDA sparse GEMV takes K <= {MAX_K} and N_pad a multiple of 64, got {k}x{n}")
    sized = [c for c in valid if 64 <= n // c.block_n * c.cluster <= 1100] or valid
    rule = choose_cuda_config(k, n, sm_count)
    return sized if rule in sized else [rule, *sized]


def _config_key(packed: PackedGemv, device: torch.device) -> tuple:
    return (packed.in_features, packed.padded_out, packed.weight_t.element_size(), device.index)


@torch.no_grad()
def tune_config(
    packed: PackedGemv,
    device: torch.device,
    sparsity: float,
    dtype: torch.dtype | None = None,
    *,
    calls: int = 16,
    reps: int = 5,
    cache: bool = True,
) -> tuple[CudaConfig, dict[CudaConfig, float]]:
    """Time every :func:`candidate_configs` choice on ``packed``'s own weights at ``sparsity`` (a synthetic
    input of which a fraction ``sparsity`` falls below the threshold, in ``dtype``: the activations', default
    the weights' for fp16/bf16), each as a CUDA graph of ``calls`` launches, best of ``reps`` replays; returns
    ``(best config, {config: µs per call})`` and makes the best the config of this shape on ``device``
    (:func:`cuda_config`) for the rest of the process. A matrix that fits the L2 cache twice is timed over up
    to 8 copies of it, so that calls stream from memory as in a model.

    ``cache=True``: a choice timed before for the same GPU model, kernel source, shape, weight and activation
    dtypes and sparsity (to 0.1) is read from :func:`tune_cache_path` instead of timed again (the times
    returned are those measured then), and a new timing is added to that file (JSON, written atomically,
    merged with what other processes wrote; an unreadable file is ignored with a warning and rewritten, a
    failed write only warns). ``cache=False`` always times and leaves the file alone."""
    if not 0.0 <= sparsity <= 1.0:
        raise UsageError(f"sparsity must be in [0, 1], got {sparsity!r}")
    k = packed.in_features
    dtype = dtype or packed.weight_t.dtype
    if dtype not in _DTYPE_CODES:
        raise UsageError(f"tune_config: the activations are fp16 or bf16, got {dtype} (pass dtype= for int8 codes)")
    if not isinstance(cache, bool):
        raise UsageError(f"cache must be True or False, got {cache!r}")
    g = torch.Generator(device="cpu").manual_seed(0)
    kept = torch.rand(k, generator=g) >= sparsity
    mag = torch.where(kept, 1.0 + torch.rand(k, generator=g), 0.5 * torch.rand(k, generator=g))
    x = (mag * torch.sign(torch.randn(k, generator=g))).to(device, dtype)
    device = torch.device(device)
    if packed.weight_t.device != device:
        raise UsageError(f"tune_config: the weights are on {packed.weight_t.device}, not {device}")
    props = torch.cuda.get_device_properties(device)
    candidates = candidate_configs(k, packed.padded_out, props.multi_processor_count)
    key = _tune_cache_key(props, packed, dtype, sparsity)
    if cache:
        hit = _cached_choice(read_tune_cache().get(key), candidates)
        if hit is not None:
            _CONFIGS[_config_key(packed, device)] = hit[0]
            return hit
    w_bytes = packed.weight_t.numel() * packed.weight_t.element_size()
    # weights that fit in L2 twice over are cycled through copies, so that every call streams from memory
    copies = min(8, max(1, math.ceil(2 * getattr(props, "L2_cache_size", 0) / max(w_bytes, 1))))
    weights = [packed.weight_t] + [packed.weight_t.clone() for _ in range(copies - 1)]
    probes = [
        PackedGemv(
            w,
            packed.segments,
            torch.full_like(packed.threshold, 0.75),  # (the layer's own thresholds and shifts are left alone)
            None if packed.shift is None else torch.zeros_like(packed.shift),
            packed.wsum,
            packed.bias,
            packed.scale,
            packed.zero,
            packed.backend,
        )
        for w in weights
    ]
    y = torch.empty(packed.padded_out, dtype=dtype, device=device)
    times: dict[CudaConfig, float] = {}
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))  # x, y and the probes were made on that one
    with torch.cuda.device(device), torch.cuda.stream(stream):
        for cfg in candidates:
            sparse_gemv_cuda(x, probes[0], cfg, out=y)  # warm up (and fail here, not inside a capture)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                for i in range(calls):
                    sparse_gemv_cuda(x, probes[i % copies], cfg, out=y)
            best = math.inf
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream)
                graph.replay()
                end.record(stream)
                end.synchronize()
                best = min(best, start.elapsed_time(end) * 1e3 / calls)
            times[cfg] = best
    choice = min(times, key=lambda c: times[c])
    _CONFIGS[_config_key(packed, device)] = choice
    if cache:
        _store_tuned(key, choice, times)
    return choice, times


# ---- the tuning cache: $ACTSPARSE_CACHE/cuda/tuned.json ---------------------------------------------------
_TUNE_CACHE_FORMAT = 1


def tune_cache_path() -> Path:
    """Where :func:`tune_config` keeps its choices: ``tuned.json`` beside the kernel builds."""
    return _cache_dir() / "tuned.json"


def _source_hash() -> str:
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]


def _tune_cache_key(props, packed: PackedGemv, dtype: torch.dtype, sparsity: float) -> str:
    """One entry per GPU model (name, compute capability, SMs), kernel source, ``K x N_pad``, weight and
    activation dtypes, and sparsity rounded to 0.1 (the choice changes slowly with it)."""
    return "|".join(
        (
            f"{props.name}",
            f"sm_{props.major}{props.minor}",
            f"{props.multi_processor_count}sm",
            _source_hash(),
            f"{packed.in_features}x{packed.padded_out}",
            str(packed.weight_t.dtype).removeprefix("torch."),
            str(dtype).removeprefix("torch."),
            f"s{round(sparsity, 1):.1f}",
        )
    )


def read_tune_cache(path: str | os.PathLike | None = None) -> dict[str, dict]:
    """The cached tuning entries (``{key: {"config": [block_n, cluster], "us": {"BN/CL": µs}}}``); an absent
    file is empty, and an unreadable one is empty with a warning (the next tuning rewrites it)."""
    p = Path(path) if path is not None else tune_cache_path()
    try:
        with open(p, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        warnings.warn(
            f"actsparse: ignoring the tuning cache {p} ({e}); it is rewritten by the next tuning", stacklevel=2
        )
        return {}
    if (
        not isinstance(data, dict)
        or data.get("format") != _TUNE_CACHE_FORMAT
        or not isinstance(data.get("entries"), dict)
    ):
        warnings.warn(
            f"actsparse: ignoring the tuning cache {p} (not a format-{_TUNE_CACHE_FORMAT} tuning cache); it is "
            "rewritten by the next tuning",
            stacklevel=2,
        )
        return {}
    return data["entries"]


def _cached_choice(entry, candidates: list[CudaConfig]) -> tuple[CudaConfig, dict[CudaConfig, float]] | None:
    """A cache entry as ``(choice, times)`` if it names a configuration the kernel takes for this shape."""

    def config(pair) -> CudaConfig:
        block_n, cluster = (int(v) for v in pair)  # exactly two numbers
        return CudaConfig(block_n, cluster)

    try:
        choice = config(entry["config"])
        times = {config(c.split("/")): float(t) for c, t in entry["us"].items()}
    except (TypeError, KeyError, ValueError, AttributeError, UsageError):
        return None
    return (choice, times) if choice in candidates else None


def _store_tuned(key: str, choice: CudaConfig, times: dict[CudaConfig, float]) -> None:
    path = tune_cache_path()
    entry = {
        "config": [choice.block_n, choice.cluster],
        "us": {f"{c.block_n}/{c.cluster}": t for c, t in times.items()},
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an unreadable file is replaced: say so once, below, not twice
            entries = read_tune_cache(path)  # merged with what other processes wrote since
        entries[key] = entry

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"format": _TUNE_CACHE_FORMAT, "entries": entries}, f, indent=1, sort_keys=True)

        atomic_write(str(path), write)
    except (OSError, UsageError) as e:
        warnings.warn(f"actsparse: the tuning choice was not cached ({path}: {e})", stacklevel=3)


def cuda_config(packed: PackedGemv, device: torch.device) -> CudaConfig:
    """The config for ``packed`` on ``device``: the one :func:`tune_config` chose for this shape in this
    process, else a measured one from ``_TUNED`` for this GPU and shape, else the launch rule's (cached per
    shape and device)."""
    k, n = packed.in_features, packed.padded_out
    key = _config_key(packed, device)
    cfg = _CONFIGS.get(key)
    if cfg is None:
        props = torch.cuda.get_device_properties(device)
        tuned = None
        if packed.weight_t.element_size() == 2:  # measured on bf16 weights
            tuned = _TUNED.get((props.major, props.minor, props.multi_processor_count), {}).get((k, n))
        cfg = CudaConfig(*tuned) if tuned else choose_cuda_config(k, n, props.multi_processor_count)
        _CONFIGS[key] = cfg
    return cfg


def supports(x: torch.Tensor, packed: PackedGemv) -> bool:
    """Whether this kernel computes ``packed`` for ``x`` (shapes and dtypes only; see
    :func:`unavailable_reason` for the device and the toolchain)."""
    w = packed.weight_t
    extras = [
        t
        for t in (packed.threshold, packed.shift, packed.wsum, packed.bias, packed.scale, packed.zero)
        if t is not None
    ]
    int8 = w.dtype == torch.int8
    return (
        w.dim() == 2
        and x.dtype in _DTYPE_CODES
        and (x.dtype == w.dtype or int8 and packed.scale is not None and packed.scale.dtype == torch.float32)
        and (packed.zero is None or packed.zero.dtype == torch.float32)
        and packed.in_features <= MAX_K
        and packed.padded_out % BLOCK_NS[-1] == 0
        and w.is_contiguous()
        and all(t.device == w.device and t.is_contiguous() for t in extras)
        and (packed.bias is None or packed.bias.dtype in (torch.float32, x.dtype))
        and packed.threshold.dtype == torch.float32
        and (packed.shift is None or packed.shift.dtype == torch.float32 and packed.wsum is not None)
    )  # (no data_ptr() here: torch.compile traces this; sparse_gemv_cuda checks the alignment)


def _nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.path.isfile(default) else None


def _cache_dir() -> Path:
    root = os.environ.get("ACTSPARSE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "actsparse"
    )
    return Path(root) / "cuda"


def build_library(arch: str) -> Path:
    """Compile the kernel for ``arch`` (e.g. ``"sm_90"``) unless a build of this source is cached; its path.

    Raises :class:`UsageError` naming the fix when nvcc is missing or the build fails."""
    nvcc = _nvcc()
    if nvcc is None:
        raise UsageError(
            "the CUDA sparse GEMV needs nvcc (the CUDA toolkit): install it or set CUDA_HOME, or use backend='triton'"
        )
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    flags = (*_FLAGS, f"-arch={arch}")
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode() + version.encode()).hexdigest()[:16]
    out = _cache_dir() / f"sgemv-{arch}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"actsparse: building the CUDA sparse GEMV for {arch} (once; cached in {out.parent})", file=sys.stderr)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([nvcc, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
        if r.returncode != 0:
            raise UsageError(f"building the CUDA sparse GEMV failed ({nvcc}):\n{r.stderr.strip()}")
        os.replace(tmp, out)  # atomic: a concurrent build of the same key writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


# actsparse_sgemv(dtype, quant, bn, cl, pdl, x, gate, w, y, tau, mu, wsum, bias, scale, zero, bias_fp32, K, N, c1, c2,
#                 stream)
_ARGTYPES = [ctypes.c_int] * 5 + [ctypes.c_void_p] * 10 + [ctypes.c_int] * 5 + [ctypes.c_void_p] * 3 + [ctypes.c_float]
_LIBS: dict[str, ctypes.CDLL] = {}
_FAILED: dict[str, str] = {}
_LOCK = threading.Lock()


def _arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def _library(device: torch.device) -> ctypes.CDLL:
    arch = _arch(device)
    with _LOCK:
        lib = _LIBS.get(arch)
        if lib is None:
            if arch in _FAILED:
                raise UsageError(_FAILED[arch])
            try:
                lib = ctypes.CDLL(str(build_library(arch)))
            except (UsageError, OSError) as e:
                _FAILED[arch] = str(e)
                raise UsageError(str(e)) from e
            fn = lib.actsparse_sgemv
            fn.restype = ctypes.c_int
            fn.argtypes = _ARGTYPES
            _LIBS[arch] = lib
    return lib


def unavailable_reason(device: torch.device | str) -> str | None:
    """None when the CUDA kernel runs on ``device`` (building it on first use), else why not."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return f"the CUDA sparse GEMV runs on CUDA devices, not {dev}"
    major, minor = torch.cuda.get_device_capability(dev)
    if major < 9:
        return f"the CUDA sparse GEMV needs compute capability 9.0 (thread-block clusters), {dev} has {major}.{minor}"
    try:
        _library(dev)
    except UsageError as e:
        return str(e)
    return None


def sparse_gemv_cuda(
    x: torch.Tensor,
    packed: PackedGemv,
    config: CudaConfig | None = None,
    *,
    out: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    norm: tuple[torch.Tensor, float] | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y_pad[N_pad]`` for one input row ``x`` (``numel == K``) in ``x``'s dtype, into ``out`` if given.

    With ``gate`` (a gated MLP's down projection, ``x`` its up projection) the input is
    ``silu(gate) * x``, rounded to the dtype after each of the two steps as torch rounds ``act_fn(gate) * up``,
    computed as the kernel loads it. With ``norm=(weight, eps)`` ``x`` is a residual stream and the input is its
    RMSNorm (:func:`~actsparse.kernels.reference.rms_norm`), formed as the kernel loads it. With ``residual``
    (``[N_pad]``, may be ``out``) the result is ``residual + y`` rounded as torch rounds it."""
    k, n = packed.in_features, packed.padded_out
    x1 = x.reshape(-1)
    if x1.numel() != k:
        raise UsageError(f"sparse GEMV takes one input row of {k} features, got shape {tuple(x.shape)}")
    g1 = None
    if gate is not None:
        g1 = gate.reshape(-1).contiguous()
        if g1.shape != x1.shape or g1.dtype != x1.dtype or g1.device != x1.device:
            raise UsageError(
                f"gate must match the input: [{k}] {x1.dtype} on {x1.device}, got {tuple(gate.shape)} "
                f"{gate.dtype} on {gate.device}"
            )
    nw, eps = _check_fusions(x1, packed, g1, norm, residual)
    if not supports(x1, packed):
        raise UsageError(
            "the CUDA sparse GEMV takes the plain layout, fp16/bf16 inputs with weights of their dtype or int8 "
            f"codes with fp32 scales, K <= {MAX_K}: use the Triton kernel for this layer"
        )
    if packed.weight_t.data_ptr() % 16:
        raise UsageError("the CUDA sparse GEMV reads weights in 16-byte rows: weight_t must be 16-byte aligned")
    x1 = x1.contiguous()
    dev = x1.device
    if dev.type != "cuda":
        raise UsageError(
            f"the CUDA sparse GEMV runs on CUDA devices, not {dev}: K.sparse_gemv picks a kernel that runs there"
        )
    config = config or cuda_config(packed, dev)
    y = torch.empty(n, dtype=x1.dtype, device=dev) if out is None else out
    if y.shape != (n,) or y.dtype != x1.dtype or not y.is_contiguous():
        raise UsageError(f"out must be a contiguous [{n}] {x1.dtype} tensor")
    if y.device != dev:
        raise UsageError(f"out is on {y.device}, the input on {dev}")
    with torch.cuda.device(dev):  # the launch goes to the current device: make it the tensors' one
        err = _launch(dev, x1, y, packed, config, g1, nw, eps, residual)
    if err != 0:
        raise UsageError(f"the CUDA sparse GEMV did not launch (code {err}) for {k}x{n} with {config}")
    return y


def _check_fusions(
    x1: torch.Tensor,
    packed: PackedGemv,
    gate: torch.Tensor | None,
    norm: tuple[torch.Tensor, float] | None,
    residual: torch.Tensor | None,
) -> tuple[torch.Tensor | None, float]:
    """The RMSNorm weight and eps the kernel forms its input with (None, 0.0 without), after checking them and
    ``residual`` against the input and the layer; a mistake raises :class:`UsageError` naming it."""
    k, n = packed.in_features, packed.padded_out
    if residual is not None and (
        residual.shape != (n,)
        or residual.dtype != x1.dtype
        or residual.device != x1.device
        or not residual.is_contiguous()
    ):
        raise UsageError(
            f"residual must be a contiguous [{n}] {x1.dtype} tensor on {x1.device}, got {tuple(residual.shape)} "
            f"{residual.dtype} on {residual.device}"
        )
    if norm is None:
        return None, 0.0
    return check_norm(norm, gate, k, x1, contiguous=True)


def _launch(
    dev: torch.device,
    x1: torch.Tensor,
    y: torch.Tensor,
    packed: PackedGemv,
    config: CudaConfig,
    gate: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 0.0,
    residual: torch.Tensor | None = None,
) -> int:
    c1, c2 = packed.segment_starts
    bias = packed.bias
    quant = 0 if not packed.quantized else (2 if packed.zero is not None else 1)
    return _library(dev).actsparse_sgemv(
        _DTYPE_CODES[x1.dtype],
        quant,
        config.block_n,
        config.cluster,
        int(PDL if config.pdl is None else config.pdl),
        x1.data_ptr(),
        gate.data_ptr() if gate is not None else None,
        packed.weight_t.data_ptr(),
        y.data_ptr(),
        packed.threshold.data_ptr(),
        packed.shift.data_ptr() if packed.shift is not None else None,
        packed.wsum.data_ptr() if packed.wsum is not None else None,
        bias.data_ptr() if bias is not None else None,
        packed.scale.data_ptr() if packed.scale is not None else None,
        packed.zero.data_ptr() if packed.zero is not None else None,
        int(bias is not None and bias.dtype == torch.float32),
        packed.in_features,
        packed.padded_out,
        c1,
        c2,
        torch.cuda.current_stream(dev).cuda_stream,
        norm_weight.data_ptr() if norm_weight is not None else None,
        residual.data_ptr() if residual is not None else None,
        norm_eps,
    )
