"""Files under a run directory that is a local path or any fsspec URI (s3://, gs://, ...).

What mixloop writes to a workdir goes through these helpers (or through fsspec
directly where a call needs more, such as the lock's conditional create), so a
workdir on object storage behaves like a local one. Object stores have no rename and no append:
JSON is written in one PUT, a log's appends are objects of their own (rewriting
the log at every line would make a long run's appends cost ever more), and
folders that must appear whole (versions) are uploaded with their completion
marker last.

Libraries that only read local folders (transformers, tokenizers, numpy's
memory maps) get a local copy of a remote folder, fetched once per machine and
keyed by the folder's listing, so a changed folder is fetched again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import fsspec

LOCAL_CACHE = Path(tempfile.gettempdir()) / "mixloop-cache"


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _current_umask()  # read once: os.umask can only be read by setting it


def join(base: str, *parts: str) -> str:
    """Join path parts for local paths and URIs alike."""
    return "/".join([base.rstrip("/"), *parts])


def is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def exists(path: str) -> bool:
    fs, inner = fsspec.core.url_to_fs(path)
    return fs.exists(inner)


def remove(path: str) -> None:
    """Delete a file or a folder with its contents, if it exists."""
    fs, inner = fsspec.core.url_to_fs(path)
    if fs.exists(inner):
        fs.rm(inner, recursive=True)


def size(path: str) -> int:
    fs, inner = fsspec.core.url_to_fs(path)
    return fs.size(inner) or 0


def expand_files(pattern: str | tuple[str, ...]) -> list[str]:
    """Files matching a path, glob or URI, sorted, as URIs/paths usable by fsspec; a tuple of files as
    it is."""
    if isinstance(pattern, tuple):  # files already found (a hub dataset's split): names, not globs
        return list(pattern)
    fs, _ = fsspec.core.url_to_fs(pattern)
    try:
        matches = fs.expand_path(pattern.split("://", 1)[-1] if "://" in pattern else pattern, recursive=False)
    except FileNotFoundError:
        return []
    files = sorted(m for m in matches if fs.isfile(m))
    if not files and len(matches) == 1 and fs.isfile(f"{matches[0]}/state.json"):
        files = _saved_dataset_files(fs, matches[0])
    protocol = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
    return [protocol + f if protocol and not f.startswith(protocol) else f for f in files]


def _saved_dataset_files(fs, folder: str) -> list[str]:
    """The data files of a folder written by Hugging Face datasets' `save_to_disk`, in order."""
    state = json.loads(fs.cat_file(f"{folder}/state.json"))
    return [f"{folder}/{entry['filename']}" for entry in state.get("_data_files", [])]


def file_format(path: str) -> str | None:
    """jsonl (also .json: a JSON array in it is found when read), parquet, csv or arrow (the files of a
    Hugging Face `save_to_disk` folder), from the extension; None when it says nothing."""
    name = path.lower()
    if name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        return "jsonl"
    return next((kind for kind in ("parquet", "csv", "arrow") if name.endswith(f".{kind}")), None)


def makedirs(path: str) -> None:
    fs, inner = fsspec.core.url_to_fs(path)
    fs.makedirs(inner, exist_ok=True)


def share_with_umask(folder: str | Path, contents_only: bool = False) -> None:
    """Give a local folder staged with tempfile (private: 0700 folders, 0600 files) the modes any new
    file would get, so other users of a shared run directory can read what it becomes. `contents_only`:
    what is in the folder, which is the user's own (its mode theirs to choose)."""
    for path in [*([] if contents_only else [Path(folder)]), *Path(folder).rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~UMASK)


def read_text(path: str) -> str:
    fs, inner = fsspec.core.url_to_fs(path)
    return fs.cat_file(inner).decode()


def write_text(path: str, text: str) -> None:
    """Write a whole file so a reader never sees half of it (rename locally, one PUT on object stores)."""
    fs, inner = fsspec.core.url_to_fs(path)
    fs.makedirs(inner.rsplit("/", 1)[0], exist_ok=True)
    if is_local(path):
        tmp = f"{inner}.tmp-{os.getpid()}"
        Path(tmp).write_text(text)
        os.replace(tmp, inner)
    else:
        fs.pipe_file(inner, text.encode())


