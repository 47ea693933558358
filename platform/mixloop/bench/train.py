"""`mixloop bench train`: training throughput against a minimal trainer, where a step's time goes, and
what Ray adds.

Two workloads on the shared corpora with MiniMind's tokenizer, at MiniMind's row lengths: pretraining
text (pretrain/*.jsonl, 340 tokens) and SFT chats (sft/*.jsonl, 768). Each trains the same steps of 16
rows, from the same weights (version base), four ways:
  plain       a minimal hand-written loop in this process, no Ray: the rows of `padded`, the model given
              the input ids alone (causal attention, no mask), mean cross-entropy, AdamW. It stands for
              the trainers people would otherwise pick: MiniMind's train_pretrain.py and train_full_sft.py
              pad every sample to the row length the same way;
  packed      rows packed with whole documents, one Ray Train worker;
  padded      the same stage with `packing: false` (one document per row), one Ray Train worker;
  in-process  the packed stage in this process through Ray Train's local mode (no worker, no reports
              through the controller): the difference to `packed` is Ray's per-step overhead.
Every variant runs with the threads of one worker (`cpus_per_worker`) and micro-batches of 4 rows.
Useful tokens are the tokens of documents (padding excluded); each variant's useful tokens/s is also
given relative to plain's. Step time is split into waiting for data, compute (forward, backward with
DDP's overlapped gradient all-reduce, optimizer), sync (the explicit all-reduce of per-corpus counts)
and report (metrics and checkpoints). The first logged window (start-up, allocator warm-up) is left out.
On GPU, model FLOPs utilisation = 6 x parameters x useful tokens/s / peak.
"""

from __future__ import annotations

import resource
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import yaml

from mixloop.config import BASE_VERSION, load_spec, stage_hash
from mixloop.console import quiet
from mixloop.data.mixplan import MixPlan
from mixloop.data.store import PackedCorpus, read_manifest
from mixloop.storage.fs import join
from mixloop.storage.layout import Workdir
from mixloop.train.metrics import read_metrics
from mixloop.versioning.lineage import Lineage
from mixloop.versioning.registry import require_lineage, version_dir

WORKLOADS = {"text": ("pretrain", "text", "pretraining text"), "sft": ("sft", "chat", "SFT chats")}
VARIANTS = ("plain", "packed", "padded", "in-process")
ROWS_PER_STEP, MICRO_BATCH_ROWS = 16, 4
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12}
WINDOW = 5  # steps per logged window


def train_spec(data: Path, workdir: Path, model: dict, steps: int, seq_lens: dict[str, int], use_gpu: bool) -> dict:
    """Two stages per workload, both from base: `<workload>-packed` and `<workload>-padded`."""
    corpora = {
        name: {"kind": kind, "path": str(data / folder / "*.jsonl"), "max_bad_fraction": 0.05}
        for name, (folder, kind, _) in WORKLOADS.items()
        if name in seq_lens
    }
    stages = []
    for name, seq_len in seq_lens.items():
        tokens_per_step = ROWS_PER_STEP * seq_len
        common = {
            "from": "base",
            "mixture": {name: 1},
            "seq_len": seq_len,
            "global_batch_tokens": tokens_per_step,
            "tokens": steps * tokens_per_step,
        }
        stages += [{"name": f"{name}-packed", **common}, {"name": f"{name}-padded", "packing": False, **common}]
    return {
        "name": "bench-train",
        "workdir": str(workdir),
        "seed": 0,
        "tokenizer": {"path": str(data / "tokenizer")},
        "model": model,
        "corpora": corpora,
        "defaults": {
            "micro_batch_rows": MICRO_BATCH_ROWS,
            "workers": 1,
            "cpus_per_worker": 1,
            "use_gpu": use_gpu,
            "log_every": WINDOW,
            "checkpoint_every": steps,
            "lr": {"peak": 0.001, "warmup": 0.1},
        },
        "stages": stages,
        "eval_rows": 8,
    }


