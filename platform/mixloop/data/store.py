"""Packed corpora on disk: fixed-length rows in .npy shards, readable by row index.

A packed corpus is a folder (local or fsspec URI) holding, per shard, three
arrays of shape (rows, seq_len): tokens-<shard>.npy, supervised-<shard>.npy,
segments-<shard>.npy. `manifest.json`, written last, lists the shards in row
order; a folder without it is an unfinished preparation and is never read.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import fsspec
import numpy as np

ARRAYS = ("tokens", "supervised", "segments")
MANIFEST = "manifest.json"


def join(base: str, *parts: str) -> str:
    """Join path parts for local paths and URIs alike."""
    return "/".join([base.rstrip("/"), *parts])


def is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def write_shard(folder: str, shard: str, rows: list[tuple[np.ndarray, ...]]) -> None:
    fs, root = fsspec.core.url_to_fs(folder)
    fs.makedirs(root, exist_ok=True)
    for index, name in enumerate(ARRAYS):
        with fs.open(f"{root}/{name}-{shard}.npy", "wb") as out:
            np.save(out, np.stack([row[index] for row in rows]))


def read_manifest(folder: str) -> dict | None:
    fs, root = fsspec.core.url_to_fs(folder)
    path = f"{root}/{MANIFEST}"
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f)


def write_json(path: str, data: dict) -> None:
    """Write JSON so a reader never sees half of it (rename on local disks, one PUT on object stores)."""
    fs, inner = fsspec.core.url_to_fs(path)
    fs.makedirs(inner.rsplit("/", 1)[0], exist_ok=True)
    text = json.dumps(data, indent=2, sort_keys=True)
    if is_local(path):
        tmp = f"{inner}.tmp-{os.getpid()}"
        Path(tmp).write_text(text)
        os.replace(tmp, inner)
    else:
        with fs.open(inner, "w") as f:
            f.write(text)


def append_line(path: str, line: str) -> None:
    """Append one line to a log file (object stores cannot append: the file is rewritten)."""
    fs, inner = fsspec.core.url_to_fs(path)
    fs.makedirs(inner.rsplit("/", 1)[0], exist_ok=True)
    if is_local(path):
        with open(inner, "a") as f:
            f.write(line + "\n")
        return
    existing = fs.cat_file(inner).decode() if fs.exists(inner) else ""
    with fs.open(inner, "w") as f:
        f.write(existing + line + "\n")


def read_lines(path: str) -> list[str]:
    fs, inner = fsspec.core.url_to_fs(path)
    return fs.cat_file(inner).decode().splitlines() if fs.exists(inner) else []


class PackedCorpus:
    """Random access to the rows of one prepared corpus."""

    def __init__(self, folder: str):
        manifest = read_manifest(folder)
        if manifest is None:
            raise FileNotFoundError(f"{folder} holds no finished packed corpus ({MANIFEST} missing)")
        self.manifest = manifest
        self.folder = folder if is_local(folder) else _local_copy(folder, manifest)
        self.seq_len = manifest["seq_len"]
        counts = [shard["rows"] for shard in manifest["shards"]]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._arrays: dict[tuple[str, str], np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _array(self, name: str, shard: str) -> np.ndarray:
        key = (name, shard)
        if key not in self._arrays:
            path = join(self.folder.removeprefix("file://"), f"{name}-{shard}.npy")
            self._arrays[key] = np.load(path, mmap_mode="r")
        return self._arrays[key]

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """tokens, supervised, segments of the given rows, in the order given."""
        rows = np.asarray(rows, dtype=np.int64)
        shard_of = np.searchsorted(self.starts, rows, side="right") - 1
        out = [np.empty((len(rows), self.seq_len), dtype=dtype) for dtype in (np.int32, bool, np.int16)]
        for shard_index in np.unique(shard_of):
            picked = shard_of == shard_index
            local = rows[picked] - self.starts[shard_index]
            shard = self.manifest["shards"][shard_index]["name"]
            for target, name in zip(out, ARRAYS):
                target[picked] = self._array(name, shard)[local]
        return tuple(out)


def _local_copy(folder: str, manifest: dict) -> str:
    """Remote packed corpora are fetched once per machine into a content-addressed local cache."""
    local = Path(tempfile.gettempdir()) / "mixloop-cache" / manifest["key"]
    if not (local / MANIFEST).exists():
        fs, root = fsspec.core.url_to_fs(folder)
        local.mkdir(parents=True, exist_ok=True)
        for shard in manifest["shards"]:
            for name in ARRAYS:
                fs.get(f"{root}/{name}-{shard['name']}.npy", str(local / f"{name}-{shard['name']}.npy"))
        (local / MANIFEST).write_text(json.dumps(manifest))
    return str(local)
