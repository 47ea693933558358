"""The stage loss: cross-entropy on supervised tokens, balanced across corpora.

With balance "corpus", each corpus's loss is its mean over its supervised tokens
in the global batch, and the corpora are combined by their share of the batch's
rows times their loss weight. A chat row supervises only its assistant tokens and
a text row all of its tokens, so without this the mixture would not decide the
corpora's shares of the gradient. With balance "token" every supervised token of
the global batch counts the same.

Both are written as one weight per token, from counts over the *global* batch,
so summing weight x CE over all micro-batches of all workers gives the same
loss (and gradient) whatever the number of workers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy (B x L), 0 where the label is -100. Labels are already shifted."""
    flat = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    return flat.view(labels.shape)


def corpus_token_weights(
    supervised_per_corpus: torch.Tensor,
    rows_per_corpus: torch.Tensor,
    loss_weights: torch.Tensor,
    balance: str,
) -> torch.Tensor:
    """Weight of one supervised token of each corpus in the global batch's loss (K values)."""
    present = supervised_per_corpus > 0
    if balance == "token":
        return present.double() / supervised_per_corpus.sum().clamp(min=1)
    share = rows_per_corpus.double() / rows_per_corpus.sum() * loss_weights.double() * present
    share = share / share.sum().clamp(min=1e-12)
    return share / supervised_per_corpus.double().clamp(min=1)
