"""What is wrong with a spec's benchmarks, found before any scoring: unknown task names, probe files
missing or malformed (the first bad record named file:line), corpus probes that cannot be, and, with
HF_HUB_OFFLINE set, tasks whose datasets are not in the cache (with the command that fetches them).

lm-eval is imported only when the spec names tasks (its index of task YAMLs takes some 6 s to build)."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

from mixloop.config.benchmarks import EVAL_PROBES, GENERATED_PROBES, BenchmarksConfig, resolve_path
from mixloop.evaluation.harness import manager_for
from mixloop.storage.hub import HUB_ID, offline


def benchmark_problems(
    config: BenchmarksConfig | None, base_dir: str, corpora: dict | None = None, *, files: bool = True
) -> list[str]:
    """Problems of the `benchmarks` section and of the `probes` of `corpora` (name -> CorpusConfig), each
    with its YAML path and a fix; files=False leaves out those that read files or lm-eval's index."""
    config = config or BenchmarksConfig()
    corpora = corpora or {}
    problems = _name_problems(config, corpora)
    for name, corpus in corpora.items():
        problems += _corpus_probe_problems(name, corpus, base_dir, files)
    if not files:
        return problems
    for name, path in config.probes.items():
        problems += _file_problems(f"benchmarks.probes.{name}", name, resolve_path(base_dir, path))
    include = resolve_path(base_dir, config.include_path) if config.include_path else None
    if include is not None and not Path(include).is_dir():
        return problems + [
            f"benchmarks.include_path: no folder {include}. Fix: point it at a local folder of lm-eval task YAMLs."
        ]
    return problems + (_task_problems(config.tasks, include) if config.tasks else [])


def _name_problems(config: BenchmarksConfig, corpora: dict) -> list[str]:
    """Each scored name once: a probe named like a task or a corpus with probes would mix their scores."""
    problems, seen = [], set(config.tasks)
    named = [(f"benchmarks.probes.{n}", n) for n in config.probes]
    named += [(f"corpora.{n}.probes", n) for n, c in corpora.items() if getattr(c, "probes", None)]
    for where, name in named:
        if name in seen:
            problems.append(f"{where}: {name!r} names another task or probe too. Fix: give this probe another name.")
        seen.add(name)
    return problems


def _corpus_probe_problems(name: str, corpus: Any, base_dir: str, files: bool) -> list[str]:
    where, value = f"corpora.{name}.probes", getattr(corpus, "probes", None)
    if value is None:
        return []
    if value == GENERATED_PROBES:
        return (
            []
            if corpus.generate is not None
            else [f"{where}: only a generated corpus has generated probes. Fix: name a probe file, or `eval`."]
        )
    if value == EVAL_PROBES:  # its records are the eval split's, checked as the corpus's own
        if corpus.kind != "chat":
            return [f"{where}: `eval` asks a chat corpus's eval split; {name} is a text corpus. Fix: name a file."]
        if corpus.eval is None and corpus.generate is None:
            return [f"{where}: {name} has no eval split to ask. Fix: add `eval`, or name a probe file."]
        return []
    return _file_problems(where, name, resolve_path(base_dir, value)) if files else []


def _file_problems(where: str, name: str, path: str) -> list[str]:
    # lazy: the probe reader brings pyarrow (a tenth of a second), only for a spec with probe files
    from mixloop.evaluation.probes import ProbeError, ProbeSource, read_probe

    try:
        read_probe(ProbeSource(name, path))
    except ProbeError as exc:
        return [f"{where}: {exc}"]
    return []


def _task_problems(tasks: list[str], include_path: str | None) -> list[str]:
    manager = manager_for(tuple(tasks), include_path)
    known = set(manager.all_tasks)
    problems = []
    for name in tasks:
        if name not in known:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            where = " (nor in include_path)" if include_path else ""
            problems.append(
                f"benchmarks.tasks: no lm-evaluation-harness task, group or tag named {name!r}{where}. Fix: "
                f"{hint}`lm-eval ls tasks` lists them."
            )
        elif offline() and (missing := _uncached(_task_datasets(manager.task_index, name))):
            problems.append(_offline_problem(name, missing, include_path))
    return problems


