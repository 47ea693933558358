"""A spec's corpora in its workdir: their files, the workdir's tokenizer, and their packed splits.

`Corpora.prepare` hands back a `PreparedCorpora` value that knows every packed
folder, so later steps (training, evaluation, tuning trials) never depend on
which method ran first. A tokenizer trained by a preparation whose data then
fails its checks is removed again: the next run trains it on the corrected data.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mixloop.config import BUILTIN_DEFAULTS, CorpusConfig, ResolvedStage, Spec
from mixloop.data import records, synthetic
from mixloop.data.files import iter_records, list_chunks
from mixloop.data.prepare import CorpusRequest, prepare_corpora
from mixloop.data.tokenizer import load_tokenizer, tokenizer_fingerprint, train_tokenizer
from mixloop.errors import MixloopError, StageConflictError
from mixloop.evaluation.health import eval_prompts
from mixloop.runs.ray_setup import init_ray
from mixloop.storage.fs import (
    exists,
    expand_files,
    is_local,
    join,
    makedirs,
    read_json,
    remove,
    share_with_umask,
    upload,
    write_json,
)
from mixloop.storage.hub import dataset_files
from mixloop.storage.layout import Workdir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedCorpora:
    """Where every packed split of a preparation lies."""

    tokenizer_dir: str
    train: dict[tuple[str, int, bool], str]
    """(corpus, seq_len, packing) -> packed train split."""
    eval: dict[str, str]
    """corpus -> packed eval split, at the pipeline's default seq_len (corpora with an eval split only)."""

    def for_stage(self, stage: ResolvedStage) -> dict[str, str]:
        """The packed train split of every corpus of a stage's mixture."""
        return {name: self.train[(name, stage.seq_len, stage.packing)] for name in stage.mixture}


