"""The training forward pass: the per-token cross-entropy of a micro-batch, by the cheapest exact route.

  documents  (CPU, a transformers model that takes its attention from transformers' registry) the
             micro-batch's documents are laid end to end in one row, padding dropped; attention runs
             document by document (SDPA with is_causal: no mask, no cross-document work) and the output
             layer and cross-entropy run only at supervised positions.
  causal     (rows holding one document each, as with `packing: false`) no mask and no position ids:
             SDPA's causal path. Padding after the document may see it, but nothing sees padding and
             padding is never a target.
  mask       otherwise, the 4D block-diagonal mask of `packing.model_inputs`.

All three give the same per-token loss and gradients, to float rounding (tests/unit/test_forward.py).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from mixloop.train.loss import token_ce

DOCUMENT_ATTENTION = "mixloop_documents"


def document_lengths(segments: np.ndarray) -> list[int]:
    """Lengths of the documents of B x L rows, padding left out, in row order: the documents of the
    row that `segments > 0` flattens the batch into."""
    segments = np.asarray(segments)
    starts = np.ones(segments.shape, dtype=bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    real = segments > 0
    first = np.flatnonzero(starts[real])
    return np.diff(np.append(first, real.sum())).tolist()


def _document_attention(
    module, query, key, value, attention_mask, *, document_lengths: list[int], dropout=0.0, scaling=None, **kwargs
):
    """SDPA over each document of a one-row batch (B x heads x L x dim); only micro_batch_ce selects it,
    and it always passes the documents' lengths."""
    gqa = query.shape[1] != key.shape[1]
    parts = [
        F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
        for q, k, v in zip(
            query.split(document_lengths, 2), key.split(document_lengths, 2), value.split(document_lengths, 2)
        )
    ]
    return torch.cat(parts, 2).transpose(1, 2).contiguous(), None


AttentionInterface.register(DOCUMENT_ATTENTION, _document_attention)


def takes_documents(model, device) -> bool:
    """Whether the documents route applies: on CPU, to a transformers model (not remote code) whose
    attention comes from transformers' registry and whose forward takes logits_to_keep, with plain
    causal attention: the route computes no sliding window and no logit soft-capping."""
    unwrapped = getattr(model, "module", model)
    return (
        torch.device(device).type == "cpu"
        and type(unwrapped).__module__.startswith("transformers.")
        and getattr(unwrapped, "_supports_attention_backend", False)
        and "logits_to_keep" in inspect.signature(unwrapped.forward).parameters
        and _full_causal(unwrapped.config)
    )


def _full_causal(config) -> bool:
    windowed = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    layers = set(getattr(config, "layer_types", None) or ["full_attention"])
    return not windowed and layers == {"full_attention"} and not getattr(config, "attn_logit_softcapping", None)


@contextmanager
def _attention(model, implementation: str):
    """The model's attention function switched for one forward pass (the model stays sdpa otherwise:
    evaluation and checkpoints see no difference)."""
    config = getattr(model, "module", model).config
    previous = config._attn_implementation
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = previous


def micro_batch_ce(model, batch, device, by_document: bool) -> torch.Tensor:
    """Per-token cross-entropy (B x L, 0 where the label is -100) of a MicroBatch."""
    inputs = batch.inputs
    labels = inputs["labels"].to(device, non_blocking=True)
    if by_document:
        real, supervised = batch.real, inputs["labels"] != -100
        with _attention(model, DOCUMENT_ATTENTION):
            logits = model(
                input_ids=inputs["input_ids"][real][None],
                position_ids=inputs["position_ids"][real][None],
                logits_to_keep=supervised[real].nonzero().view(-1),
                use_cache=False,
                document_lengths=batch.document_lengths,
            ).logits[0]
        ce = F.cross_entropy(logits.float(), labels[supervised], reduction="none")
        return torch.zeros(labels.shape, dtype=ce.dtype).index_put((supervised,), ce)
    if batch.one_document_per_row:
        return token_ce(model(input_ids=inputs["input_ids"].to(device, non_blocking=True)).logits, labels)
    keys = ("input_ids", "attention_mask", "position_ids")
    return token_ce(model(**{k: inputs[k].to(device, non_blocking=True) for k in keys}).logits, labels)
