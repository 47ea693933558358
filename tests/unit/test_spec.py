"""The pipeline spec: every mistake reported at once, with its YAML path and a fix; settings layered."""

from __future__ import annotations

import copy
import json
import os
import re
import select
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
import yaml
from fsspec.implementations.memory import MemoryFileSystem

from mixloop.cli import main
from mixloop.config import BUILTIN_DEFAULTS, PRESET_POSITIONS, QWEN3_DEFAULT_POSITIONS, check_spec_data, load_spec
from mixloop.errors import SpecError

JOBS = sorted((Path(__file__).parents[2] / "jobs").glob("*.yaml"))

BASE = {
    "name": "unit",
    "workdir": "runs",
    "tokenizer": {"train": {"vocab_size": 300}},
    "model": {"preset": "micro"},
    "corpora": {
        "web": {"kind": "text", "path": "data/web-*.jsonl"},
        "chat": {"kind": "chat", "path": "data/chat.jsonl"},
    },
    "defaults": {"seq_len": 64, "global_batch_tokens": 2048, "micro_batch_rows": 8},
    "stages": [
        {"name": "pretrain", "mixture": {"web": 1.0}, "tokens": 100_000},
        {"name": "sft", "mixture": {"chat": 0.8, "web": 0.2}, "tokens": 50_000},
    ],
}


KNOWN_STAGE_HASH = "613001b8501464ab"  # BASE's first stage, as mixloop 0.1.0 hashed it


@pytest.fixture
def write_spec(tmp_path):
    """Write BASE, changed by `edit`, as tmp_path/spec.yaml next to a few data files."""
    (tmp_path / "data").mkdir()
    for name in ("web-0.jsonl", "web-1.jsonl"):
        (tmp_path / "data" / name).write_text('{"text": "hello"}\n')
    (tmp_path / "data" / "chat.jsonl").write_text(
        '{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
    )

    def write(edit=None) -> Path:
        data = copy.deepcopy(BASE)
        if edit:
            edit(data)
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


def _problems(write_spec, edit) -> tuple[str, list[str]]:
    with pytest.raises(SpecError) as info:
        load_spec(write_spec(edit))
    message = str(info.value)
    return message, [line[4:] for line in message.splitlines() if line.startswith("  - ")]


def _only_problem(write_spec, edit) -> str:
    _, problems = _problems(write_spec, edit)
    assert len(problems) == 1, problems
    return problems[0]


def test_base_spec_is_valid(write_spec):
    spec = load_spec(write_spec())
    assert spec.stage_names() == ["pretrain", "sft"]


def test_misspelt_key_names_its_path_and_suggests_the_right_one(write_spec):
    def edit(data):
        stage = data["stages"][0]
        stage["mixtrue"] = stage.pop("mixture")

    message, problems = _problems(write_spec, edit)
    unknown = [p for p in problems if p.startswith("stages[0].mixtrue")]
    assert len(unknown) == 1
    assert "unknown key" in unknown[0] and "did you mean 'mixture'?" in unknown[0]
    assert "spec.yaml" in message


def test_misspelt_nested_key_suggests_the_field(write_spec):
    problem = _only_problem(write_spec, lambda d: d["defaults"].update(lr={"warmpu": 0.1}))
    assert problem.startswith("defaults.lr.warmpu:") and "did you mean 'warmup'?" in problem


def test_wrong_type_names_the_path_the_value_and_what_the_field_is(write_spec):
    problem = _only_problem(write_spec, lambda d: d["stages"][1].update(tokens="many"))
    assert problem == (
        "stages[1].tokens: expected a whole number, got 'many'. Fix: write a whole number such as "
        "160000 (Token budget of the stage (rounded up to whole optimizer steps))."
    )


def test_missing_required_field_is_named(write_spec):
    problem = _only_problem(write_spec, lambda d: d["stages"][1].pop("tokens"))
    assert problem.startswith("stages[1].tokens: required but missing") and "Fix: add it" in problem


def test_mixture_naming_an_unknown_corpus(write_spec):
    problem = _only_problem(write_spec, lambda d: d["stages"][1]["mixture"].update(books=0.5))
    assert problem.startswith("stages[1].mixture.books: unknown corpus")
    assert "Fix:" in problem and "web" in problem and "chat" in problem


def test_duplicate_stage_names(write_spec):
    problem = _only_problem(write_spec, lambda d: d["stages"][1].update(name="pretrain"))
    assert problem.startswith("stages[1].name:") and "'pretrain'" in problem and "unique" in problem


