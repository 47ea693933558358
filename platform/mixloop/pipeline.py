"""Run or continue a pipeline: every stage whose version is missing, in order.

A finished stage is recognised by its content hash (its resolved settings and
its parent's hash), so re-running a spec trains nothing and an appended stage
trains alone, from the newest version. A stage that was edited after it
produced its version is refused rather than silently retrained or skipped.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import yaml

from mixloop.data import records, synthetic
from mixloop.data.prepare import CorpusRequest, iter_records, list_chunks, prepare_corpora
from mixloop.data.mixplan import MixPlan
from mixloop.data.store import read_manifest
from mixloop.storage import (exists, expand_files, is_local, join, makedirs, read_json, remove, share_with_umask, upload, write_json,
                             write_text)
from mixloop.errors import MixloopError, StageConflictError
from mixloop.evaluate import evaluate_versions, format_deltas, format_matrix, health_versions, iteration_deltas
from mixloop.health import eval_prompts
from mixloop.lock import workdir_lock
from mixloop.model import check_vocabulary, load_config, load_model, model_config, new_model
from mixloop.ray_setup import init_ray
from mixloop.registry import (list_versions, now, publish, read_lineage, remove_partial_publishes, verified_version,
                              version_dir)
from mixloop.report import write_report
from mixloop.spec import BASE_VERSION, BUILTIN_DEFAULTS, CorpusSpec, PipelineSpec, Spec, resolve_stage, stage_hash
from mixloop.tokenizer import load_tokenizer, tokenizer_fingerprint, train_tokenizer

Log = Callable[[str], None]
class Pipeline:
    """A spec's run directory: prepares its data, trains and publishes its stages, evaluates and reports.
    Ray starts (or is joined at `address`) on the first work that needs it, after the workdir's lock
    is taken and the spec checked against the versions, so a refused run costs seconds. `lock`: the
    workdir's lock when the caller already holds it."""

    def __init__(self, spec: Spec, log: Log = print, address: str | None = None, lock=None):
        self.spec = spec
        self.pipeline = spec.pipeline
        self.workdir = spec.workdir
        self.log = log
        self.address = address
        self.lock = lock  # the workdir's lock while this pipeline holds it
        self.folders: dict | None = None  # packed folder of each CorpusRequest, once prepare_all ran

    @contextmanager
    def locked(self, command: str):
        """Hold the workdir's lock (one run per workdir); nested calls share the outer hold."""
        if self.lock is not None:
            yield self.lock
            return
        with workdir_lock(self.workdir, command, self.log) as lock:
            self.lock = lock
            try:
                yield lock
            finally:
                self.lock = None

    # ------------------------------------------------------------ inputs

    @functools.cache
    def corpus_files(self, name: str) -> dict[str, str]:
        """{'train': pattern, 'eval': pattern?}, generating the corpus first (once) if the spec asks for it."""
        corpus: CorpusSpec = self.pipeline.corpora[name]
        if corpus.generate is not None:
            g = corpus.generate
            return synthetic.write_corpus(join(self.workdir, "generated", name), corpus.kind, g.topic,
                                          g.documents, g.eval_documents, g.seed)
        files = {"train": self.spec.path(corpus.path)}
        if corpus.eval:
            files["eval"] = self.spec.path(corpus.eval)
        return files

    def tokenizer_dir(self) -> str:
        """<workdir>/tokenizer: a copy of the given tokenizer, or one trained once on the corpora.
        Every version of the workdir uses it, so a spec whose tokenizer changed is refused."""
        target = join(self.workdir, "tokenizer")
        makedirs(self.workdir)
        spec = self.pipeline.tokenizer
        # Paths resolved, so the workdir's own copy of the spec (absolute paths) matches the original.
        source = {"spec": {**spec.model_dump(), "path": self.spec.path(spec.path) if spec.path else None},
                  "files": tokenizer_fingerprint(self.spec.path(spec.path)) if spec.path else None}
        record = join(self.workdir, "tokenizer-source.json")
        if exists(join(target, "tokenizer.json")):
            if read_json(record) != source:
                raise StageConflictError(
                    f"{target} was made from another tokenizer spec or files, and the versions here use it. "
                    "Fix: use a new workdir for a new tokenizer, or restore the spec's tokenizer section.")
            return target
        # Staged beside the target when local, so it appears by one rename.
        local_workdir = self.workdir.removeprefix("file://") if is_local(target) else None
        staging = tempfile.mkdtemp(dir=local_workdir, prefix=".tokenizer-")
        try:
            if spec.path:
                load_tokenizer(self.spec.path(spec.path)).save_pretrained(staging)
            else:
                self.log(f"training a byte-level BPE tokenizer ({spec.train.vocab_size} tokens)")
                train_tokenizer(self._tokenizer_texts(spec.train.sample_bytes), spec.train.vocab_size, staging)
            write_json(record, source)
            if is_local(target):
                share_with_umask(staging)  # mkdtemp made it private
                os.replace(staging, target.removeprefix("file://"))
            else:
                upload(staging, target, last="tokenizer.json")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def _tokenizer_texts(self, budget: int):
        """Text of every corpus, an equal share of `budget` bytes from each."""
        for name, corpus in self.pipeline.corpora.items():
            share = budget // len(self.pipeline.corpora)
            chunks = list_chunks(expand_files(self.corpus_files(name)["train"]), corpus.format)
            for text in (_record_text(record, corpus.kind) for chunk in chunks for _, record in iter_records(chunk)):
                if share <= 0:
                    break
                share -= len(text.encode())
                yield text

    def prepared_tokenizer(self, extra_stages: list[dict] = ()) -> str:
        """The workdir's tokenizer, with every corpus the stages use packed and checked. A tokenizer
        trained by this call is removed again when the data fails its checks, so the next run
        trains it on the corrected data."""
        fresh = not exists(join(self.workdir, "tokenizer", "tokenizer.json"))
        tokenizer_dir = self.tokenizer_dir()
        try:
            self.prepare_all(tokenizer_dir, extra_stages)
        except MixloopError:
            if fresh:
                remove(tokenizer_dir)
                remove(join(self.workdir, "tokenizer-source.json"))
            raise
        return tokenizer_dir

    def prepare_all(self, tokenizer_dir: str, extra_stages: list[dict] = ()) -> None:
        """Pack, in one Ray Data job, every corpus split the spec (and `extra_stages`, resolved stages
        outside it such as a search's trials) uses that the cache lacks, so bad or missing data stops
        the run before any training."""
        init_ray(self.address)
        requests = [self._request(n, "train", s["seq_len"], s["packing"])
                    for s in [*self.spec.resolved_stages(), *extra_stages] for n in s["mixture"]]
        requests += [self._request(n, "eval", self.default("seq_len"))
                     for n in self.pipeline.corpora if "eval" in self.corpus_files(n)]
        self.folders = prepare_corpora(requests, tokenizer_dir, self.workdir)

    def _request(self, name: str, split: str, seq_len: int, packing: bool = True) -> CorpusRequest:
        corpus = self.pipeline.corpora[name]
        return CorpusRequest(name, split, self.corpus_files(name)[split], corpus.format, corpus.kind,
                             corpus.max_bad_fraction, seq_len, corpus.max_document_tokens, corpus.long_documents,
                             packing)

    def packed(self, name: str, split: str, seq_len: int, packing: bool = True) -> str:
        return self.folders[self._request(name, split, seq_len, packing)]

    # ------------------------------------------------------------ versions

    def ensure_base(self, tokenizer_dir: str) -> dict:
        """The starting weights as version `base`: a seeded new model, or a copy of model.path."""
        model_spec = self.pipeline.model
        tokenizer = load_tokenizer(tokenizer_dir)
        model_source = {**model_spec.model_dump(), "path": self.spec.path(model_spec.path) if model_spec.path else None}
        base_hash = stage_hash({"model": model_source, "seed": self.pipeline.seed}, tokenizer_fingerprint(tokenizer_dir))
        existing = read_lineage(self.workdir, BASE_VERSION)
        if existing:
            if existing["stage_hash"] != base_hash:
                raise StageConflictError(
                    f"{version_dir(self.workdir, BASE_VERSION)} was made from another model, tokenizer or seed. "
                    "Fix: use a new workdir for a new model, or restore the spec's model/tokenizer/seed.")
            return existing
        if model_spec.path:
            path = self.spec.path(model_spec.path)
            check_vocabulary(load_config(path, model_spec.trust_remote_code).vocab_size, tokenizer)
            model = load_model(path, model_spec.trust_remote_code)
        else:
            model = new_model(model_config(model_spec.preset, model_spec.config, tokenizer), self.pipeline.seed)
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder, safe_serialization=True)
            lineage = {"parent": None, "stage": None, "stage_hash": base_hash, "started": now(),
                       "parameters": sum(p.numel() for p in model.parameters()),
                       "metrics": {"final_lr": 0.0}}
            publish(self.workdir, BASE_VERSION, folder, tokenizer_dir, lineage)
        self.log(f"published version {BASE_VERSION} ({lineage['parameters']:,} parameters)")
        return read_lineage(self.workdir, BASE_VERSION)

    def run(self) -> dict:
        """Train every missing stage, evaluate, print and store the eval matrix."""
        with self.locked("mixloop run"):
            trained = self.train()
            if not trained:
                self.log("every stage is done; nothing to train")
            return {"trained": trained, **self.report()}

    def train(self, until: str | None = None, extra_stages: list[dict] = ()) -> list[str]:
        """Train the missing stages in order, up to and including `until` (all by default); the
        names of those trained. `extra_stages` are prepared too (see prepare_all).

        Nothing is written until the spec is accepted (no finished stage was edited) and the data
        passed its checks: a run that fails those leaves the workdir as it was."""
        conflicts = edited_stages(self.spec)
        if conflicts:
            raise StageConflictError("\n".join(conflicts))
        with self.locked("mixloop run"):
            return self._train(until, extra_stages)

    def _train(self, until: str | None, extra_stages: list[dict]) -> list[str]:
        for leftover in remove_partial_publishes(self.workdir):
            self.log(f"removed {leftover}, left by a publish that was interrupted")
        tokenizer_dir = self.prepared_tokenizer(extra_stages)
        previous = self.ensure_base(tokenizer_dir)
        write_text(join(self.workdir, "pipeline.yaml"), yaml.safe_dump(self.spec.portable(), sort_keys=False))
        trained = []
        for stage in self.pipeline.stages if until != BASE_VERSION else []:
            resolved = resolve_stage(self.pipeline, stage)
            parent = read_lineage(self.workdir, stage.start_from) if stage.start_from else previous
            digest = stage_hash(resolved, parent["stage_hash"])
            existing = read_lineage(self.workdir, stage.name)
            if existing is not None:
                self.log(f"stage {stage.name}: done (version {stage.name}), skipping")
                previous = existing
            else:
                previous = self.train_stage(resolved, parent, digest, tokenizer_dir)
                trained.append(stage.name)
            if stage.name == until:
                break
        return trained

    def report(self) -> dict:
        """Evaluate what is missing, then write eval/ and report/index.html and print the tables."""
        with self.locked("mixloop report"):
            return self._report()

    def _report(self) -> dict:
        if self.folders is None:  # `mixloop report` alone: the eval splits must be packed first
            self.prepare_all(self.tokenizer_dir())
        matrix = self.evaluate()  # only pairs not stored yet are computed
        lineages = {v["version"]: v for v in list_versions(self.workdir)}
        deltas = iteration_deltas(matrix, lineages)
        health = health_versions(self.workdir, list(lineages), self.chat_prompts(), self.pipeline.chat_max_new_tokens)
        table = format_matrix(matrix)
        write_text(join(self.workdir, "eval", "table.txt"), table + "\n")
        write_json(join(self.workdir, "eval", "matrix.json"), matrix)
        write_json(join(self.workdir, "eval", "deltas.json"), deltas)
        unmeasured = [n for n in self.pipeline.corpora if "eval" not in self.corpus_files(n)]
        page = write_report(self.workdir, lineages, matrix, deltas, health, unmeasured)
        if any(matrix.values()):
            self.log("eval loss (token mean; chat sets on assistant tokens):\n" + table)
        if deltas:
            self.log("against each parent:\n" + format_deltas(deltas))
        if unmeasured:
            self.log(no_eval_note(unmeasured))
        self.log(f"report: {page}")
        return {"matrix": matrix, "deltas": deltas, "health": health, "report": page}

    def chat_prompts(self) -> dict[str, list]:
        count = self.pipeline.chat_prompts
        return {name: eval_prompts(self.corpus_files(name)["eval"], count)
                for name, corpus in self.pipeline.corpora.items()
                if corpus.kind == "chat" and count and "eval" in self.corpus_files(name)}

    def train_stage(self, stage: dict, parent: dict, digest: str, tokenizer_dir: str) -> dict:
        from mixloop.train.launch import fit_stage, run_name

        verified_version(self.workdir, parent["version"])  # a clear error now, not three failed restarts
        job = self.stage_job(stage, parent)
        corpus_dirs, rows_per_step, total_steps = job["corpus_dirs"], job["rows_per_step"], job["total_steps"]
        self.log(f"stage {stage['name']}: training {total_steps} steps of {stage['global_batch_tokens']} tokens "
                 f"from version {parent['version']} on {stage['max_workers']} worker(s)")
        for warning in repeat_warnings(stage, _stage_plan(stage, corpus_dirs, total_steps * rows_per_step).epochs()):
            self.log(f"warning: {warning}")
        started, clock = now(), time.time()
        result = fit_stage(job, join(self.workdir, "train"), run_name(self.pipeline.name, stage["name"], digest, corpus_dirs))
        metrics = {**(result.metrics or {}), "resumed_from": (result.return_value or {}).get("resumed_from"),
                   "wall_seconds": round(time.time() - clock, 1)}
        with result.checkpoint.as_directory() as folder:
            return self.publish_stage(stage, parent, digest, folder, tokenizer_dir, metrics, started)

    def publish_stage(self, stage: dict, parent: dict, digest: str, checkpoint_dir: str, tokenizer_dir: str,
                      metrics: dict, started: str) -> dict:
        """Publish a stage's final checkpoint as its version, with its lineage."""
        from mixloop.train.loop import STATE_FILE

        job = self.stage_job(stage, parent)
        corpus_dirs, total_steps = job["corpus_dirs"], job["total_steps"]
        state = json.loads(Path(checkpoint_dir, STATE_FILE).read_text())
        if state["step"] != total_steps:
            raise MixloopError(f"stage {stage['name']}: the last checkpoint is at step {state['step']}, "
                               f"not {total_steps}; run again to finish it")
        plan = _stage_plan(stage, corpus_dirs, total_steps * job["rows_per_step"])
        lineage = {
            "parent": parent["version"], "stage": stage, "stage_hash": digest, "started": started,
            "tokens_per_corpus": dict(zip(stage["mixture"], state["tokens"])),
            "rows_per_corpus": plan.rows_per_corpus(), "epochs_per_corpus": plan.epochs(),
            "data_fingerprints": {n: Path(d).name for n, d in corpus_dirs.items()},
            "metrics": {**metrics, "final_lr": state["lr"], "steps": state["step"]},
        }
        publish(self.workdir, stage["name"], checkpoint_dir, tokenizer_dir, lineage)
        self.log(f"stage {stage['name']}: published version {stage['name']}")
        return read_lineage(self.workdir, stage["name"])

    def stage_job(self, stage: dict, parent: dict) -> dict:
        corpus_dirs = {n: self.packed(n, "train", stage["seq_len"], stage["packing"]) for n in stage["mixture"]}
        return stage_job(self.pipeline, self.workdir, stage, parent, corpus_dirs, join(self.workdir, "metrics.jsonl"))

    def preview(self, stage_name: str | None = None) -> list[dict]:
        """Per stage and corpus: documents, tokens, packed rows, rejects, realised share, passes over it."""
        with self.locked("mixloop data preview"):
            self.prepare_all(self.tokenizer_dir())
        report = []
        for stage in self.spec.resolved_stages():
            if stage_name not in (None, stage["name"]):
                continue
            folders = {n: self.packed(n, "train", stage["seq_len"], stage["packing"]) for n in stage["mixture"]}
            rows_per_step, total_steps = _steps(stage)
            plan = _stage_plan(stage, folders, rows_per_step * total_steps)
            realised, epochs = plan.rows_per_corpus(), plan.epochs()
            for name, folder in folders.items():
                manifest = read_manifest(folder)
                report.append({
                    "stage": stage["name"], "corpus": name, "documents": manifest["documents"],
                    "tokens": manifest["tokens"], "rows": manifest["rows"], "rejected": manifest["rejected"],
                    "blank_lines": manifest.get("blank_lines", 0),  # manifests before the count lack it
                    "share": realised[name] / (rows_per_step * total_steps), "epochs": epochs[name],
                    "warnings": repeat_warnings(stage, {name: epochs[name]}),
                })
        return report

    def evaluate(self) -> dict:
        """Every version on every eval split, packed at the pipeline's default sequence length."""
        seq_len, rows = self.default("seq_len"), self.pipeline.eval_rows
        eval_dirs = {n: self.packed(n, "eval", seq_len) for n in self.pipeline.corpora if "eval" in self.corpus_files(n)}
        versions = [v["version"] for v in list_versions(self.workdir)]
        for version in versions:  # cached results must not hide a version whose weights went bad
            verified_version(self.workdir, version)
        return evaluate_versions(self.workdir, versions, eval_dirs, rows)

    def default(self, field: str):
        """A setting of the pipeline's defaults, or mixloop's own when the spec leaves it out."""
        value = getattr(self.pipeline.defaults, field)
        return value if value is not None else getattr(BUILTIN_DEFAULTS, field)


