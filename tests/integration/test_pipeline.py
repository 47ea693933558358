"""A continual pipeline over the real corpora in ../shared/data with MiniMind's tokenizer.

pretrain on Shakespeare -> SFT on GSM8K chats -> continue pretraining on medical text with
Shakespeare replayed; then a re-run is a no-op and an appended stage trains alone.
"""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mixloop.cli import main
from mixloop.config import load_spec
from mixloop.evaluation.health import eval_prompts
from mixloop.runs.pipeline import PipelineRunner
from mixloop.versioning.registry import list_versions
from support import SHARED_DATA, open_in_browser, write_spec

pytestmark = pytest.mark.slow

STAGES = [
    {"name": "pretrain", "mixture": {"shakespeare": 1.0}, "tokens": 114688},
    {"name": "sft", "mixture": {"gsm8k": 0.8, "shakespeare": 0.2}, "tokens": 49152, "lr": {"peak": 0.001}},
    {
        "name": "medical",
        "mixture": {"medical": {"from": 0.7, "to": 0.9}, "shakespeare": {"from": 0.3, "to": 0.1}},
        "tokens": 81920,
        "lr": {"peak": 0.002, "decay": "wsd"},
    },
]
MEDICAL_SFT = {
    "name": "medical-sft",
    "mixture": {"medical_chat": 0.6, "gsm8k": 0.4},
    "tokens": 32768,
    "lr": {"peak": 0.001},
}


def spec_dict(workdir, stages):
    data = SHARED_DATA
    return {
        "name": "shared-data",
        "workdir": str(workdir),
        "seed": 1,
        "tokenizer": {"path": str(data / "tokenizer")},
        "model": {"preset": "tiny"},
        "corpora": {
            "shakespeare": {
                "kind": "text",
                "path": str(data / "pretrain/en_tinyshakespeare.jsonl"),
                "eval": str(data / "eval/pretrain_en.jsonl"),
            },
            "gsm8k": {
                "kind": "chat",
                "path": str(data / "sft/en_gsm8k.jsonl"),
                "eval": str(data / "eval/sft_en.jsonl"),
            },
            "medical": {
                "kind": "text",
                "path": str(data / "domain/medical_en_medquad.jsonl"),
                "eval": str(data / "eval/domain_medical_en.jsonl"),
            },
            "medical_chat": {
                "kind": "chat",
                "path": str(data / "sft/en_medical_medquad.jsonl"),
                "eval": str(data / "eval/sft_medical_en.jsonl"),
            },
        },
        "defaults": {
            "seq_len": 256,
            "global_batch_tokens": 8192,
            "micro_batch_rows": 8,
            "workers": 1,
            "cpus_per_worker": 2,
            "checkpoint_every": 10,
            "log_every": 5,
            "lr": {"peak": 0.004, "warmup": 0.1},
        },
        "stages": stages,
        "eval_rows": 16,
        "chat_prompts": 3,
        "chat_max_new_tokens": 32,
    }


def test_continual_pipeline_on_shared_corpora(ray_address, tmp_path):
    workdir = tmp_path / "run"
    spec_path = write_spec(tmp_path, spec_dict(workdir, STAGES))
    first = PipelineRunner(load_spec(spec_path)).run()
    assert first.trained == ["pretrain", "sft", "medical"]
    matrix = first.matrix
    for version in ("pretrain", "sft", "medical"):
        for corpus in ("shakespeare", "gsm8k", "medical"):
            assert matrix[version][corpus]["loss"] < matrix["base"][corpus]["loss"], (version, corpus)
    # Uptake: the medical stage lowers medical loss against its parent.
    assert matrix["medical"]["medical"]["loss"] < matrix["sft"]["medical"]["loss"]
    assert (workdir / "eval" / "table.txt").read_text().startswith("version")
    deltas = first.deltas
    assert deltas["medical"]["uptake"]["medical"] > 0 and set(deltas["medical"]["forgetting"]) == {
        "shakespeare",
        "gsm8k",
    }
    assert set(first.health["sft"]) == {"gsm8k", "medical_chat"}
    gsm8k_health = first.health["sft"]["gsm8k"]
    assert gsm8k_health["samples"] == 3 and gsm8k_health["ended"] in (0, 1 / 3, 2 / 3, 1)  # chat_prompts: 3
    asked = eval_prompts(str(SHARED_DATA / "eval/sft_en.jsonl"), 1)[0][-1]["content"]  # the first eval prompt
    assert gsm8k_health["examples"][0]["prompt"] == json.dumps(asked, ensure_ascii=False)[1:-1][:300]

    # The report renders in a real browser with every plot loaded and no console error.
    images, errors = open_in_browser(workdir / "report" / "index.html")
    assert {src for src, _ in images} == {"training.png", "eval_matrix.png", "uptake_forgetting.png", "lineage.png"}
    assert all(loaded for _, loaded in images), images
    assert errors == []

    # TensorBoard, on by default: the stages line up on one axis of cumulative tokens, with each version's eval.
    runs = {}
    for stage in ("pretrain", "sft", "medical"):
        accumulator = EventAccumulator(str(workdir / "tensorboard" / stage))
        accumulator.Reload()
        runs[stage] = accumulator
    steps = {stage: [e.step for e in run.Scalars("train/loss")] for stage, run in runs.items()}
    assert all(s == sorted(s) and len(s) >= 2 for s in steps.values())
    assert steps["pretrain"][-1] < steps["sft"][0] and steps["sft"][-1] < steps["medical"][0]
    assert runs["medical"].Scalars("eval/medical")[0].value == pytest.approx(
        matrix["medical"]["medical"]["loss"], rel=1e-5
    )
    assert runs["medical"].Scalars("uptake/medical")[0].value > 0

    lineage = json.loads((workdir / "models" / "medical" / "lineage.json").read_text())
    assert lineage["parent"] == "sft"
    assert lineage["stage"]["mixture"]["shakespeare"] == {"from": 0.3, "to": 0.1}

    trained_before = sorted(p.name for p in (workdir / "train").iterdir())
    prepared_before = (workdir / "cache" / "prepare.jsonl").read_text()
    again = PipelineRunner(load_spec(spec_path)).run()
    assert again.trained == []
    assert sorted(p.name for p in (workdir / "train").iterdir()) == trained_before
    assert (workdir / "cache" / "prepare.jsonl").read_text() == prepared_before, "a re-run tokenized again"

    appended = write_spec(tmp_path, spec_dict(workdir, STAGES + [MEDICAL_SFT]))
    third = PipelineRunner(load_spec(appended)).run()
    assert third.trained == ["medical-sft"]
    assert list(list_versions(str(workdir))) == ["base", "pretrain", "sft", "medical", "medical-sft"]
    assert json.loads((workdir / "models" / "medical-sft" / "lineage.json").read_text())["parent"] == "medical"
    assert third.matrix["medical-sft"]["medical_chat"]["loss"] < third.matrix["medical"]["medical_chat"]["loss"]

    # The run directory alone is enough to rebuild the report (its pipeline.yaml has absolute paths).
    (workdir / "report" / "index.html").unlink()
    assert main(["report", str(workdir)]) == 0
    assert (workdir / "report" / "index.html").exists()
