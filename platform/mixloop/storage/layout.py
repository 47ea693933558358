"""The run directory's layout: every path under a workdir (local or an fsspec URI), named once.

    <workdir>/
      pipeline.yaml            the spec as the last run read it, every path absolute (Spec.portable)
      metrics.jsonl            every stage's metrics lines (train.metrics)
      current.json             the current version and its history (versioning.registry)
      inbox.json               what `mixloop watch` has added from its inbox
      .lock                    one command at a time (storage.lock)
      tokenizer/               the pipeline's tokenizer; tokenizer-source.json says where it came from
      generated/<corpus>/      corpora the spec asks mixloop to write (data.synthetic)
      cache/<corpus>-<split>-<key>/   packed corpora; cache/prepare.jsonl logs each preparation
      rejects/<corpus>-<split>-<key>/ the records preparation refused, with reasons
      models/<version>/        published versions (versioning.registry); models/current links one
      eval/<version>/<corpus>.json    eval results; eval/{table.txt,matrix.json,deltas.json} the summary
      eval/scores.json, eval/knowledge/<key>.json     benchmark scores: headlines, and each version's all
      train/<run>/             Ray Train's storage for a run (checkpoints, final/<stage run>/)
      tune/<search>/           a search: results, trials/<id>/ (SearchFolder)
      report/                  the HTML report
      tensorboard/             the default tracker's event files; wandb/ the W&B tracker's

Nothing else joins these names: a module that needs a path asks a `Workdir` (or a `SearchFolder`).
"""

from __future__ import annotations

from dataclasses import dataclass

from mixloop.storage.fs import join

METRICS_FILE = "metrics.jsonl"
OBJECTIVE_PLOT = "objective.png"  # a search's plot, beside its results
LINEAGE_FILE = "lineage.json"


@dataclass(frozen=True)
class Workdir:
    """The paths of one run directory; `root` is a local path or a URI, as the spec resolves it."""

    root: str

    @property
    def pipeline_copy(self) -> str:
        return join(self.root, "pipeline.yaml")

    @property
    def metrics(self) -> str:
        return join(self.root, METRICS_FILE)

    @property
    def current_record(self) -> str:
        return join(self.root, "current.json")

    @property
    def inbox_record(self) -> str:
        return join(self.root, "inbox.json")

    @property
    def lock(self) -> str:
        return join(self.root, ".lock")

    @property
    def tokenizer(self) -> str:
        return join(self.root, "tokenizer")

    @property
    def tokenizer_source(self) -> str:
        return join(self.root, "tokenizer-source.json")

    def generated(self, corpus: str) -> str:
        return join(self.root, "generated", corpus)

    def packed(self, corpus: str, split: str, key: str) -> str:
        return join(self.root, "cache", f"{corpus}-{split}-{key}")

    @property
    def prepare_log(self) -> str:
        return join(self.root, "cache", "prepare.jsonl")

    def rejects(self, corpus: str, split: str, key: str) -> str:
        return join(self.root, "rejects", f"{corpus}-{split}-{key}")

    @property
    def models(self) -> str:
        return join(self.root, "models")

    def version(self, name: str) -> str:
        return join(self.models, name)

    def lineage(self, version: str) -> str:
        return join(self.version(version), LINEAGE_FILE)

    def eval_result(self, version: str, corpus: str) -> str:
        return join(self.root, "eval", version, f"{corpus}.json")

    @property
    def eval_table(self) -> str:
        """The loss matrix as the report prints it."""
        return join(self.root, "eval", "table.txt")

    @property
    def eval_matrix(self) -> str:
        """matrix.json: every version's results per eval set."""
        return join(self.root, "eval", "matrix.json")

    @property
    def eval_scores(self) -> str:
        """scores.json: every version's headline score per benchmark task and probe."""
        return join(self.root, "eval", "scores.json")

    @property
    def knowledge_cache(self) -> str:
        """Each version's full scores, one JSON file per (weights, benchmarks) key."""
        return join(self.root, "eval", "knowledge")

    @property
    def eval_deltas(self) -> str:
        """deltas.json: uptake and forgetting per version."""
        return join(self.root, "eval", "deltas.json")

    @property
    def train(self) -> str:
        """Ray Train's storage path: one folder per run name."""
        return join(self.root, "train")

    def final_weights(self, run: str, stage_run: str) -> str:
        """Where a group's workers leave a stage's final weights for the publisher."""
        return join(self.train, run, "final", stage_run)

    @property
    def tune(self) -> str:
        return join(self.root, "tune")

    def search(self, name: str) -> SearchFolder:
        return SearchFolder(join(self.tune, name))

    @property
    def report(self) -> str:
        return join(self.root, "report")

    @property
    def tensorboard(self) -> str:
        return join(self.root, "tensorboard")

    @property
    def wandb(self) -> str:
        """Weights & Biases' run files (offline mode: synced from here)."""
        return join(self.root, "wandb")


@dataclass(frozen=True)
class SearchFolder:
    """`tune/<search>/`: a search's record, results and its trials' folders."""

    root: str

    @property
    def record(self) -> str:
        """search.json: the fingerprint and settings the search was started with."""
        return join(self.root, "search.json")

    @property
    def results(self) -> str:
        return join(self.root, "results.json")

    @property
    def results_csv(self) -> str:
        return join(self.root, "results.csv")

    @property
    def objective_plot(self) -> str:
        return join(self.root, OBJECTIVE_PLOT)

    @property
    def best_stage(self) -> str:
        return join(self.root, "best-stage.yaml")

    @property
    def train(self) -> str:
        """Ray Train's storage for trials of several workers."""
        return join(self.root, "train")

    def trial(self, trial_id: str) -> TrialFolder:
        return TrialFolder(join(self.root, "trials", trial_id))


@dataclass(frozen=True)
class TrialFolder:
    """`tune/<search>/trials/<id>/`: one trial's stage, metrics, result and final weights."""

    root: str

    @property
    def stage(self) -> str:
        return join(self.root, "stage.yaml")

    @property
    def metrics(self) -> str:
        return join(self.root, METRICS_FILE)

    @property
    def result(self) -> str:
        return join(self.root, "result.json")

    @property
    def starts(self) -> str:
        """starts.jsonl: when each attempt of the trial started (a trial's overhead is measured from it)."""
        return join(self.root, "starts.jsonl")

    @property
    def tracked(self) -> str:
        """tracked.json: the trackers its lines were already forwarded to."""
        return join(self.root, "tracked.json")

    @property
    def final(self) -> str:
        return join(self.root, "final")
