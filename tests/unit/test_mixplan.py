"""The mix plan: accurate, deterministic, resumable, independent of the number of workers."""

from __future__ import annotations

import numpy as np
import pytest

from mixloop.data.mixplan import MixPlan, permute

NAMES = ["web", "books", "code"]
WEIGHTS = [0.6, 0.3, 0.1]
TOTAL = 20_000
WINDOW, STEP = 1000, 50


def _plan(weights_from=WEIGHTS, weights_to=None, corpus_rows=(50_000, 9_000, 700), total=TOTAL, seed=1):
    names = NAMES[: len(weights_from)]
    return MixPlan(names, list(weights_from), list(weights_to or weights_from), list(corpus_rows), total, seed)


def _window_shares(corpus: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Share of each corpus in every window of WINDOW rows starting at multiples of STEP; and the starts."""
    counts = np.vstack([np.zeros(k), np.cumsum(np.eye(k)[corpus], axis=0)])
    starts = np.arange(0, len(corpus) - WINDOW + 1, STEP)
    return (counts[starts + WINDOW] - counts[starts]) / WINDOW, starts


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_shares_within_one_point_over_the_stage_and_every_window(seed):
    plan = _plan(seed=seed)
    corpus, _ = plan.rows(0, TOTAL)
    assert len(corpus) == TOTAL
    whole = np.bincount(corpus, minlength=3) / TOTAL
    assert np.abs(whole - WEIGHTS).max() <= 0.01
    shares, _ = _window_shares(corpus, 3)
    assert np.abs(shares - WEIGHTS).max() <= 0.01
    assert plan.rows_per_corpus() == dict(zip(NAMES, np.bincount(corpus, minlength=3).tolist()))


def test_unnormalised_weights_are_relative_shares():
    corpus, _ = _plan(weights_from=[6, 3, 1]).rows(0, TOTAL)
    assert np.abs(np.bincount(corpus, minlength=3) / TOTAL - WEIGHTS).max() <= 0.01


def test_ramped_weight_follows_the_linear_schedule():
    # replay fades from 0.3 to 0.1 while the new corpus grows from 0.7 to 0.9
    plan = _plan(weights_from=[0.7, 0.3], weights_to=[0.9, 0.1], corpus_rows=(50_000, 50_000))
    corpus, _ = plan.rows(0, TOTAL)
    shares, starts = _window_shares(corpus, 2)
    expected = 0.3 + (0.1 - 0.3) * (starts + WINDOW / 2) / TOTAL
    assert abs(shares[0, 1] - expected[0]) <= 0.01 and abs(shares[0, 1] - 0.3) <= 0.015
    assert abs(shares[-1, 1] - expected[-1]) <= 0.01 and abs(shares[-1, 1] - 0.1) <= 0.015
    assert np.abs(shares[:, 1] - expected).max() <= 0.01
    assert abs(np.mean(corpus == 1) - 0.2) <= 0.01


def test_same_arguments_same_rows_and_another_seed_other_rows():
    first = _plan(seed=3).rows(0, TOTAL)
    again = _plan(seed=3).rows(0, TOTAL)
    other = _plan(seed=4).rows(0, TOTAL)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert not np.array_equal(first[1], other[1])


@pytest.mark.parametrize("start, stop", [(0, 1), (255, 257), (1234, 5678), (19_000, TOTAL), (700, 700)])
def test_any_range_equals_the_slice_of_the_whole(start, stop):
    plan = _plan()
    corpus, row = plan.rows(0, TOTAL)
    part_corpus, part_row = plan.rows(start, stop)
    assert np.array_equal(part_corpus, corpus[start:stop])
    assert np.array_equal(part_row, row[start:stop])


@pytest.mark.parametrize("rows_per_step", [32, 48, 100])
def test_step_by_step_equals_the_whole_sequence(rows_per_step):
    # What a resumed or re-sized run reads: global batch s is rows [s*G, (s+1)*G) whoever reads it.
    plan = _plan(total=4_000)
    steps = 4_000 // rows_per_step
    corpus, row = plan.rows(0, steps * rows_per_step)
    parts = [plan.rows(s * rows_per_step, (s + 1) * rows_per_step) for s in range(steps)]
    assert np.array_equal(np.concatenate([c for c, _ in parts]), corpus)
    assert np.array_equal(np.concatenate([r for _, r in parts]), row)


def test_no_repeats_within_an_epoch_and_a_fresh_order_after():
    corpus_rows = (50_000, 9_000, 700)
    plan = _plan(corpus_rows=corpus_rows)
    corpus, row = plan.rows(0, TOTAL)
    for c, n in enumerate(corpus_rows):
        drawn = row[corpus == c]
        assert ((drawn >= 0) & (drawn < n)).all()
        for epoch_start in range(0, len(drawn), n):
            epoch = drawn[epoch_start : epoch_start + n]
            assert len(np.unique(epoch)) == len(epoch), f"{NAMES[c]} repeats a row within an epoch"
            if len(epoch) == n:
                assert sorted(epoch.tolist()) == list(range(n))
    small = row[corpus == 2]
    assert len(small) > 2 * corpus_rows[2]
    assert not np.array_equal(small[: corpus_rows[2]], small[corpus_rows[2] : 2 * corpus_rows[2]])
    assert not np.array_equal(small[: corpus_rows[2]], np.arange(corpus_rows[2]))


def test_epochs_reports_repeats():
    plan = _plan(corpus_rows=(50_000, 9_000, 700))
    epochs = plan.epochs()
    realised = plan.rows_per_corpus()
    assert epochs["code"] > 1 and epochs["web"] < 1
    for name, rows in zip(NAMES, (50_000, 9_000, 700)):
        assert epochs[name] == pytest.approx(realised[name] / rows)


def test_a_corpus_without_rows_is_refused():
    with pytest.raises(ValueError, match="books"):
        _plan(corpus_rows=(10, 0, 5))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 1000, 4097])
@pytest.mark.parametrize("key", [0, 1, 123456789])
def test_permute_is_a_bijection(n, key):
    image = permute(np.arange(n), n, key)
    assert sorted(image.tolist()) == list(range(n))


def test_permute_depends_on_the_key_and_shuffles():
    n = 1000
    a, b = permute(np.arange(n), n, 1), permute(np.arange(n), n, 2)
    assert not np.array_equal(a, b)
    assert np.mean(a == np.arange(n)) < 0.05
    per_element = permute(np.arange(n), n, np.full(n, 1, dtype=np.uint64))
    assert np.array_equal(per_element, a)


@pytest.mark.parametrize("micro_batch_rows", [4, 8])
def test_one_two_or_three_workers_train_the_same_global_batches(micro_batch_rows):
    """Each worker reads only its micro-batches; together, in order, they are each global batch."""
    from mixloop.train.batches import micro_batches_of, row_hash

    plan, rows_per_step = _plan(), 48
    micro_batches = rows_per_step // micro_batch_rows
    hashes = {}
    for world in (1, 2, 3):
        per_step = []
        for step in range(40):
            corpus, index = plan.rows(step * rows_per_step, (step + 1) * rows_per_step)
            trained = {}  # micro-batch number -> (corpus, index) as read by the worker that owns it
            for rank in range(world):
                for m in micro_batches_of(rank, world, micro_batches):
                    assert m not in trained, "two workers trained the same micro-batch"
                    span = slice(m * micro_batch_rows, (m + 1) * micro_batch_rows)
                    trained[m] = (corpus[span], index[span])
            assert sorted(trained) == list(range(micro_batches)), "a micro-batch was left out"
            per_step.append(
                row_hash(
                    np.concatenate([trained[m][0] for m in range(micro_batches)]),
                    np.concatenate([trained[m][1] for m in range(micro_batches)]),
                )
            )
        hashes[world] = per_step
    assert hashes[1] == hashes[2] == hashes[3]
    assert len(set(hashes[1])) == 40