def no_eval_note(corpora: list[str]) -> str:
    return (f"no eval split for corpora {', '.join(corpora)}: their uptake and forgetting are not measured. "
            "Fix: add `eval: <held-out file>` to each of them in the spec.")


def edited_stages(spec: Spec) -> list[str]:
    """A problem for every finished stage of the spec whose settings (or whose parent's) changed
    after it produced its version: versions are immutable, so such a spec is refused."""
    workdir = spec.workdir
    base = read_lineage(workdir, BASE_VERSION)
    if base is None:
        return []
    hashes, problems = {BASE_VERSION: base["stage_hash"]}, []
    previous = BASE_VERSION
    for index, stage in enumerate(spec.pipeline.stages):
        parent = stage.start_from or previous
        digest = stage_hash(resolve_stage(spec.pipeline, stage), hashes.get(parent, ""))
        existing = read_lineage(workdir, stage.name)
        if existing is not None and existing["stage_hash"] != digest:
            problems.append(
                f"stages[{index}] ({stage.name}): changed after it produced version {stage.name} "
                f"(hash {existing['stage_hash']} -> {digest}). Versions are immutable. Fix: restore the stage's "
                f"settings, give the changed stage a new name, or delete {version_dir(workdir, stage.name)} to "
                "retrain it.")
        hashes[stage.name] = existing["stage_hash"] if existing is not None else digest
        previous = stage.name
    return problems


