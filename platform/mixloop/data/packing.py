"""Pack tokenized documents into fixed-length rows, and turn rows into model inputs.

A packed row stores three arrays of length L:
  tokens     token ids (pad id after the last document)
  supervised True where the token is a training target (all text tokens, assistant chat tokens)
  segments   1, 2, ... numbering the documents of the row, 0 for padding
Attention masks, position ids and labels are derived from them, so documents in
one row never see each other (docs/ARCHITECTURE.md, section "transformers 5").
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch


class Packer:
    """Greedy packer, in document order.

    Text fills rows completely: a document that does not fit continues in the next
    row as a new segment (it cannot attend back across rows, and the token at the
    cut is not a target). A chat that fits in a row is never split, so its answers
    keep their prompt; the rest of the row is padding. A chat longer than a row is
    cut like text.

    With one_per_row (packing: false) every document starts a row of its own and the rest of
    the row is padding, as in trainers that pad each sample to the sequence length."""

    def __init__(self, seq_len: int, pad_id: int, split_documents: bool, one_per_row: bool = False):
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.split_documents = split_documents
        self.one_per_row = one_per_row
        self._reset()

    def _reset(self) -> None:
        self.tokens = np.full(self.seq_len, self.pad_id, dtype=np.int32)
        self.supervised = np.zeros(self.seq_len, dtype=bool)
        self.segments = np.zeros(self.seq_len, dtype=np.int16)
        self.used = 0
        self.count = 0

    def add(self, ids: np.ndarray, supervised: np.ndarray) -> Iterable[tuple[np.ndarray, ...]]:
        """Add one document; yields every row it completes."""
        if self.one_per_row and self.used:
            yield self._emit()
        start = 0
        while start < len(ids):
            room = self.seq_len - self.used
            left = len(ids) - start
            if left > room and not self.split_documents and self.used and left <= self.seq_len:
                yield self._emit()
                continue
            take = min(room, left)
            self.count += 1
            span = slice(self.used, self.used + take)
            self.tokens[span] = ids[start : start + take]
            self.supervised[span] = supervised[start : start + take]
            self.segments[span] = self.count
            self.used += take
            start += take
            if self.used == self.seq_len:
                yield self._emit()

    def flush(self) -> Iterable[tuple[np.ndarray, ...]]:
        """The last, partly filled row (padded), if any."""
        if self.used:
            yield self._emit()

    def _emit(self) -> tuple[np.ndarray, ...]:
        row = (self.tokens, self.supervised, self.segments)
        self._reset()
        return row


def model_inputs(tokens: np.ndarray, supervised: np.ndarray, segments: np.ndarray) -> dict[str, torch.Tensor]:
    """Batch (B x L) arrays -> input_ids, a 4D block-diagonal causal mask, position_ids and labels.

    labels[t] is the target for the logits at t (already shifted): token t+1 when it
    is supervised and belongs to the same document, else -100.
    """
    tokens_t = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    seg = torch.as_tensor(np.asarray(segments, dtype=np.int64))
    length = seg.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    # Padding (segment 0) attends to padding only, which keeps every softmax row non-empty.
    mask = (seg[:, :, None] == seg[:, None, :]) & causal
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    index = torch.arange(length).expand_as(seg)
    start_index = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values
    return {
        "input_ids": tokens_t,
        "attention_mask": mask[:, None, :, :],
        "position_ids": index - start_index,
        "labels": labels_of(tokens, supervised, segments),
    }


def labels_of(tokens: np.ndarray, supervised: np.ndarray, segments: np.ndarray) -> torch.Tensor:
    """The labels of model_inputs alone (B x L): token t+1 where it is supervised and in t's document."""
    tokens_t = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    seg = torch.as_tensor(np.asarray(segments, dtype=np.int64))
    sup = torch.as_tensor(np.asarray(supervised, dtype=bool))
    labels = torch.full_like(tokens_t, -100)
    same_doc = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0) & sup[:, 1:]
    labels[:, :-1] = torch.where(same_doc, tokens_t[:, 1:], labels[:, :-1])
    return labels
