"""Semantic checks of what a spec reads and writes: each corpus (its records' format and columns, its
files, which must exist and not be empty, or its hub dataset's splits), chat templates, and the
workdir, which a run must be able to create and write in, locally or on an object store."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import fsspec

from mixloop.config.resolve import Spec
from mixloop.config.sources import FILE_FORMATS, CorpusConfig
from mixloop.data.records import CHAT_FORMATS, TEXT_FORMATS
from mixloop.errors import MixloopError
from mixloop.storage.fs import exists, expand_files, file_format, read_text, size
from mixloop.storage.hub import HUB_ID, split_paths

# The fields of each kind of record that `columns` may rename.
CHAT_FIELDS = ("conversations", "messages", "role", "content", "instruction", "input", "output", "system")


def _filesystem_problems(where: str, uri: str) -> list[str]:
    protocol = uri.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as exc:
        extra = {"s3": "mixloop[s3]", "gs": "mixloop[gcs]", "gcs": "mixloop[gcs]"}.get(protocol)
        fix = f"pip install '{extra}'" if extra else "install the fsspec implementation for it"
        return [f"{where}: cannot use {protocol}:// here ({str(exc).splitlines()[0]}). Fix: {fix}."]
    return []


def workdir_problems(workdir: str) -> list[str]:
    """Whether a run could create `workdir` (a local path or an fsspec URI) and write in it."""
    if "://" in workdir:
        return _filesystem_problems("workdir", workdir) or _remote_write_problems(workdir)
    return _local_write_problems(Path(workdir))


def _local_write_problems(workdir: Path) -> list[str]:
    # The nearest existing folder on the way: the run creates the rest of the path from there.
    ancestor = workdir
    try:  # exists() raises when a folder on the way may not be searched
        if workdir.exists() and not workdir.is_dir():
            return [f"workdir: {workdir} is a file. Fix: point workdir at a folder, or move the file away."]
        ancestor = next(p for p in (workdir, *workdir.parents) if p.exists())
        if not ancestor.is_dir():
            return [
                f"workdir: cannot create {workdir}, because {ancestor} is a file. "
                "Fix: choose a workdir whose path runs through folders only."
            ]
        # A real attempt: as root, permission bits say nothing, and /proc or read-only mounts refuse anyway.
        os.rmdir(tempfile.mkdtemp(prefix=".mixloop-write-probe-", dir=ancestor))
    except OSError as exc:
        return [
            f"workdir: cannot create {workdir}: {ancestor} is not writable ({exc.strerror or exc}). "
            "Fix: choose a workdir you may write to, or change the permissions of that folder."
        ]
    return []


def _remote_write_problems(workdir: str) -> list[str]:
    """Write and delete a probe object as the run will write (mixloop.storage.fs makes the folders first)."""
    probe = workdir.rstrip("/") + "/.mixloop-write-probe"
    try:
        fs, inner = fsspec.core.url_to_fs(probe)
        fs.makedirs(inner.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(inner, b"mixloop checks that it may write here\n")
        fs.rm_file(inner)
    except Exception as exc:  # noqa: BLE001 - permissions, credentials (botocore), network: all stop a run
        return [
            f"workdir: cannot write to {workdir} ({_first_line(exc)}). Fix: check the bucket and path, and "
            "that this machine's credentials may write there (for s3: AWS_PROFILE or AWS_ACCESS_KEY_ID; "
            "for gs: GOOGLE_APPLICATION_CREDENTIALS)."
        ]
    return []


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def corpus_problems(spec: Spec, name: str, corpus: CorpusConfig, files: bool) -> list[str]:
    where = f"corpora.{name}"
    if [corpus.path, corpus.dataset, corpus.generate].count(None) != 2:
        return [
            f"{where}: give exactly one of `path` (files), `dataset` (a Hugging Face Hub dataset id) or "
            "`generate` (mixloop writes them)."
        ]
    if corpus.dataset is None and (
        hub_only := [key for key in ("subset", "split", "revision") if getattr(corpus, key)]
    ):
        return [f"{where}.{hub_only[0]}: only a hub dataset (`dataset: org/name`) has one. Fix: remove it."]
    if corpus.generate is not None:
        return [f"{where}.eval: a generated corpus writes its own eval split; remove `eval`."] if corpus.eval else []
    problems = _record_format_problems(where, corpus)
    if corpus.chat_template is not None and corpus.kind != "chat":
        problems.append(f"{where}.chat_template: a text corpus has no chats to render. Fix: remove it.")
    if corpus.dataset is not None and not HUB_ID.match(corpus.dataset):
        problems.append(
            f"{where}.dataset: {corpus.dataset!r} is not a hub id. Fix: write it as org/name, or give "
            "local files in `path`."
        )
    if not files:
        return problems
    problems += template_problems(spec, f"{where}.chat_template", corpus.chat_template)
    if corpus.dataset is not None:
        return problems + _dataset_problems(where, corpus)
    return problems + [
        problem
        for key in ("path", "eval")
        if getattr(corpus, key) is not None
        for problem in _corpus_file_problems(where, key, spec.path(getattr(corpus, key)), corpus.file_format)
    ]


def _dataset_problems(where: str, corpus: CorpusConfig) -> list[str]:
    """A hub dataset's splits, resolved without downloading data (offline: in the cache)."""
    if corpus.dataset is None:
        return []
    for key, split in (("split", corpus.train_split), ("eval", corpus.eval)):
        try:
            paths = split_paths(corpus.dataset, corpus.revision, corpus.subset, split) if split else ()
        except MixloopError as exc:
            return [f"{where}.{key}: {exc}"]
        if corpus.file_format is None and (unread := next((p for p in paths if file_format(p) is None), None)):
            return [
                f"{where}.file_format: cannot tell the format of {unread!r} from its extension. Fix: "
                f"set file_format: one of {', '.join(FILE_FORMATS)}, if the files are one."
            ]
    return []


