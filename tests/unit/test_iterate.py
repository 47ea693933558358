"""New data in, gated versions out, without Ray: the gate's verdicts, the `current` alias with promote
and rollback, `mixloop add --dry-run` and its refusals, and how the inbox is read."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest
import yaml

from mixloop.cli import main
from mixloop.config import GateConfig, load_spec, spec_from_data
from mixloop.config.edit import append_entries, replace_validated
from mixloop.errors import MixloopError, SpecError
from mixloop.evaluation.scores import Score
from mixloop.runs.iterate import NewCorpus, plan, ready_corpora
from mixloop.versioning import gate
from mixloop.versioning.lineage import GateVerdict
from mixloop.versioning.registry import current_state, current_version, list_versions, set_current
from support import lineage_of, lineages_of, micro_versions

LINEAGES = lineages_of(  # base -> pre (web) -> sft (web, chats) -> law (law, web) -> law-sft
    lineage_of("base"),
    lineage_of("pre", "base", ["web"]),
    lineage_of("sft", "pre", {"chats": (0.9, 0.9), "web": (0.1, 0.1)}),
    lineage_of("law", "sft", ["law", "web"]),
    lineage_of("law-sft", "law", ["chats", "law"]),
)


def matrix(**losses: dict) -> dict:
    return {version: {corpus: {"loss": loss} for corpus, loss in row.items()} for version, row in losses.items()}


MATRIX = matrix(sft={"web": 3.0, "chats": 2.0, "law": 4.0}, **{"law-sft": {"web": 3.2, "chats": 2.05, "law": 3.0}})
HEALTH = {"law-sft": {"chats": {"ended": 0.75, "repetition": 0.2}}}


def verdict(**bounds) -> GateVerdict:
    return gate.judge(GateConfig(**bounds), "law-sft", "sft", MATRIX, HEALTH, LINEAGES)


def test_the_gate_checks_forgetting_uptake_and_chat_health_against_the_current_version():
    passed = verdict(max_forgetting=0.25, min_uptake=0.5, min_ended=0.5, max_repetition=0.3)
    assert passed.passed and passed.against == "sft" and not passed.failed
    assert passed.checks == [
        "forgetting on chats: +0.0500 (at most 0.2500)",
        "forgetting on web: +0.2000 (at most 0.2500)",
        "uptake on law: +1.0000 (at least 0.5000)",
        "answers ended on chats: 75% (at least 50%)",
        "repetition on chats: 0.200 (at most 0.300)",
    ]
    # A share is of the current version's loss: 5% of web's 3.0 is 0.15 < 0.2; per corpus, others unchecked.
    relative = verdict(max_forgetting={"web": " 5% "})  # as written in YAML, spaces and all
    assert not relative.passed and relative.failed == ["forgetting on web: +0.2000 (at most 0.1500)"]
    assert verdict(min_uptake="30%").failed == ["uptake on law: +1.0000 (at least 1.2000)"]
    assert verdict(min_ended=0.8).failed == ["answers ended on chats: 75% (at least 80%)"]
    assert verdict().passed and verdict().checks == []  # bounds left out are not checked


def test_uptake_that_cannot_be_measured_fails_and_the_first_version_passes_without_comparison():
    no_eval = matrix(sft={"web": 3.0}, **{"law-sft": {"web": 3.0}})
    judged = gate.judge(GateConfig(min_uptake=0.1), "law-sft", "sft", no_eval, {}, LINEAGES)
    assert not judged.passed and judged.failed == ["uptake on law: not measured (it has no eval split)"]
    first = gate.judge(GateConfig(min_uptake=0.1), "sft", None, no_eval, {}, LINEAGES)
    assert first.passed and first.checks == ["no current version to compare with"]
    assert gate.judge(None, "law-sft", "sft", no_eval, {}, LINEAGES).checks == ["the pipeline has no gate"]


def test_score_bounds_fail_beyond_the_noise_and_pass_within_it_saying_so():
    """A fall of 0.10 in accuracy: with standard errors of 0.02 (the difference's is 0.028, z = 1.96
    gives 0.055) it is beyond the noise of a 0.02 bound; with 0.09 each (0.127 x 1.96 = 0.25) it is
    within it. The verdict names the numbers either way."""
    scores = {
        "sft": {"facts": Score("acc", 0.90, 0.02, 400)},
        "law-sft": {"facts": Score("acc", 0.80, 0.02, 400)},
    }
    failed = gate.judge(GateConfig(max_score_drop=0.02), "law-sft", "sft", MATRIX, {}, LINEAGES, scores)
    assert not failed.passed
    assert failed.failed == ["score drop on facts (acc): +0.1000 ± 0.0283 (at most 0.0200)"]
    noisy = {v: {"facts": Score("acc", s["facts"].value, 0.09, 24)} for v, s in scores.items()}
    within = gate.judge(GateConfig(max_score_drop={"facts": 0.02}), "law-sft", "sft", MATRIX, {}, LINEAGES, noisy)
    assert within.passed and within.checks == [
        "score drop on facts (acc): +0.1000 ± 0.1273 (at most 0.0200; crossed by 0.0800, within the noise "
        "(1.96 × 0.1273))"
    ]
    floor = gate.judge(
        GateConfig(min_score={"facts": 0.95, "other": 0.5}), "law-sft", "sft", MATRIX, {}, LINEAGES, scores
    )
    assert floor.failed == [
        "score on facts (acc): 0.8000 ± 0.0200 (at least 0.9500)",
        "score on other: not measured (no such benchmark task or probe)",
    ]
    # A lower confidence forgives less noise: at 0.3, z = 0.39 and the 0.08 crossing is beyond 0.39 x 0.127.
    assert not gate.judge(
        GateConfig(max_score_drop=0.02, confidence=0.3), "law-sft", "sft", MATRIX, {}, LINEAGES, noisy
    ).passed


def test_loss_bounds_weigh_the_standard_errors_of_both_losses():
    """Forgetting of +0.2 on web against a bound of 0.15: beyond the noise when the losses are measured to
    0.01, within it when to 0.05 (0.071 x 1.96 = 0.139 > 0.05)."""

    def with_stderr(stderr: float) -> dict:
        return {v: {c: {"loss": r["loss"], "stderr": stderr} for c, r in row.items()} for v, row in MATRIX.items()}

    sure = gate.judge(GateConfig(max_forgetting={"web": 0.15}), "law-sft", "sft", with_stderr(0.01), {}, LINEAGES)
    assert sure.failed == ["forgetting on web: +0.2000 ± 0.0141 (at most 0.1500)"]
    noisy = gate.judge(GateConfig(max_forgetting={"web": 0.15}), "law-sft", "sft", with_stderr(0.05), {}, LINEAGES)
    assert noisy.passed and "within the noise" in noisy.checks[0]


@pytest.fixture
def versions(tmp_path, trained_tokenizer):
    """Two published micro versions, v1 then v2 (its child), in tmp_path/run."""
    return micro_versions(tmp_path, trained_tokenizer, [("v1", None), ("v2", "v1")])


def test_current_follows_verdicts_promotions_and_rollbacks_and_loads_as_a_path(versions, capsys):
    from transformers import AutoModelForCausalLM

    workdir = str(versions)
    assert gate.record(workdir, "v1", GateVerdict(passed=True, against=None)).gate.passed
    rejected = GateVerdict(passed=False, against="v1", checks=["x"], failed=["forgetting on web: +1 (at most 0.1)"])
    assert not gate.record(workdir, "v2", rejected).gate.passed
    assert current_version(workdir) == "v1"
    assert json.loads((versions / "models/v2/lineage.json").read_text())["gate"]["failed"] == rejected.failed
    assert os.readlink(versions / "models/current") == "v1"
    assert AutoModelForCausalLM.from_pretrained(versions / "models/current") is not None
    assert list(list_versions(workdir)) == ["v1", "v2"]  # the link is not a version

    assert main(["models", "list", workdir]) == 0
    listing = capsys.readouterr().out
    rows = {line.split()[0]: line for line in listing.splitlines()[1:]}
    assert rows["v1"].endswith("CURRENT, passed") and rows["v2"].endswith(
        "failed against v1: forgetting on web: +1 (at most 0.1)"
    )
    assert main(["models", "promote", workdir, "v2", "--reason", "checked by hand"]) == 0
    assert current_version(workdir) == "v2" and os.readlink(versions / "models/current") == "v2"
    promotions = json.loads((versions / "models/v2/lineage.json").read_text())["promotions"]
    assert promotions[0]["from"] == "v1" and promotions[0]["reason"] == "checked by hand"
    capsys.readouterr()
    assert main(["models", "path", workdir, "current"]) == 0
    assert capsys.readouterr().out.strip() == str(versions / "models/v2")
    assert main(["models", "rollback", workdir, "--reason", "worse answers"]) == 0
    assert current_version(workdir) == "v1"
    assert [entry["version"] for entry in current_state(workdir)["history"]] == ["v1", "v2", "v1"]
    assert "rollback from v2: worse answers" in current_state(workdir)["history"][-1]["why"]
    # A second rollback steps further back than the entry the first restored, never forth again to v2.
    assert main(["models", "rollback", workdir]) == 1
    assert "no earlier current version to roll back to" in capsys.readouterr().err
    set_current(f"file://{workdir}", "v2", "a workdir given as a file:// URI")
    assert current_version(workdir) == "v2" and os.readlink(versions / "models/current") == "v2"


def test_no_current_version_and_a_stage_named_current_are_refused_clearly(tmp_path, capsys):
    assert main(["models", "path", str(tmp_path), "current"]) == 1
    assert "has no current version yet" in capsys.readouterr().err
    data = pipeline_data(tmp_path)
    data["stages"][0]["name"] = "current"
    with pytest.raises(SpecError, match="stages\\[0\\].name: 'current' names the version in use"):
        spec_from_data(data, str(tmp_path))
    data = pipeline_data(tmp_path)
    data["gate"] = {"max_forgetting": {"nope": 0.1, "web": "five%"}}
    with pytest.raises(SpecError) as error:
        spec_from_data(data, str(tmp_path))
    assert "gate.max_forgetting.nope: no corpus named 'nope'" in str(error.value)
    assert "gate.max_forgetting.web: 'five%' is neither a number nor a share" in str(error.value)


def write_lines(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def pipeline_data(tmp_path: Path) -> dict:
    write_lines(tmp_path / "web.jsonl", [f"the web page number {i} says hello." for i in range(40)])
    (tmp_path / "chats.jsonl").write_text(
        json.dumps({"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
        + "\n"
    )
    return {
        "name": "grow",
        "workdir": str(tmp_path / "run"),
        "tokenizer": {"train": {"vocab_size": 300}},
        "model": {"preset": "micro"},
        "corpora": {"web": {"kind": "text", "path": "web.jsonl"}, "chats": {"kind": "chat", "path": "chats.jsonl"}},
        "defaults": {"seq_len": 32, "global_batch_tokens": 128, "micro_batch_rows": 4},
        "stages": [
            {"name": "pre", "mixture": {"web": 1}, "tokens": 512},
            {"name": "sft", "mixture": {"chats": 0.9, "web": 0.1}, "tokens": 256},
        ],
    }


def test_the_iteration_template_replays_old_text_and_fine_tunes_on_old_and_new_chats(tmp_path):
    data = pipeline_data(tmp_path)
    data["iterate"] = {
        "replay": 0.4,
        "passes": 2,
        "lr": {"peak": 0.002},
        "finetune": {"tokens": 0.5, "new_share": 0.5, "text_share": 0.2},
    }
    spec = spec_from_data(data, str(tmp_path))
    new = NewCorpus("law", "law.jsonl", chat="law-qa.jsonl", eval="law-eval.jsonl")
    corpora, stages = plan(spec, new, 1000, {"web", "chats"}, "sft")
    assert corpora == {
        "law": {"kind": "text", "path": "law.jsonl", "eval": "law-eval.jsonl"},
        "law-chat": {"kind": "chat", "path": "law-qa.jsonl"},
    }
    assert stages[0] == {
        "name": "law",
        "from": "sft",
        "mixture": {"law": 0.6, "web": 0.4},
        "tokens": 3333,
        "lr": {"peak": 0.002, "warmup": 0.05, "warmup_from": "zero", "decay": "cosine"},
    }
    assert stages[1]["name"] == "law-sft" and stages[1]["tokens"] == 1666
    assert stages[1]["mixture"] == {"law-chat": 0.4, "chats": 0.4, "law": 0.2}
    # Without chats anywhere, no fine-tune; without old text, no replay.
    data["corpora"].pop("chats")
    data["stages"] = data["stages"][:1]
    corpora, stages = plan(spec_from_data(data, str(tmp_path)), NewCorpus("law", "law.jsonl"), 1000, set(), None)
    assert [s["name"] for s in stages] == ["law"] and stages[0]["mixture"] == {"law": 1.0}
    assert stages[0]["tokens"] == 2000 and "from" not in stages[0]


def test_add_dry_run_prints_and_validates_the_stages_and_writes_nothing(tmp_path, capsys):
    spec_path = tmp_path / "pipeline.yaml"
    spec_path.write_text("# my pipeline: comments stay\n" + yaml.safe_dump(pipeline_data(tmp_path), sort_keys=False))
    write_lines(tmp_path / "law.jsonl", [f"the court rules on case {i} today." for i in range(30)])
    before = spec_path.read_text()
    assert main(["add", str(spec_path), "law", "--text", str(tmp_path / "law.jsonl"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "iteration law: adds to" in out and "- name: law\n" in out and "- name: law-sft" in out
    assert "valid with the iteration (dry run: nothing written, nothing trained)" in out
    assert spec_path.read_text() == before and not (tmp_path / "run" / "models").exists()
    assert not list(tmp_path.glob(".pipeline.yaml.*"))

    assert main(["add", str(spec_path), "web", "--text", str(tmp_path / "law.jsonl"), "--dry-run"]) == 1
    assert "web already in the spec. Fix: add the corpus under a new name" in capsys.readouterr().err
    assert main(["add", str(spec_path), "Law Books", "--text", "law.jsonl", "--dry-run"]) == 1
    assert "cannot name a corpus and its stages" in capsys.readouterr().err
    assert main(["add", str(spec_path), "law", "--text", str(tmp_path / "law.jsonl"), "--tune", "3"]) == 1
    assert "Fix: give --tune 3 or more, and --eval" in capsys.readouterr().err
    write_lines(tmp_path / "empty.jsonl", [])
    assert main(["add", str(spec_path), "empty", "--text", str(tmp_path / "empty.jsonl"), "--dry-run"]) == 1
    assert "no text records" in capsys.readouterr().err
    assert spec_path.read_text() == before


SPEC_TEXT = """\
# my pipeline
name: grow
workdir: run
tokenizer: {train: {vocab_size: 300}}
model: {preset: micro}
defaults: {seq_len: 32, global_batch_tokens: 128, micro_batch_rows: 4}
corpora:
    web: {kind: text, path: web.jsonl}  # crawled
    chats: {kind: chat, path: chats.jsonl}

