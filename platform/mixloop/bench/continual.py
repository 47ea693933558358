"""`mixloop bench continual`: four ways to absorb a new domain, on the real corpora, as branches of one
pipeline (the `from:` of a stage).

The base model is pretrained on general text in chunks of CHUNK tokens at a constant learning rate
until its general eval loss has flattened (a chunk improves it by less than FLAT, or MAX_CHUNKS ran),
then fine-tuned on chats (`sft`). Then medical text arrives:
  (a) scratch  re-train from the initial model on all of it: old and new data together;
  (b) new-only continue `sft` on the medical text alone at its final learning rate, then fine-tune;
  (c) replay   `mixloop add` with the `iterate:` template's defaults: replay + re-warm, then fine-tune;
  (d) tuned    the same after `mixloop add --tune TRIALS` (a short search of replay share and re-warm).
(b)-(d) train on the same number of medical tokens. Each is measured after its fine-tune (scratch has
the chats in its mix) against `sft`: uptake on medical, forgetting per old corpus, chat health, the
mean eval loss over every corpus, tokens and wall time.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from mixloop.config import load_spec
from mixloop.console import quiet
from mixloop.runs.iterate import NewCorpus, add, count_tokens
from mixloop.runs.ray_setup import init_ray
from mixloop.versioning.registry import list_versions, set_current

CHUNK, SFT, DOMAIN = 131072, 98304, 196608  # tokens: 16, 12 and 24 steps of 8192
FLAT, MAX_CHUNKS = 0.02, 6
TRIALS = 4
NEW = {"replay": "medical-replay", "tuned": "medical-tuned"}  # the corpus names `add` gives the medical text

if TYPE_CHECKING:  # torch and Ray come with the runner: imported where it runs
    from mixloop.runs.pipeline import RunResult


def continual_spec(data: Path, workdir: Path) -> dict:
    return {
        "name": "bench-continual",
        "workdir": str(workdir),
        "seed": 0,
        "tokenizer": {"path": str(data / "tokenizer")},
        "model": {"preset": "tiny"},
        "corpora": {
            "general": {
                "kind": "text",
                "path": str(data / "pretrain/en_*.jsonl"),
                "eval": str(data / "eval/pretrain_en.jsonl"),
            },
            "chat": {"kind": "chat", "path": str(data / "sft/en_gsm8k.jsonl"), "eval": str(data / "eval/sft_en.jsonl")},
            "medical": {
                "kind": "text",
                "path": str(data / "domain/medical_en_medquad.jsonl"),
                "eval": str(data / "eval/domain_medical_en.jsonl"),
            },
        },
        "defaults": {
            "seq_len": 256,
            "global_batch_tokens": 8192,
            "micro_batch_rows": 8,
            "workers": 1,
            "cpus_per_worker": 2,
            "checkpoint_every": 8,
            "log_every": 8,
            "lr": {"peak": 0.004, "warmup": 0.1, "decay": "cosine", "floor": 0.1},
        },
        "eval_rows": 32,
        "chat_prompts": 8,
        "chat_max_new_tokens": 48,
        "stages": [{"name": "pretrain-1", "mixture": {"general": 1.0}, "tokens": CHUNK, "lr": {"decay": "constant"}}],
    }


# The pipelines' lines are not the benchmark's; the search's trial lines show how far it got.
@quiet("mixloop.tuning.plugins")
def continual(data: Path, workdir: Path, address: str | None = None, trials: int = TRIALS) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "bench-continual.yaml"
    spec = continual_spec(data, workdir)
    init_ray(address)
    clock = time.time()
    flattening = _pretrain_until_flat(path, spec, address)
    spec = yaml.safe_load(path.read_text())
    last_chunk = spec["stages"][-1]["name"]
    spec["stages"].append(
        {
            "name": "sft",
            "mixture": {"chat": 0.8, "general": 0.2},
            "tokens": SFT,
            "lr": {"peak": 0.001, "warmup_from": "zero"},
        }
    )
    medical = count_tokens(load_spec(_write(path, spec)), spec["corpora"]["medical"]["path"])
    spec["iterate"] = {"passes": round(DOMAIN / medical, 4)}  # (c) and (d) see DOMAIN medical tokens, as (b)
    _run(_write(path, spec), address)
    walls = {}
    for strategy, tune in (("replay", 0), ("tuned", trials)):
        set_current(str(workdir), "sft", "bench: every strategy starts from sft")
        started = time.time()
        add(
            str(path),
            NewCorpus(NEW[strategy], spec["corpora"]["medical"]["path"], eval=spec["corpora"]["medical"]["eval"]),
            tune=tune,
            address=address,
        )
        walls[strategy] = time.time() - started
    spec = yaml.safe_load(path.read_text())
    pretrain_tokens = CHUNK * len(flattening["losses"])
    spec["stages"] += [
        {
            "name": "new-only",
            "from": "sft",
            "mixture": {"medical": 1.0},
            "tokens": DOMAIN,
            "lr": {"peak": 0.0001, "warmup": 0.0, "decay": "constant"},
        },
        {"name": "new-only-sft", **_finetune_of(spec, "medical-replay-sft", "medical")},
        {
            "name": "scratch",
            "from": "base",
            "tokens": pretrain_tokens + SFT + DOMAIN,
            # the old and new data in the proportions the iterative path trained them (weights are relative)
            "mixture": {"general": pretrain_tokens + 0.2 * SFT, "chat": 0.8 * SFT, "medical": DOMAIN},
        },
    ]
    result = _run(_write(path, spec), address)
    return _summary(workdir, result, flattening, last_chunk, walls, time.time() - clock)


def _pretrain_until_flat(path: Path, spec: dict, address: str | None) -> dict:
    """Pretrain chunk by chunk at a constant learning rate until a chunk improves the general eval loss
    by less than FLAT (relative), or MAX_CHUNKS ran: how the base was decided to be trained enough."""
    from mixloop.runs.pipeline import PipelineRunner  # lazy: torch, transformers

    losses = []
    while True:  # training and evaluation only: chat health and the report wait for the strategies
        pipeline = PipelineRunner(load_spec(_write(path, spec)), address=address)
        with pipeline.locked("mixloop bench continual"):
            matrix = pipeline.evaluate(pipeline.train().prepared)
        losses.append(matrix[spec["stages"][-1]["name"]]["general"]["loss"])
        gain = (losses[-2] - losses[-1]) / losses[-2] if len(losses) > 1 else 1.0
        if gain < FLAT or len(losses) == MAX_CHUNKS:
            return {
                "losses": losses,
                "last_gain": gain,
                "rule": f"stop when a chunk of {CHUNK:,} tokens improves "
                f"the general eval loss by less than {FLAT:.0%}, or after {MAX_CHUNKS} chunks",
            }
        name = f"pretrain-{len(losses) + 1}"
        spec["stages"].append(
            {
                "name": name,
                "mixture": {"general": 1.0},
                "tokens": CHUNK,
                "lr": {"warmup": 0.0, "warmup_from": "current", "decay": "constant"},
            }
        )


def _finetune_of(spec: dict, template_stage: str, new_text: str) -> dict:
    """The template's fine-tune as (c) got it, with (b)'s text in place of (c)'s."""
    stage = next(s for s in spec["stages"] if s["name"] == template_stage)
    mixture = {(new_text if name == NEW["replay"] else name): weight for name, weight in stage["mixture"].items()}
    return {"mixture": mixture, "tokens": stage["tokens"], "lr": stage.get("lr", {})}


