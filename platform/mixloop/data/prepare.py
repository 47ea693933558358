"""Prepare a corpus once: read, validate, tokenize and pack it with Ray Data.

Files are cut into chunks (data/files.py: byte ranges of jsonl, row groups of
parquet, whole files of the other kinds). Ray Data tasks (TaskPoolStrategy, at most one per CPU), with one
tokenizer cached per worker process, each stream one chunk into shards of at
most SHARD_ROWS packed rows written straight to the cache, and send back only a
small summary. Memory therefore depends on the shard and tokenizer batch sizes,
never on the chunk or corpus size, and no data passes through the driver.

The result is content-addressed by the files' identities, the tokenizer, the
sequence length and the packing rules, so every later stage, iteration or
tuning trial that needs the same corpus reuses it. Every preparation that did
tokenize is appended to cache/prepare.jsonl.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import IO, Any, NamedTuple

import fsspec
import numpy as np

from mixloop.data import records
from mixloop.data.files import BLANK_LINE, iter_records, list_chunks
from mixloop.data.packing import Packer
from mixloop.data.store import MANIFEST, find_manifest, read_manifest, write_shard
from mixloop.data.tokenizer import encode_chats, encode_texts, load_tokenizer, tokenizer_fingerprint
from mixloop.errors import DataError
from mixloop.runs.tracking import counted
from mixloop.storage.fs import append_line, expand_files, join, write_json
from mixloop.storage.layout import Workdir

FORMAT_VERSION = 1
TOKENIZE_BATCH = 512
REJECT_PREVIEW_CHARS = 500
SHARD_ROWS = 4096
PACKING_FIELDS = (
    "kind",
    "seq_len",
    "max_document_tokens",
    "long_documents",
    "packing",
    "record_format",
    "columns",
    "chat_template",
)


def corpus_key(files: list[str], request: CorpusRequest, tokenizer_fp: str) -> str:
    """Identity of a packed corpus: its files' identities, the tokenizer and every packing rule."""
    identities = []
    for path in files:
        fs, inner = fsspec.core.url_to_fs(path)
        identities.append([path, fs.ukey(inner)])
    # Options at their defaults stay out, so corpora packed before the options existed keep their keys
    # (and a stage that was under way keeps its run name and checkpoints).
    options = {
        field: getattr(request, field)
        for field in PACKING_FIELDS
        if field in ("kind", "seq_len") or getattr(request, field) != CorpusRequest._field_defaults[field]
    }
    payload = {"files": identities, "tokenizer": tokenizer_fp, "format": FORMAT_VERSION, **options}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class ChunkPacker:
    """One chunk in, shards of packed rows and a rejects file out, a summary back."""

    def __init__(self, tokenizer_dir: str):
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.template = self.tokenizer.chat_template

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        summaries = [self.pack_chunk({key: batch[key][i] for key in batch}) for i in range(len(batch["file"]))]
        return {key: [s[key] for s in summaries] for key in summaries[0]}

    def pack_chunk(self, chunk: dict) -> dict:
        kind = chunk["kind"]
        packer = Packer(
            int(chunk["seq_len"]),
            self.tokenizer.pad_token_id,
            split_documents=kind == "text",
            one_per_row=not chunk["packing"],
        )
        shards = ShardWriter(chunk["out_dir"], chunk["shard"])
        rejects = RejectWriter(join(chunk["rejects_dir"], f"{chunk['shard']}.jsonl"))
        self.tokenizer.chat_template = chunk["chat_template"] or self.template  # the corpus's, else the tokenizer's
        shapes: Counter[str] = Counter()
        encode = encode_texts if kind == "text" else encode_chats
        limit = int(chunk["max_document_tokens"]) or None
        stats = {"documents": 0, "tokens": 0, "supervised_tokens": 0, "split_documents": 0, "blank_lines": 0}

        def tokenize(pending: list[tuple[str, object, object]]) -> None:
            """pending: (where, raw record, checked record)."""
            for (where, raw, _), documents in encode_each(self.tokenizer, encode, pending, rejects):
                longest = max(len(ids) for ids, _ in documents)
                if limit and longest > limit:
                    if chunk["long_documents"] == "drop":
                        rejects.add(where, raw, f"document has {longest} tokens, more than max_document_tokens {limit}")
                        continue
                    stats["split_documents"] += 1
                stats["documents"] += 1
                for ids, supervised in documents:  # a chat whose template rewrites history: one per answer
                    stats["tokens"] += len(ids)
                    stats["supervised_tokens"] += int(supervised.sum())
                    for start in range(0, len(ids), limit or len(ids)):
                        piece = slice(start, start + limit) if limit else slice(None)
                        shards.add(packer.add(ids[piece], supervised[piece]))

        for pending in checked_batches(chunk, rejects, shapes, stats):
            tokenize(pending)
        shards.add(packer.flush())
        shards.close()
        rejects.close()
        return {
            "request": chunk["request"],
            "shard": chunk["shard"],
            "shards": json.dumps(shards.written),
            "rows": sum(rows for _, rows in shards.written),
            "rejected": rejects.count,
            "first_rejects": json.dumps(rejects.first),
            "formats": json.dumps(shapes),
            **stats,
        }


