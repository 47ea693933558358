"""Reading corpus files as chunks of records: JSON lines (plain or gzip, split into byte ranges),
Parquet (by row group), and files read whole (JSON arrays, CSV, the Arrow files of a `save_to_disk`
folder). A record that cannot be read is yielded as a BadRecord with its reason, never raised."""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections.abc import Iterator

import fsspec
import pyarrow.ipc
import pyarrow.parquet as pq

from mixloop.data import records
from mixloop.storage.fs import file_format

CHUNK_BYTES = 32 * 1024 * 1024
WHOLE_FILE_FORMATS = ("json", "csv", "arrow")  # read whole, as one chunk per file
BLANK_LINE = object()  # what iter_records yields for an empty or whitespace-only line: skipped, counted


def list_chunks(files: list[str], fmt: str | None) -> list[dict]:
    chunks = []
    for file_index, path in enumerate(files):
        kind = fmt or file_format(path)
        fs, inner = fsspec.core.url_to_fs(path)
        if kind == "jsonl" and path.lower().endswith(".json") and _json_array(fs, inner):
            kind = "json"
        if kind == "parquet":
            with fs.open(inner, "rb") as f:
                groups = pq.ParquetFile(f).num_row_groups
            spans = [(g, g + 1) for g in range(groups)]
        elif kind in WHOLE_FILE_FORMATS or path.lower().endswith(".gz"):
            spans = [(0, -1)]
        else:
            size = fs.size(inner)
            spans = [(s, min(s + CHUNK_BYTES, size)) for s in range(0, max(size, 1), CHUNK_BYTES)]
        for chunk_index, (start, end) in enumerate(spans):
            chunks.append(
                {
                    "file": path,
                    "format": kind,
                    "start": start,
                    "end": end,
                    "shard": f"{file_index:05d}-{chunk_index:05d}",
                }
            )
    return chunks


def _json_array(fs, inner: str) -> bool:
    """Whether a .json file holds one JSON array (rather than JSON lines)."""
    with fs.open(inner, "rb") as f:
        return f.read(4096).lstrip(codecs.BOM_UTF8 + b" \t\r\n")[:1] == b"["


def iter_records(chunk: dict) -> Iterator[tuple[str, object]]:
    """(where, record) for each line or row of one chunk: the raw record, a BadRecord or BLANK_LINE.

    jsonl lines may end with LF or CRLF, and a file may open with a UTF-8 byte-order mark.
    """
    fs, inner = fsspec.core.url_to_fs(chunk["file"])
    if chunk["format"] == "parquet":
        with fs.open(inner, "rb") as f:
            table = pq.ParquetFile(f).read_row_group(chunk["start"])
        for index, row in enumerate(table.to_pylist()):
            yield f"{chunk['file']}:row-group {chunk['start']} row {index}", row
        return
    if chunk["format"] in WHOLE_FILE_FORMATS:
        yield from _whole_file_records(chunk["file"], chunk["format"], fs, inner)
        return
    compression = "gzip" if chunk["file"].lower().endswith(".gz") else None
    with fs.open(inner, "rb", compression=compression) as f:
        start, end = chunk["start"], chunk["end"]
        if start > 0:
            f.seek(start - 1)
            f.readline()  # the line that straddles the boundary belongs to the previous chunk
        position = f.tell()
        line_number = 0
        for raw in iter(f.readline, b""):
            if end >= 0 and position >= end:
                break
            line_number += 1
            where = f"{chunk['file']}:{line_number}" if start == 0 else f"{chunk['file']}@byte {position}"
            position += len(raw)
            if start == 0 and line_number == 1:  # Windows editors open files with a byte-order mark; json refuses it
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if not raw.strip():
                yield where, BLANK_LINE
                continue
            try:
                yield where, records.parse_json_line(raw.rstrip(b"\r\n"))
            except records.BadRecord as exc:
                exc.raw = raw.decode("utf-8", "replace")
                yield where, exc


def _whole_file_records(path: str, kind: str, fs, inner: str) -> Iterator[tuple[str, object]]:
    """The rows of a CSV file (its first line names the columns), an Arrow file of a `save_to_disk` folder, or
    the items of a JSON array; a file that cannot be read at all is one bad record."""
    with fs.open(inner, "rb") as f:
        try:
            if kind == "json":
                items = json.loads(f.read().decode("utf-8-sig"))
                if not isinstance(items, list):
                    raise ValueError("a .json file holds JSON lines or one array of records")
                yield from ((f"{path}[{i}]", item) for i, item in enumerate(items))
            elif kind == "csv":  # every field as text, as written (Arrow would read "3." as a float)
                reader = csv.DictReader(io.StringIO(f.read().decode("utf-8-sig"), newline=""))
                yield from ((f"{path}:{reader.line_num}", row) for row in reader)
            else:
                rows = pyarrow.ipc.open_stream(f).read_all().to_pylist()
                yield from ((f"{path}:row {i}", row) for i, row in enumerate(rows))
        except (ValueError, csv.Error, pyarrow.ArrowInvalid) as exc:  # JSONDecodeError, UnicodeDecodeError too
            yield path, records.BadRecord(f"cannot read the {kind} file: {str(exc).splitlines()[0]}")
