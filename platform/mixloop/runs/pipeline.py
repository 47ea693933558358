"""Run or continue a pipeline: every stage whose version is missing, in order, then the report.

A finished stage is recognised by its content hash (its resolved settings and
its parent's hash), so re-running a spec trains nothing and an appended stage
trains alone, from the newest version. A stage that was edited after it
produced its version is refused rather than silently retrained or skipped.

The work itself lives in rooms of its own: corpora (files, tokenizer, packed
splits), stages (base, training, publishing), evaluate and report. `PipelineRunner`
holds the workdir's lock and calls them in order.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import yaml

from mixloop.config import BASE_VERSION, ResolvedStage, Spec, resolve_stage, stage_hash
from mixloop.data.corpora import Corpora, PreparedCorpora
from mixloop.data.store import read_manifest
from mixloop.errors import StageConflictError
from mixloop.evaluation.evaluate import (
    evaluate_versions,
    format_deltas,
    format_matrix,
    health_versions,
    iteration_deltas,
)
from mixloop.evaluation.knowledge import benchmarks_of
from mixloop.evaluation.report import write_report
from mixloop.evaluation.scores import ScoreMatrix, format_scores, headlines, score_deltas, score_versions
from mixloop.evaluation.scores import as_json as scores_json
from mixloop.runs.stages import StageRunner, edited_stages, ensure_base, repeat_warnings, stage_plan
from mixloop.runs.tracking import Trackers
from mixloop.storage.fs import write_json, write_text
from mixloop.storage.layout import Workdir
from mixloop.storage.lock import workdir_lock
from mixloop.train.job import same_workers
from mixloop.train.metrics import format_eta
from mixloop.train.step import StepHooks
from mixloop.versioning import gate
from mixloop.versioning.lineage import Lineage, Lineages
from mixloop.versioning.registry import (
    current_version,
    list_versions,
    read_lineage,
    remove_partial_publishes,
    require_lineage,
    verified_version,
)

logger = logging.getLogger(__name__)


class Trained(NamedTuple):
    trained: list[str]
    """The stages trained by this call, in order."""
    prepared: PreparedCorpora
    """The packed corpora they (and the evaluation) use."""


class Member(NamedTuple):
    """A stage of a group (see PipelineRunner._groups)."""

    position: int
    """Its index in the spec's stages."""
    stage: ResolvedStage
    digest: str
    parent: str
    train: bool
    """Whether this call trains it: it has no version, and is not after the stage to train until."""


def _blocks(group: list[Member]) -> list[list[Member]]:
    """The runs of consecutive stages of a group that this call trains: each run one worker group."""
    blocks: list[list[Member]] = []
    for before, member in zip([None, *group], group):
        if member.train:
            if before is not None and before.train:
                blocks[-1].append(member)
            else:
                blocks.append([member])
    return blocks


@dataclass(frozen=True)
class Evaluation:
    """What evaluating a workdir's versions gives (`mixloop eval`, `mixloop report`)."""

    matrix: dict[str, dict[str, dict]]
    """Per version and eval set: {"loss", "stderr", "perplexity", "tokens", "rows", "key"} (eval/matrix.json)."""
    deltas: dict[str, dict]
    """Per version, against its parent: {"parent", "uptake", "forgetting", "forgetting_vs_best"} (eval loss)."""
    health: dict[str, dict]
    """Per version and chat set: {"samples", "ended", "repetition", "length", "examples"}."""
    scores: ScoreMatrix = field(default_factory=dict)
    """Per version and benchmark task or probe: its headline Score (value, stderr) (eval/scores.json)."""
    score_deltas: dict[str, dict[str, dict]] = field(default_factory=dict)
    """Per version and task, against its parent: {"change", "stderr", "significant"}."""
    report: str = ""
    """The report page (report/index.html)."""


