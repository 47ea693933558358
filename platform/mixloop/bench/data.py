"""`mixloop bench data`: how fast corpora are prepared, how fast the mixed loader feeds a worker,
and whether preparation's memory stays flat when the corpus grows tenfold.

- preparation: every train corpus of the shared data, MiniMind's tokenizer, one Ray Data job in a
  fresh process with its own local Ray; tokens per second and per CPU core (worker start-up included),
  beside the tokenizer's own `encode_batch` on the same documents in one process on one thread.
- loader: rows per second the mix plan and packed-row reads deliver to one of the quickstart's two
  workers, against the rows per second that worker trains with the quickstart model (tiny preset,
  512-token vocabulary, one thread, micro-batches of 8 rows of 128 tokens).
- memory: peak resident memory of the whole process tree (driver, raylet, Ray Data's task workers) while
  preparing the English pretraining text, then the same text repeated ten times in each file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mixloop.data.files import iter_records, list_chunks
from mixloop.data.mixplan import MixPlan
from mixloop.data.records import BadRecord, checked
from mixloop.data.store import PackedCorpus, read_manifest
from mixloop.runs.ray_setup import init_ray
from mixloop.storage.fs import expand_files

SEQ_LEN = 128
MEMORY_FILES = "pretrain/en_*.jsonl"
LOADER_CORPORA = {"pretrain": 0.6, "sft": 0.3, "domain": 0.1}


def data_benchmark(data: Path, root: Path, replicas: int = 10) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix="run-") as workdir:  # fresh: nothing cached
        return _measure(data, Path(workdir), replicas)


def _measure(data: Path, workdir: Path, replicas: int) -> dict:
    tokenizer = str(data / "tokenizer")
    corpora = {name: str(data / name / "*.jsonl") for name in LOADER_CORPORA}
    prepared = prepare_in_child(corpora, tokenizer, workdir / "all")
    raw = raw_encode_in_child(corpora, tokenizer)
    cpus = prepared["cpus"]
    per_core = prepared["tokens"] / prepared["seconds"] / cpus
    memory = {}
    for factor in (1, replicas):
        files = replicate(sorted(data.glob(MEMORY_FILES)), factor, workdir / f"x{factor}")
        memory[f"x{factor}"] = prepare_in_child(
            {"english": str(files / "*.jsonl")}, tokenizer, workdir / f"mem{factor}"
        )
    return {
        "machine": f"{os.cpu_count()} CPU cores",
        "preparation": {
            **prepared,
            "tokens_per_s": prepared["tokens"] / prepared["seconds"],
            "tokens_per_s_per_core": per_core,
            "share_of_raw_encoding": per_core / raw["tokens_per_s"],
        },
        "raw_encoding": raw,
        "loader": loader_vs_training(prepared["folders"]),
        "memory": {**memory, "ratio": memory[f"x{replicas}"]["peak_rss_mb"] / memory["x1"]["peak_rss_mb"]},
    }


def replicate(files: list[Path], factor: int, out: Path) -> Path:
    """Each file's content `factor` times, in a file of the same name (new identities, no cache hit)."""
    out.mkdir(parents=True, exist_ok=True)
    for file in files:
        content = file.read_bytes()
        with open(out / file.name, "wb") as target:
            for _ in range(factor):
                target.write(content)
    return out


def prepare_in_child(corpora: dict[str, str], tokenizer: str, workdir: Path) -> dict:
    """Prepare in a fresh process; its result plus the peak RSS of its whole process tree."""
    command = [
        sys.executable,
        "-m",
        "mixloop.bench.data",
        "--tokenizer",
        tokenizer,
        "--workdir",
        str(workdir),
        "--corpora",
        json.dumps(corpora),
    ]
    with tempfile.TemporaryFile("w+") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.DEVNULL)
        peak = 0
        while child.poll() is None:
            peak = max(peak, tree_rss(child.pid))
            time.sleep(0.1)
        out.seek(0)
        lines = out.read().splitlines()
    if child.returncode != 0 or not lines:
        raise RuntimeError(f"preparation in {workdir} failed (exit {child.returncode})")
    return {**json.loads(lines[-1]), "peak_rss_mb": peak / 2**20}


def raw_encode_in_child(corpora: dict[str, str], tokenizer: str) -> dict:
    """The tokenizer's own speed on the same documents: `encode_batch` in one process on one thread
    (chats rendered by the chat template first, untimed)."""
    command = [
        sys.executable,
        "-m",
        "mixloop.bench.data",
        "--tokenizer",
        tokenizer,
        "--corpora",
        json.dumps(corpora),
        "--raw",
    ]
    env = {**os.environ, "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def _raw_encode(corpora: dict[str, str], tokenizer_dir: str) -> dict:
    from mixloop.data.tokenizer import load_tokenizer  # lazy: transformers

    tokenizer = load_tokenizer(tokenizer_dir)
    texts = []
    for name, pattern in corpora.items():
        kind = "chat" if name == "sft" else "text"
        for chunk in list_chunks(expand_files(pattern), None):
            for _, record in iter_records(chunk):
                try:
                    content, _ = checked(record, kind, "auto", {})
                except BadRecord:
                    continue
                texts.append(content if kind == "text" else tokenizer.apply_chat_template(content, tokenize=False))
    started = time.perf_counter()
    encoded = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    seconds = time.perf_counter() - started
    tokens = sum(len(e.ids) for e in encoded)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "threads": 1}