def checked_batches(chunk: dict, rejects: RejectWriter, shapes: Counter, stats: dict) -> Iterator[list]:
    """The chunk's records that pass the checks, TOKENIZE_BATCH at a time, as (where, raw record, checked
    record); the rest go to `rejects`, blank lines are counted in `stats` and record shapes in `shapes`."""
    kind, record_format, columns = chunk["kind"], chunk["record_format"], json.loads(chunk["columns"] or "{}")
    pending = []
    for where, record in iter_records(chunk):
        if record is BLANK_LINE:
            stats["blank_lines"] += 1
            continue
        try:
            if isinstance(record, records.BadRecord):
                raise record
            content, shape = records.checked(record, kind, record_format, columns)
            pending.append((where, record, content))
            shapes[shape] += 1
        except records.BadRecord as exc:
            rejects.add(where, record, str(exc))
        if len(pending) >= TOKENIZE_BATCH:
            yield pending
            pending = []
    if pending:  # the tokenizer refuses an empty batch
        yield pending


def encode_each(tokenizer, encode, pending: list[tuple[str, object, object]], rejects: RejectWriter) -> list:
    """(pending item, its encoding) for each item the tokenizer and chat template accept.

    One record the template refuses fails the whole batch, so a failed batch is
    encoded again record by record, and only the records that fail alone are rejected.
    """
    try:
        return list(zip(pending, encode(tokenizer, [item[2] for item in pending])))
    except Exception:  # noqa: BLE001 -- which record it was is found below
        pass
    encoded = []
    for item in pending:
        try:
            encoded.append((item, encode(tokenizer, [item[2]])[0]))
        except Exception as exc:  # noqa: BLE001 -- one record's failure, never the job's
            reason = str(exc) if isinstance(exc, DataError) else f"tokenizer failed: {type(exc).__name__}: {exc}"
            rejects.add(item[0], item[1], reason)
    return encoded


class ShardWriter:
    """Writes a chunk's rows as shards of at most SHARD_ROWS rows: memory does not grow with the chunk."""

    def __init__(self, folder: str, prefix: str):
        self.folder, self.prefix = folder, prefix
        self.rows: list[tuple[np.ndarray, ...]] = []
        self.written: list[tuple[str, int]] = []  # (shard name, rows) in row order

    def add(self, rows) -> None:
        self.rows.extend(rows)
        if len(self.rows) >= SHARD_ROWS:
            self.close()

    def close(self) -> None:
        if self.rows:
            name = f"{self.prefix}-{len(self.written):04d}"
            write_shard(self.folder, name, self.rows)
            self.written.append((name, len(self.rows)))
            self.rows = []


