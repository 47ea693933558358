"""Does a version know what its corpora say? Scores from lm-evaluation-harness tasks and probes.

Eval loss rewards learning how a domain sounds; these scores ask questions. `score_version` runs
lm-eval's own evaluator with its Hugging Face model class on a version's folder: named tasks and
multiple-choice probes in one call, question probes in a second with the version's chat template on
(lm-eval applies a chat template to every task of a call or to none). Each probe becomes an inline
lm-eval task config (mixloop.evaluation.probes), so all share lm-eval's metrics and standard errors.

A version's scores are cached as JSON in the given folder, keyed by its weights' SHA-256 (from its
lineage), its tokenizer files and everything that decides the scores (tasks, settings, the bytes of
every probe file and local task YAML, the lm-eval version), so scoring again does no work.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version as installed_version
from pathlib import Path

from mixloop.config.benchmarks import EVAL_PROBES, GENERATED_PROBES, BenchmarksConfig, resolve_path
from mixloop.config.resolve import Spec
from mixloop.data import synthetic
from mixloop.evaluation import harness
from mixloop.evaluation.harness import Example, Record, TaskScore
from mixloop.evaluation.probes import ProbeSource, probe_task, read_probe, write_task_data
from mixloop.storage.fs import exists, expand_files, join, local_copy, read_text, write_text
from mixloop.storage.layout import LINEAGE_FILE, Workdir
from mixloop.versioning.lineage import load_lineage
from mixloop.versioning.registry import file_sha256

# Part of every cache key: raise it when what a score means changes (a metric, the normalisation).
SCORING_VERSION = 1
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
# Files of a version folder besides its weights that change its answers: tokenizer and chat template.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@dataclass(frozen=True)
class Benchmarks:
    """What to score a version on, every path resolved: the typed form of a spec's benchmarks."""

    tasks: tuple[str, ...] = ()
    """lm-eval task, group or tag names (its own, or of include_path)."""
    include_path: str | None = None
    num_fewshot: int | None = None
    limit: int | None = None
    probes: tuple[ProbeSource, ...] = ()
    max_new_tokens: int = 64

    @classmethod
    def from_config(
        cls, config: BenchmarksConfig, base_dir: str, corpus_probes: tuple[ProbeSource, ...] = ()
    ) -> Benchmarks:
        """The section's settings with its paths taken from `base_dir` (the spec's folder)."""
        probes = tuple(ProbeSource(name, resolve_path(base_dir, path)) for name, path in config.probes.items())
        return cls(
            tasks=tuple(config.tasks),
            include_path=resolve_path(base_dir, config.include_path) if config.include_path else None,
            num_fewshot=config.num_fewshot,
            limit=config.limit,
            probes=probes + corpus_probes,
            max_new_tokens=config.max_new_tokens,
        )

    def identity(self) -> dict:
        """Everything that decides the scores, file contents included (as their SHA-256)."""
        probes = [asdict(p) | {"sha256": [file_sha256(f) for f in expand_files(p.files)]} for p in self.probes]
        folder = Path(self.include_path) if self.include_path else None
        local_tasks = sorted(folder.rglob("*")) if folder else []
        return asdict(self) | {
            "probes": probes,
            "include_path": {
                str(p.relative_to(folder)): file_sha256(str(p)) for p in local_tasks if folder and p.is_file()
            },
        }


class VersionScores(Record):
    """What one version scored: the record cached per (version weights, benchmarks)."""

    key: str
    """The cache key: SHA-256 over the version's weights and tokenizer and the benchmarks' identity."""
    folder: str
    scores: tuple[TaskScore, ...]
    examples: tuple[Example, ...] = ()
    """The first few questions of each probe as the version answered them."""
    seconds: float
    """Wall time of the scoring (not of reading it from the cache)."""
    lm_eval_version: str

    def score(self, task: str, metric: str, filter: str = "none") -> TaskScore | None:
        return next((s for s in self.scores if (s.task, s.metric, s.filter) == (task, metric, filter)), None)


