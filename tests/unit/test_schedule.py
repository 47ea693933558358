"""Learning-rate schedules: (re-)warm to the peak, then decay to floor x peak by the last step."""

from __future__ import annotations

import numpy as np
import pytest

from mixloop.config import ResolvedLR
from mixloop.train.schedule import learning_rate, warmup_steps

PEAK, FLOOR = 1e-3, 0.1


def _lr(decay: str, total: int = 200, warmup: float = 0.1, start_lr: float = 0.0, wsd_decay: float = 0.2):
    lr = ResolvedLR(peak=PEAK, warmup=warmup, warmup_from="zero", decay=decay, floor=FLOOR, wsd_decay=wsd_decay)
    return np.array([learning_rate(step, total, lr, start_lr) for step in range(total)])


@pytest.mark.parametrize("start_lr", [0.0, 3e-4, 2e-3])
@pytest.mark.parametrize("decay", ["cosine", "linear", "wsd", "constant"])
def test_warmup_is_linear_from_the_start_lr_to_the_peak(decay, start_lr):
    values = _lr(decay, start_lr=start_lr)
    warm = warmup_steps(200, 0.1)
    assert warm == 20
    ramp = np.concatenate([[start_lr], values[:warm]])
    steps = np.diff(ramp)
    assert np.allclose(steps, steps[0]), "warmup must move by the same amount every step"
    assert values[warm - 1] == pytest.approx(PEAK)
    assert ramp[0] == start_lr and values[0] != start_lr


def test_rewarm_starts_near_the_current_lr_not_zero():
    values = _lr("cosine", start_lr=5e-4)
    assert values[0] > 5e-4 and values[:20].min() > 5e-4
    assert _lr("cosine", start_lr=0.0)[0] < 5e-4


@pytest.mark.parametrize("decay", ["cosine", "linear"])
@pytest.mark.parametrize("total, warmup", [(200, 0.1), (57, 0.05), (10, 0.0), (1, 0.0)])
def test_decay_ends_at_the_floor_and_never_rises(decay, total, warmup):
    values = _lr(decay, total=total, warmup=warmup)
    warm = warmup_steps(total, warmup)
    assert values[-1] == pytest.approx(FLOOR * PEAK)
    after = values[warm:]
    assert (np.diff(after) <= 1e-15).all()
    assert after.max() <= PEAK + 1e-15 and after.min() >= FLOOR * PEAK - 1e-15


def test_cosine_and_linear_differ_in_shape():
    cosine, linear = _lr("cosine"), _lr("linear")
    middle = 20 + (200 - 20) // 4
    # Early in the decay, cosine is still above the straight line.
    assert cosine[middle] > linear[middle]


def test_wsd_holds_the_peak_then_decays_to_the_floor():
    total, wsd_decay = 200, 0.2
    values = _lr("wsd", total=total, warmup=0.0, wsd_decay=wsd_decay)
    decaying = int(round(total * wsd_decay))
    assert np.allclose(values[: total - decaying], PEAK)
    tail = values[total - decaying :]
    assert (np.diff(tail) < 0).all()
    assert tail[-1] == pytest.approx(FLOOR * PEAK)


def test_wsd_decays_over_the_last_share_of_the_stage_steps_with_warmup():
    # LRConfig.wsd_decay: "the share of the stage's steps spent decaying" -- warmup does not shrink it.
    total, wsd_decay = 200, 0.2
    values = _lr("wsd", total=total, warmup=0.1, wsd_decay=wsd_decay)
    warm = warmup_steps(total, 0.1)
    below_peak_after_warmup = int((values[warm:] < PEAK * (1 - 1e-9)).sum())
    assert abs(below_peak_after_warmup - total * wsd_decay) <= 1
    assert values[-1] == pytest.approx(FLOOR * PEAK)


def test_constant_stays_at_the_peak_after_warmup():
    values = _lr("constant")
    assert np.allclose(values[20:], PEAK)


def test_unknown_decay_is_an_error():
    with pytest.raises(ValueError, match="unknown decay"):
        # Validation refuses such a decay; the schedule refuses it too, should it ever get one.
        lr = ResolvedLR.model_construct(peak=PEAK, warmup=0.0, decay="exp", floor=FLOOR, wsd_decay=0.2)
        learning_rate(50, 100, lr, 0.0)