def _write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _run(path: Path, address: str | None) -> RunResult:
    from mixloop.runs.pipeline import PipelineRunner  # lazy: torch, transformers

    return PipelineRunner(load_spec(path), address=address).run()


def _summary(workdir: Path, result: RunResult, flattening: dict, last_chunk: str, walls: dict, total_s: float) -> dict:
    """Per strategy: its final version against sft, its tokens and wall time."""
    loss = {v: {c: r["loss"] for c, r in row.items() if r} for v, row in result.matrix.items()}
    lineages = list_versions(str(workdir))
    final = {
        "scratch": ["scratch"],
        "new-only": ["new-only", "new-only-sft"],
        "replay": [NEW["replay"], f"{NEW['replay']}-sft"],
        "tuned": [NEW["tuned"], f"{NEW['tuned']}-sft"],
    }
    corpora = ("general", "chat", "medical")
    strategies = {}
    for name, versions in final.items():
        version = versions[-1]
        medical = {c: loss[version][c] for c in loss[version] if c.startswith("medical")}  # the same eval split
        eval_loss = {
            "general": loss[version]["general"],
            "chat": loss[version]["chat"],
            "medical": min(medical.values()),
        }
        strategies[name] = {
            "versions": versions,
            "uptake_medical": loss["sft"]["medical"] - eval_loss["medical"],
            "forgetting": {c: eval_loss[c] - loss["sft"][c] for c in ("general", "chat")},
            "eval_loss": eval_loss,
            "mean_eval_loss": sum(eval_loss.values()) / len(corpora),
            "tokens_trained": sum(lineages[v].trained_tokens for v in versions),
            "wall_s": walls.get(name, sum(lineages[v].metrics.wall_seconds for v in versions)),
            "chat_health": {
                c: {k: h[k] for k in ("ended", "repetition", "length")}
                for c, h in result.health.get(version, {}).items()
            },
        }
    scratch = strategies["scratch"]
    goal = {
        name: {
            "within_1pct_of_scratch": s["mean_eval_loss"] <= 1.01 * scratch["mean_eval_loss"],
            "at_most_half_its_tokens": s["tokens_trained"] <= 0.5 * scratch["tokens_trained"],
        }
        for name, s in strategies.items()
        if name in ("replay", "tuned")
    }
    return {
        "base": {
            "chunks": len(flattening["losses"]),
            "general_eval_loss_per_chunk": flattening["losses"],
            "last_gain": flattening["last_gain"],
            "rule": flattening["rule"],
            "last_chunk": last_chunk,
        },
        "reference": {"version": "sft", "eval_loss": loss["sft"]},
        "strategies": strategies,
        "goal": goal,
        "matrix": loss,
        "report": result.report,
        "wall_s": total_s,
    }