class RejectWriter:
    """Streams bad records with their place and reason to a jsonl file, opened at the first one."""

    def __init__(self, path: str):
        self.path, self.count = path, 0
        self.file: IO[str] | None = None
        self.first: list[dict[str, Any]] = []  # the first three, for the error message

    def add(self, where: str, record: object, reason: str) -> None:
        entry = {"where": where, "reason": reason, "record": _preview(record)}
        if self.file is None:
            fs, inner = fsspec.core.url_to_fs(self.path)
            fs.makedirs(inner.rsplit("/", 1)[0], exist_ok=True)
            self.file = fs.open(inner, "w")
        self.file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self.count += 1
        if len(self.first) < 3:
            self.first.append(entry)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _preview(record: object) -> str:
    if isinstance(record, records.BadRecord):
        text = getattr(record, "raw", "")
    else:
        try:
            text = json.dumps(record, ensure_ascii=False, default=str)
        except RecursionError:  # parsed near the recursion limit, it cannot be dumped from deeper in the stack
            text = f"<a {type(record).__name__} nested too deeply to show>"
    # A lone surrogate (from a JSON \u escape) cannot be written as UTF-8: it is shown escaped.
    return text[:REJECT_PREVIEW_CHARS].encode("utf-8", "backslashreplace").decode("utf-8")


class CorpusRequest(NamedTuple):
    """One corpus split to prepare at one sequence length."""

    name: str
    split: str
    pattern: str | tuple[str, ...]  # a hub dataset split: its files
    fmt: str | None
    kind: str
    max_bad_fraction: float
    seq_len: int
    max_document_tokens: int | None = None
    long_documents: str = "split"
    packing: bool = True
    record_format: str = "auto"
    columns: str = ""  # JSON of the corpus's `columns` ("" for none): a request is a dict key, so hashable
    chat_template: str = ""  # the corpus's own template ("": the tokenizer's)


def prepare_corpora(
    requests: list[CorpusRequest], tokenizer_dir: str, workdir: str, progress_bar: bool = False
) -> dict[CorpusRequest, str]:
    """The packed folder of each request; those the cache lacks are prepared in one Ray Data job
    (its chunks counted on a bar with `progress_bar`, for a terminal)."""
    tokenizer_fp = tokenizer_fingerprint(tokenizer_dir)
    folders, todo = {}, {}
    for request in dict.fromkeys(requests):
        files = expand_files(request.pattern)
        if not files:
            raise DataError(f"corpus {request.name!r} ({request.split}): no file matches {request.pattern!r}")
        key = corpus_key(files, request, tokenizer_fp)
        folders[request] = Workdir(workdir).packed(request.name, request.split, key)
        manifest = find_manifest(folders[request])
        if manifest is None:
            todo[request] = (key, files)
        else:  # the limit may have changed since the corpus was prepared
            _check_quality(request, manifest, _rejects_dir(workdir, request, key))
    if not todo:
        return folders
    started = time.time()
    chunks = []
    for index, (request, (key, files)) in enumerate(todo.items()):
        chunks += request_chunks(request, index, files, folders[request], _rejects_dir(workdir, request, key))
    summaries = _run_packers(chunks, tokenizer_dir, progress_bar)
    for index, (request, (key, files)) in enumerate(todo.items()):
        mine = [s for s in summaries if s["request"] == index]
        manifest = _manifest(request, key, files, mine)
        write_json(join(folders[request], MANIFEST), manifest)
        _log_preparation(workdir, manifest, time.time() - started)
    # Checked on every use, not only when packed: the limit may change, the packed rows stay valid.
    for request, (key, _) in todo.items():
        _check_quality(request, read_manifest(folders[request]), _rejects_dir(workdir, request, key))
    return folders


def request_chunks(request: CorpusRequest, index: int, files: list[str], out_dir: str, rejects_dir: str) -> list[dict]:
    """The chunks of one request's files, each with all ChunkPacker.pack_chunk needs to know."""
    chunks = list_chunks(files, request.fmt)
    for chunk in chunks:
        chunk.update(
            request=index,
            out_dir=out_dir,
            rejects_dir=rejects_dir,
            **{field: getattr(request, field) for field in PACKING_FIELDS},
        )
        chunk["max_document_tokens"] = request.max_document_tokens or 0  # Arrow columns want no None
    return chunks


