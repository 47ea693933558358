"""The mix plan: which corpus and which packed row fill each global row of a stage.

A pure function of (seed, weights, schedule, row counts, global row index), so
any worker of any world size, before or after a restart, computes the same
sequence without reading data or keeping state (docs/ARCHITECTURE.md, section "Determinism").

How rows are chosen:
- The stage is cut into blocks of BLOCK rows. Each block's weights are the
  schedule's at the block's middle; its per-corpus counts are apportioned
  (largest remainder) from the cumulative target, carrying the rounding, so
  every corpus stays within one row of its target at every block boundary.
- Inside a block the corpora are interleaved evenly (the k-th of n rows of a
  corpus sits near (k + 1/2) / n of the block), so any window of rows, aligned
  or not, holds each corpus within a couple of rows of its share.
- The j-th row drawn from a corpus is row perm_e(j mod N) of that corpus, where
  e = j // N is its epoch and perm_e a keyed pseudo-random permutation (a Feistel
  network, so nothing of size N is held in memory). A corpus that runs out is
  thus re-shuffled and repeated; `epochs` reports how often.
"""

from __future__ import annotations

import zlib

import numpy as np

from mixloop.config import ResolvedStage

BLOCK = 256


class MixPlan:
    def __init__(
        self,
        names: list[str],
        weights_from: list[float],
        weights_to: list[float],
        corpus_rows: list[int],
        total_rows: int,
        seed: int,
    ):
        if min(corpus_rows) <= 0:
            empty = [n for n, r in zip(names, corpus_rows) if r <= 0]
            raise ValueError(f"corpora without packed rows cannot be mixed: {', '.join(empty)}")
        self.names = list(names)
        self.start = np.asarray(weights_from, dtype=np.float64)
        self.end = np.asarray(weights_to, dtype=np.float64)
        self.corpus_rows = np.asarray(corpus_rows, dtype=np.int64)
        self.total_rows = int(total_rows)
        self.seed = int(seed)
        self._cumulative = self._apportion_blocks()
        self._last_block: tuple = (-1, None, None)

    @classmethod
    def for_stage(cls, stage: ResolvedStage, corpus_rows: dict[str, int]) -> MixPlan:
        """The plan of a resolved stage (every row of its steps) over corpora of the given sizes."""
        names = list(stage.mixture)
        return cls(
            names,
            [stage.mixture[n].start for n in names],
            [stage.mixture[n].end for n in names],
            [corpus_rows[n] for n in names],
            stage.total_steps * stage.geometry.rows_per_step,
            stage.seed,
        )

    def _block_weights(self, block: int) -> np.ndarray:
        middle = (block * BLOCK + BLOCK / 2) / max(self.total_rows, 1)
        weights = self.start + (self.end - self.start) * min(middle, 1.0)
        return weights / weights.sum()

    def _apportion_blocks(self) -> np.ndarray:
        """cumulative[b, c]: rows of corpus c in blocks before b."""
        blocks = -(-self.total_rows // BLOCK)
        cumulative = np.zeros((blocks + 1, len(self.names)), dtype=np.int64)
        target = np.zeros(len(self.names))
        for block in range(blocks):
            target = target + self._block_weights(block) * BLOCK
            quota = np.maximum(target - cumulative[block], 0.0)
            quota *= BLOCK / quota.sum()
            counts = np.floor(quota).astype(np.int64)
            short = BLOCK - counts.sum()
            counts[np.argsort(-(quota - counts), kind="stable")[:short]] += 1
            cumulative[block + 1] = cumulative[block] + counts
        return cumulative

    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """Corpus index and occurrence number of each slot of one block."""
        counts = self._cumulative[block + 1] - self._cumulative[block]
        corpus = np.repeat(np.arange(len(self.names)), counts)
        within = np.concatenate([np.arange(n) for n in counts])
        keys = (within + 0.5) / counts[corpus] + corpus * 1e-9
        order = np.argsort(keys, kind="stable")
        corpus, within = corpus[order], within[order]
        return corpus, self._cumulative[block][corpus] + within

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(corpus index, row index within that corpus) for global rows [start, stop)."""
        if not 0 <= start <= stop <= self.total_rows:
            raise IndexError(f"rows [{start}, {stop}) outside the plan of {self.total_rows} rows")
        corpus_parts, row_parts = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for block in range(start // BLOCK, -(-stop // BLOCK)):
            corpus, rows = self._block_rows(block)
            lo, hi = max(start - block * BLOCK, 0), min(stop - block * BLOCK, BLOCK)
            corpus_parts.append(corpus[lo:hi])
            row_parts.append(rows[lo:hi])
        return np.concatenate(corpus_parts), np.concatenate(row_parts)

    def _block_rows(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """Corpus and row index of every slot of a block; the last block is kept, since a training
        loop asks for it step after step and shuffling costs more per call than per row."""
        if self._last_block[0] != block:
            corpus, occurrence = self._block(block)
            self._last_block = (block, corpus, self._shuffle(corpus, occurrence))
        return self._last_block[1], self._last_block[2]

    def _shuffle(self, corpus: np.ndarray, occurrence: np.ndarray) -> np.ndarray:
        rows = np.empty_like(occurrence)
        for c in np.unique(corpus):
            picked = corpus == c
            n = int(self.corpus_rows[c])
            epoch, position = np.divmod(occurrence[picked], n)
            epochs, inverse = np.unique(epoch, return_inverse=True)
            keys = np.asarray([self._key(c, int(e)) for e in epochs], dtype=np.uint64)[inverse]
            rows[picked] = permute(position, n, keys)
        return rows

    def _key(self, corpus: int, epoch: int) -> int:
        return zlib.crc32(f"{self.seed}/{self.names[corpus]}/{epoch}".encode())

    def rows_per_corpus(self) -> dict[str, int]:
        """Realised rows of each corpus over the whole stage (the last block may be cut short)."""
        last = (self.total_rows - 1) // BLOCK
        corpus, _ = self._block(last)
        tail = np.bincount(corpus[: self.total_rows - last * BLOCK], minlength=len(self.names))
        return dict(zip(self.names, (self._cumulative[last] + tail).tolist()))

    def epochs(self) -> dict[str, float]:
        """How many passes over each corpus the stage makes (above 1 means repeats)."""
        realised = self.rows_per_corpus()
        return {n: realised[n] / int(r) for n, r in zip(self.names, self.corpus_rows)}


def permute(index: np.ndarray, n: int, keys: np.ndarray | int, rounds: int = 4) -> np.ndarray:
    """A keyed bijection of [0, n) for each key: a balanced Feistel network with cycle walking."""
    if n <= 1:
        return np.zeros_like(index)
    bits = max(2, int(np.ceil(np.log2(n))))
    bits += bits % 2
    half = bits // 2
    low_mask = np.uint64((1 << half) - 1)
    values = np.asarray(index, dtype=np.uint64).copy()
    keys = np.broadcast_to(np.asarray(keys, dtype=np.uint64), values.shape)
    pending = np.ones(len(values), dtype=bool)
    while True:
        for r in range(rounds):
            left, right = values[pending] >> np.uint64(half), values[pending] & low_mask
            round_keys = _mix64(keys[pending] + np.uint64(r + 1))
            values[pending] = (right << np.uint64(half)) | (left ^ (_mix64(right ^ round_keys) & low_mask))
        pending &= values >= np.uint64(n)
        if not pending.any():
            return values.astype(np.int64)


def _mix64(x: np.ndarray) -> np.ndarray:
    """The murmur3 64-bit finaliser: a cheap, well-spread hash of each value (arrays wrap around
    on overflow, as the hash wants)."""
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xFF51AFD7ED558CCD)
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xC4CEB9FE1A85EC53)
    return x ^ (x >> np.uint64(33))
