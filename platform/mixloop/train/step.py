"""One optimizer step on one worker: its micro-batches of the global batch, accumulated, with the
loss weighted per corpus from token counts summed over all workers; and what a step costs."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

from mixloop.train.batches import MicroBatch, StepBatch
from mixloop.train.forward import micro_batch_ce, takes_documents
from mixloop.train.job import StageJob
from mixloop.train.loss import corpus_token_weights


class StepHooks:
    """Where tests reach into the step loop (slow steps down, make a batch's loss NaN). Production
    passes none: these defaults do nothing."""

    def before_step(self, step: int) -> None:
        """Called before step `step` (0-based) trains."""

    def loss(self, step: int, ce: torch.Tensor) -> torch.Tensor:
        """The per-token loss of a micro-batch of step `step`, before its backward pass."""
        return ce


class Progress:
    """Sums that are all-reduced at each report: loss and supervised tokens per corpus, tokens seen."""

    def __init__(self, corpora: int, device):
        self.corpora, self.device = corpora, device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros(self.corpora, dtype=torch.float64)
        self.supervised = torch.zeros(self.corpora, dtype=torch.float64)
        self.tokens = torch.zeros(self.corpora, dtype=torch.float64)

    def reduced(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        packed = all_reduce(torch.stack([self.loss, self.supervised, self.tokens]), self.device)
        self.reset()
        return packed[0], packed[1], packed[2]


def all_reduce(tensor: torch.Tensor, device) -> torch.Tensor:
    """Sum over workers. NCCL reduces only device tensors, so the sum travels through the device."""
    if not dist.is_initialized():
        return tensor
    on_device = tensor.to(device)
    dist.all_reduce(on_device)
    return on_device.cpu()


class StepTimer:
    """Seconds spent per kind of work (data, compute, sync, report), summed until read."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    @contextmanager
    def __call__(self, kind: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.totals[kind] = self.totals.get(kind, 0.0) + time.perf_counter() - started

    def per_step(self, steps: int) -> dict[str, float]:
        """{kind}_s: mean seconds per step since the last read."""
        means = {f"{kind}_s": total / max(steps, 1) for kind, total in self.totals.items()}
        self.totals = {}
        return means


class StepTrainer:
    """One optimizer step: this worker's micro-batches of the global batch, accumulated."""

    def __init__(self, job: StageJob, model, optimizer, world: int, device, hooks: StepHooks):
        self.stage, self.model, self.optimizer, self.world, self.device = job.stage, model, optimizer, world, device
        self.hooks = hooks
        names = list(job.stage.mixture)
        self.loss_weights = torch.tensor([job.stage.loss_weights[n] for n in names], dtype=torch.float64)
        self.corpora = len(names)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if job.stage.use_gpu else nullcontext()
        self.by_document = takes_documents(model, device)

    def step(self, batch: StepBatch, lr: float, progress: Progress, step: int, timer: StepTimer) -> float:
        """Train one step; returns the gradient norm (not finite: nothing was applied). DDP's gradient
        all-reduce overlaps the last backward pass and is timed as compute; sync is the explicit
        all-reduce of the batch's per-corpus token counts."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with timer("sync"):
            weights = _token_weights(
                batch.micro_batches,
                batch.corpus_of_row,
                self.corpora,
                self.loss_weights,
                self.stage.balance,
                self.device,
            )
        with timer("compute"):
            losses = [
                self._backward(micro_batch, weights, step, last=position == len(batch.micro_batches) - 1)
                for position, micro_batch in enumerate(batch.micro_batches)
            ]
            # After DDP's all-reduce every worker holds the same gradients, so all take the same decision.
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.stage.grad_clip))
            if math.isfinite(grad_norm):
                self.optimizer.step()
                for ce, micro_batch in zip(losses, batch.micro_batches):
                    _accumulate(progress, ce, micro_batch)
            self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _backward(self, micro_batch: MicroBatch, weights: torch.Tensor, step: int, last: bool) -> torch.Tensor:
        labels = micro_batch.inputs["labels"].to(self.device, non_blocking=True)
        with nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync():
            with self.autocast:
                ce = micro_batch_ce(self.model, micro_batch, self.device, self.by_document)
            ce = self.hooks.loss(step, ce)
            per_token = weights[micro_batch.corpus.to(self.device)][:, None] * (labels != -100)
            # DDP averages gradients over workers; the loss is a sum over all of them.
            (ce * per_token).sum().mul(self.world).backward()
        return ce.detach().double().cpu()


def _token_weights(batches, corpus_of_row, corpora: int, loss_weights, balance, device) -> torch.Tensor:
    """Per-corpus token weights from global counts: supervised tokens are summed across workers."""
    supervised = torch.zeros(corpora, dtype=torch.float64)
    for batch in batches:
        supervised.index_add_(0, batch.corpus, batch.targets)
    supervised = all_reduce(supervised, device)
    rows = torch.bincount(torch.as_tensor(corpus_of_row), minlength=corpora)
    return corpus_token_weights(supervised, rows, loss_weights, balance).float().to(device)


def _accumulate(progress: Progress, ce: torch.Tensor, batch: MicroBatch) -> None:
    progress.loss.index_add_(0, batch.corpus, ce.sum(1))
    progress.supervised.index_add_(0, batch.corpus, batch.targets)
    progress.tokens.index_add_(0, batch.corpus, batch.real_tokens)