def _task_datasets(index: dict, name: str, seen: set[str] | None = None) -> set[tuple[str, str | None]]:
    """(dataset_path, dataset_name) of every task a task, group or tag name stands for, read from lm-eval's
    index of task YAMLs (their `include`s resolved), downloading nothing."""
    seen = set() if seen is None else seen
    entry = index.get(name)
    if entry is None or name in seen:
        return set()
    seen.add(name)
    if entry.kind.name == "TAG":  # the tasks that carry it
        return set().union(*(_task_datasets(index, task, seen) for task in entry.tags))
    return _config_datasets(index, entry.cfg or {}, seen)


def _config_datasets(index: dict, config: dict, seen: set[str]) -> set[tuple[str, str | None]]:
    members = config.get("task")
    if "group" in config and isinstance(members, list):  # a group: its members, named or inline
        found = set()
        for member in members:
            if isinstance(member, str):
                found |= _task_datasets(index, member, seen)
            elif isinstance(member, dict) and "dataset_path" not in member:
                found |= _config_datasets(index, member, seen) | _task_datasets(index, str(member.get("task")), seen)
            elif isinstance(member, dict):
                found.add((member["dataset_path"], member.get("dataset_name")))
        return found
    path = config.get("dataset_path")
    return {(path, config.get("dataset_name"))} if isinstance(path, str) and not config.get("custom_dataset") else set()


def _uncached(datasets: set[tuple[str, str | None]]) -> list[tuple[str, str | None]]:
    """The hub datasets among these that the datasets library could not load offline: with HF_HUB_OFFLINE,
    load_dataset reads only its own cache of prepared datasets (CachedDatasetModuleFactory), never the
    hub's download cache, so that is the cache looked in, as it looks: <org>___<name>/<config>/<version>/<hash>/."""
    # lazy: the datasets library, only for a spec that names hub tasks
    from datasets.naming import camelcase_to_snakecase
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    missing = []
    for path, name in sorted(datasets, key=str):
        if path in _PACKAGED_DATASETS_MODULES or Path(path).exists() or not (HUB_ID.match(path) or "/" not in path):
            continue
        *namespace, dataset = path.split("/")
        root = Path(_datasets_cache(), "___".join([*namespace, camelcase_to_snakecase(dataset)]))
        if not any(p.is_dir() for p in root.glob(f"{name or '*'}/*/*")):
            missing.append((path, name))
    return missing


def _datasets_cache() -> str:
    """The datasets library's cache folder as it takes it from the environment (read now, not at import)."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return os.environ["HF_DATASETS_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "datasets")


def _offline_problem(task: str, missing: list[tuple[str, str | None]], include_path: str | None) -> str:
    first = ", ".join(f"{path}" + (f" ({name})" if name else "") for path, name in missing[:3])
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    if len(missing) == 1:
        path, name = missing[0]
        command = (
            f"python -c \"import datasets; datasets.load_dataset('{path}'" + (f", '{name}'" if name else "") + ')"'
        )
    else:  # lm-eval's own loader fetches every dataset of a group
        manager = f"TaskManager(include_path='{include_path}')" if include_path else "TaskManager()"
        command = f"python -c \"from lm_eval.tasks import TaskManager; {manager}.load(['{task}'])\""
    return (
        f"benchmarks.tasks: {task} needs the hub dataset {first}{more}, not in the Hugging Face datasets cache "
        f"({_datasets_cache()}), and HF_HUB_OFFLINE is set. Fix: fetch it once where there is a network, with "
        f"the same HF_HOME (`{command}`), or unset HF_HUB_OFFLINE."
    )