def template_problems(spec: Spec, where: str, value: str | None) -> list[str]:
    if value is None or value == "chatml":
        return []
    if not exists(spec.path(value)) or not read_text(spec.path(value)).strip():
        return [f"{where}: no template in {spec.path(value)}. Fix: name a Jinja file of a chat template, or chatml."]
    return []


def _record_format_problems(where: str, corpus: CorpusConfig) -> list[str]:
    formats, fields = (TEXT_FORMATS, ("text",)) if corpus.kind == "text" else (CHAT_FORMATS, CHAT_FIELDS)
    problems = []
    if corpus.format not in formats:
        problems.append(
            f"{where}.format: {corpus.format} records are not {corpus.kind} records. Fix: use one of "
            f"{', '.join(formats)}, or kind: {'chat' if corpus.kind == 'text' else 'text'}."
        )
    for key in corpus.columns:
        if key not in fields:
            problems.append(
                f"{where}.columns.{key}: not a field of {corpus.kind} records. Fix: use "
                f"{' or '.join(fields)} (the name mixloop expects), mapped to your records' name."
            )
    return problems


def _corpus_file_problems(where: str, key: str, pattern: str, declared_format: str | None) -> list[str]:
    if "://" in pattern and (problems := _filesystem_problems(f"{where}.{key}", pattern)):
        return problems
    try:
        files = expand_files(pattern)
        empty = bool(files) and all(size(f) == 0 for f in files)
    except Exception as exc:  # noqa: BLE001 - credentials or network on object stores: report, not crash
        return [
            f"{where}.{key}: cannot list {pattern!r} ({_first_line(exc)}). Fix: check the path and that "
            "this machine's credentials may read it."
        ]
    if not files:
        return [f"{where}.{key}: no file matches {pattern!r}. Fix: check the path or glob."]
    if empty:
        return [
            f"{where}.{key}: every file matching {pattern!r} is empty ({len(files)} file(s) of 0 bytes). "
            "Fix: point it at the corpus's data, or wait until its files are written."
        ]
    if declared_format is None and any(file_format(f) is None for f in files):
        return [
            f"{where}.file_format: cannot tell the format of {files[0]!r} from its extension. "
            f"Fix: set file_format: one of {', '.join(FILE_FORMATS)}."
        ]
    return []