@dataclass(frozen=True)
class RunResult(Evaluation):
    """What `mixloop run` gives: the evaluation, and the versions this run trained (in order)."""

    trained: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CorpusPreview:
    """What one stage draws from one corpus, before training (`mixloop data preview`)."""

    stage: str
    corpus: str
    documents: int
    tokens: int
    rows: int
    rejected: int
    blank_lines: int
    formats: dict[str, int]
    """Records per shape they were read in (text, conversations, messages, ...)."""
    share: float
    """The corpus's realised share of the stage's rows."""
    epochs: float
    """Passes the stage makes over the corpus."""
    warnings: list[str]


class PipelineRunner:
    """A spec's run directory. Ray starts (or is joined at `address`) on the first work that needs
    it, after the workdir's lock is taken and the spec checked against the versions, so a refused run
    costs seconds. `lock`: the workdir's lock when the caller already holds it; `hooks`: see
    train.step.StepHooks."""

    def __init__(
        self,
        spec: Spec,
        address: str | None = None,
        lock=None,
        hooks: StepHooks | None = None,
        progress_bar: bool = False,
    ):
        self.spec = spec
        self.workdir = spec.workdir
        self.lock = lock  # the workdir's lock while this pipeline holds it
        self.hooks = hooks  # tests' way into the step loop; none in production
        self.corpora = Corpora(spec, address, progress_bar)
        self.trackers = Trackers.of(spec)
        self.progress_bar = progress_bar  # live bars (preparation, stages, evaluation) instead of lines

    @contextmanager
    def locked(self, command: str):
        """Hold the workdir's lock (one run per workdir); nested calls share the outer hold."""
        with workdir_lock(self.workdir, command, held=self.lock) as lock:
            outer, self.lock = self.lock, lock
            try:
                yield lock
            finally:
                self.lock = outer

    def run(self) -> RunResult:
        """Train every missing stage, then evaluate, judge the last version by the gate, and report."""
        with self.locked("mixloop run"):
            trained, prepared = self.train()
            if not trained:
                logger.info("every stage is done; nothing to train")
            evaluation = self.report(prepared, judge=True)
            return RunResult(trained=trained, **vars(evaluation))  # the records as they are, not as dicts

    def train(self, until: str | None = None, extra_stages: Iterable[ResolvedStage] = ()) -> Trained:
        """Train the missing stages in order, up to and including `until` (all by default).
        `extra_stages` (a search's trials) have their corpora packed too.

        Nothing is published, and the workdir's pipeline.yaml is not rewritten, until the spec is
        accepted (no finished stage was edited) and the data passed its checks. What a failed check
        leaves is the packed corpora and their rejects, content-addressed, for the next run to reuse."""
        conflicts = edited_stages(self.spec)
        if conflicts:
            raise StageConflictError("\n".join(conflicts))
        with self.locked("mixloop run"):
            for leftover in remove_partial_publishes(self.workdir):
                logger.info(f"removed {leftover}, left by a publish that was interrupted")
            prepared = self.corpora.prepare([*self.spec.resolved_stages(), *extra_stages])
            ensure_base(self.spec, prepared.tokenizer_dir)
            write_text(Workdir(self.workdir).pipeline_copy, yaml.safe_dump(self.spec.portable(), sort_keys=False))
            runner = StageRunner(self.spec, prepared, self.hooks, self.lock, self.trackers, self.progress_bar)
            return Trained(self._train_stages(runner, until), prepared)

    def _train_stages(self, runner: StageRunner, until: str | None) -> list[str]:
        trained: list[Lineage] = []
        for group in self._groups(until):
            run = runner.run_name(group[0].stage, group[0].digest)
            for block in _blocks(group):
                logger.info(self._pipeline_line(block[0].position, trained))
                parent = require_lineage(self.workdir, block[0].parent)
                trained += runner.train([(member.stage, member.digest) for member in block], parent, run)
        return [lineage.version for lineage in trained]

    def _groups(self, until: str | None) -> list[list[Member]]:
        """The spec's stages in groups that one worker group trains in turn: consecutive stages, each the
        next one's parent, asking for the same workers. A group is the same whatever part of it is done,
        so its Ray Train run (named after all its stages) resumes after an interruption. Stages after
        `until` are marked not to train."""
        groups: list[list[Member]] = []
        hashes = {BASE_VERSION: require_lineage(self.workdir, BASE_VERSION).stage_hash}
        previous, beyond = BASE_VERSION, until == BASE_VERSION
        for index, stage in enumerate(self.spec.config.stages):
            resolved, parent = resolve_stage(self.spec.config, stage), stage.start_from or previous
            existing = read_lineage(self.workdir, stage.name)
            hashes[stage.name] = existing.stage_hash if existing else stage_hash(resolved, hashes[parent])
            if existing is not None and not beyond:
                logger.info(f"stage {stage.name}: done (version {stage.name}), skipping")
            member = Member(index, resolved, hashes[stage.name], parent, train=existing is None and not beyond)
            if groups and groups[-1][-1].stage.name == parent and same_workers(groups[-1][-1].stage, resolved):
                groups[-1].append(member)
            else:
                groups.append([member])
            previous, beyond = stage.name, beyond or stage.name == until
        return groups

    def _pipeline_line(self, index: int, trained: list[Lineage]) -> str:
        """Where the whole pipeline stands as stage `index` starts: budgets done and left, and an ETA at
        the speed of the stages this run trained."""
        stages = self.spec.resolved_stages()
        budgets = [stage.geometry.tokens_for(stage.total_steps) for stage in stages]
        done = sum(b for stage, b in zip(stages, budgets) if read_lineage(self.workdir, stage.name) is not None)
        left = sum(budgets) - done
        seconds = sum(lineage.metrics.wall_seconds for lineage in trained)
        rate = sum(lineage.budget_slots for lineage in trained) / seconds if seconds else 0
        eta = f"; ETA {format_eta(left / rate)} at {rate:,.0f} tokens/s (so far, start-up included)" if rate else ""
        return (
            f"pipeline: stage {index + 1} of {len(stages)} ({stages[index].name}); {done:,} of "
            f"{sum(budgets):,} budgeted tokens done, {left:,} left{eta}"
        )

    def report(self, prepared: PreparedCorpora | None = None, judge: bool = False) -> Evaluation:
        """Evaluate what is missing, then write eval/ and report/index.html and print the tables.
        `judge`: first pass the gate's verdict on the pipeline's last version (once per version)."""
        with self.locked("mixloop report"):
            prepared = prepared or self.corpora.prepare(self.spec.resolved_stages())
            lineages = list_versions(self.workdir)
            evaluation = self._measure(prepared, lineages)
            if judge:
                lineages = self._judge_last(evaluation, lineages)
            evaluation = self._write(evaluation, lineages)
        self._print(evaluation)
        return evaluation

    def _measure(self, prepared: PreparedCorpora, lineages: Lineages) -> Evaluation:
        """Loss on every eval split, chat health and benchmark scores of every version (only what is not
        stored yet is computed), and what each gained and lost against its parent."""
        matrix = self.evaluate(prepared)
        chat = self.corpora.chat_prompts(), self.spec.config.chat_max_new_tokens
        health = health_versions(self.workdir, list(lineages), *chat, self.progress_bar)
        benchmarks = benchmarks_of(self.spec, self.corpora)
        scored = score_versions(self.workdir, list(lineages), benchmarks, self.progress_bar) if benchmarks else {}
        scores = headlines(scored)
        return Evaluation(
            matrix=matrix,
            deltas=iteration_deltas(matrix, lineages),
            health=health,
            scores=scores,
            score_deltas=score_deltas(scores, lineages),
        )

    def _write(self, evaluation: Evaluation, lineages: Lineages) -> Evaluation:
        """eval/'s tables, the report page and the trackers; the evaluation with its page."""
        workdir = Workdir(self.workdir)
        write_text(workdir.eval_table, format_matrix(evaluation.matrix) + "\n")
        write_json(workdir.eval_matrix, evaluation.matrix)
        write_json(workdir.eval_deltas, evaluation.deltas)
        write_json(workdir.eval_scores, scores_json(evaluation.scores))
        page = write_report(
            self.workdir,
            lineages,
            evaluation.matrix,
            evaluation.deltas,
            evaluation.health,
            self.corpora.without_eval(),
            scores=evaluation.scores,
            score_deltas=evaluation.score_deltas,
        )
        self.trackers.log_versions(evaluation.matrix, evaluation.deltas, lineages, evaluation.scores)
        self.trackers.close(workdir.report)
        return dataclasses.replace(evaluation, report=page)

    def _print(self, evaluation: Evaluation) -> None:
        if any(evaluation.matrix.values()):
            logger.info("eval loss (token mean; chat sets on assistant tokens):\n" + format_matrix(evaluation.matrix))
        if evaluation.deltas:
            logger.info(format_deltas(evaluation.deltas))
        if evaluation.scores:
            logger.info(
                "knowledge (headline metric per task, ± its standard error):\n" + format_scores(evaluation.scores)
            )
        unmeasured = self.corpora.without_eval()
        if unmeasured:
            logger.info(no_eval_note(unmeasured))
        logger.info(f"report: {evaluation.report}")

    def _judge_last(self, evaluation: Evaluation, lineages: Lineages) -> Lineages:
        """The gate's verdict on the pipeline's last version, unless it has one; the lineages with it."""
        last = self.spec.config.stages[-1].name
        if last not in lineages or lineages[last].gate is not None:
            return lineages
        current = current_version(self.workdir)
        e = evaluation
        verdict = gate.judge(self.spec.config.gate, last, current, e.matrix, e.health, lineages, e.scores)
        lineages = lineages.with_lineage(gate.record(self.workdir, last, verdict))
        if verdict.passed:
            logger.info(f"gate: {last} is now the current version ({verdict.summary()})")
        else:
            logger.info(
                f"gate: {last} {verdict.summary()}; {current} stays the current version. "
                f"Override with `mixloop models promote {self.workdir} {last}`."
            )
        return lineages

    def evaluate(self, prepared: PreparedCorpora) -> dict:
        """Every version on every eval split, packed at the pipeline's default sequence length."""
        versions = list(list_versions(self.workdir))
        for version in versions:  # cached results must not hide a version whose weights went bad
            verified_version(self.workdir, version)
        return evaluate_versions(self.workdir, versions, prepared.eval, self.spec.config.eval_rows, self.progress_bar)

    def preview(self, stage_name: str | None = None) -> list[CorpusPreview]:
        """Per stage and corpus: documents, tokens, packed rows, rejects, realised share, passes over it."""
        with self.locked("mixloop data preview"):
            prepared = self.corpora.prepare(self.spec.resolved_stages())
        report = []
        for stage in self.spec.resolved_stages():
            if stage_name not in (None, stage.name):
                continue
            folders = prepared.for_stage(stage)
            plan = stage_plan(stage, folders)
            realised, epochs = plan.rows_per_corpus(), plan.epochs()
            for name, folder in folders.items():
                manifest = read_manifest(folder)
                report.append(
                    CorpusPreview(
                        stage=stage.name,
                        corpus=name,
                        documents=manifest["documents"],
                        tokens=manifest["tokens"],
                        rows=manifest["rows"],
                        rejected=manifest["rejected"],
                        blank_lines=manifest.get("blank_lines", 0),  # manifests before the count lack it
                        formats=manifest.get("formats", {}),
                        share=realised[name] / plan.total_rows,
                        epochs=epochs[name],
                        warnings=repeat_warnings(stage, {name: epochs[name]}),
                    )
                )
        return report


def no_eval_note(corpora: list[str]) -> str:
    return (
        f"no eval split for corpora {', '.join(corpora)}: their uptake and forgetting are not measured. "
        "Fix: add `eval: <held-out file>` to each of them in the spec."
    )
