"""Loss balancing: the mixture, not the number of supervised tokens, decides each corpus's share."""

from __future__ import annotations

import pytest
import torch

from mixloop.train.loss import corpus_token_weights, token_ce


def _weights(supervised, rows, loss_weights=None, balance="corpus"):
    supervised = torch.tensor(supervised, dtype=torch.long)
    rows = torch.tensor(rows, dtype=torch.long)
    loss_weights = torch.tensor(loss_weights or [1.0] * len(rows))
    return corpus_token_weights(supervised, rows, loss_weights, balance), supervised.double()


def test_equal_rows_get_equal_total_weight_despite_ten_times_fewer_tokens():
    # A chat corpus supervises only assistant tokens: 10x fewer than a text corpus with as many rows.
    weights, counts = _weights(supervised=[10_000, 1_000], rows=[8, 8])
    totals = weights * counts
    assert totals[0].item() == pytest.approx(totals[1].item())
    assert totals.sum().item() == pytest.approx(1.0)
    assert weights[1] > weights[0]  # so each chat token counts 10x


def test_total_weight_follows_the_row_shares():
    weights, counts = _weights(supervised=[5_000, 300, 900], rows=[6, 3, 1])
    assert (weights * counts).tolist() == pytest.approx([0.6, 0.3, 0.1])


def test_loss_weights_tilt_the_shares():
    weights, counts = _weights(supervised=[10_000, 1_000], rows=[8, 8], loss_weights=[2.0, 1.0])
    assert (weights * counts).tolist() == pytest.approx([2 / 3, 1 / 3])


def test_corpus_without_supervised_tokens_gets_nothing_and_others_renormalise():
    weights, counts = _weights(supervised=[4_000, 0, 1_000], rows=[4, 4, 4])
    assert weights[1].item() == 0.0
    assert (weights * counts).tolist() == pytest.approx([0.5, 0.0, 0.5])


def test_token_balance_counts_every_supervised_token_the_same():
    weights, counts = _weights(supervised=[10_000, 1_000, 0], rows=[8, 8, 2], balance="token")
    assert weights.tolist() == pytest.approx([1 / 11_000, 1 / 11_000, 0.0])
    assert (weights * counts).sum().item() == pytest.approx(1.0)


def test_weighted_loss_is_the_share_weighted_mean_of_per_corpus_means():
    torch.manual_seed(0)
    corpus_of_token = torch.tensor([0] * 50 + [1] * 5)
    ce = torch.rand(55)
    weights, _ = _weights(supervised=[50, 5], rows=[3, 1])
    loss = (weights[corpus_of_token] * ce).sum()
    expected = 0.75 * ce[:50].mean() + 0.25 * ce[50:].mean()
    assert loss.item() == pytest.approx(expected.item())


def test_token_ce_is_zero_where_labels_are_ignored():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[3, -100, 4, -100, -100], [1, 2, -100, 10, 0]])
    ce = token_ce(logits, labels)
    assert ce.shape == labels.shape
    assert (ce[labels == -100] == 0).all() and (ce[labels != -100] > 0).all()
    reference = torch.nn.functional.cross_entropy(logits[0, 0], labels[0, 0])
    assert ce[0, 0].item() == pytest.approx(reference.item(), rel=1e-6)
