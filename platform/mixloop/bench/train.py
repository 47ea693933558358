"""`mixloop bench train`: training throughput, where a step's time goes, and what Ray adds.

On the shared SFT conversations with MiniMind's tokenizer, one stage of the same steps runs three ways:
  packed      rows packed with whole conversations, one Ray Train worker;
  padded      the same stage with `packing: false` (one conversation per row), one Ray Train worker;
  in-process  the packed stage in this process through Ray Train's local mode (no worker, no reports
              through the controller): the difference to `packed` is Ray's per-step overhead.
Useful tokens are the tokens of documents (padding excluded). Step time is split into waiting for data,
compute (forward, backward with DDP's overlapped gradient all-reduce, optimizer), sync (the explicit
all-reduce of per-corpus counts) and report (metrics and checkpoints). The first logged window (start-up,
allocator warm-up) is left out. On GPU, model FLOPs utilisation = 6 x parameters x tokens/s / peak.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import yaml

VARIANTS = ("packed", "padded", "in-process")
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12}
WINDOW = 5  # steps per logged window


def train_spec(data: Path, workdir: Path, preset: str, steps: int, seq_len: int, use_gpu: bool) -> dict:
    tokens_per_step = 16 * seq_len
    return {
        "name": "bench-train", "workdir": str(workdir), "seed": 0,
        "tokenizer": {"path": str(data / "tokenizer")},
        "model": {"preset": preset},
        "corpora": {"sft": {"kind": "chat", "path": str(data / "sft" / "*.jsonl"), "max_bad_fraction": 0.05}},
        "defaults": {"seq_len": seq_len, "global_batch_tokens": tokens_per_step, "micro_batch_rows": 4,
                     "workers": 1, "cpus_per_worker": 1, "use_gpu": use_gpu, "log_every": WINDOW,
                     "checkpoint_every": steps, "lr": {"peak": 0.001, "warmup": 0.1}},
        "stages": [{"name": "packed", "mixture": {"sft": 1}, "tokens": steps * tokens_per_step},
                   {"name": "padded", "from": "base", "packing": False, "mixture": {"sft": 1},
                    "tokens": steps * tokens_per_step}],
        "eval_rows": 8,
    }


def train_benchmark(data: Path, workdir: Path, preset: str, steps: int, seq_len: int,
                    address: str | None = None) -> dict:
    import torch

    from mixloop.data.store import read_manifest
    from mixloop.pipeline import Pipeline
    from mixloop.registry import read_lineage
    from mixloop.spec import BASE_VERSION, load_spec, stage_hash
    from mixloop.stages import StageRunner
    from mixloop.storage import join
    from mixloop.train.launch import fit_stage

    use_gpu = torch.cuda.is_available()
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "bench-train.yaml"
    path.write_text(yaml.safe_dump(train_spec(data, workdir, preset, steps, seq_len, use_gpu), sort_keys=False))
    pipeline = Pipeline(load_spec(path), log=lambda line: None, address=address)
    prepared = pipeline.train(until=BASE_VERSION).prepared  # tokenizer, packed corpora and base: no stage
    base = read_lineage(str(workdir), BASE_VERSION)
    runner = StageRunner(pipeline.spec, prepared)
    results = {}
    for variant in VARIANTS:
        stage = next(s for s in pipeline.spec.resolved_stages() if s.name == ("packed" if variant == "in-process" else variant))
        metrics_path = join(str(workdir), f"metrics-{variant}.jsonl")
        Path(metrics_path).unlink(missing_ok=True)
        job = runner.job(stage, base).model_copy(update={"metrics_path": metrics_path})
        # Each run starts from scratch: a fresh name, so no checkpoint of an earlier run is resumed.
        name = f"bench.{stage_hash(stage, base['stage_hash'])}-{variant}-{len(list(workdir.glob('train/*')))}"
        fit_stage(job, join(str(workdir), "train"), name, in_process=variant == "in-process")
        results[variant] = summarise(metrics_path)
    manifest = read_manifest(prepared.train[("sft", seq_len, True)])
    mean_length = manifest["tokens"] / manifest["documents"]
    parameters = read_lineage(str(workdir), "base")["parameters"]
    packed, padded, local = results["packed"], results["padded"], results["in-process"]
    summary = {
        "machine": torch.cuda.get_device_name() if use_gpu else f"CPU ({torch.get_num_threads()} threads per worker)",
        "model": {"preset": preset, "parameters": parameters}, "seq_len": seq_len, "steps": steps,
        "mean_document_tokens": mean_length, "seq_len_over_mean_length": seq_len / mean_length,
        "variants": results,
        "packed_over_padded": packed["useful_tokens_per_s"] / padded["useful_tokens_per_s"],
        "ray_overhead": (packed["step_seconds"] - local["step_seconds"]) / packed["step_seconds"],
        "data_wait_share": packed["data_s"] / packed["step_seconds"],
    }
    if use_gpu:
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in summary["machine"]), None)
        summary["mfu"] = 6 * parameters * packed["useful_tokens_per_s"] / peak if peak else None
    return summary


def summarise(metrics_path: str) -> dict:
    """Means over the logged windows after the first: useful tokens/s, step time and its parts."""
    windows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines()][1:]
    if not windows:
        raise RuntimeError(f"{metrics_path}: fewer than two logged windows; run more steps")
    mean = {key: statistics.fmean(w.get(key, 0.0) for w in windows)
            for key in ("tokens_per_s", "step_seconds", "data_s", "compute_s", "sync_s", "report_s")}
    mean["useful_tokens_per_s"] = mean.pop("tokens_per_s")
    mean["peak_memory_mb"] = max(w["peak_memory_mb"] for w in windows)
    return mean


def format_train(result: dict) -> str:
    lines = [f"{'variant':<12}{'useful tok/s':>14}{'step s':>9}{'data':>8}{'compute':>9}{'sync':>8}"
             f"{'report':>8}{'peak MB':>9}"]
    for name, v in result["variants"].items():
        lines.append(f"{name:<12}{v['useful_tokens_per_s']:>14,.0f}{v['step_seconds']:>9.3f}{v['data_s']:>8.4f}"
                     f"{v['compute_s']:>9.3f}{v['sync_s']:>8.4f}{v['report_s']:>8.4f}{v['peak_memory_mb']:>9,.0f}")
    lines.append(f"packed / padded {result['packed_over_padded']:.2f}x (seq_len / mean conversation "
                 f"{result['seq_len_over_mean_length']:.2f}); Ray overhead {result['ray_overhead']:.1%} of a step; "
                 f"data wait {result['data_wait_share']:.2%}")
    if result.get("mfu") is not None:
        lines.append(f"MFU {result['mfu']:.1%}")
    return "\n".join(lines)