def test_global_batch_not_a_multiple_of_seq_len(write_spec):
    problem = _only_problem(write_spec, lambda d: d["stages"][0].update(global_batch_tokens=2000))
    assert problem.startswith("stages[0].global_batch_tokens:")
    assert "2000" in problem and "seq_len 64" in problem and "Fix:" in problem


def test_global_batch_from_defaults_is_checked_for_every_stage(write_spec):
    _, problems = _problems(write_spec, lambda d: d["defaults"].update(global_batch_tokens=2000))
    assert [p.split(":")[0] for p in problems] == [
        "stages[0].global_batch_tokens",
        "stages[1].global_batch_tokens",
    ]


def test_corpus_path_matching_no_file(write_spec):
    problem = _only_problem(write_spec, lambda d: d["corpora"]["web"].update(path="data/missing-*.jsonl"))
    assert problem.startswith("corpora.web.path: no file matches")
    assert "missing-*.jsonl" in problem and "Fix:" in problem


def test_loss_weights_naming_an_unknown_corpus(write_spec):
    problem = _only_problem(write_spec, lambda d: d["stages"][1].update(loss_weights={"books": 2.0}))
    assert problem.startswith("stages[1].loss_weights.books:") and "Fix:" in problem


def test_default_loss_weights_naming_an_unknown_corpus(write_spec):
    # A typo here would otherwise be dropped silently when stages are resolved.
    _, problems = _problems(write_spec, lambda d: d["defaults"].update(loss_weights={"wbe": 2.0}))
    assert len(problems) == 1 and problems[0].startswith("defaults.loss_weights.wbe:"), problems


def test_from_naming_a_later_stage(write_spec):
    problem = _only_problem(write_spec, lambda d: d["stages"][0].update({"from": "sft"}))
    assert problem.startswith("stages[0].from:") and "'sft'" in problem and "earlier stage" in problem
    assert "Fix: use base" in problem


def test_from_an_earlier_stage_or_base_is_fine(write_spec):
    def edit(data):
        data["stages"][0]["from"] = "base"
        data["stages"][1]["from"] = "pretrain"

    assert [s.start_from for s in load_spec(write_spec(edit)).config.stages] == ["base", "pretrain"]


def test_several_semantic_problems_are_reported_in_one_error(write_spec):
    def edit(data):
        data["corpora"]["web"]["path"] = "data/nothing.jsonl"
        data["stages"][0]["mixture"]["books"] = 1.0
        data["stages"][0]["from"] = "sft"
        data["stages"][1]["name"] = "pretrain"
        data["stages"][1]["global_batch_tokens"] = 1000

    message, problems = _problems(write_spec, edit)
    assert len(problems) == 5, problems
    assert message.splitlines()[0].endswith("5 problem(s) in the pipeline spec:")
    paths = {p.split(":")[0] for p in problems}
    assert paths == {
        "corpora.web.path",
        "stages[0].mixture.books",
        "stages[0].from",
        "stages[1].name",
        "stages[1].global_batch_tokens",
    }
    assert all("Fix:" in p for p in problems)


def test_several_structural_problems_are_reported_in_one_error(write_spec):
    def edit(data):
        data["modle"] = data.pop("model")
        data["stages"][0]["tokens"] = -5
        data["corpora"]["web"]["kind"] = "audio"

    _, problems = _problems(write_spec, edit)
    paths = sorted(p.split(":")[0] for p in problems)
    assert paths == ["corpora.web.kind", "model", "modle", "stages[0].tokens"]
    assert "did you mean 'model'?" in next(p for p in problems if p.startswith("modle"))


def test_missing_spec_file_and_bad_yaml(tmp_path):
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)


# ---------------------------------------------------------------- the CLI


