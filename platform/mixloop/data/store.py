"""Packed corpora on disk: fixed-length rows in .npy shards, readable by row index.

A packed corpus is a folder (local or fsspec URI) holding, per shard, three
arrays of shape (rows, seq_len): tokens-<shard>.npy, supervised-<shard>.npy,
segments-<shard>.npy. `manifest.json`, written last, lists the shards in row
order; a folder without it is an unfinished preparation and is never read.
"""

from __future__ import annotations

from typing import Any

import fsspec
import numpy as np

from mixloop.storage.fs import join, local_copy, read_json

ARRAYS = ("tokens", "supervised", "segments")
MANIFEST = "manifest.json"


def write_shard(folder: str, shard: str, rows: list[tuple[np.ndarray, ...]]) -> None:
    fs, root = fsspec.core.url_to_fs(folder)
    fs.makedirs(root, exist_ok=True)
    for index, name in enumerate(ARRAYS):
        with fs.open(f"{root}/{name}-{shard}.npy", "wb") as out:
            np.save(out, np.stack([row[index] for row in rows]))


def find_manifest(folder: str) -> dict[str, Any] | None:
    """A packed corpus's manifest, or None while the folder holds none (not packed, or not finished)."""
    return read_json(join(folder, MANIFEST))


def read_manifest(folder: str) -> dict[str, Any]:
    """The manifest of a finished packed corpus; FileNotFoundError when the folder holds none."""
    manifest = find_manifest(folder)
    if manifest is None:
        raise FileNotFoundError(f"{folder} holds no finished packed corpus ({MANIFEST} missing)")
    return manifest


class PackedCorpus:
    """Random access to the rows of one prepared corpus."""

    def __init__(self, folder: str):
        manifest = read_manifest(folder)
        self.manifest = manifest
        self.folder = local_copy(folder)
        self.seq_len = manifest["seq_len"]
        counts = [shard["rows"] for shard in manifest["shards"]]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._arrays: dict[tuple[str, str], np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _array(self, name: str, shard: str) -> np.ndarray:
        key = (name, shard)
        if key not in self._arrays:
            path = join(self.folder, f"{name}-{shard}.npy")
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
        return out[0], out[1], out[2]
