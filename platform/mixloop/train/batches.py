"""Each step's rows: the global batch the mix plan chooses, cut into micro-batches, this worker's
share of them read (one step ahead, in a background thread) and turned into model inputs."""

from __future__ import annotations

import hashlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch

from mixloop.config import StepGeometry
from mixloop.data.mixplan import MixPlan
from mixloop.data.packing import model_inputs
from mixloop.train.forward import document_lengths


class StepBatch(NamedTuple):
    corpus_of_row: np.ndarray  # corpus of every row of the global batch
    row_hash: str  # identity of the global batch's rows
    micro_batches: list[MicroBatch]  # this worker's share, ready for the model


class StepLoader:
    """This worker's micro-batches of each global batch, the next one read in a background thread
    while the current one trains (numpy and torch release the GIL while they copy)."""

    def __init__(
        self, plan: MixPlan, corpora, geometry: StepGeometry, total_steps: int, mine: list[int], pin_memory: bool
    ):
        self.plan, self.corpora, self.rows_per_step, self.mine = plan, corpora, geometry.rows_per_step, mine
        self.micro, self.total_steps, self.pin_memory = geometry.micro_batch_rows, total_steps, pin_memory
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mixloop-loader")
        self.pending: tuple[int, Future] | None = None

    def get(self, step: int) -> StepBatch:
        if self.pending is not None and self.pending[0] == step:
            batch = self.pending[1].result()
        else:
            batch = self.load(step)
        self.pending = (step + 1, self.pool.submit(self.load, step + 1)) if step + 1 < self.total_steps else None
        return batch

    def load(self, step: int) -> StepBatch:
        corpus, index = self.plan.rows(step * self.rows_per_step, (step + 1) * self.rows_per_step)
        micro = self.micro
        batches = [
            MicroBatch(
                self.corpora, corpus[i * micro : (i + 1) * micro], index[i * micro : (i + 1) * micro], self.pin_memory
            )
            for i in self.mine
        ]
        return StepBatch(corpus, row_hash(corpus, index), batches)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def micro_batches_of(rank: int, world: int, micro_batches: int) -> list[int]:
    """Which micro-batches of every global batch a worker trains: every world-th one from its rank.
    Together the workers cover each global batch exactly once, whatever their number."""
    return list(range(rank, micro_batches, world))


def row_hash(corpus_of_row: np.ndarray, row_index: np.ndarray) -> str:
    """Identity of the rows one global step trains, to compare runs step by step."""
    ids = np.stack([np.asarray(corpus_of_row, np.int64), np.asarray(row_index, np.int64)])
    return hashlib.sha256(ids.tobytes()).hexdigest()[:16]


class MicroBatch:
    def __init__(self, corpora, corpus_of_row: np.ndarray, row_index: np.ndarray, pin_memory: bool = False):
        length = corpora[0].seq_len
        tokens = np.empty((len(row_index), length), np.int32)
        supervised = np.empty((len(row_index), length), bool)
        segments = np.empty((len(row_index), length), np.int16)
        for c in np.unique(corpus_of_row):
            picked = corpus_of_row == c
            tokens[picked], supervised[picked], segments[picked] = corpora[c].read(row_index[picked])
        self.inputs = model_inputs(tokens, supervised, segments)
        if pin_memory:  # page-locked host memory lets the copy to the GPU run asynchronously
            self.inputs = {k: v.pin_memory() for k, v in self.inputs.items()}
        self.corpus = torch.as_tensor(corpus_of_row, dtype=torch.long)
        self.targets = (self.inputs["labels"] != -100).sum(1).double()  # supervised targets per row
        self.real = torch.as_tensor(segments > 0)
        self.real_tokens = self.real.sum(1).double()
        # What the forward pass needs to skip the 4D mask (mixloop.train.forward).
        self.document_lengths = document_lengths(segments)
        self.one_document_per_row = bool((segments.max(1) <= 1).all())