def test_cli_validate_exits_2_with_the_message_and_no_traceback(write_spec, capsys):
    path = write_spec(lambda d: d["stages"][1]["mixture"].update(books=0.5))
    assert main(["validate", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("mixloop: error: ")
    assert "stages[1].mixture.books: unknown corpus" in err
    assert "Traceback" not in err


def test_cli_validate_accepts_a_valid_spec(write_spec, capsys):
    assert main(["validate", str(write_spec())]) == 0
    out, err = capsys.readouterr()
    assert "valid" in out and "pretrain, sft" in out and err == ""


def test_cli_lines_reach_a_pipe_while_the_command_still_runs(write_spec):
    """Progress lines of a long run that writes to a file or pipe (Ray Jobs' logs, tee) appear as
    they are printed, not when a buffer fills or the process ends."""
    script = (
        f"import sys, time; from mixloop.cli import main; main(['validate', {str(write_spec())!r}]); time.sleep(60)"
    )
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # as on users' machines
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=environment)
    try:
        ready, _, _ = select.select([process.stdout], [], [], 30)
        assert ready and "valid pipeline" in process.stdout.readline()
        assert process.poll() is None
    finally:
        process.kill()
        process.wait()


# ---------------------------------------------------------------- resolved stages


def test_stage_settings_layer_builtin_then_defaults_then_stage(write_spec):
    def edit(data):
        data["defaults"].update(lr={"peak": 0.003, "warmup": 0.1}, workers=2, weight_decay=0.05)
        data["stages"][1].update(lr={"peak": 0.001}, seq_len=128, workers={"min": 1, "max": 2})

    pretrain, sft = (stage.as_json() for stage in load_spec(write_spec(edit)).resolved_stages())
    builtin = BUILTIN_DEFAULTS
    # builtin defaults fill what nobody sets
    assert pretrain["grad_clip"] == sft["grad_clip"] == builtin.grad_clip
    assert pretrain["checkpoint_every"] == builtin.checkpoint_every
    # defaults: override builtin
    assert pretrain["seq_len"] == 64 and pretrain["weight_decay"] == sft["weight_decay"] == 0.05
    assert (pretrain["min_workers"], pretrain["max_workers"]) == (2, 2)
    # the stage overrides defaults
    assert sft["seq_len"] == 128 and (sft["min_workers"], sft["max_workers"]) == (1, 2)
    # lr merges field by field: stage peak, defaults warmup, builtin decay and floor
    assert pretrain["lr"] == {**builtin.lr.model_dump(), "peak": 0.003, "warmup": 0.1}
    assert sft["lr"] == {**builtin.lr.model_dump(), "peak": 0.001, "warmup": 0.1}
    assert None not in sft["lr"].values()
    assert (sft["name"], sft["tokens"]) == ("sft", 50_000)


def test_mixture_weights_are_normalised_and_loss_weights_filled(write_spec):
    def edit(data):
        data["stages"][1]["mixture"] = {"chat": 3, "web": 1}
        data["stages"][1]["loss_weights"] = {"chat": 2.0}

    sft = load_spec(write_spec(edit)).resolved_stages()[1].as_json()
    assert sft["mixture"] == {
        "chat": {"from": pytest.approx(0.75), "to": pytest.approx(0.75)},
        "web": {"from": pytest.approx(0.25), "to": pytest.approx(0.25)},
    }
    assert sft["loss_weights"] == {"chat": 2.0, "web": 1.0}


def test_ramped_weight_is_normalised_at_each_end(write_spec):
    def edit(data):
        data["stages"][1]["mixture"] = {"chat": 0.7, "web": {"from": 0.3, "to": 0.1}}

    mixture = load_spec(write_spec(edit)).resolved_stages()[1].as_json()["mixture"]
    assert sum(w["from"] for w in mixture.values()) == pytest.approx(1.0)
    assert sum(w["to"] for w in mixture.values()) == pytest.approx(1.0)
    assert mixture["web"]["from"] == pytest.approx(0.3)
    assert mixture["web"]["to"] == pytest.approx(0.1 / 0.8)
    assert mixture["web"]["to"] < mixture["web"]["from"]


def test_a_resolved_stage_crosses_to_workers_as_json_and_comes_back_the_same(write_spec):
    from mixloop.config import ResolvedStage

    for stage in load_spec(write_spec()).resolved_stages():
        sent = json.loads(json.dumps(stage.as_json()))  # what Ray Train hands each worker
        assert ResolvedStage.model_validate(sent) == stage
        assert sent["mixture"]["web"].keys() == {"from", "to"}  # as the YAML names a ramp's ends


# ---------------------------------------------------------------- every shipped spec


def test_there_are_shipped_specs():
    assert JOBS, "jobs/ should hold at least the quickstart"


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_every_shipped_spec_validates(path):
    spec = load_spec(path)
    stages = [stage.as_json() for stage in spec.resolved_stages()]
    assert stages and all(re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", s["name"]) for s in stages)
    for stage in stages:
        assert sum(w["from"] for w in stage["mixture"].values()) == pytest.approx(1.0)
        assert stage["global_batch_tokens"] % stage["seq_len"] == 0


def test_loss_weights_that_silence_a_stage_or_are_ignored(write_spec):
    def edit(data):
        data["stages"][0]["loss_weights"] = {"web": 0.0}
        data["stages"][1].update(balance="token", loss_weights={"chat": 2.0})

    message, problems = _problems(write_spec, edit)
    assert any(p.startswith("stages[0].loss_weights:") and "learn nothing" in p for p in problems)
    assert any(p.startswith("stages[1].loss_weights:") and "balance: token" in p for p in problems)


def test_workdir_on_a_filesystem_fsspec_cannot_open_is_refused_before_any_work(write_spec):
    message, problems = _problems(write_spec, lambda data: data.update(workdir="nofs://bucket/run"))
    assert any(p.startswith("workdir: cannot use nofs://") and "Fix:" in p for p in problems)
    spec = load_spec(write_spec(lambda data: data.update(workdir="memory://bucket/run")))
    assert spec.workdir == "memory://bucket/run"
    assert not fsspec.filesystem("memory").exists("/bucket/run/.mixloop-write-probe"), "the probe is deleted"


def test_stage_hash_ignores_where_a_stage_runs_but_not_what_it_trains(write_spec):
    from mixloop.config import stage_hash

    def digest(edit):
        spec = load_spec(write_spec(edit))
        return stage_hash(spec.resolved_stages()[0], "parent")

    plain = digest(None)
    assert digest(lambda d: d["defaults"].update(workers=2, cpus_per_worker=0.5, checkpoint_every=7)) == plain
    assert digest(lambda d: d["defaults"].update(micro_batch_rows=4, log_every=3, use_gpu=True)) == plain
    assert digest(lambda d: d["defaults"].update(resources_per_worker={"accelerator_type:H100": 0.001})) == plain
    assert digest(lambda d: d["stages"][0].update(lr={"peak": 0.01})) != plain
    assert digest(lambda d: d["stages"][0].update(tokens=200_000)) != plain
    assert digest(lambda d: d["stages"][0].update(packing=False)) != plain
    assert digest(lambda d: d["stages"][0].update(packing=True)) == plain


def test_stage_hash_of_a_known_stage_never_changes(write_spec):
    """Hashes name finished versions; a new setting must not make old stages look edited."""
    from mixloop.config import stage_hash

    spec = load_spec(write_spec())
    assert stage_hash(spec.resolved_stages()[0], "parent") == KNOWN_STAGE_HASH


def test_resources_per_worker_leave_the_known_stage_hash_alone(write_spec):
    """Where a stage trains (GPU nodes, a custom resource) is no part of what it trains."""
    from mixloop.config import stage_hash

    def edit(data):
        data["defaults"].update(use_gpu=True, resources_per_worker={"GPU": 2})
        data["stages"][0].update(resources_per_worker={"accelerator_type:H100": 0.001})

    spec = load_spec(write_spec(edit))
    assert spec.resolved_stages()[0].resources_per_worker == {"accelerator_type:H100": 0.001}
    assert stage_hash(spec.resolved_stages()[0], "parent") == KNOWN_STAGE_HASH


def test_resources_per_worker_layer_and_default_to_empty(write_spec):
    def edit(data):
        data["defaults"].update(resources_per_worker={"accelerator_type:A10G": 0.001})
        data["stages"][1].update(use_gpu=True, resources_per_worker={"GPU": 2, "memory": 1e9})

    pretrain, sft = load_spec(write_spec(edit)).resolved_stages()
    assert pretrain.resources_per_worker == {"accelerator_type:A10G": 0.001}
    assert sft.resources_per_worker == {"GPU": 2, "memory": 1e9}  # replaces the defaults' dict
    assert all(s.resources_per_worker == {} for s in load_spec(write_spec()).resolved_stages())


def test_resources_per_worker_refuses_cpu_gpu_without_use_gpu_and_non_positive_amounts(write_spec):
    problem = _only_problem(write_spec, lambda d: d["defaults"].update(resources_per_worker={"CPU": 2}))
    assert problem.startswith("defaults.resources_per_worker.CPU:")
    assert "Fix: remove CPU and set cpus_per_worker: 2 instead." in problem
    problem = _only_problem(write_spec, lambda d: d["stages"][0].update(resources_per_worker={"cpu": 0.5}))
    assert problem.startswith("stages[0].resources_per_worker.cpu:") and "cpus_per_worker: 0.5" in problem
    problem = _only_problem(write_spec, lambda d: d["stages"][1].update(resources_per_worker={"gpu": 1}, use_gpu=True))
    assert problem.startswith("stages[1].resources_per_worker.gpu:") and "Fix: write GPU." in problem
    problem = _only_problem(write_spec, lambda d: d["stages"][1].update(resources_per_worker={"GPU": 1}))
    assert problem.startswith("stages[1].resources_per_worker.GPU:") and "Fix: set use_gpu: true" in problem
    problem = _only_problem(write_spec, lambda d: d["stages"][0].update(resources_per_worker={"TRAIN_ACCEL": 0}))
    assert problem.startswith("stages[0].resources_per_worker.TRAIN_ACCEL:") and "greater than 0" in problem


def test_portable_copy_validates_anywhere_with_the_same_paths(write_spec, tmp_path):
    spec = load_spec(write_spec())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "pipeline.yaml").write_text(yaml.safe_dump(spec.portable()))
    copy = load_spec(elsewhere / "pipeline.yaml")
    assert copy.workdir == spec.workdir
    assert copy.path(copy.config.corpora["web"].path) == spec.path(spec.config.corpora["web"].path)
    assert copy.resolved_stages() == spec.resolved_stages()


# ---------------------------------------------------------------- everything at once


def test_structural_and_semantic_problems_come_in_one_list(write_spec):
    """A type error in one stage leaves the corpus file checks and the other stages' checks running."""

    def edit(data):
        data["stages"][1]["tokens"] = "lots"
        data["corpora"]["web"]["kind"] = "audio"
        data["corpora"]["chat"]["path"] = "data/none.jsonl"
        data["stages"][0]["mixture"]["books"] = 1.0
        data["stages"][0]["global_batch_tokens"] = 2000

    message, problems = _problems(write_spec, edit)
    assert message.splitlines()[0].endswith("5 problem(s) in the pipeline spec:")
    assert [p.split(":")[0] for p in problems] == [  # structure first, then meaning
        "corpora.web.kind",
        "stages[1].tokens",
        "corpora.chat.path",
        "stages[0].mixture.books",
        "stages[0].global_batch_tokens",
    ]
    assert all("Fix:" in p for p in problems)


def test_checks_that_need_a_broken_part_are_skipped_not_guessed(write_spec):
    def edit(data):
        data["defaults"]["micro_batch_rows"] = "eight"  # batch arithmetic would need it: skipped
        data["stages"][1]["global_batch_tokens"] = 2000
        data["stages"][0]["tokens"] = "lots"  # a broken stage keeps its name for `from` and duplicates
        data["stages"][1]["from"] = "pretrain"
        data["corpora"]["web"]["kind"] = "audio"  # a broken corpus keeps its name for mixtures

    _, problems = _problems(write_spec, edit)
    assert sorted(p.split(":")[0] for p in problems) == [
        "corpora.web.kind",
        "defaults.micro_batch_rows",
        "stages[0].tokens",
    ]


def test_a_broken_seed_leaves_the_batch_checks_running(write_spec):
    _, problems = _problems(
        write_spec, lambda d: d.update(seed="seven") or d["defaults"].update(global_batch_tokens=2000)
    )
    assert [p.split(":")[0] for p in problems] == [
        "seed",
        "stages[0].global_batch_tokens",
        "stages[1].global_batch_tokens",
    ]


def test_check_spec_data_without_files_checks_the_spec_alone(tmp_path):
    # A filesystem that refuses every write: the check reaches no network (a real s3:// would ask AWS).
    fsspec.register_implementation("refusing", _RefusingFileSystem, clobber=True)
    data = {
        **copy.deepcopy(BASE),
        "workdir": "refusing://no-such-bucket/run",
        "model": {"path": "missing-model"},
        "tokenizer": {"path": "missing-tokenizer"},
    }
    assert check_spec_data(data, str(tmp_path), files=False) == []
    paths = sorted(p.split(":")[0] for p in check_spec_data(data, str(tmp_path)))
    assert paths == ["corpora.chat.path", "corpora.web.path", "model.path", "tokenizer.path", "workdir"]
    data["stages"][0]["tokens"] = "lots"
    data["stages"][1]["mixture"]["books"] = 1.0
    assert [p.split(":")[0] for p in check_spec_data(data, str(tmp_path), files=False)] == [
        "stages[0].tokens",
        "stages[1].mixture.books",
    ]


# ---------------------------------------------------------------- fixes that say what to write


@pytest.mark.parametrize(
    "edit, expected",
    [
        (
            lambda d: d["stages"][0].update(tokens=2.5),
            "stages[0].tokens: expected a whole number, got 2.5. Fix: write a whole number such as 160000 (",
        ),
        (
            lambda d: d["defaults"].update(seq_len=4),
            "defaults.seq_len: expected a whole number greater than or equal to 8, got 4. "
            "Fix: write a whole number greater than or equal to 8 such as 256 (Tokens per packed row).",
        ),
        (
            lambda d: d["defaults"].update(lr={"peak": "fast"}),
            "defaults.lr.peak: expected a number, got 'fast'. Fix: write a number such as 0.001 (",
        ),
        (
            lambda d: d["defaults"].update(lr={"floor": 1.5}),
            "defaults.lr.floor: expected a number less than or equal to 1, got 1.5. Fix: write a number greater than "
            "or equal to 0 and less than or equal to 1 such as 0.1 (",
        ),
        (
            lambda d: d["defaults"].update(use_gpu="maybe"),
            "defaults.use_gpu: expected true or false, got 'maybe'. Fix: write true or false (",
        ),
        (
            lambda d: d["stages"][1].update(balance="tokens"),
            "stages[1].balance: expected one of corpus, token, got 'tokens'. Fix: did you mean 'token'? "
            "write one of: corpus, token (",
        ),
        (
            lambda d: d["corpora"]["web"].update(kind="audio"),
            "corpora.web.kind: expected one of text, chat, got 'audio'. Fix: write one of: text, chat (",
        ),
        (
            lambda d: d["stages"][0].update(name="Pre Train"),
            "stages[0].name: expected a name of lowercase letters, digits, '_', '.' and '-', got 'Pre Train'. "
            "Fix: write e.g. 'pre-train' (",
        ),
        (
            lambda d: d["stages"][0]["mixture"].update(web="lots"),
            "stages[0].mixture.web: expected a weight or {from: W, to: W}, got 'lots'. Fix: write a weight or {from: W, to: W} (",
        ),
        (
            lambda d: d["defaults"].update(workers=2.5),
            "defaults.workers: expected a whole number or {min: N, max: N}, got 2.5. Fix: write a whole number or {min: N, max: N} (",
        ),
        (
            lambda d: d["tokenizer"]["train"].update(vocab_size=100),
            "tokenizer.train.vocab_size: expected a whole number greater than or equal to 260, got 100. Fix: write a whole "
            "number greater than or equal to 260 and less than or equal to 262144 such as 6400 (",
        ),
        (
            lambda d: d.update(stages=[]),
            "stages: List should have at least 1 item, got []. Fix: give at least 1 (The ordered stages of the model's life).",
        ),
    ],
)
def test_a_type_error_says_what_to_write(write_spec, edit, expected):
    problem = _only_problem(write_spec, edit)
    assert problem.startswith(expected), problem
    assert problem.endswith(").") or problem.endswith("."), problem


def test_numbers_in_exponent_notation_are_whole_numbers_where_one_is_meant(write_spec):
    """PyYAML (YAML 1.1) reads 2e9, 2.0e9 and 1e-3 as strings and 5.0e+8 as a float; all are numbers here."""

    def edit(data):
        data["defaults"]["global_batch_tokens"] = "2.048e3"
        data["stages"][0]["tokens"] = "2e9"
        data["stages"][1]["tokens"] = "2.0e9"
        data["stages"].append(
            {
                "name": "more",
                "mixture": {"web": "1e-1", "chat": {"from": "9e-1", "to": "5e-1"}},
                "tokens": 5.0e8,
                "workers": "1e0",
                "lr": {"peak": "3e-4"},
            }
        )

    path = write_spec(edit)
    assert "tokens: 2e9\n" in path.read_text() and "tokens: 500000000.0\n" in path.read_text()
    pretrain, sft, more = (stage.as_json() for stage in load_spec(path).resolved_stages())
    assert (pretrain["tokens"], sft["tokens"], more["tokens"]) == (2_000_000_000, 2_000_000_000, 500_000_000)
    assert all(type(s["tokens"]) is int and s["global_batch_tokens"] == 2048 for s in (pretrain, sft, more))
    assert more["lr"]["peak"] == 3e-4 and more["mixture"]["web"]["from"] == pytest.approx(0.1)
    assert (more["min_workers"], more["max_workers"]) == (1, 1)
    problem = _only_problem(write_spec, lambda d: d["stages"][0].update(tokens="2.5e0"))
    assert problem.startswith("stages[0].tokens: expected a whole number, got 2.5. Fix: write a whole number")


def test_a_stage_name_that_reads_like_a_number_stays_a_name(write_spec):
    spec = load_spec(write_spec(lambda d: d["stages"][1].update(name="1e5")))
    assert spec.stage_names() == ["pretrain", "1e5"]


# ---------------------------------------------------------------- seq_len against the model's positions


def test_a_stage_longer_than_the_models_positions(write_spec):
    problem = _only_problem(write_spec, lambda d: d["stages"][1].update(seq_len=4096, global_batch_tokens=32768))
    assert problem == (
        "stages[1].seq_len: rows of 4096 tokens, but the model has 2048 positions (max_position_embeddings "
        "of preset micro). Fix: set seq_len to at most 2048, or raise model.config.max_position_embeddings."
    )


def test_a_defaults_seq_len_too_long_is_named_once_where_it_is_set(write_spec):
    problem = _only_problem(write_spec, lambda d: d["defaults"].update(seq_len=4096, global_batch_tokens=32768))
    assert problem.startswith(
        "defaults.seq_len: rows of 4096 tokens (every stage without its own seq_len, and the "
        "eval splits), but the model has 2048 positions"
    )


def test_positions_from_config_overrides_qwen3s_default_and_a_model_directory(write_spec, tmp_path):
    problem = _only_problem(write_spec, lambda d: d["model"].update(config={"max_position_embeddings": 32}))
    assert problem.startswith("defaults.seq_len: rows of 64 tokens") and "32 positions (model.config" in problem
    config = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    problem = _only_problem(
        write_spec,
        lambda d: (
            d.update(model={"config": config})
            or d["stages"][0].update(seq_len=65536, global_batch_tokens=65536 * 8, tokens=10**7)
        ),
    )
    assert f"{QWEN3_DEFAULT_POSITIONS} positions (Qwen3Config's default" in problem
    (tmp_path / "start").mkdir()
    (tmp_path / "start" / "config.json").write_text(json.dumps({"max_position_embeddings": 128}))
    problem = _only_problem(
        write_spec, lambda d: d.update(model={"path": "start"}) or d["stages"][1].update(seq_len=256)
    )
    assert problem.startswith(
        "stages[1].seq_len: rows of 256 tokens, but the model has 128 positions (model.path's "
        "config.json). Fix: set seq_len to at most 128, or start from a model with more positions."
    )


def test_preset_positions_match_the_models_presets_and_qwen3s_default():
    """spec.py keeps its own copy so that validating imports no torch; this keeps the copies in step."""
    from transformers import Qwen3Config

    from mixloop.train.model import PRESETS

    assert QWEN3_DEFAULT_POSITIONS == Qwen3Config().max_position_embeddings
    assert PRESET_POSITIONS == {
        name: preset.get("max_position_embeddings", QWEN3_DEFAULT_POSITIONS) for name, preset in PRESETS.items()
    }


# ---------------------------------------------------------------- the workdir and the corpus files


def test_workdir_that_is_a_file_or_lies_under_one(write_spec, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    problem = _only_problem(write_spec, lambda d: d.update(workdir="afile"))
    assert problem == f"workdir: {tmp_path / 'afile'} is a file. Fix: point workdir at a folder, or move the file away."
    problem = _only_problem(write_spec, lambda d: d.update(workdir="afile/runs/one"))
    assert problem.startswith(
        f"workdir: cannot create {tmp_path / 'afile/runs/one'}, because {tmp_path / 'afile'} is a file."
    )
    assert "Fix:" in problem


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_workdir_that_cannot_be_created_even_by_root(write_spec):
    """Permission bits do not stop root, so the check tries for real: nothing can be created in /proc."""
    problem = _only_problem(write_spec, lambda d: d.update(workdir="/proc/mixloop-test/run"))
    assert problem.startswith("workdir: cannot create /proc/mixloop-test/run: /proc is not writable (")
    assert "Fix: choose a workdir you may write to" in problem


def test_existing_and_new_local_workdirs_are_fine_and_left_as_they_were(write_spec, tmp_path):
    (tmp_path / "runs").mkdir()
    load_spec(write_spec())
    load_spec(write_spec(lambda d: d.update(workdir="new/deeper/run")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "runs", "spec.yaml"]
    assert list((tmp_path / "runs").iterdir()) == []


class _RefusingFileSystem(MemoryFileSystem):
    """An object store that refuses writes, as a bucket without write access or credentials does."""

    protocol = "refusing"
    error: Exception = PermissionError("Access Denied\nrequest id 123")

    def pipe_file(self, path, value, **kwargs):
        raise self.error


def test_remote_workdir_that_cannot_be_written_names_the_error(write_spec):
    fsspec.register_implementation("refusing", _RefusingFileSystem, clobber=True)
    problem = _only_problem(write_spec, lambda d: d.update(workdir="refusing://bucket/run"))
    assert problem.startswith("workdir: cannot write to refusing://bucket/run (PermissionError: Access Denied). Fix: ")
    botocore = pytest.importorskip("botocore.exceptions")
    _RefusingFileSystem.error = botocore.NoCredentialsError()
    try:
        problem = _only_problem(write_spec, lambda d: d.update(workdir="refusing://bucket/run"))
    finally:
        _RefusingFileSystem.error = PermissionError("Access Denied")
    assert "(NoCredentialsError: Unable to locate credentials)" in problem and "credentials may write there" in problem


def test_corpus_whose_files_are_all_empty(write_spec, tmp_path):
    for name in ("web-0.jsonl", "web-1.jsonl"):
        (tmp_path / "data" / name).write_text("")
    problem = _only_problem(write_spec, lambda d: None)
    assert problem.startswith("corpora.web.path: every file matching") and "2 file(s) of 0 bytes" in problem
    assert "Fix:" in problem
    (tmp_path / "data" / "web-1.jsonl").write_text('{"text": "hello"}\n')
    load_spec(write_spec())  # one empty file among others is fine
    (tmp_path / "data" / "chat-eval.jsonl").write_text("")
    problem = _only_problem(write_spec, lambda d: d["corpora"]["chat"].update(eval="data/chat-eval.jsonl"))
    assert problem.startswith("corpora.chat.eval: every file matching")


def test_corpus_on_a_filesystem_fsspec_cannot_open(write_spec):
    problem = _only_problem(write_spec, lambda d: d["corpora"]["web"].update(path="nofs://bucket/web/*.jsonl"))
    assert problem.startswith("corpora.web.path: cannot use nofs://") and "Fix:" in problem


# ---------------------------------------------------------------- overrides and the Python API


def test_overrides_set_values_by_path_index_or_stage_name_and_are_validated_like_the_file(write_spec):
    path = write_spec()
    spec = load_spec(path, ["defaults.lr.peak=0.002", "stages[0].tokens=2e5", "stages.sft.workers=1"])
    pretrain, sft = spec.resolved_stages()
    assert (pretrain.lr.peak, pretrain.tokens, sft.max_workers) == (0.002, 200_000, 1)
    assert spec.portable()["defaults"]["lr"]["peak"] == 0.002  # what the workdir keeps
    assert spec.overrides == ["defaults.lr.peak=0.002", "stages[0].tokens=2e5", "stages.sft.workers=1"]
    assert load_spec(path).resolved_stages()[0].tokens == 100_000  # the file itself is unchanged

    with pytest.raises(SpecError) as error:
        load_spec(path, ["stages.nope.tokens=3", "defaults.lr.peek=0.1", "oops", "stages[0].tokens=lots"])
    message = str(error.value)
    assert "'stages.nope.tokens=3': no stage named 'nope'. Fix: use one of pretrain, sft." in message
    assert "defaults.lr.peek: unknown key. Fix: did you mean 'peak'?" in message
    assert "'oops': not an override. Fix: write KEY.PATH=VALUE" in message
    assert "stages[0].tokens: expected a whole number, got 'lots'" in message


def test_the_python_api_takes_a_spec_from_a_dict(tmp_path, write_spec):
    import mixloop

    data = yaml.safe_load(write_spec().read_text())
    spec = mixloop.from_dict(data, base_dir=str(tmp_path), overrides=["stages[1].tokens=60000"])
    assert spec.stage_names() == ["pretrain", "sft"] and spec.resolved_stages()[1].tokens == 60_000
    assert mixloop.versions(spec) == []  # nothing trained yet
    with pytest.raises(SpecError, match="no file matches"):
        mixloop.from_dict(
            {**data, "corpora": {**data["corpora"], "web": {"kind": "text", "path": "none/*.jsonl"}}},
            base_dir=str(tmp_path),
        )
