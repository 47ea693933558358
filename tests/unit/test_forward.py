"""The training forward pass: its three routes (documents, causal, mask) give the same loss and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixloop.data.packing import Packer
from mixloop.train.batches import MicroBatch
from mixloop.train.forward import document_lengths, micro_batch_ce, takes_documents
from mixloop.train.model import model_config, new_model

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
    ce = micro_batch_ce(model, batch, "cpu", by_document=route == "documents")
    ce.sum().backward()
    return ce.detach(), [p.grad.clone() for p in model.parameters()]


def test_document_lengths_leave_padding_out_and_never_join_rows():
    segments = np.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1], [1, 2, 3, 0, 0, 0]])
    assert document_lengths(segments) == [2, 3, 6, 1, 1, 1]


@pytest.mark.parametrize("one_per_row", [False, True])
def test_every_route_gives_the_mask_routes_loss_and_gradients(model, one_per_row):
    # Packed: several documents per row, one cut across rows, padding in the last row; or one per row.
    batch = micro_batch(documents([7, 19, 4, 30, 11, 5]), seq_len=24, one_per_row=one_per_row)
    assert batch.one_document_per_row == one_per_row
    reference, reference_grads = loss_and_grads(model, batch, "mask")
    assert (reference > 0).sum() > 20
    for route in ["documents"] + (["causal"] if one_per_row else []):
        ce, grads = loss_and_grads(model, micro_batch(documents([7, 19, 4, 30, 11, 5]), 24, one_per_row), route)
        torch.testing.assert_close(ce, reference, atol=1e-5, rtol=0)
        for grad, expected in zip(grads, reference_grads):
            torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4)


def test_in_the_documents_route_a_document_never_sees_its_neighbours(model):
    first_a, second = documents([10, 12], seed=1)
    first_b, _ = documents([10, 12], seed=2)
    with torch.no_grad():
        a = micro_batch([first_a, second], 32)
        b = micro_batch([first_b, second], 32)
        ce_a = micro_batch_ce(model, a, "cpu", by_document=True)[0]
        ce_b = micro_batch_ce(model, b, "cpu", by_document=True)[0]
    assert not torch.allclose(ce_a[:10], ce_b[:10], atol=1e-3)
    torch.testing.assert_close(ce_a[10:22], ce_b[10:22], atol=1e-5, rtol=0)


def test_the_documents_route_leaves_the_model_on_sdpa(model):
    micro_batch_ce(model, micro_batch(documents([5, 9]), 16), "cpu", by_document=True)
    assert model.config._attn_implementation == "sdpa"
    assert "attn_implementation" not in model.config.to_json_string()


def test_the_documents_route_is_for_transformers_models_on_cpu(model):
    assert takes_documents(model, "cpu")
    assert not takes_documents(model, "cuda")

    class RemoteCode(torch.nn.Module):  # a trust_remote_code model: its own attention, no registry
        _supports_attention_backend = False

        def forward(self, input_ids, logits_to_keep=0):
            return input_ids

    assert not takes_documents(RemoteCode(), "cpu")
    from transformers import MistralConfig, MistralForCausalLM

    windowed = MistralForCausalLM(
        MistralConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=64,
            sliding_window=16,
        )
    )
    assert not takes_documents(windowed, "cpu")  # the route computes no sliding window: the mask path does


def test_a_micro_batch_without_targets_has_zero_loss_and_gradients(model):
    unsupervised = [(ids, np.zeros(len(ids), bool)) for ids, _ in documents([6, 9])]
    model.zero_grad()
    ce = micro_batch_ce(model, micro_batch(unsupervised, 16), "cpu", by_document=True)
    ce.sum().backward()
    assert (ce == 0).all()
    assert all(p.grad is None or (p.grad == 0).all() for p in model.parameters())
