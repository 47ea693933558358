"""The spec's `benchmarks` section: what every version is scored on besides eval loss.

Eval loss rewards sounding like a domain; these scores ask whether a version knows what the domain
says. Named tasks run as lm-evaluation-harness defines them; probes are files of questions a user
writes in one line each (see mixloop.evaluation.probes for their records). A corpus may carry its own
probe (`probes:` in its section), scored the same way under the corpus's name."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field

from mixloop.config.strict import Strict

# Values of a corpus's `probes` that name no file.
EVAL_PROBES = "eval"
GENERATED_PROBES = "generated"
PROBE_KEYWORDS = (EVAL_PROBES, GENERATED_PROBES)


class BenchmarksConfig(Strict):
    tasks: list[str] = Field(default_factory=list, examples=[["arc_easy", "my_task"]])
    """lm-evaluation-harness task, group or tag names (arc_easy, mmlu), or tasks of `include_path`;
    their datasets are downloaded once into the Hugging Face datasets cache (HF_HUB_OFFLINE honoured)."""
    include_path: str | None = None
    """A folder of your own lm-evaluation-harness task YAMLs (relative to the spec) that `tasks` may name."""
    num_fewshot: int | None = Field(default=None, ge=0)
    """Solved examples shown before each question of the named tasks; default: each task's own (0 when it
    sets none). Probes are always asked zero-shot."""
    limit: int | None = Field(default=None, gt=0)
    """Score at most this many examples of each task and probe (its first ones); default: all."""
    probes: dict[str, str] = Field(default_factory=dict, examples=[{"astro-facts": "data/astro-mc.jsonl"}])
    """Probe name to a file (relative to the spec) of JSON lines, one question each, its kind told by its
    fields: multiple choice {"prompt", "choices": [...], "answer": index of the right choice} (scored by
    log-likelihood: acc, and acc_norm per character of the choice; each choice follows the prompt after
    a space), questions {"question", "answer"}, or chats ({"conversations": [...]}: the first user turn
    asked, its assistant answer the reference); questions are answered greedily through the version's
    chat template and scored by exact_match and contains (after lowercasing and dropping punctuation,
    articles and extra spaces)."""
    max_new_tokens: int = Field(default=64, gt=0)
    """Longest answer generated for a question probe; an answer cut there is scored as it stands."""


def resolve_path(base_dir: str, value: str) -> str:
    """A path of the spec as Spec.path resolves it: URIs and absolute paths stay, others start at base_dir."""
    return value if "://" in value or Path(value).is_absolute() else str((Path(base_dir) / value).resolve())


def portable_benchmarks(section: dict[str, Any], path: Callable[[str], str]) -> dict[str, Any]:
    """The section (as data) with its paths made absolute by `path` (Spec.path), for the workdir's copy."""
    return section | {
        "probes": {name: path(value) for name, value in section.get("probes", {}).items()},
        **({"include_path": path(section["include_path"])} if section.get("include_path") else {}),
    }