def write_json(path: str, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True))


def read_json(path: str) -> dict | None:
    return json.loads(read_text(path)) if exists(path) else None


def append_line(path: str, line: str) -> None:
    """Append to a log. On object stores the line is one object under `<log>.d/`, named by time so
    that listing order is append order (a log's writers take turns: one stage, one search at a time)."""
    fs, inner = fsspec.core.url_to_fs(path)
    if is_local(path):
        fs.makedirs(inner.rsplit("/", 1)[0], exist_ok=True)
        with open(inner, "a") as f:
            f.write(line + "\n")
        return
    fs.pipe_file(f"{inner}.d/{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.jsonl", (line + "\n").encode())


def read_lines(path: str) -> list[str]:
    """A log's whole lines (see LogFollower)."""
    return LogFollower(path).new_lines()


class LogFollower:
    """The lines appended to a log (see append_line) since the last call, for readers that poll it while
    other processes append: only what is new is read. A line still being written waits for the next call.

    Local: a byte offset. Object stores: the objects already read; the log object itself, if it was
    written whole before appends became objects, comes first (a log's name sorts before its `.d/` objects).
    """

    def __init__(self, path: str):
        self.path, self.offset = path, 0
        self.read: set[str] = set()

    def new_lines(self) -> list[str]:
        fs, inner = fsspec.core.url_to_fs(self.path)
        if is_local(self.path):
            if not fs.isfile(inner):
                return []
            with open(inner, "rb") as f:
                f.seek(self.offset)
                data = f.read()
            whole = data[: data.rfind(b"\n") + 1]
            self.offset += len(whole)
            return whole.decode().splitlines()
        fs.invalidate_cache(f"{inner}.d")  # fsspec caches listings: other processes append
        files = [inner] if fs.isfile(inner) else []
        if fs.isdir(f"{inner}.d"):
            files += fs.ls(f"{inner}.d", detail=False)
        new = [name for name in files if name not in self.read]
        self.read.update(new)
        contents = fs.cat(new) if new else {}  # concurrent GETs
        return [line for _, data in sorted(contents.items()) for line in data.decode().splitlines()]


def local_copy(folder: str) -> str:
    """A local folder with the files of `folder` (itself when it is local)."""
    if is_local(folder):
        return folder.removeprefix("file://")
    fs, root = fsspec.core.url_to_fs(folder)
    listing = fs.find(root, detail=True)
    # ukey: fsspec's identity of a file's content version (ETag, generation...), so a folder that was
    # deleted and written again with files of the same sizes is fetched again.
    identity = json.dumps([folder, sorted((path, fs.ukey(path)) for path in listing)])
    local = LOCAL_CACHE / hashlib.sha256(identity.encode()).hexdigest()[:20]
    if not (local / ".complete").exists():
        LOCAL_CACHE.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=LOCAL_CACHE))
        for path in listing:
            target = staging / path[len(root) :].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(path, str(target))
        (staging / ".complete").touch()
        try:
            os.replace(staging, local)
        except OSError:  # another process on this machine fetched it first
            shutil.rmtree(staging, ignore_errors=True)
    return str(local)


def upload(local_folder: str, target: str, last: str | None = None) -> None:
    """Copy a local folder's files to `target`; the file named `last` (a completion marker) goes last."""
    fs, inner = fsspec.core.url_to_fs(target)
    files = sorted((f for f in Path(local_folder).rglob("*") if f.is_file()), key=lambda f: f.name == last)
    for file in files:
        destination = f"{inner}/{file.relative_to(local_folder).as_posix()}"
        fs.makedirs(destination.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(file), destination)


def train_storage(path: str):
    """(storage_path, storage_filesystem) for Ray Train and Tune: any fsspec filesystem goes in through pyarrow."""
    if is_local(path):
        return path.removeprefix("file://"), None
    import pyarrow.fs  # lazy: pyarrow, only for Ray; storage.fs is on the path of mixloop --help

    fs, inner = fsspec.core.url_to_fs(path)
    return inner, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
