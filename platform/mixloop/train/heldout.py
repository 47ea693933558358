"""The loss of a model on a packed held-out split. Training measures it at its eval steps and `mixloop
eval` for every published version (evaluation.evaluate); both must measure the same thing, so it
lives here, below both, rather than in evaluation, which itself builds on train."""

from __future__ import annotations

import math

import numpy as np
import torch

from mixloop.data.packing import model_inputs
from mixloop.data.store import PackedCorpus
from mixloop.train.loss import token_ce

BATCH_ROWS = 8
BOOTSTRAP_SAMPLES = 200  # resamples for a loss's standard error: enough for two significant digits
BOOTSTRAP_SEED = 0  # the same rows give the same standard error


@torch.no_grad()
def evaluate_model(model, eval_dir: str, max_rows: int, device: str = "cpu") -> dict:
    """Token-mean loss over the supervised tokens of the first `max_rows` packed rows, with its standard
    error (`stderr`, a bootstrap over the rows: a row's documents are resampled together)."""
    corpus = PackedCorpus(eval_dir)
    rows = np.arange(min(max_rows, len(corpus)))
    sums, counts = [], []
    for start in range(0, len(rows), BATCH_ROWS):
        inputs = model_inputs(*corpus.read(rows[start : start + BATCH_ROWS]))
        labels = inputs.pop("labels").to(device)
        ce = token_ce(model(**{k: v.to(device) for k, v in inputs.items()}).logits, labels)
        sums += ce.sum(dim=1).tolist()
        counts += (labels != -100).sum(dim=1).tolist()
    total, count = sum(sums), sum(counts)
    loss = total / max(count, 1)
    return {
        "loss": loss,
        "stderr": bootstrap_stderr(np.array(sums), np.array(counts)),
        "perplexity": math.exp(min(loss, 50)),
        "tokens": count,
        "rows": len(rows),
    }


def bootstrap_stderr(sums: np.ndarray, counts: np.ndarray) -> float | None:
    """Standard error of the ratio sum(sums) / sum(counts) when whole rows are drawn again with
    replacement; None for fewer than two rows."""
    if len(sums) < 2:
        return None
    draws = np.random.default_rng(BOOTSTRAP_SEED).integers(0, len(sums), size=(BOOTSTRAP_SAMPLES, len(sums)))
    ratios = sums[draws].sum(axis=1) / np.maximum(counts[draws].sum(axis=1), 1)
    return float(ratios.std(ddof=1))
