"""Uptake and forgetting arithmetic, chat health metrics, and training curves for the report."""

from __future__ import annotations

import json

import pytest

from mixloop.evaluate import iteration_deltas
from mixloop.health import repetition_rate, summarise
from mixloop.report import training_curves


def lineage(parent, mixture):
    return {"parent": parent, "stage": {"mixture": {c: {"from": 1, "to": 1} for c in mixture}} if mixture else None}


def test_uptake_and_forgetting_against_parent_and_best_ancestor():
    lineages = {
        "base": lineage(None, None),
        "pretrain": lineage("base", ["web"]),
        "sft": lineage("pretrain", ["chat", "web"]),
        "domain": lineage("sft", ["law", "web"]),
    }
    loss = {"base": {"web": 9.0, "chat": 9.0, "law": 9.0},
            "pretrain": {"web": 3.0, "chat": 5.0, "law": 7.0},
            "sft": {"web": 3.5, "chat": 2.0, "law": 6.5},
            "domain": {"web": 3.25, "chat": 4.0, "law": 2.5}}
    matrix = {v: {c: {"loss": x} for c, x in row.items()} for v, row in loss.items()}
    deltas = iteration_deltas(matrix, lineages)
    assert set(deltas) == {"pretrain", "sft", "domain"}
    assert deltas["pretrain"]["uptake"] == {"web": 6.0} and deltas["pretrain"]["forgetting"] == {}
    assert deltas["sft"]["uptake"] == {"chat": 3.0}
    assert deltas["sft"]["forgetting"] == {"web": 0.5}
    assert deltas["domain"]["uptake"] == {"law": 4.0}
    assert deltas["domain"]["forgetting"] == {"chat": 2.0, "web": -0.25}  # web improved thanks to replay
    assert deltas["domain"]["forgetting_vs_best"] == {"chat": 2.0, "web": 0.25}  # web was best at 3.0


def test_repetition_rate_counts_repeated_four_grams():
    assert repetition_rate([1, 2, 3, 4, 5, 6]) == 0.0
    assert repetition_rate([7, 7, 7, 7, 7, 7, 7]) == pytest.approx(3 / 4)  # 4 four-grams, 1 distinct
    assert repetition_rate([1, 2, 3]) == 0.0


def test_chat_health_on_crafted_generations():
    eos = 2
    generations = [[5, 6, eos, 9, 9], [3, 4, 5, 6, 3, 4, 5, 6], [8, eos]]
    health = summarise(generations, eos, max_new_tokens=8)
    assert health["ended"] == pytest.approx(2 / 3)
    assert health["length"] == pytest.approx((3 + 8 + 2) / 3)
    assert health["repetition"] == pytest.approx((0 + 1 / 5 + 0) / 3)


def test_training_curves_keep_the_last_line_of_a_redone_step_and_count_tokens_across_stages(tmp_path):
    lines = [
        {"stage": "a", "step": 5, "tokens": {"x": 100}, "loss": 3.0},
        {"stage": "a", "step": 10, "tokens": {"x": 200}, "loss": 2.5},
        {"stage": "a", "step": 10, "tokens": {"x": 200}, "loss": 2.4},  # redone after a restart
        {"stage": "b", "step": 5, "tokens": {"x": 30, "y": 20}, "loss": 2.0},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    curves = training_curves(str(path), ["a", "b"])
    assert [c["stage"] for c in curves] == ["a", "b"]
    assert [p["loss"] for p in curves[0]["points"]] == [3.0, 2.4]
    assert curves[1]["start"] == 200
    assert curves[1]["points"][0]["cumulative_tokens"] == 250