def format_continual(result: dict) -> str:
    base = result["base"]
    lines = [
        f"base: {base['chunks']} chunks ({base['rule']}); general eval loss per chunk "
        + ", ".join(f"{x:.3f}" for x in base["general_eval_loss_per_chunk"]),
        f"{'strategy':<10}{'medical uptake':>16}{'general forgot':>16}{'chat forgot':>13}{'mean loss':>11}"
        f"{'chat ended':>12}{'repeated':>10}{'tokens':>12}{'wall s':>8}",
    ]
    for name, s in result["strategies"].items():
        health = s["chat_health"].get("chat", {})
        lines.append(
            f"{name:<10}{s['uptake_medical']:>16.3f}{s['forgetting']['general']:>16.3f}"
            f"{s['forgetting']['chat']:>13.3f}{s['mean_eval_loss']:>11.3f}"
            f"{health.get('ended', float('nan')):>12.0%}{health.get('repetition', float('nan')):>10.3f}"
            f"{s['tokens_trained']:>12,.0f}{s['wall_s']:>8.0f}"
        )
    for name, goal in result["goal"].items():
        lines.append(
            f"goal for {name}: mean eval loss within 1% of scratch: {goal['within_1pct_of_scratch']}; "
            f"at most half its tokens: {goal['at_most_half_its_tokens']}"
        )
    return "\n".join(lines)
