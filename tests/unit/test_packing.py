"""Packed rows: documents share a row but never see each other."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixloop.data.packing import Packer, model_inputs
from mixloop.train.model import model_config, new_model

PAD = 0


def _docs(lengths: list[int], supervise_every: int = 1, first_id: int = 10) -> list[tuple[np.ndarray, np.ndarray]]:
    """Documents with distinct, increasing token ids, so any loss or reordering is visible."""
    docs, next_id = [], first_id
    for length in lengths:
        ids = np.arange(next_id, next_id + length, dtype=np.int32)
        docs.append((ids, np.arange(length) % supervise_every == 0))
        next_id += length
    return docs


def _pack(docs, seq_len: int, split: bool) -> list[tuple[np.ndarray, ...]]:
    packer = Packer(seq_len, PAD, split_documents=split)
    rows = []
    for ids, supervised in docs:
        rows += [tuple(a.copy() for a in row) for row in packer.add(ids, supervised)]
    rows += [tuple(a.copy() for a in row) for row in packer.flush()]
    return rows


def _stack(rows):
    return tuple(np.stack(arrays) for arrays in zip(*rows))


def test_text_split_across_rows_keeps_every_token_once_in_order():
    docs = _docs([5, 23, 3, 40, 1, 9, 16])
    rows = _pack(docs, seq_len=16, split=True)
    assert all(len(tokens) == 16 for tokens, _, _ in rows)
    packed = np.concatenate([tokens[segments > 0] for tokens, _, segments in rows])
    assert packed.tolist() == np.concatenate([ids for ids, _ in docs]).tolist()
    # Only the last row may carry padding: text fills rows completely.
    assert all((segments > 0).all() for _, _, segments in rows[:-1])


def test_supervision_travels_with_its_tokens():
    docs = _docs([7, 30, 12], supervise_every=3)
    for split in (True, False):
        rows = _pack(docs, seq_len=16, split=split)
        packed = np.concatenate([sup[seg > 0] for _, sup, seg in rows])
        assert packed.tolist() == np.concatenate([sup for _, sup in docs]).tolist()
        assert not any(sup[seg == 0].any() for _, sup, seg in rows)


def test_chat_documents_that_fit_are_never_split():
    docs = _docs([5, 9, 12, 16, 3, 14, 2, 8])
    rows = _pack(docs, seq_len=16, split=False)
    for ids, _ in docs:
        homes = [(tokens, segments) for tokens, _, segments in rows if np.isin(ids, tokens[segments > 0]).any()]
        assert len(homes) == 1, f"document starting at {ids[0]} is spread over {len(homes)} rows"
        tokens, segments = homes[0]
        segment = segments[tokens == ids[0]][0]
        assert tokens[segments == segment].tolist() == ids.tolist()
    packed = np.concatenate([tokens[segments > 0] for tokens, _, segments in rows])
    assert packed.tolist() == np.concatenate([ids for ids, _ in docs]).tolist()


@pytest.mark.parametrize("split", [True, False])
def test_document_longer_than_a_row_is_cut_into_pieces(split):
    docs = _docs([4, 37, 5])
    rows = _pack(docs, seq_len=16, split=split)
    long_ids = docs[1][0]
    pieces = []
    for tokens, _, segments in rows:
        for segment in np.unique(segments[segments > 0]):
            piece = tokens[segments == segment]
            if np.isin(piece, long_ids).any():
                assert np.isin(piece, long_ids).all()
                pieces.append(piece)
    assert len(pieces) >= 3 and all(len(p) <= 16 for p in pieces)
    assert np.concatenate(pieces).tolist() == long_ids.tolist()


def test_segments_are_numbered_per_row_and_padding_is_segment_zero():
    rows = _pack(_docs([5, 23, 3, 2, 4, 1]), seq_len=16, split=False)
    for tokens, supervised, segments in rows:
        used = segments > 0
        # Documents first, padding only at the end of the row.
        assert used.tolist() == sorted(used.tolist(), reverse=True)
        numbers = segments[used]
        assert numbers[0] == 1
        assert set(np.diff(numbers).tolist()) <= {0, 1}
        assert (tokens[~used] == PAD).all() and not supervised[~used].any()
    assert (rows[-1][2] == 0).any(), "the last row should be padded in this example"


def test_flush_of_an_empty_packer_yields_nothing():
    assert list(Packer(8, PAD, split_documents=True).flush()) == []


# ---------------------------------------------------------------- model inputs


@pytest.fixture
def batch():
    """Two rows: chats with unsupervised prompt tokens, a text piece cut at a row end, padding."""
    docs = _docs([6, 9, 11, 4, 3], supervise_every=2)
    rows = _pack(docs, seq_len=16, split=True)
    return _stack(rows)


def test_labels_are_next_token_within_a_document_and_supervised(batch):
    tokens, supervised, segments = batch
    labels = model_inputs(tokens, supervised, segments)["labels"].numpy()
    assert labels.shape == tokens.shape
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1]):
            target_ok = (
                t + 1 < tokens.shape[1]
                and segments[b, t] > 0
                and segments[b, t + 1] == segments[b, t]
                and supervised[b, t + 1]
            )
            assert labels[b, t] == (tokens[b, t + 1] if target_ok else -100), (b, t)


def test_labels_ignore_boundaries_padding_and_unsupervised_tokens(batch):
    tokens, supervised, segments = batch
    labels = model_inputs(tokens, supervised, segments)["labels"].numpy()
    last_of_document = np.zeros_like(segments, dtype=bool)
    last_of_document[:, :-1] = segments[:, :-1] != segments[:, 1:]
    last_of_document[:, -1] = True
    assert (labels[last_of_document] == -100).all()
    assert (labels[segments == 0] == -100).all()
    next_unsupervised = np.ones_like(supervised)
    next_unsupervised[:, :-1] = ~supervised[:, 1:]
    assert (labels[next_unsupervised] == -100).all()
    assert (labels != -100).sum() > 0


def test_position_ids_restart_for_each_document(batch):
    tokens, supervised, segments = batch
    positions = model_inputs(tokens, supervised, segments)["position_ids"].numpy()
    for b in range(tokens.shape[0]):
        for segment in np.unique(segments[b][segments[b] > 0]):
            span = positions[b][segments[b] == segment]
            assert span.tolist() == list(range(len(span)))


def test_attention_mask_is_block_diagonal_causal(batch):
    tokens, supervised, segments = batch
    mask = model_inputs(tokens, supervised, segments)["attention_mask"]
    batch_size, length = tokens.shape
    assert mask.shape == (batch_size, 1, length, length) and mask.dtype == torch.bool
    mask = mask[:, 0].numpy()
    for b in range(batch_size):
        for i in range(length):
            for j in range(length):
                assert mask[b, i, j] == (j <= i and segments[b, i] == segments[b, j]), (b, i, j)
        assert mask[b].any(axis=1).all(), "every query must attend to something"


# ---------------------------------------------------------------- the model never mixes documents


@pytest.fixture(scope="module")
def tiny_model(request):
    tokenizer = request.getfixturevalue("trained_tokenizer")
    model = new_model(model_config("micro", None, tokenizer), seed=0)
    return model.eval()


def _row(documents: list[np.ndarray], seq_len: int) -> dict[str, torch.Tensor]:
    packer = Packer(seq_len, PAD, split_documents=False)
    rows = [row for ids in documents for row in packer.add(ids, np.ones(len(ids), bool))]
    rows += list(packer.flush())
    assert len(rows) == 1
    return model_inputs(*(a[None] for a in rows[0]))


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            position_ids=inputs["position_ids"],
        ).logits[0]


def test_changing_the_first_document_does_not_change_the_second(tiny_model):
    rng = np.random.default_rng(0)
    vocab = tiny_model.config.vocab_size
    second = rng.integers(3, vocab, 12).astype(np.int32)
    first_a = rng.integers(3, vocab, 10).astype(np.int32)
    first_b = rng.integers(3, vocab, 10).astype(np.int32)
    first_short = rng.integers(3, vocab, 6).astype(np.int32)

    logits_a = _logits(tiny_model, _row([first_a, second], 32))[10:22]
    logits_b = _logits(tiny_model, _row([first_b, second], 32))[10:22]
    logits_short = _logits(tiny_model, _row([first_short, second], 32))[6:18]
    first_logits_a = _logits(tiny_model, _row([first_a, second], 32))[:10]
    first_logits_b = _logits(tiny_model, _row([first_b, second], 32))[:10]
    assert not torch.allclose(first_logits_a, first_logits_b, atol=1e-3)  # the change is visible...
    assert torch.allclose(logits_a, logits_b, atol=1e-5)  # ...but not to the second document
    assert torch.allclose(logits_a, logits_short, atol=1e-5)

    with torch.no_grad():
        alone = tiny_model(input_ids=torch.as_tensor(second[None], dtype=torch.long)).logits[0]
    assert torch.allclose(logits_a, alone, atol=1e-4)


def test_without_packing_every_document_gets_rows_of_its_own():
    packer = Packer(8, pad_id=0, split_documents=True, one_per_row=True)
    docs = [np.arange(1, 4), np.arange(10, 20), np.arange(30, 32)]
    rows = [row for doc in docs for row in packer.add(doc, np.ones(len(doc), bool))] + list(packer.flush())
    tokens = [row[0].tolist() for row in rows]
    assert tokens == [
        [1, 2, 3, 0, 0, 0, 0, 0],
        list(range(10, 18)),
        [18, 19, 0, 0, 0, 0, 0, 0],
        [30, 31, 0, 0, 0, 0, 0, 0],
    ]
    assert all(set(row[2][row[2] > 0].tolist()) == {1} for row in rows), "one document (segment) per row"