class Corpora:
    def __init__(self, spec: Spec, address: str | None = None, progress_bar: bool = False):
        self.spec, self.address, self.progress_bar = spec, address, progress_bar
        self.workdir = spec.workdir

    @functools.cache  # noqa: B019 (one Corpora per command: the cache lives as long as it should)
    def files(self, name: str) -> Mapping[str, str | tuple[str, ...]]:
        """{'train': pattern, 'eval': pattern?} (a hub dataset's split: its files), generating the corpus
        first (once) if the spec asks for it."""
        corpus = self.spec.config.corpora[name]
        if corpus.generate is not None:
            g = corpus.generate
            return synthetic.write_corpus(
                Workdir(self.workdir).generated(name), corpus.kind, g.topic, g.documents, g.eval_documents, g.seed
            )
        if corpus.dataset is not None:
            dataset, splits = corpus.dataset, {"train": corpus.train_split, "eval": corpus.eval}
            return {key: _hub_split(name, dataset, corpus, split) for key, split in splits.items() if split is not None}
        if corpus.path is None:  # the spec's checks refuse a corpus without path, dataset or generate
            raise MixloopError(f"corpora.{name}: no path. Fix: give it a path, a dataset or generate.")
        files = {"train": self.spec.path(corpus.path)}
        if corpus.eval:
            files["eval"] = self.spec.path(corpus.eval)
        return files

    def without_eval(self) -> list[str]:
        return [name for name in self.spec.config.corpora if "eval" not in self.files(name)]

    def chat_prompts(self) -> dict[str, list]:
        """The prompts of each chat corpus's eval split that chat health asks every version."""
        count = self.spec.config.chat_prompts
        return {
            name: eval_prompts(self.files(name)["eval"], count, corpus.file_format, corpus.format, corpus.columns)
            for name, corpus in self.spec.config.corpora.items()
            if corpus.kind == "chat" and count and "eval" in self.files(name)
        }

    def prepare(self, stages: Iterable[ResolvedStage]) -> PreparedCorpora:
        """The workdir's tokenizer and every split that `stages` and the evaluation use, packed and
        checked (in one Ray Data job for whatever the cache lacks)."""
        fresh = not exists(join(Workdir(self.workdir).tokenizer, "tokenizer.json"))
        tokenizer_dir = self.tokenizer()
        try:
            return self._pack(tokenizer_dir, list(stages))
        except MixloopError:
            if fresh:
                remove(tokenizer_dir)
                remove(Workdir(self.workdir).tokenizer_source)
            raise

    def _pack(self, tokenizer_dir: str, stages: list[ResolvedStage]) -> PreparedCorpora:
        init_ray(self.address)
        train = {
            (name, stage.seq_len, stage.packing): self._request(name, "train", stage.seq_len, stage.packing)
            for stage in stages
            for name in stage.mixture
        }
        seq_len = self.spec.config.defaults.seq_len or BUILTIN_DEFAULTS.seq_len
        assert seq_len is not None  # BUILTIN_DEFAULTS sets every setting
        evals = {
            name: self._request(name, "eval", seq_len, True)
            for name in self.spec.config.corpora
            if "eval" in self.files(name)
        }
        folders = prepare_corpora([*train.values(), *evals.values()], tokenizer_dir, self.workdir, self.progress_bar)
        return PreparedCorpora(
            tokenizer_dir,
            {key: folders[request] for key, request in train.items()},
            {name: folders[request] for name, request in evals.items()},
        )

    def _request(self, name: str, split: str, seq_len: int, packing: bool) -> CorpusRequest:
        corpus = self.spec.config.corpora[name]
        return CorpusRequest(
            name,
            split,
            self.files(name)[split],
            corpus.file_format,
            corpus.kind,
            corpus.max_bad_fraction,
            seq_len,
            corpus.max_document_tokens,
            corpus.long_documents,
            packing,
            corpus.format,
            json.dumps(corpus.columns, sort_keys=True) if corpus.columns else "",
            self.spec.chat_template(corpus.chat_template) or "",
        )

    def tokenizer(self) -> str:
        """<workdir>/tokenizer: a copy of the given tokenizer, or one trained once on the corpora.
        Every version of the workdir uses it, so a spec whose tokenizer changed is refused."""
        target = Workdir(self.workdir).tokenizer
        makedirs(self.workdir)
        spec = self.spec.config.tokenizer
        # The folder it is copied from (None: trained here), and the name recorded for it: paths resolved,
        # so the workdir's own copy of the spec (absolute paths) matches the original; the model's own
        # tokenizer (neither path nor train) is named as the model is (a hub id, not its cache folder).
        folder: str | None
        named: str | None
        if spec.path:
            folder = named = self.spec.path(spec.path)
        elif spec.train:
            folder = named = None
        else:
            folder, named = self.spec.model_folder()[0], self.spec.model_source()
        template = self.spec.chat_template(self.spec.config.chat_template)
        source = {
            "spec": {**spec.model_dump(), "path": named},
            "files": tokenizer_fingerprint(folder) if folder else None,
        }
        if template is not None:  # recorded only when set, so workdirs from before the setting stay valid
            source["chat_template"] = template
        record = Workdir(self.workdir).tokenizer_source
        if exists(join(target, "tokenizer.json")):
            if read_json(record) != source:
                raise StageConflictError(
                    f"{target} was made from another tokenizer spec or files, and the versions here use it. "
                    "Fix: use a new workdir for a new tokenizer, or restore the spec's tokenizer section."
                )
            return target
        # Staged beside the target when local, so it appears by one rename.
        local_workdir = self.workdir.removeprefix("file://") if is_local(target) else None
        staging = tempfile.mkdtemp(dir=local_workdir, prefix=".tokenizer-")
        try:
            if folder:
                tokenizer = load_tokenizer(folder)
            else:
                assert spec.train is not None  # folder is None only for a tokenizer trained here
                logger.info(f"training a byte-level BPE tokenizer ({spec.train.vocab_size} tokens)")
                tokenizer = train_tokenizer(self._texts(spec.train.sample_bytes), spec.train.vocab_size)
            if template is not None:
                tokenizer.chat_template = template
            tokenizer.save_pretrained(staging)
            write_json(record, source)
            if is_local(target):
                share_with_umask(staging)  # mkdtemp made it private
                os.replace(staging, target.removeprefix("file://"))
            else:
                upload(staging, target, last="tokenizer.json")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def _texts(self, budget: int):
        """Text of every corpus, an equal share of `budget` bytes from each."""
        corpora = self.spec.config.corpora
        for name, corpus in corpora.items():
            share = budget // len(corpora)
            chunks = list_chunks(expand_files(self.files(name)["train"]), corpus.file_format)
            for text in (_record_text(record, corpus) for chunk in chunks for _, record in iter_records(chunk)):
                if share <= 0:
                    break
                share -= len(text.encode())
                yield text


def _hub_split(name: str, dataset: str, corpus: CorpusConfig, split: str) -> tuple[str, ...]:
    try:
        return dataset_files(dataset, corpus.revision, corpus.subset, split)
    except MixloopError as exc:
        raise MixloopError(f"corpora.{name}: {exc}") from None


def _record_text(record, corpus: CorpusConfig) -> str:
    """The text a record trains on, or "" for a record that preparation will reject."""
    try:
        content, _ = records.checked(record, corpus.kind, corpus.format, corpus.columns)
        return content if corpus.kind == "text" else "\n".join(turn["content"] for turn in content)
    except records.BadRecord:
        return ""
