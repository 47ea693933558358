"""The training forward pass: the per-token cross-entropy of a micro-batch, by the cheapest exact route.

  causal     (rows holding one document each, as with `packing: false`) no mask and no position ids:
             SDPA's causal path. Padding after the document may see it, but nothing sees padding and
             padding is never a target.
  mask       otherwise, the 4D block-diagonal mask of `packing.model_inputs`.

Both give the same per-token loss and gradients, to float rounding (tests/unit/test_forward.py).
"""

from __future__ import annotations

import torch

from mixloop.train.loss import token_ce


def micro_batch_ce(model, batch, device) -> torch.Tensor:
    """Per-token cross-entropy (B x L, 0 where the label is -100) of a MicroBatch."""
    inputs = batch.inputs
    labels = inputs["labels"].to(device, non_blocking=True)
    if batch.one_document_per_row:
        return token_ce(model(input_ids=inputs["input_ids"].to(device, non_blocking=True)).logits, labels)
    keys = ("input_ids", "attention_mask", "position_ids")
    return token_ce(model(**{k: inputs[k].to(device, non_blocking=True) for k in keys}).logits, labels)