def _rejects_dir(workdir: str, request: CorpusRequest, key: str) -> str:
    return Workdir(workdir).rejects(request.name, request.split, key)


@functools.lru_cache(maxsize=4)
def _packer(tokenizer_dir: str) -> ChunkPacker:
    """One per worker process and tokenizer: Ray reuses its worker processes for later tasks."""
    return ChunkPacker(tokenizer_dir)


def pack_chunks(batch: dict[str, np.ndarray], tokenizer_dir: str) -> dict[str, list]:
    return _packer(tokenizer_dir)(batch)


def _run_packers(chunks: list[dict], tokenizer_dir: str, progress_bar: bool) -> list[dict]:
    """Ray Data tasks, at most one per CPU. Tasks rather than an actor pool: a failed task is retried
    alone, and Ray logs an error-level line for every restartable actor whose constructor arguments
    sit in the object store, which an actor pool's do."""
    import ray  # lazy: ray

    parallel = max(1, min(len(chunks), int(ray.available_resources().get("CPU", 1))))
    dataset = ray.data.from_items(chunks, override_num_blocks=len(chunks)).map_batches(
        # Ray's type for fn takes the batch alone and returns a DataBatch; map_batches passes fn_kwargs and
        # takes a dict of lists too (2.60).
        pack_chunks,  # type: ignore[arg-type]
        fn_kwargs=dict(tokenizer_dir=tokenizer_dir),
        batch_size=1,
        num_cpus=1,
        compute=ray.data.TaskPoolStrategy(size=parallel),
    )
    summaries = counted(dataset.iter_rows(), len(chunks), "[prepare] chunks", progress_bar)
    return sorted((dict(summary) for summary in summaries), key=lambda s: s["shard"])


def _manifest(request: CorpusRequest, key: str, files: list[str], summaries: list[dict]) -> dict:
    # blank_lines: manifests written before it existed lack it, so readers use .get("blank_lines", 0)
    counts = ("rows", "documents", "tokens", "supervised_tokens", "split_documents", "rejected", "blank_lines")
    totals = {k: int(sum(s[k] for s in summaries)) for k in counts}
    return {
        "corpus": request.name,
        "split": request.split,
        "key": key,
        "seq_len": request.seq_len,
        "files": files,
        "shards": [{"name": name, "rows": rows} for s in summaries for name, rows in json.loads(s["shards"])],
        "reject_examples": [r for s in summaries for r in json.loads(s["first_rejects"])][:3],
        "formats": dict(sum((Counter(json.loads(s["formats"])) for s in summaries), Counter())),  # records per shape
        **totals,
    }


def _check_quality(request: CorpusRequest, manifest: dict, rejects_dir: str) -> None:
    name, max_bad_fraction = request.name, request.max_bad_fraction
    seen = manifest["documents"] + manifest["rejected"]
    if manifest["documents"] == 0:
        raise DataError(
            f"corpus {name!r} ({manifest['split']}): no usable document in {len(manifest['files'])} file(s)"
            f"{_examples(manifest)}. Rejects: {rejects_dir}"
        )
    if manifest["rejected"] / seen > max_bad_fraction:
        raise DataError(
            f"corpus {name!r} ({manifest['split']}): {manifest['rejected']} of {seen} records are bad "
            f"({manifest['rejected'] / seen:.1%} > max_bad_fraction {max_bad_fraction:.1%}){_examples(manifest)}. "
            f"All of them, with reasons, are in {rejects_dir}. Fix the data or raise max_bad_fraction."
        )


def _examples(manifest: dict) -> str:
    return "".join(f"\n    {r['where']}: {r['reason']}" for r in manifest["reject_examples"])


def _log_preparation(workdir: str, manifest: dict, seconds: float) -> None:
    entry = {k: manifest[k] for k in ("corpus", "split", "key", "documents", "tokens", "rows", "rejected")}
    entry.update(seconds=round(seconds, 2), finished=time.time())
    append_line(Workdir(workdir).prepare_log, json.dumps(entry))
