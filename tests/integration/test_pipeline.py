"""A continual pipeline over the real corpora in ../shared/data with MiniMind's tokenizer.

pretrain on Shakespeare -> SFT on GSM8K chats -> continue pretraining on medical text with
Shakespeare replayed; then a re-run is a no-op and an appended stage trains alone.
"""

from __future__ import annotations

import json

import pytest
import yaml
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


# Knowledge scored on every version: a local lm-eval task (multiple choice over JSON lines), a probe
# file users write in one line a question, and the medical chats' eval questions answered in chat.
TERMS = [
    ("An inflammation of the liver is called", ["hepatitis", "arthritis", "gastritis"], 0),
    ("High blood sugar over a long time is a sign of", ["diabetes", "asthma", "anemia"], 0),
    ("The organ that pumps blood is the", ["heart", "lung", "kidney"], 0),
    ("A broken bone is also called a", ["fracture", "sprain", "bruise"], 0),
]
TASK_YAML = """task: medical_terms
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
metric_list: [{{metric: acc, aggregation: mean, higher_is_better: true}}]
"""


def write_benchmarks(folder) -> dict:
    """The spec's benchmarks section over a task folder and a probe file written here."""
    tasks = folder / "tasks"
    tasks.mkdir(parents=True)
    rows = [{"question": q, "choices": c, "answer": a} for q, c, a in TERMS]
    (tasks / "medical_terms.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "medical_terms.yaml").write_text(TASK_YAML.format(data=tasks / "medical_terms.jsonl"))
    probe = folder / "medical_mc.jsonl"
    probe.write_text(
        "".join(json.dumps({"prompt": q, "choices": [f" {x}" for x in c], "answer": a}) + "\n" for q, c, a in TERMS)
    )
    return {"tasks": ["medical_terms"], "include_path": str(tasks), "probes": {"medical_mc": str(probe)}, "limit": 4}


def spec_dict(workdir, stages, benchmarks=None):
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
                "probes": "eval",  # its eval chats' questions, answered in chat
            },
        },
        "benchmarks": benchmarks,
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
    benchmarks = write_benchmarks(tmp_path / "bench")
    spec_path = write_spec(tmp_path, spec_dict(workdir, STAGES, benchmarks))
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

    # Every version is scored on the local task, the probe file and the eval split's questions, with
    # standard errors, and the scores are kept beside the losses.
    for version in ("base", "pretrain", "sft", "medical"):
        metrics = {task: (s.metric, s.samples) for task, s in first.scores[version].items()}
        assert metrics == {"medical_terms": ("acc", 4), "medical_mc": ("acc", 4), "medical_chat": ("exact_match", 4)}
        assert all(s.stderr is not None and 0 <= s.value <= 1 for s in first.scores[version].values())
    assert set(json.loads((workdir / "eval" / "scores.json").read_text())) == {"base", "pretrain", "sft", "medical"}
    assert set(first.score_deltas["medical"]) == {"medical_terms", "medical_mc", "medical_chat"}

    # The report renders in a real browser with every plot loaded and no console error.
    page = (workdir / "report" / "index.html").read_text()
    assert "What each version knows: benchmark scores" in page and "<th>medical_terms</th>" in page
    images, errors = open_in_browser(workdir / "report" / "index.html")
    plots = {
        "training.png",
        "eval_matrix.png",
        "uptake_forgetting.png",
        "lineage.png",
        "scores.png",
        "score_changes.png",
    }
    assert {src for src, _ in images} == plots
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

    appended = write_spec(tmp_path, spec_dict(workdir, STAGES + [MEDICAL_SFT], benchmarks))
    third = PipelineRunner(load_spec(appended)).run()
    assert third.trained == ["medical-sft"]
    assert list(list_versions(str(workdir))) == ["base", "pretrain", "sft", "medical", "medical-sft"]
    assert json.loads((workdir / "models" / "medical-sft" / "lineage.json").read_text())["parent"] == "medical"
    assert third.matrix["medical-sft"]["medical_chat"]["loss"] < third.matrix["medical"]["medical_chat"]["loss"]

    # The exported model card carries the version's scores as its model-index.
    assert main(["models", "export", str(workdir), "medical-sft", str(tmp_path / "exported")]) == 0
    card = (tmp_path / "exported" / "README.md").read_text()
    index = yaml.safe_load(card.split("---\n")[1])["model-index"][0]
    assert {r["dataset"]["name"] for r in index["results"]} == {"medical_terms", "medical_mc", "medical_chat"}

    # The run directory alone is enough to rebuild the report (its pipeline.yaml has absolute paths).
    (workdir / "report" / "index.html").unlink()
    assert main(["report", str(workdir)]) == 0
    assert (workdir / "report" / "index.html").exists()