def benchmarks_of(spec: Spec, corpora=None) -> Benchmarks | None:
    """The spec's benchmarks with its corpora's probes (a generated corpus's written into the workdir
    first), or None when it asks for none. `corpora`: the run's mixloop.data.corpora.Corpora, if made."""
    config = spec.config.benchmarks or BenchmarksConfig()
    own = {name: corpus for name, corpus in spec.config.corpora.items() if corpus.probes}
    if not own and not config.tasks and not config.probes:
        return None
    if own and corpora is None:
        from mixloop.data.corpora import Corpora  # lazy: Ray and transformers come with it

        corpora = Corpora(spec)
    sources = tuple(_corpus_probe(spec, corpora, name, corpus) for name, corpus in own.items())
    return Benchmarks.from_config(config, spec.base_dir, sources)


def _corpus_probe(spec: Spec, corpora, name: str, corpus) -> ProbeSource:
    if corpus.probes == GENERATED_PROBES:
        folder = Workdir(spec.workdir).generated(name)
        return ProbeSource(name, synthetic.write_probes(folder, corpus.kind, corpus.generate.topic))
    if corpus.probes == EVAL_PROBES:  # the eval split's chats, read as the corpus reads them
        files = corpora.files(name)["eval"]
        columns = tuple(sorted(corpus.columns.items()))
        return ProbeSource(name, files, corpus.file_format, corpus.format, columns, skip_bad=True)
    return ProbeSource(name, spec.path(corpus.probes))


def score_version(folder: str, benchmarks: Benchmarks, work_dir: str, *, device: str = "cpu") -> VersionScores:
    """The version's scores on `benchmarks`, from the cache in `work_dir` (a folder or URI) when it
    holds them, else measured with lm-eval and cached there."""
    key = score_key(folder, benchmarks)
    path = join(work_dir, f"{key}.json")
    if exists(path):  # the same weights may be scored under another folder (an alias, an export)
        return VersionScores.model_validate_json(read_text(path)).model_copy(update={"folder": folder})
    start = time.monotonic()
    scores, examples = _measure(local_copy(folder), benchmarks, device)
    result = VersionScores(
        key=key,
        folder=folder,
        scores=tuple(scores),
        examples=tuple(examples),
        seconds=round(time.monotonic() - start, 3),
        lm_eval_version=installed_version("lm_eval"),
    )
    write_text(path, result.model_dump_json(indent=2))
    return result


def _measure(folder: str, benchmarks: Benchmarks, device: str) -> tuple[list[TaskScore], list[Example]]:
    probes = [read_probe(source) for source in benchmarks.probes]
    lm = harness.load_lm(folder, device)
    scores, examples = [], []
    with tempfile.TemporaryDirectory(prefix="mixloop-probes-") as scratch:
        configs = {
            p.name: probe_task(p, write_task_data(p, scratch), join(scratch, "datasets"), benchmarks.max_new_tokens)
            for p in probes
        }
        choice: list[str | dict] = [*benchmarks.tasks, *(configs[p.name] for p in probes if p.kind == "choice")]
        questions: list[str | dict] = [configs[p.name] for p in probes if p.kind == "question"]
        for tasks, chat in ((choice, False), (questions, True)):
            if not tasks:
                continue
            manager = harness.manager_for(() if chat else benchmarks.tasks, benchmarks.include_path)
            results = harness.evaluate(
                lm, tasks, manager, chat=chat, num_fewshot=benchmarks.num_fewshot, limit=benchmarks.limit
            )
            scores += harness.scores_from(results, configs)
            examples += harness.examples_from(results, [t["task"] for t in tasks if isinstance(t, dict)])
    return scores, examples


def score_key(folder: str, benchmarks: Benchmarks) -> str:
    """SHA-256 over the version's weights and tokenizer files and the benchmarks' identity. The weights'
    hashes come from the version's lineage.json (written at publish); a folder without one is hashed."""
    lineage = load_lineage(join(folder, LINEAGE_FILE))
    weights = (lineage.weights_sha256 if lineage else {}) or {
        name: file_sha256(join(folder, name)) for name in WEIGHT_FILES if exists(join(folder, name))
    }
    tokenizer = {name: file_sha256(join(folder, name)) for name in TOKENIZER_FILES if exists(join(folder, name))}
    identity = {
        "weights": weights,
        "tokenizer": tokenizer,
        "benchmarks": benchmarks.identity(),
        "lm_eval": installed_version("lm_eval"),
        "scoring": SCORING_VERSION,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
