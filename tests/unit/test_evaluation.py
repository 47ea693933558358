"""Uptake and forgetting arithmetic, chat health metrics, and training curves for the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixloop.evaluation.evaluate import iteration_deltas
from mixloop.evaluation.health import repetition_rate, summarise
from mixloop.evaluation.report import training_curves
from support import lineage_of, lineages_of, metrics_line


def test_uptake_and_forgetting_against_parent_and_best_ancestor():
    lineages = lineages_of(
        lineage_of("base"),
        lineage_of("pretrain", "base", ["web"]),
        lineage_of("sft", "pretrain", ["chat", "web"]),
        lineage_of("domain", "sft", ["law", "web"]),
    )
    loss = {
        "base": {"web": 9.0, "chat": 9.0, "law": 9.0},
        "pretrain": {"web": 3.0, "chat": 5.0, "law": 7.0},
        "sft": {"web": 3.5, "chat": 2.0, "law": 6.5},
        "domain": {"web": 3.25, "chat": 4.0, "law": 2.5},
    }
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
        metrics_line("a", 5, {"x": 100}, {"x": 3.0}),
        metrics_line("a", 10, {"x": 200}, {"x": 2.5}),
        metrics_line("a", 10, {"x": 200}, {"x": 2.4}),  # redone after a restart
        metrics_line("b", 5, {"x": 30, "y": 20}, {"x": 2.0}),
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    curves = training_curves(str(path), ["a", "b"])
    assert [c.stage for c in curves] == ["a", "b"]
    assert [p.loss for p in curves[0].points] == [3.0, 2.4]
    assert curves[1].start == 200
    assert curves[1].tokens_at(curves[1].points[0]) == 250


def test_eval_loss_of_a_known_case_is_log_vocabulary(tmp_path, trained_tokenizer):
    """A model whose logits are all equal predicts uniformly: its loss is ln(V) on every supervised
    token, whatever the rows; the token count is the number of supervised targets."""
    import math

    import torch

    from mixloop.data.packing import Packer
    from mixloop.data.store import MANIFEST, write_shard
    from mixloop.data.tokenizer import encode_chats, encode_texts
    from mixloop.storage.fs import write_json
    from mixloop.train.heldout import evaluate_model
    from mixloop.train.model import model_config, new_model

    docs = [
        doc for record in encode_texts(trained_tokenizer, ["the cat sat on the mat", "hello world"]) for doc in record
    ]
    docs += encode_chats(
        trained_tokenizer, [[{"role": "user", "content": "why"}, {"role": "assistant", "content": "yes"}]]
    )[0]
    packer = Packer(16, trained_tokenizer.pad_token_id, split_documents=True)
    rows = [row for ids, sup in docs for row in packer.add(ids, sup)] + list(packer.flush())
    folder = tmp_path / "packed"
    write_shard(str(folder), "00000-00000", rows)
    write_json(
        str(folder / MANIFEST), {"key": "k", "seq_len": 16, "shards": [{"name": "00000-00000", "rows": len(rows)}]}
    )

    model = new_model(model_config("micro", None, trained_tokenizer), seed=0).eval()
    with torch.no_grad():
        model.model.norm.weight.zero_()  # hidden states -> 0, so every logit is 0
    result = evaluate_model(model, str(folder), max_rows=100)
    assert result["loss"] == pytest.approx(math.log(model.config.vocab_size), rel=1e-5)
    expected_targets = sum(int(sup[1:].sum()) for _, sup in docs)  # within-document next tokens only
    cuts = len(rows) - 1  # text continuing into the next row loses the one target at the cut
    assert expected_targets - cuts <= result["tokens"] <= expected_targets
    assert result["rows"] == len(rows)
    assert result["perplexity"] == pytest.approx(model.config.vocab_size, rel=1e-4)


def test_chat_health_prompts_come_from_every_file_of_a_glob_and_from_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mixloop.evaluation.health import eval_prompts

    def chat(question):
        return {"conversations": [{"role": "user", "content": question}, {"role": "assistant", "content": "ok"}]}

    (tmp_path / "eval-0.jsonl").write_text(json.dumps(chat("first?")) + "\n{broken\n")
    (tmp_path / "eval-1.jsonl").write_text(
        json.dumps({"conversations": [{"role": "assistant", "content": "hello"}]})
        + "\n"
        + json.dumps(chat("second?"))
        + "\n"
    )
    prompts = eval_prompts(str(tmp_path / "eval-*.jsonl"), 5)
    assert [p[-1]["content"] for p in prompts] == ["first?", "second?"]  # bad and prompt-less chats skipped
    assert eval_prompts(str(tmp_path / "eval-*.jsonl"), 1) == [[{"role": "user", "content": "first?"}]]

    pq.write_table(pa.Table.from_pylist([chat("from parquet?")]), tmp_path / "eval.parquet")
    assert eval_prompts(str(tmp_path / "eval.parquet"), 3) == [[{"role": "user", "content": "from parquet?"}]]


def test_scores_take_each_tasks_headline_and_call_a_change_only_beyond_its_noise(tmp_path):
    from mixloop.evaluation.harness import TaskScore
    from mixloop.evaluation.knowledge import VersionScores
    from mixloop.evaluation.report import write_report
    from mixloop.evaluation.scores import format_scores, headlines, score_deltas

    def scored(facts: float, chat: float, stderr: float) -> VersionScores:
        metrics = [("facts", "acc_norm", facts - 0.1), ("facts", "acc", facts), ("chat", "contains", 1.0)]
        metrics += [("chat", "exact_match", chat)]
        scores = tuple(
            TaskScore(task=t, metric=m, value=v, stderr=stderr, samples=40, kind="probe") for t, m, v in metrics
        )
        return VersionScores(key="k", folder="f", scores=scores, seconds=1.0, lm_eval_version="0.4.13")

    matrix = headlines(
        {"base": scored(0.30, 0.0, 0.07), "sft": scored(0.90, 0.5, 0.05), "next": scored(0.95, 0.5, 0.05)}
    )
    assert {t: s.metric for t, s in matrix["sft"].items()} == {"chat": "exact_match", "facts": "acc"}
    lineages = lineages_of(
        lineage_of("base"), lineage_of("sft", "base", ["facts"]), lineage_of("next", "sft", ["facts"])
    )
    deltas = score_deltas(matrix, lineages)
    assert deltas["sft"]["facts"]["change"] == pytest.approx(0.6) and deltas["sft"]["facts"]["significant"]
    assert not deltas["next"]["facts"]["significant"]  # +0.05 against a difference stderr of 0.071
    table = format_scores(matrix).splitlines()
    assert table[0].split() == ["version", "chat", "(exact_match)", "facts", "(acc)"]
    assert table[2].split() == ["sft", "0.500±0.050", "0.900±0.050"]
    page = Path(write_report(str(tmp_path), lineages, {}, {}, {}, scores=matrix, score_deltas=deltas)).read_text()
    assert "<td>sft</td><td>0.500±0.050</td><td>0.900±0.050</td>" in page
    assert "<td>next</td><td>facts</td><td>+0.050</td><td>0.071</td><td>no (noise)</td>" in page
    assert (tmp_path / "report" / "scores.png").stat().st_size and (tmp_path / "report" / "score_changes.png").exists()
