"""The training forward pass: its routes (causal, mask) give the same loss and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixloop.data.packing import Packer
from mixloop.model import model_config, new_model
from mixloop.train.batches import MicroBatch
from mixloop.train.forward import micro_batch_ce

PAD = 0


class Rows:
    """Packed rows as the loader reads them (PackedCorpus's read)."""

    def __init__(self, rows):
        self.tokens, self.supervised, self.segments = (np.stack(a) for a in zip(*rows))
        self.seq_len = self.tokens.shape[1]

    def read(self, index):
        return self.tokens[index], self.supervised[index], self.segments[index]


def micro_batch(documents, seq_len: int, one_per_row: bool = False) -> MicroBatch:
    packer = Packer(seq_len, PAD, split_documents=True, one_per_row=one_per_row)
    rows = [tuple(a.copy() for a in row) for ids, sup in documents for row in packer.add(ids, sup)]
    rows += [tuple(a.copy() for a in row) for row in packer.flush()]
    return MicroBatch([Rows(rows)], np.zeros(len(rows), np.int64), np.arange(len(rows)))


def documents(lengths, seed: int = 0, vocab: int = 200):
    """Documents of random ids, every third token unsupervised (as a chat's prompt is)."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(3, vocab, n).astype(np.int32), np.arange(n) % 3 != 0) for n in lengths]


@pytest.fixture(scope="module")
def model(request):
    tokenizer = request.getfixturevalue("trained_tokenizer")
    return new_model(model_config("micro", None, tokenizer), seed=0)


def loss_and_grads(model, batch, route: str):
    batch.one_document_per_row = batch.one_document_per_row and route == "causal"
    model.zero_grad()
    ce = micro_batch_ce(model, batch, "cpu")
    ce.sum().backward()
    return ce.detach(), [p.grad.clone() for p in model.parameters()]


def test_rows_of_one_document_take_the_causal_route_with_the_mask_routes_loss_and_gradients(model):
    batch = micro_batch(documents([7, 19, 4, 30, 11, 5]), seq_len=24, one_per_row=True)
    assert batch.one_document_per_row
    assert not micro_batch(documents([7, 19, 4, 30, 11, 5]), seq_len=24).one_document_per_row
    reference, reference_grads = loss_and_grads(model, batch, "mask")
    assert (reference > 0).sum() > 20
    ce, grads = loss_and_grads(model, micro_batch(documents([7, 19, 4, 30, 11, 5]), 24, one_per_row=True), "causal")
    torch.testing.assert_close(ce, reference, atol=1e-5, rtol=0)
    for grad, expected in zip(grads, reference_grads):
        torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4)