def tree_rss(root: int) -> int:
    """Resident bytes of a process and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            children.setdefault(int(fields[1]), []).append(int(entry.name))
            rss[int(entry.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


def loader_vs_training(folders: dict[str, str], steps: int = 200) -> dict:
    """Rows/s the mixed loader hands one worker, and rows/s that worker trains (quickstart settings)."""
    # lazy: torch, transformers
    import torch
    from transformers import Qwen3Config

    from mixloop.train.batches import MicroBatch, micro_batches_of
    from mixloop.train.loss import token_ce
    from mixloop.train.model import PRESETS, new_model

    torch.set_num_threads(1)
    names = list(LOADER_CORPORA)
    corpora = [PackedCorpus(folders[name]) for name in names]
    rows_per_step, micro, world = 4096 // SEQ_LEN, 8, 2
    weights = [LOADER_CORPORA[n] for n in names]
    plan = MixPlan(names, weights, weights, [len(c) for c in corpora], steps * rows_per_step, seed=0)
    mine = micro_batches_of(0, world, rows_per_step // micro)

    def load(step: int) -> list[MicroBatch]:
        corpus, index = plan.rows(step * rows_per_step, (step + 1) * rows_per_step)
        return [
            MicroBatch(corpora, corpus[m * micro : (m + 1) * micro], index[m * micro : (m + 1) * micro]) for m in mine
        ]

    started = time.perf_counter()
    for step in range(steps):
        load(step)
    loader_rows_per_s = steps * len(mine) * micro / (time.perf_counter() - started)

    config = Qwen3Config(**PRESETS["tiny"], vocab_size=512, tie_word_embeddings=True, head_dim=16)
    model = new_model(config, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = [load(step) for step in range(5)]
    started, trained = time.perf_counter(), 0  # (again at step 2)
    for step, micro_batches in enumerate(batches * 3):
        if step == 2:  # the first steps warm up allocators and kernels
            started, trained = time.perf_counter(), 0
        for batch in micro_batches:
            inputs = dict(batch.inputs)
            labels = inputs.pop("labels")
            inputs["input_ids"] = inputs["input_ids"] % 512  # MiniMind's ids folded into the quickstart's vocabulary
            labels = torch.where(labels >= 0, labels % 512, labels)
            token_ce(model(**inputs).logits, labels).sum().backward()
            trained += len(batch.corpus)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    training_rows_per_s = trained / (time.perf_counter() - started)
    return {
        "loader_rows_per_s": loader_rows_per_s,
        "training_rows_per_s": training_rows_per_s,
        "ratio": loader_rows_per_s / training_rows_per_s,
        "seq_len": SEQ_LEN,
        "micro_batch_rows": micro,
    }


def format_data(result: dict) -> str:
    prep, loader, memory = result["preparation"], result["loader"], result["memory"]
    sizes = " vs ".join(
        f"{k} {v['peak_rss_mb']:.0f} MB ({v['tokens']:,} tokens)" for k, v in memory.items() if isinstance(v, dict)
    )
    return "\n".join(
        [
            f"preparation  {prep['tokens']:,} tokens in {prep['seconds']:.1f} s on {prep['cpus']} CPUs: "
            f"{prep['tokens_per_s']:,.0f} tokens/s, {prep['tokens_per_s_per_core']:,.0f} per core, "
            f"{prep['share_of_raw_encoding']:.0%} of the tokenizer's own {result['raw_encoding']['tokens_per_s']:,.0f} "
            "tokens/s on one core",
            f"loader       {loader['loader_rows_per_s']:,.0f} rows/s to one worker; it trains "
            f"{loader['training_rows_per_s']:,.1f} rows/s: {loader['ratio']:,.0f}x",
            f"memory       peak RSS {sizes}: ratio {memory['ratio']:.2f}",
        ]
    )


def _child(argv: list[str]) -> None:
    """Run in a fresh process by prepare_in_child: prepare the corpora, print one JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer")
    parser.add_argument("--workdir")
    parser.add_argument("--corpora")
    parser.add_argument("--raw", action="store_true", help="time the tokenizer alone instead of preparing")
    args = parser.parse_args(argv)
    if args.raw:
        print(json.dumps(_raw_encode(json.loads(args.corpora), args.tokenizer)))
        return
    # lazy: ray, torch (only the preparation child starts Ray)
    import ray

    from mixloop.data.prepare import CorpusRequest, prepare_corpora

    init_ray()
    corpora = json.loads(args.corpora)
    kinds = {name: "chat" if name == "sft" else "text" for name in corpora}
    requests = [
        CorpusRequest(name, "train", pattern, None, kinds[name], 0.05, SEQ_LEN) for name, pattern in corpora.items()
    ]
    started = time.perf_counter()
    folders = prepare_corpora(requests, args.tokenizer, args.workdir)
    seconds = time.perf_counter() - started
    manifests = [read_manifest(folders[r]) for r in requests]
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpus": int(ray.cluster_resources()["CPU"]),
                "tokens": sum(m["tokens"] for m in manifests),
                "documents": sum(m["documents"] for m in manifests),
                "rows": sum(m["rows"] for m in manifests),
                "rejected": sum(m["rejected"] for m in manifests),
                "folders": {r.name: folders[r] for r in requests},
            }
        )
    )


if __name__ == "__main__":
    _child(sys.argv[1:])