@quiet()  # the pipeline's lines are not the benchmark's
def train_benchmark(
    data: Path, workdir: Path, model: dict, steps: int, seq_lens: dict[str, int], address: str | None = None
) -> dict:
    # lazy: torch, and the mixloop modules that import it
    import torch

    from mixloop.runs.pipeline import PipelineRunner
    from mixloop.runs.stages import StageRunner

    use_gpu = torch.cuda.is_available()
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "bench-train.yaml"
    path.write_text(yaml.safe_dump(train_spec(data, workdir, model, steps, seq_lens, use_gpu), sort_keys=False))
    pipeline = PipelineRunner(load_spec(path), address=address)
    prepared = pipeline.train(until=BASE_VERSION).prepared  # tokenizer, packed corpora and base: no stage
    base = require_lineage(str(workdir), BASE_VERSION)
    runner = StageRunner(pipeline.spec, prepared)
    stages = {stage.name: stage for stage in pipeline.spec.resolved_stages()}
    parameters, threads = base.parameters, pipeline.spec.resolved_stages()[0].cpus_per_worker
    machine = torch.cuda.get_device_name() if use_gpu else f"CPU ({threads:g} thread(s) per variant)"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in machine), None)
    base_dir, device = version_dir(str(workdir), BASE_VERSION), torch.device("cuda" if use_gpu else "cpu")
    workloads = {}
    for name, seq_len in seq_lens.items():
        padded = stages[f"{name}-padded"]
        results = {"plain": plain_variant(padded, prepared.for_stage(padded)[name], base_dir, device)}
        for variant in VARIANTS[1:]:
            stage = stages[f"{name}-{'packed' if variant == 'in-process' else variant}"]
            results[variant] = _run_stage(runner, stage, base, workdir, f"{name}-{variant}", variant == "in-process")
        manifest = read_manifest(prepared.train[(name, seq_len, True)])
        packed, plain, local = results["packed"], results["plain"], results["in-process"]
        workloads[name] = {
            "corpus": f"{WORKLOADS[name][0]}/*.jsonl",
            "seq_len": seq_len,
            "mean_document_tokens": manifest["tokens"] / manifest["documents"],
            "variants": results,
            "vs_plain": {v: r["useful_tokens_per_s"] / plain["useful_tokens_per_s"] for v, r in results.items()},
            "packed_over_padded": packed["useful_tokens_per_s"] / results["padded"]["useful_tokens_per_s"],
            "ray_overhead": (packed["step_seconds"] - local["step_seconds"]) / packed["step_seconds"],
            "data_wait_share": packed["data_s"] / packed["step_seconds"],
            "mfu": 6 * parameters * packed["useful_tokens_per_s"] / peak if peak and parameters else None,
        }
    return {
        "machine": machine,
        "model": {**model, "parameters": parameters},
        "steps": steps,
        "rows_per_step": ROWS_PER_STEP,
        "workloads": workloads,
    }


def _run_stage(runner, stage, base: Lineage, workdir: Path, variant: str, in_process: bool) -> dict:
    from mixloop.train.launch import fit_stages  # lazy: ray, torch

    metrics_path = join(str(workdir), f"metrics-{variant}.jsonl")
    Path(metrics_path).unlink(missing_ok=True)
    # Each run starts from scratch: a fresh name, so no checkpoint of an earlier run is resumed.
    name = f"bench.{stage_hash(stage, base.stage_hash)}-{variant}-{len(list(workdir.glob('train/*')))}"
    job = runner.job(stage, base.version, base.metrics.final_lr, run=name).model_copy(
        update={"metrics_path": metrics_path}
    )
    fit_stages([job], Workdir(str(workdir)).train, name, in_process=in_process)
    return summarise(metrics_path)


def plain_variant(stage, corpus_dir: str, base_dir: str, device) -> dict:
    """The plain loop over the rows the stage `stage` (packing: false) trains, from the base weights."""
    # lazy: torch, and the mixloop modules that import it
    import torch

    from mixloop.train.model import load_model

    corpus = PackedCorpus(corpus_dir)
    plan = MixPlan.for_stage(stage, {next(iter(stage.mixture)): len(corpus)})
    rows = stage.geometry.rows_per_step
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(stage.cpus_per_worker)))
    try:
        records = plain_loop(
            load_model(base_dir),
            corpus,
            lambda step: plan.rows(step * rows, (step + 1) * rows)[1],
            stage.total_steps,
            stage.geometry.micro_batch_rows,
            stage.lr.peak,
            device,
        )
    finally:
        torch.set_num_threads(threads)
    return summarise_plain(records)


