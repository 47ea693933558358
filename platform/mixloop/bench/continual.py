"""Benchmarks that print JSON and a table.

`continual`: after a pretrain + fine-tune iteration on real corpora, three ways to absorb a new
domain, as branches of one pipeline (the `from:` of a stage):
  (a) scratch  re-train from the initial model on old and new data together;
  (b) new-only continue the fine-tuned model on the new data alone, at its final learning rate;
  (c) replay   continue it on the new data with replay of the old and a re-warmed schedule.
Each is measured against the fine-tuned model: uptake on the new domain, forgetting on the old
corpora, chat health, and the tokens it trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

PRETRAIN, SFT, DOMAIN = 393216, 98304, 196608  # tokens: 48, 12 and 24 steps of 8192


def continual_spec(data: Path, workdir: Path) -> dict:
    return {
        "name": "bench-continual", "workdir": str(workdir), "seed": 0,
        "tokenizer": {"path": str(data / "tokenizer")},
        "model": {"preset": "tiny"},
        "corpora": {
            "general": {"kind": "text", "path": str(data / "pretrain/en_*.jsonl"), "eval": str(data / "eval/pretrain_en.jsonl")},
            "chat": {"kind": "chat", "path": str(data / "sft/en_gsm8k.jsonl"), "eval": str(data / "eval/sft_en.jsonl")},
            "medical": {"kind": "text", "path": str(data / "domain/medical_en_medquad.jsonl"),
                        "eval": str(data / "eval/domain_medical_en.jsonl")},
        },
        "defaults": {"seq_len": 256, "global_batch_tokens": 8192, "micro_batch_rows": 8, "workers": 1,
                     "cpus_per_worker": 2, "checkpoint_every": 12, "log_every": 12,
                     "lr": {"peak": 0.004, "warmup": 0.1, "decay": "cosine", "floor": 0.1}},
        "eval_rows": 32, "chat_prompts": 8, "chat_max_new_tokens": 48,
        "stages": [
            {"name": "pretrain", "mixture": {"general": 1.0}, "tokens": PRETRAIN},
            {"name": "sft", "mixture": {"chat": 0.8, "general": 0.2}, "tokens": SFT, "lr": {"peak": 0.001}},
            {"name": "new-only", "from": "sft", "mixture": {"medical": 1.0}, "tokens": DOMAIN,
             "lr": {"peak": 0.0001, "warmup": 0.0, "decay": "constant"}},
            {"name": "replay", "from": "sft", "tokens": DOMAIN,
             "mixture": {"medical": {"from": 0.7, "to": 0.9}, "general": {"from": 0.2, "to": 0.08},
                         "chat": {"from": 0.1, "to": 0.02}},
             "lr": {"peak": 0.002, "warmup": 0.1, "warmup_from": "current", "decay": "cosine"}},
            {"name": "scratch", "from": "base", "tokens": PRETRAIN + SFT + DOMAIN,
             # the old and new data in the proportions the iterative path trained them (weights are relative)
             "mixture": {"general": PRETRAIN + 0.2 * SFT, "chat": 0.8 * SFT, "medical": DOMAIN}},
        ],
    }


def continual(data: Path, workdir: Path, address: str | None = None) -> dict:
    from mixloop.pipeline import Pipeline
    from mixloop.ray_setup import init_ray
    from mixloop.spec import load_spec

    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "bench-continual.yaml"
    path.write_text(yaml.safe_dump(continual_spec(data, workdir), sort_keys=False))
    init_ray(address)
    result = Pipeline(load_spec(path), log=lambda line: None).run()
    loss = {v: {c: r["loss"] for c, r in row.items() if r} for v, row in result["matrix"].items()}
    lineages = {v: json.loads((workdir / "models" / v / "lineage.json").read_text()) for v in loss}
    strategies = {}
    for name in ("scratch", "new-only", "replay"):
        strategies[name] = {
            "uptake_medical": loss["sft"]["medical"] - loss[name]["medical"],
            "forgetting": {c: loss[name][c] - loss["sft"][c] for c in ("general", "chat")},
            "eval_loss": loss[name],
            "tokens_trained": sum(lineages[name]["tokens_per_corpus"].values()),
            "chat_health": {c: {k: h[k] for k in ("ended", "repetition", "length")}
                            for c, h in result["health"].get(name, {}).items()},
        }
    return {"reference": {"version": "sft", "eval_loss": loss["sft"]}, "strategies": strategies,
            "matrix": loss, "report": result["report"]}


def format_continual(result: dict) -> str:
    lines = [f"{'strategy':<10}{'medical uptake':>16}{'general forgot':>16}{'chat forgot':>13}"
             f"{'chat ended':>12}{'tokens':>12}"]
    for name, s in result["strategies"].items():
        ended = s["chat_health"].get("chat", {}).get("ended", float("nan"))
        lines.append(f"{name:<10}{s['uptake_medical']:>16.3f}{s['forgetting']['general']:>16.3f}"
                     f"{s['forgetting']['chat']:>13.3f}{ended:>12.0%}{s['tokens_trained']:>12,.0f}")
    return "\n".join(lines)