def stage_job(pipeline: PipelineSpec, workdir: str, stage: dict, parent: dict, corpus_dirs: dict[str, str],
              metrics_path: str) -> dict:
    """What every worker of a resolved stage needs (train.loop.StageJob), as plain data."""
    rows_per_step, total_steps = _steps(stage)
    return {
        "pipeline": pipeline.name, "stage": stage, "total_steps": total_steps, "rows_per_step": rows_per_step,
        "corpus_dirs": {n: corpus_dirs[n] for n in stage["mixture"]},
        "parent_dir": version_dir(workdir, parent["version"]),
        "start_lr": parent["metrics"]["final_lr"] if stage["lr"]["warmup_from"] == "current" else 0.0,
        "metrics_path": metrics_path, "trust_remote_code": pipeline.model.trust_remote_code,
    }


def _steps(stage: dict) -> tuple[int, int]:
    """Rows per optimizer step and the stage's steps (its token budget rounded up to whole steps)."""
    return stage["global_batch_tokens"] // stage["seq_len"], math.ceil(stage["tokens"] / stage["global_batch_tokens"])


def _stage_plan(stage: dict, corpus_dirs: dict[str, str], total_rows: int) -> MixPlan:
    return MixPlan.for_stage(stage, {n: read_manifest(d)["rows"] for n, d in corpus_dirs.items()}, total_rows)


def repeat_warnings(stage: dict, epochs: dict[str, float]) -> list[str]:
    return [f"stage {stage['name']} passes over corpus {name!r} {passes:.1f} times, more than max_repeats "
            f"{stage['max_repeats']:g}: add data to it or lower its weight" for name, passes in epochs.items()
            if passes > stage["max_repeats"]]


def _record_text(record, kind: str) -> str:
    """The text a record trains on, or "" for a record that preparation will reject."""
    try:
        if kind == "text":
            return records.check_text(record)
        return "\n".join(turn["content"] for turn in records.check_chat(record))
    except records.BadRecord:
        return ""
