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
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from mixloop.data import synthetic
from mixloop.data.prepare import CorpusRequest, iter_records, list_chunks, prepare_corpora
from mixloop.data.mixplan import MixPlan
from mixloop.data.store import read_manifest
from mixloop.storage import exists, is_local, join, makedirs, read_json, upload, write_json, write_text
from mixloop.errors import MixloopError, StageConflictError
from mixloop.evaluate import evaluate_versions, format_deltas, format_matrix, health_versions, iteration_deltas
from mixloop.health import eval_prompts
from mixloop.model import check_vocabulary, load_config, load_model, model_config, new_model
from mixloop.registry import list_versions, now, publish, read_lineage, version_dir
from mixloop.report import write_report
from mixloop.spec import BASE_VERSION, BUILTIN_DEFAULTS, CorpusSpec, PipelineSpec, Spec, expand_files, resolve_stage, stage_hash
from mixloop.tokenizer import load_tokenizer, tokenizer_fingerprint, train_tokenizer

Log = Callable[[str], None]
# A custom resource that tuning trials' drivers take, so they never hold the CPUs training workers need.
TRIAL_RESOURCE = "mixloop_trial"


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to a cluster, or start a private local one bound to 127.0.0.1 without a dashboard."""
    import ray
    import ray.data

    # Ray Train's reports wait for the controller's poll; the default 2 s interval makes them slow.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.3")
    if ray.is_initialized():
        return
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    if address:
        ray.init(address=address)
    else:
        # The dashboard process also serves the state API that Ray Train polls; it listens on loopback only.
        # Ray's own processes (Train's placement-group cleaner) call that API without an address: with
        # another Ray on this machine they would find two and fail, so ours is named in their environment.
        dashboard_port = _free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
        ray.init(dashboard_host="127.0.0.1", dashboard_port=dashboard_port, include_dashboard=True,
                 num_cpus=num_cpus, resources={TRIAL_RESOURCE: 1000})


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Pipeline:
    def __init__(self, spec: Spec, log: Log = print):
        self.spec = spec
        self.pipeline = spec.pipeline
        self.workdir = spec.workdir
        self.log = log
        makedirs(self.workdir)

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
            for text in (_record_text(record) for chunk in chunks for _, record in iter_records(chunk)):
                if share <= 0:
                    break
                share -= len(text.encode())
                yield text

    def prepare_all(self, tokenizer_dir: str, extra_stages: list[dict] = ()) -> None:
        """Pack, in one Ray Data job, every corpus split the spec (and `extra_stages`, resolved stages
        outside it such as a search's trials) uses that the cache lacks, so bad or missing data stops
        the run before any training."""
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
        trained = self.train()
        if not trained:
            self.log("every stage is done; nothing to train")
        return {"trained": trained, **self.report()}

    def train(self, until: str | None = None, extra_stages: list[dict] = ()) -> list[str]:
        """Train the missing stages in order, up to and including `until` (all by default); the
        names of those trained. `extra_stages` are prepared too (see prepare_all)."""
        write_text(join(self.workdir, "pipeline.yaml"), yaml.safe_dump(self.spec.portable(), sort_keys=False))
        tokenizer_dir = self.tokenizer_dir()
        previous = self.ensure_base(tokenizer_dir)
        self.prepare_all(tokenizer_dir, extra_stages)
        trained = []
        for stage in self.pipeline.stages if until != BASE_VERSION else []:
            resolved = resolve_stage(self.pipeline, stage)
            parent = read_lineage(self.workdir, stage.start_from) if stage.start_from else previous
            digest = stage_hash(resolved, parent["stage_hash"])
            existing = read_lineage(self.workdir, stage.name)
            if existing is not None:
                if existing["stage_hash"] != digest:
                    raise StageConflictError(
                        f"stage {stage.name!r} changed after it produced version {stage.name} "
                        f"(hash {existing['stage_hash']} -> {digest}). Versions are immutable. Fix: give the "
                        f"changed stage a new name, or delete {version_dir(self.workdir, stage.name)} to retrain it.")
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
        matrix = self.evaluate()  # only pairs not stored yet are computed
        lineages = {v["version"]: v for v in list_versions(self.workdir)}
        deltas = iteration_deltas(matrix, lineages)
        health = health_versions(self.workdir, list(lineages), self.chat_prompts(), self.pipeline.chat_max_new_tokens)
        table = format_matrix(matrix)
        write_text(join(self.workdir, "eval", "table.txt"), table + "\n")
        write_json(join(self.workdir, "eval", "matrix.json"), matrix)
        write_json(join(self.workdir, "eval", "deltas.json"), deltas)
        page = write_report(self.workdir, lineages, matrix, deltas, health)
        self.log("eval loss (token mean; chat sets on assistant tokens):\n" + table)
        if deltas:
            self.log("against each parent:\n" + format_deltas(deltas))
        self.log(f"report: {page}")
        return {"matrix": matrix, "deltas": deltas, "health": health, "report": page}

    def chat_prompts(self) -> dict[str, list]:
        count = self.pipeline.chat_prompts
        return {name: eval_prompts(self.corpus_files(name)["eval"], count)
                for name, corpus in self.pipeline.corpora.items()
                if corpus.kind == "chat" and count and "eval" in self.corpus_files(name)}

    def train_stage(self, stage: dict, parent: dict, digest: str, tokenizer_dir: str) -> dict:
        from mixloop.train.launch import fit_stage, run_name

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
                    "share": realised[name] / (rows_per_step * total_steps), "epochs": epochs[name],
                    "warnings": repeat_warnings(stage, {name: epochs[name]}),
                })
        return report

    def evaluate(self) -> dict:
        """Every version on every eval split, packed at the pipeline's default sequence length."""
        seq_len, rows = self.default("seq_len"), self.pipeline.eval_rows
        eval_dirs = {n: self.packed(n, "eval", seq_len) for n in self.pipeline.corpora if "eval" in self.corpus_files(n)}
        versions = [v["version"] for v in list_versions(self.workdir)]
        return evaluate_versions(self.workdir, versions, eval_dirs, rows)

    def default(self, field: str):
        """A setting of the pipeline's defaults, or mixloop's own when the spec leaves it out."""
        value = getattr(self.pipeline.defaults, field)
        return value if value is not None else getattr(BUILTIN_DEFAULTS, field)


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


def _record_text(record) -> str:
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record, dict) and isinstance(record.get("conversations"), list):
        return "\n".join(str(t.get("content", "")) for t in record["conversations"] if isinstance(t, dict))
    return ""
