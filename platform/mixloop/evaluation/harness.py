"""Running lm-evaluation-harness on one version, and reading its results into typed scores.

Everything is lm-eval's own: its Hugging Face model class loads the version's folder, its evaluator
runs named tasks and probes alike, and its metric names and standard errors are kept as it reports
them ("acc,none" becomes metric acc, filter none). lm-eval is imported only here, when a version is
scored: the import alone takes some 3 s and indexing its task YAMLs some 6 s.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

# lm-eval's default of 100,000 resamples costs minutes for metrics estimated by bootstrap (bleu,
# perplexity); the mean metrics probes and most tasks report (acc, exact_match) have a closed form.
BOOTSTRAP_ITERS = 1000
BATCH_SIZE = 32  # a tiny model's forward pass on CPU is cheap; larger batches amortise the Python around it
EXAMPLES_PER_PROBE = 5


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskScore(Record):
    """One metric of one task (or group, or probe) as lm-eval reports it."""

    task: str
    """The lm-eval task or group name, or the probe's name."""
    metric: str
    """The metric as lm-eval names it: acc, acc_norm, exact_match, contains, ..."""
    value: float
    stderr: float | None
    """lm-eval's standard error of the value; None where it has none (one sample, or no estimator)."""
    samples: int
    """Examples scored (after `limit`); for a group, those of its tasks together."""
    filter: str = "none"
    """lm-eval's filter the metric was computed after (a task may report one metric under several)."""
    kind: Literal["task", "group", "probe"] = "task"
    higher_is_better: bool | None = None


class Example(Record):
    """One probe question as a version answered it, to show beside the scores."""

    task: str
    prompt: str
    reference: str
    response: str
    """The version's greedy answer; for multiple choice, the choice it found most likely."""
    correct: bool


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None, defaults: bool):
    """lm-eval's index of task YAMLs: its own (when `defaults`) and those of `include_path`; built once
    per process, as it reads thousands of files."""
    from lm_eval.tasks import TaskManager  # lazy: lm-eval (a second), only where tasks are scored

    return TaskManager(include_path=include_path, include_defaults=defaults)


def manager_for(tasks: tuple[str, ...], include_path: str | None):
    """The index `tasks` need: include_path's alone when it defines every one of them as a task (a group
    or tag may name lm-eval's own), else lm-eval's own too (some 6 s to build); none needs neither."""
    if include_path:
        local = task_manager(include_path, False)
        if all(name in local.task_index and local.task_index[name].kind.name == "TASK" for name in tasks):
            return local
    return task_manager(include_path, bool(tasks))


def load_lm(folder: str, device: str = "cpu"):
    """lm-eval's Hugging Face model on a local version folder (its tokenizer and chat template with it)."""
    # lazy: lm-eval's model class brings torch and transformers
    import datasets
    import transformers
    from lm_eval.models.huggingface import HFLM

    # Seconds of work per version: their progress bars would only interleave with the pipeline's log lines.
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    return HFLM(pretrained=folder, tokenizer=folder, device=device, batch_size=BATCH_SIZE, dtype="float32")


def evaluate(
    lm, tasks: list[str | dict], manager, *, chat: bool, num_fewshot: int | None, limit: int | None
) -> dict[str, Any]:
    """lm-eval's simple_evaluate, leaving the caller's random state alone: log-likelihoods and greedy
    answers need no seed, and few-shot examples keep lm-eval's own fixed seed."""
    from lm_eval.evaluator import simple_evaluate  # lazy: lm-eval, only where tasks are scored

    return simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,
        num_fewshot=num_fewshot,
        limit=limit,
        apply_chat_template=chat,
        fewshot_as_multiturn=chat,
        bootstrap_iters=BOOTSTRAP_ITERS,
        log_samples=True,
        random_seed=None,
        numpy_random_seed=None,
        torch_random_seed=None,
    )


def scores_from(results: dict[str, Any], probes: Iterable[str]) -> list[TaskScore]:
    """Every metric of every task and group in simple_evaluate's results, with its standard error."""
    probes, subtasks = set(probes), results.get("group_subtasks", {})
    counts = {task: n["effective"] for task, n in results.get("n-samples", {}).items()}
    scores = []
    for task, row in results["results"].items():
        kind = "probe" if task in probes else "group" if subtasks.get(task) else "task"
        for key, value in row.items():
            metric, comma, filter_name = key.partition(",")
            if not comma or metric.endswith("_stderr") or not _number(value):
                continue
            stderr = row.get(f"{metric}_stderr,{filter_name}")
            scores.append(
                TaskScore(
                    task=task,
                    metric=metric,
                    value=float(value),
                    stderr=float(stderr) if _number(stderr) else None,
                    samples=_samples(task, counts, subtasks),
                    filter=filter_name,
                    kind=kind,
                    higher_is_better=results.get("higher_is_better", {}).get(task, {}).get(metric),
                )
            )
    return scores


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # NaN: none


def _samples(task: str, counts: dict[str, int], subtasks: dict[str, list[str]]) -> int:
    if task in counts:
        return counts[task]
    return sum(_samples(child, counts, subtasks) for child in subtasks.get(task, []))


def examples_from(results: dict[str, Any], probes: Iterable[str]) -> list[Example]:
    """The first few questions of each probe, as the version answered them."""
    examples = []
    for task in probes:
        for sample in results.get("samples", {}).get(task, [])[:EXAMPLES_PER_PROBE]:
            doc = sample["doc"]
            if "choices" in doc:
                likelihoods = [response[0] for response in sample["filtered_resps"]]
                chosen = max(range(len(likelihoods)), key=likelihoods.__getitem__)
                prompt, reference, response = doc["prompt"], doc["choices"][doc["answer"]], doc["choices"][chosen]
                correct = chosen == doc["answer"]
            else:
                prompt, reference, response = doc["question"], doc["answer"], sample["filtered_resps"][0]
                correct = bool(sample.get("exact_match"))
            examples.append(Example(task=task, prompt=prompt, reference=reference, response=response, correct=correct))
    return examples
