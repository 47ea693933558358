"""Learning-rate schedules: warm up (or re-warm) to the peak, then decay to a floor.

A pure function of the step, so a resumed stage needs only its step to be back
on its curve.
"""

from __future__ import annotations

import math

from mixloop.config import ResolvedLR


def warmup_steps(total_steps: int, warmup_share: float) -> int:
    return int(round(total_steps * warmup_share))


def final_lr(total_steps: int, lr: ResolvedLR, start_lr: float) -> float:
    """The learning rate of a stage's last step: where a stage that re-warms from it starts."""
    return learning_rate(total_steps - 1, total_steps, lr, start_lr)


def learning_rate(step: int, total_steps: int, lr: ResolvedLR, start_lr: float) -> float:
    """Learning rate for optimizer step `step` (0-based) of a stage of `total_steps`.

    lr: peak, warmup (share of steps), decay (cosine|linear|wsd|constant), floor
    (fraction of peak), wsd_decay (share of steps). start_lr is where warmup begins:
    the parent's final learning rate when re-warming, or 0.
    """
    peak, floor = lr.peak, lr.peak * lr.floor
    warm = warmup_steps(total_steps, lr.warmup)
    if step < warm:
        return start_lr + (peak - start_lr) * (step + 1) / warm
    decay_steps = max(total_steps - warm, 1)
    progress = min((step - warm + 1) / decay_steps, 1.0)
    kind = lr.decay
    if kind == "constant":
        return peak
    if kind == "linear":
        return peak + (floor - peak) * progress
    if kind == "cosine":
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "wsd":  # the decay phase is the last wsd_decay share of the whole stage
        decay_start = total_steps - max(1, round(total_steps * lr.wsd_decay))
        if step < max(decay_start, warm):
            return peak
        return peak + (floor - peak) * (step - max(decay_start, warm) + 1) / (total_steps - max(decay_start, warm))
    raise ValueError(f"unknown decay {kind!r}")