def plain_loop(model, corpus, rows_of_step, steps: int, micro_batch_rows: int, lr: float, device) -> list[dict]:
    """A minimal trainer: each step reads its padded rows, runs the model on the input ids alone (causal
    attention, no mask) micro-batch by micro-batch, averages the cross-entropy over the targets, clips the
    gradient and steps AdamW. One record per step: seconds, data seconds, useful tokens, loss."""
    # lazy: torch, and the mixloop modules that import it
    import torch
    import torch.nn.functional as F

    from mixloop.data.packing import labels_of

    model.to(device).train()
    if device.type == "cuda":  # its own peak, not the earlier variants' in this process
        torch.cuda.reset_peak_memory_stats(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    records = []
    for step in range(steps):
        started = time.perf_counter()
        tokens, supervised, segments = corpus.read(rows_of_step(step))
        inputs = torch.as_tensor(tokens, dtype=torch.long)
        labels = labels_of(tokens, supervised, segments)  # the targets mixloop trains on
        targets = max(int((labels != -100).sum()), 1)
        loaded = time.perf_counter()
        loss_sum = 0.0
        for start in range(0, len(inputs), micro_batch_rows):
            part = slice(start, start + micro_batch_rows)
            with autocast:
                logits = model(input_ids=inputs[part].to(device)).logits
            loss = (
                F.cross_entropy(
                    logits.float().flatten(0, 1), labels[part].flatten().to(device), ignore_index=-100, reduction="sum"
                )
                / targets
            )  # a micro-batch without targets adds 0, not NaN
            loss.backward()
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        records.append(
            {
                "step_seconds": time.perf_counter() - started,
                "data_s": loaded - started,
                "useful_tokens": int((segments > 0).sum()),
                "loss": loss_sum,
            }
        )
    return records


def summarise_plain(records: list[dict]) -> dict:
    """As `summarise`, the steps of the first window left out."""
    import torch  # lazy: torch

    kept = records[WINDOW:] or records
    seconds = sum(r["step_seconds"] for r in kept)
    memory = (
        torch.cuda.max_memory_allocated()
        if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ) / 2**20
    return {
        "useful_tokens_per_s": sum(r["useful_tokens"] for r in kept) / seconds,
        "step_seconds": seconds / len(kept),
        "data_s": statistics.fmean(r["data_s"] for r in kept),
        "compute_s": statistics.fmean(r["step_seconds"] - r["data_s"] for r in kept),
        "sync_s": 0.0,
        "report_s": 0.0,
        "peak_memory_mb": memory,
    }


def summarise(metrics_path: str) -> dict:
    """Means over the logged windows after the first: useful tokens/s, step time and its parts."""
    windows = read_metrics(metrics_path)[1:]
    if not windows:
        raise RuntimeError(f"{metrics_path}: fewer than two logged windows; run more steps")
    mean = {
        key: statistics.fmean(getattr(w, key) for w in windows)
        for key in ("tokens_per_s", "step_seconds", "data_s", "compute_s", "sync_s", "report_s")
    }
    mean["useful_tokens_per_s"] = mean.pop("tokens_per_s")
    mean["peak_memory_mb"] = max(w.peak_memory_mb for w in windows)
    return mean


def format_train(result: dict) -> str:
    lines = [
        f"{result['machine']}; model {result['model']['parameters']:,} parameters; "
        f"{result['rows_per_step']} rows per step, {result['steps']} steps per variant"
    ]
    for name, w in result["workloads"].items():
        lines += [
            "",
            f"{WORKLOADS[name][2]} ({w['corpus']}), rows of {w['seq_len']} tokens, "
            f"mean document {w['mean_document_tokens']:.0f} tokens",
            f"{'variant':<12}{'useful tok/s':>14}{'vs plain':>10}{'step s':>9}{'data':>8}{'compute':>9}"
            f"{'sync':>8}{'report':>8}{'peak MB':>9}",
        ]
        for variant, v in w["variants"].items():
            lines.append(
                f"{variant:<12}{v['useful_tokens_per_s']:>14,.0f}{w['vs_plain'][variant]:>9.2f}x"
                f"{v['step_seconds']:>9.3f}{v['data_s']:>8.4f}{v['compute_s']:>9.3f}{v['sync_s']:>8.4f}"
                f"{v['report_s']:>8.4f}{v['peak_memory_mb']:>9,.0f}"
            )
        lines.append(
            f"packed / padded {w['packed_over_padded']:.2f}x; Ray overhead {w['ray_overhead']:.1%} of a "
            f"step; data wait {w['data_wait_share']:.2%}" + (f"; MFU {w['mfu']:.1%}" if w["mfu"] else "")
        )
    return "\n".join(lines)