stages:
    -   name: pre
        mixture:
            web: 1
        tokens: 512
    -   name: sft
        mixture: {chats: 0.9, web: 0.1}  # mostly chats
        tokens: 256

# evaluation
eval_rows: 8
"""


def add_law(spec_path: Path, tmp_path: Path) -> dict:
    """Append the iteration `mixloop add SPEC law` plans, as `add` does; the stage it added."""
    write_lines(tmp_path / "law.jsonl", ["the court rules."])
    corpora, stages = plan(load_spec(spec_path), NewCorpus("law", "law.jsonl"), 100, {"web"}, None)
    replace_validated(spec_path, append_entries(spec_path, {"corpora": corpora, "stages": stages}), "adding law")
    return stages[-1]


def test_add_appends_to_the_spec_keeping_its_comments_and_layout(tmp_path):
    pipeline_data(tmp_path)  # the data files
    spec_path = tmp_path / "pipeline.yaml"
    spec_path.write_text(SPEC_TEXT)
    stage = add_law(spec_path, tmp_path)
    # Comments, key order, indentation (4 spaces, dashes at 4) and flow entries stay; the new entries are
    # written as the last one of their section is, and what followed the stages still follows them.
    # (Not kept: spaces that align values, as in `web:   {...}`; ruamel writes one.)
    law_corpus = "    law: {kind: text, path: law.jsonl}\n"
    law_stage = (
        "    -   name: law\n"
        "        mixture: {law: 0.5, web: 0.5}\n"  # as sft's mixture is written
        "        tokens: 200\n"
        "        lr:\n"  # sft has no lr to follow: block style
        "            warmup: 0.05\n"
        "            warmup_from: zero\n"
        "            decay: cosine\n"
    )
    assert spec_path.read_text() == SPEC_TEXT.replace("\n\nstages", "\n" + law_corpus + "\nstages").replace(
        "\n# evaluation", law_stage + "\n# evaluation"
    )
    spec = load_spec(spec_path)
    assert list(spec.config.corpora) == ["web", "chats", "law"] and spec.stage_names() == ["pre", "sft", "law"]
    assert yaml.safe_load(spec_path.read_text())["stages"][-1] == stage and spec.config.eval_rows == 8

    before = spec_path.read_text()  # an edit that does not validate leaves the file as it was
    with pytest.raises(MixloopError, match="would make .* invalid"):
        replace_validated(spec_path, append_entries(spec_path, {"stages": [{"name": "x", "tokens": 9}]}), "adding x")
    assert spec_path.read_text() == before and not list(tmp_path.glob(".pipeline.yaml.*"))


def test_add_edits_a_flow_style_spec(tmp_path):
    data = pipeline_data(tmp_path)
    spec_path = tmp_path / "pipeline.yaml"
    head = "\n".join(f"{key}: {json.dumps(value)}" for key, value in data.items() if key not in ("corpora", "stages"))
    spec_path.write_text(
        f"{head}\n"
        "corpora: {web: {kind: text, path: web.jsonl}, chats: {kind: chat, path: chats.jsonl}}  # all of them\n"
        "stages: [{name: pre, mixture: {web: 1}, tokens: 512}, {name: sft, mixture: {chats: 1}, tokens: 256}]\n"
        "# the end\n"
    )
    stage = add_law(spec_path, tmp_path)
    text = spec_path.read_text()
    assert "law: {kind: text, path: law.jsonl}} # all of them\n" in text and text.endswith("\n# the end\n")
    spec = load_spec(spec_path)
    assert list(spec.config.corpora) == ["web", "chats", "law"] and spec.stage_names() == ["pre", "sft", "law"]
    assert yaml.safe_load(text)["stages"][-1] == stage
    # It edits again; new values read back as written (PyYAML reads a plain `no` as false, 1e-05 as a string).
    more = {"corpora": {"no": {"kind": "text", "path": "law.jsonl"}}}
    more["stages"] = [{"name": "no", "mixture": {"no": 1e-05, "chats": 1}, "tokens": 256}]
    replace_validated(spec_path, append_entries(spec_path, more), "adding no")
    spec = load_spec(spec_path)
    assert spec.stage_names()[-1] == "no" and list(spec.config.corpora)[-1] == "no"
    assert yaml.safe_load(spec_path.read_text())["stages"][-1]["mixture"] == {"no": 1e-05, "chats": 1}


def test_an_edit_that_would_drop_a_comment_is_refused(tmp_path):
    pipeline_data(tmp_path)
    spec_path = tmp_path / "pipeline.yaml"
    spec_path.write_text(SPEC_TEXT.replace("web: {kind: text, path", "web: {\n      kind: text,  # plain\n      path"))
    assert load_spec(spec_path).config.corpora["web"].path == "web.jsonl"
    before = spec_path.read_text()
    with pytest.raises(MixloopError, match="would drop the comment '# plain'.*Fix: move the comment out"):
        add_law(spec_path, tmp_path)
    assert spec_path.read_text() == before


def test_the_inbox_yields_ready_corpora_in_arrival_order_with_their_files(tmp_path, caplog):
    inbox = tmp_path / "inbox"
    for name, files in (
        ("Zoo Law", {"text.jsonl": ""}),
        ("alpha", {"text.parquet": "", "eval.jsonl": "", "chat.jsonl": ""}),
    ):
        (inbox / name).mkdir(parents=True)
        for file, content in files.items():
            (inbox / name / file).write_text(content)
    (inbox / "pending").mkdir()
    (inbox / "pending" / "text.jsonl").write_text("")  # no marker yet: still being written
    (inbox / "Zoo Law" / "_READY").write_text("")
    time.sleep(0.05)
    (inbox / "alpha" / "manifest.json").write_text(json.dumps({"text": "text.parquet"}))
    found = ready_corpora(str(inbox))
    assert [uri for uri, _ in found] == [str(inbox / "Zoo Law"), str(inbox / "alpha")]
    assert found[0][1] == NewCorpus("zoo-law", str(inbox / "Zoo Law" / "text.jsonl"))
    assert found[1][1] == NewCorpus(
        "alpha",
        str(inbox / "alpha" / "text.parquet"),
        str(inbox / "alpha" / "chat.jsonl"),
        str(inbox / "alpha" / "eval.jsonl"),
    )
    (inbox / "broken").mkdir()
    (inbox / "broken" / "_READY").write_text("")
    caplog.set_level(logging.INFO, logger="mixloop")  # a ready folder without a text file is named, the others come
    assert [uri for uri, _ in ready_corpora(str(inbox))] == [
        str(inbox / "Zoo Law"),
        str(inbox / "alpha"),
    ]
    assert len(caplog.records) == 1 and "broken: no text file" in caplog.messages[0]
    assert caplog.records[0].levelno == logging.WARNING


def test_a_corpus_that_fails_in_watch_is_recorded_with_why_and_left_out_of_the_spec(tmp_path):
    from mixloop.runs.iterate import _take

    spec_path = tmp_path / "pipeline.yaml"
    spec_path.write_text(yaml.safe_dump(pipeline_data(tmp_path), sort_keys=False))
    before = spec_path.read_text()
    state = tmp_path / "run" / "inbox.json"
    empty = NewCorpus("empty", str(write_lines(tmp_path / "empty.jsonl", [])))
    assert not _take(str(spec_path), str(state), "inbox/empty", empty, None, None)
    entry = json.loads(state.read_text())["corpora"]["inbox/empty"]
    assert entry["status"] == "failed" and "no text records" in entry["error"]
    assert spec_path.read_text() == before  # a later start adds it again instead of finishing an iteration
