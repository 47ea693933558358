"""`mixloop bench train`'s plain variant: a minimal loop over padded rows that trains and counts useful tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixloop.bench.train import WINDOW, plain_loop, summarise_plain
from mixloop.data.packing import Packer
from mixloop.train.model import model_config, new_model


class PaddedRows:
    """Rows of one document each, padded (a `packing: false` corpus), read as PackedCorpus reads."""

    def __init__(self, seq_len: int, documents: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        packer = Packer(seq_len, pad_id=0, split_documents=True, one_per_row=True)
        rows = []
        for _ in range(documents):  # chats: the first third of each document is an unsupervised prompt
            ids = rng.integers(3, 40, rng.integers(4, seq_len)).astype(np.int32)
            rows += [tuple(a.copy() for a in row) for row in packer.add(ids, np.arange(len(ids)) >= len(ids) // 3)]
        rows += [tuple(a.copy() for a in row) for row in packer.flush()]
        self.tokens, self.supervised, self.segments = (np.stack(a) for a in zip(*rows))

    def read(self, index):
        return self.tokens[index], self.supervised[index], self.segments[index]


@pytest.fixture(scope="module")
def rows():
    return PaddedRows(seq_len=24, documents=8)


def test_the_plain_loop_trains_and_counts_only_document_tokens(rows, trained_tokenizer):
    model = new_model(model_config("micro", None, trained_tokenizer), seed=0)
    index = np.arange(8)
    records = plain_loop(
        model, rows, lambda step: index, steps=WINDOW + 3, micro_batch_rows=4, lr=1e-2, device=torch.device("cpu")
    )
    assert len(records) == WINDOW + 3
    assert records[-1]["loss"] < records[0]["loss"] - 0.5, [r["loss"] for r in records]
    real = int((rows.segments[index] > 0).sum())
    assert real < rows.segments[index].size, "the rows hold padding"
    assert all(r["useful_tokens"] == real for r in records)
    summary = summarise_plain(records)
    kept = records[WINDOW:]
    assert summary["useful_tokens_per_s"] == pytest.approx(real * len(kept) / sum(r["step_seconds"] for r in kept))
    assert summary["step_seconds"] == pytest.approx(sum(r["step_seconds"] for r in kept) / len(kept))
