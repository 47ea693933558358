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


@torch.no_grad()
def evaluate_model(model, eval_dir: str, max_rows: int, device: str = "cpu") -> dict:
    """Token-mean loss over the supervised tokens of the first `max_rows` packed rows."""
    corpus = PackedCorpus(eval_dir)
    rows = np.arange(min(max_rows, len(corpus)))
    total, count = 0.0, 0
    for start in range(0, len(rows), BATCH_ROWS):
        inputs = model_inputs(*corpus.read(rows[start : start + BATCH_ROWS]))
        labels = inputs.pop("labels").to(device)
        ce = token_ce(model(**{k: v.to(device) for k, v in inputs.items()}).logits, labels)
        total += float(ce.sum())
        count += int((labels != -100).sum())
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens": count, "rows": len(rows)}
