"""Knowledge scores: lm-eval tasks and probes scored by lm-eval's own evaluator on real (micro) versions,
one taught a few facts and chats, one untrained; the cache; and what validation says about benchmarks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mixloop.config import spec_from_data
from mixloop.config.benchmarks import BenchmarksConfig
from mixloop.errors import SpecError
from mixloop.evaluation.knowledge import Benchmarks, benchmarks_of, score_version
from mixloop.evaluation.knowledge_checks import benchmark_problems
from mixloop.evaluation.probes import ProbeError, ProbeSource, contains, exact_match, normalize_answer, read_probe
from mixloop.train.model import model_config, new_model
from mixloop.versioning.registry import publish
from support import lineage_of

FACTS = ["the cat sat on the mat.", "the dog ran under the moon.", "hello world!"]
CHOICES = [
    {"prompt": "the cat sat on the", "choices": ["moon", "mat", "star"], "answer": 1},
    {"prompt": "the dog ran under the", "choices": ["moon", "mat", "light"], "answer": 0},
    {"prompt": "hello", "choices": ["dark", "planet", "world"], "answer": 2},
]
CHATS = [  # the version is taught the first two; the third it never saw
    [{"role": "user", "content": "where is the cat?"}, {"role": "assistant", "content": "The cat sat on the mat."}],
    [{"role": "user", "content": "what is far?"}, {"role": "assistant", "content": "the sun is far"}],
    [{"role": "user", "content": "why is it dark?"}, {"role": "assistant", "content": "no sun is near."}],
]

# The eval split words the first reference otherwise than training did: case, article, full stop.
EVAL_CHATS = [[CHATS[0][0], {"role": "assistant", "content": "the cat sat on a mat"}], *CHATS[1:]]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def taught_model(tokenizer, steps: int):
    """A micro Qwen3 that saw FACTS and the first two CHATS `steps` times (0: untrained)."""
    model = new_model(model_config("micro", None, tokenizer), seed=0)
    texts = FACTS + [tokenizer.apply_chat_template(chat, tokenize=False) for chat in CHATS[:2]]
    ids = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in texts]
    width = max(map(len, ids))
    inputs = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in ids])
    labels = torch.tensor([row + [-100] * (width - len(row)) for row in ids])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only contend with the other tests
    try:
        for _ in range(steps):
            optimizer.zero_grad()
            model(input_ids=inputs, labels=labels).loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model


@pytest.fixture(scope="module")
def versions(tmp_path_factory, trained_tokenizer) -> dict[str, str]:
    """Two published versions (lineage with weights_sha256, tokenizer and ChatML template): taught, untrained."""
    root = tmp_path_factory.mktemp("versions")
    trained_tokenizer.save_pretrained(root / "tokenizer")
    folders = {}
    for name, steps in (("taught", 60), ("untrained", 0)):
        taught_model(trained_tokenizer, steps).save_pretrained(root / name)
        folders[name] = publish(str(root / "run"), str(root / name), str(root / "tokenizer"), lineage_of(name))
    return folders


@pytest.fixture(scope="module")
def probe_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("probes")
    return {
        "choice": write_jsonl(folder / "facts.jsonl", CHOICES),
        "chats": write_jsonl(folder / "chat-eval.jsonl", [{"conversations": chat} for chat in EVAL_CHATS]),
    }


def direct_choices(folder: str, questions: list[dict]) -> list[int]:
    """The choice of highest log-likelihood after the prompt, computed with torch as lm-eval defines it:
    the prompt and " " + choice encoded together, the choice's tokens scored given all before them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    chosen = []
    for question in questions:
        context = tokenizer(question["prompt"])["input_ids"]
        likelihoods = []
        for choice in question["choices"]:
            whole = tokenizer(question["prompt"] + " " + choice)["input_ids"]
            with torch.no_grad():
                logprobs = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            likelihoods.append(sum(logprobs[t - 1, whole[t]].item() for t in range(len(context), len(whole))))
        chosen.append(max(range(len(likelihoods)), key=likelihoods.__getitem__))
    return chosen


def metrics(result, task: str) -> dict[str, tuple[float, float | None, int]]:
    return {s.metric: (s.value, s.stderr, s.samples) for s in result.scores if s.task == task}


def test_a_multiple_choice_probe_scores_what_a_direct_log_likelihood_finds(versions, probe_files, tmp_path):
    benchmarks = Benchmarks(probes=(ProbeSource("facts", str(probe_files["choice"])),))
    taught = score_version(versions["taught"], benchmarks, str(tmp_path / "scores"))
    assert metrics(taught, "facts") == {"acc": (1.0, 0.0, 3), "acc_norm": (1.0, 0.0, 3)}
    assert {s.kind for s in taught.scores} == {"probe"}
    untrained = score_version(versions["untrained"], benchmarks, str(tmp_path / "scores"))
    expected = direct_choices(versions["untrained"], CHOICES)
    assert [e.response for e in untrained.examples] == [q["choices"][i] for q, i in zip(CHOICES, expected)]
    accuracy = sum(i == q["answer"] for q, i in zip(CHOICES, expected)) / 3
    value, stderr, samples = metrics(untrained, "facts")["acc"]
    assert (value, samples) == (pytest.approx(accuracy), 3) and stderr is not None and 0 <= stderr <= 0.5


def test_a_local_lm_eval_task_yaml_is_scored_like_the_probe_over_the_same_records(versions, probe_files, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "facts.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "facts_mc",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(probe_files["choice"])}},
                "test_split": "test",
                "output_type": "multiple_choice",
                "doc_to_text": "prompt",
                "doc_to_choice": "choices",
                "doc_to_target": "answer",
                "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
            }
        )
    )
    benchmarks = Benchmarks(tasks=("facts_mc",), include_path=str(tasks), limit=2)
    result = score_version(versions["taught"], benchmarks, str(tmp_path / "scores"))
    assert metrics(result, "facts_mc") == {"acc": (1.0, 0.0, 2), "acc_norm": (1.0, 0.0, 2)}  # limit: 2 of 3
    assert {s.kind for s in result.scores} == {"task"} and not result.examples


def test_questions_from_a_chat_eval_file_are_answered_through_the_chat_template(versions, probe_files, tmp_path):
    benchmarks = Benchmarks(probes=(ProbeSource("chats", str(probe_files["chats"])),), max_new_tokens=16)
    result = score_version(versions["taught"], benchmarks, str(tmp_path / "scores"))
    # The two taught answers come back as taught, the first matching its reference once normalised; the
    # third question was never answered in training. lm-eval's stderr of a mean: sqrt(var / (n - 1)).
    third = pytest.approx((1 / 3) ** 0.5 / 3**0.5)
    assert metrics(result, "chats") == {
        "exact_match": (pytest.approx(2 / 3), third, 3),
        "contains": (pytest.approx(2 / 3), third, 3),
    }
    assert [(e.prompt, e.response.strip(), e.correct) for e in result.examples[:2]] == [
        ("where is the cat?", "The cat sat on the mat.", True),
        ("what is far?", "the sun is far", True),
    ]
    untrained = score_version(versions["untrained"], benchmarks, str(tmp_path / "scores"))
    assert metrics(untrained, "chats")["exact_match"] == (0.0, 0.0, 3)


def test_answers_match_after_lowercasing_and_dropping_punctuation_articles_and_spaces():
    assert normalize_answer("  The Cat sat, on a   MAT! ") == "cat sat on mat"
    assert exact_match(["The cat sat on the mat."], ["the cat  sat on the mat"]) == 1.0
    assert exact_match(["The cat sat on the mat."], ["yes, the cat sat on the mat."]) == 0.0
    assert contains(["The cat sat on the mat."], ["yes, the cat sat on the mat."]) == 1.0
    assert contains(["red"], ["it is bored"]) == 0.0  # whole words only


def test_scores_are_cached_by_weights_and_probe_contents(versions, probe_files, tmp_path):
    probe = write_jsonl(tmp_path / "facts.jsonl", CHOICES)
    benchmarks = Benchmarks(probes=(ProbeSource("facts", str(probe)),))
    cache = tmp_path / "scores"
    first = score_version(versions["taught"], benchmarks, str(cache))
    assert [p.name for p in cache.iterdir()] == [f"{first.key}.json"]
    weights = Path(versions["taught"], "model.safetensors")
    saved = weights.read_bytes()
    weights.write_bytes(b"not weights")  # scoring again must not even load the model
    try:
        assert score_version(versions["taught"], benchmarks, str(cache)) == first
    finally:
        weights.write_bytes(saved)
    write_jsonl(probe, CHOICES[:2])  # another probe: scored again, cached beside the first
    second = score_version(versions["taught"], benchmarks, str(cache))
    assert second.key != first.key and metrics(second, "facts")["acc"] == (1.0, 0.0, 2)
    assert len(list(cache.iterdir())) == 2


def test_probe_files_are_read_by_their_fields_and_a_bad_line_is_named(tmp_path):
    questions = write_jsonl(tmp_path / "qa.jsonl", [{"question": "what is far?", "answer": "the sun"}])
    assert read_probe(ProbeSource("qa", str(questions))).kind == "question"
    lines = [json.dumps(CHOICES[0]), json.dumps({**CHOICES[1], "answer": 3}), "{oops"]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ProbeError, match=r"bad\.jsonl:2: \"answer\" must be the index of the right choice, 0 to 2"):
        read_probe(ProbeSource("bad", str(tmp_path / "bad.jsonl")))
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [CHOICES[0], {"question": "q?", "answer": "a"}])
    with pytest.raises(ProbeError, match=r"mixed\.jsonl:2: a question record among choice records"):
        read_probe(ProbeSource("mixed", str(mixed)))


def spec_data(tmp_path: Path, **extra) -> dict:
    data = {
        "name": "probes",
        "workdir": str(tmp_path / "run"),
        "tokenizer": {"train": {"vocab_size": 300}},
        "model": {"preset": "micro"},
        "corpora": {
            "web": {"kind": "text", "path": "web.jsonl"},
            "facts": {"kind": "text", "generate": {"topic": "astronomy"}, "probes": "generated"},
            "chats": {"kind": "chat", "path": "chats.jsonl", "eval": "chat-eval.jsonl", "probes": "eval"},
        },
        "defaults": {"seq_len": 32, "global_batch_tokens": 128, "micro_batch_rows": 4},
        "stages": [{"name": "s", "mixture": {"web": 1}, "tokens": 128}],
    }
    write_jsonl(tmp_path / "web.jsonl", [{"text": fact} for fact in FACTS])
    for name in ("chats.jsonl", "chat-eval.jsonl"):
        write_jsonl(tmp_path / name, [{"conversations": chat} for chat in CHATS] + [{"text": "not a chat"}])
    return data | extra


def test_a_spec_asks_its_corpora_probes_and_its_own(tmp_path, versions):
    write_jsonl(tmp_path / "mine.jsonl", CHOICES)
    spec = spec_from_data(spec_data(tmp_path, benchmarks={"probes": {"mine": "mine.jsonl"}}), str(tmp_path))
    benchmarks = benchmarks_of(spec)
    assert [p.name for p in benchmarks.probes] == ["mine", "facts", "chats"]
    generated = read_probe(benchmarks.probes[1])  # the generator wrote it beside the corpus, from its facts
    assert benchmarks.probes[1].files == str(tmp_path / "run/generated/facts/probes.jsonl")
    assert (generated.kind, len(generated.items)) == ("choice", 24)
    chats = read_probe(benchmarks.probes[2])  # the eval split's chats; its record that is no chat is skipped
    assert [q.question for q in chats.items] == [chat[0]["content"] for chat in CHATS]
    assert spec.portable()["benchmarks"]["probes"] == {"mine": str(tmp_path / "mine.jsonl")}
    plain = spec_data(tmp_path)
    for corpus in plain["corpora"].values():
        corpus.pop("probes", None)
    assert benchmarks_of(spec_from_data(plain, str(tmp_path))) is None


def test_validation_names_every_benchmark_problem_with_its_fix(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps(CHOICES[0]) + "\n" + '{"prompt": "x", "choices": ["a"]}\n')
    data = spec_data(tmp_path, benchmarks={"tasks": ["arc_esay"], "probes": {"web": "bad.jsonl", "gone": "no.jsonl"}})
    data["corpora"]["web"]["probes"] = "generated"
    data["corpora"]["facts"]["probes"] = "eval"
    with pytest.raises(SpecError) as error:
        spec_from_data(data, str(tmp_path))
    message = str(error.value)
    for expected in (
        "corpora.web.probes: 'web' names another task or probe too",
        "corpora.web.probes: only a generated corpus has generated probes",
        "corpora.facts.probes: `eval` asks a chat corpus's eval split; facts is a text corpus",
        f'benchmarks.probes.web: {tmp_path / "bad.jsonl"}:2: "choices" must be a list of two or more',
        "benchmarks.probes.gone: probe gone: no file matches",
        "benchmarks.tasks: no lm-evaluation-harness task, group or tag named 'arc_esay'. Fix: did you mean arc_easy",
    ):
        assert expected in message, message


def test_score_bounds_must_name_what_the_spec_scores(tmp_path):
    """A typo in a gate's score bound is found before training, not as a failed gate after it."""
    data = spec_data(tmp_path, gate={"min_score": {"fatcs": 0.8, "chats": 0.5}, "max_score_drop": {"chat": 0.1}})
    with pytest.raises(SpecError) as error:
        spec_from_data(data, str(tmp_path))
    problems = [line for line in str(error.value).splitlines() if "gate." in line]
    assert len(problems) == 2, problems
    assert (
        "gate.min_score.fatcs: the spec scores no benchmark task or probe named 'fatcs'. Fix: use one of chats, facts"
        in problems[0]
    )
    assert "gate.max_score_drop.chat:" in problems[1]
    data["gate"] = {"min_score": {"facts": 0.8, "chats": 0.5}, "max_score_drop": 0.1}
    assert spec_from_data(data, str(tmp_path)).config.gate.min_score == {"facts": 0.8, "chats": 0.5}


def hub_task(folder: Path) -> Path:
    """A local lm-eval task over a hub dataset, as task YAMLs name them."""
    folder.mkdir(exist_ok=True)
    (folder / "hub.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "hub_facts",
                "dataset_path": "tiny-org/facts",
                "dataset_name": "ARC",
                "test_split": "test",
                "output_type": "multiple_choice",
                "doc_to_text": "prompt",
                "doc_to_choice": "choices",
                "doc_to_target": "answer",
            }
        )
    )
    return folder


def cache_as_load_dataset_does(cache: Path, records: Path) -> None:
    """tiny-org/facts (subset ARC) prepared in the datasets cache where load_dataset leaves a hub dataset:
    <org>___<name>/<subset>/<version>/<hash>/."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.json.json import Json

    builder = Json(
        cache_dir=str(cache),
        dataset_name="facts",
        config_name="ARC",
        data_files=DataFilesDict.from_patterns({"test": [str(records)]}),
    )
    builder.repo_id, builder.hash, builder.config_id = "tiny-org/facts", "0123abcd", "ARC"
    builder._cache_dir = builder._build_cache_dir()
    builder.download_and_prepare()


def test_offline_a_task_whose_hub_dataset_is_not_cached_is_a_problem_until_it_is(
    tmp_path, monkeypatch, versions, probe_files
):
    tasks, cache = hub_task(tmp_path / "tasks"), tmp_path / "datasets"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    config = BenchmarksConfig(tasks=["hub_facts"], include_path="tasks")
    (problem,) = benchmark_problems(config, str(tmp_path))
    assert problem.startswith("benchmarks.tasks: hub_facts needs the hub dataset tiny-org/facts (ARC), not in")
    assert "`python -c \"import datasets; datasets.load_dataset('tiny-org/facts', 'ARC')\"`" in problem
    cache_as_load_dataset_does(cache, probe_files["choice"])
    assert benchmark_problems(config, str(tmp_path)) == []
    # ... and lm-eval then scores it offline (a fresh process: datasets reads HF_HUB_OFFLINE when imported).
    script = (
        "import sys; from mixloop.evaluation.knowledge import Benchmarks, score_version\n"
        f"b = Benchmarks(tasks=('hub_facts',), include_path={str(tasks)!r})\n"
        f"print(score_version({versions['taught']!r}, b, {str(tmp_path / 'scores')!r}).score('hub_facts', 'acc').value)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ))
    assert done.stdout.strip().splitlines()[-1:] == ["1.0"], done.stderr[-2000:]


@pytest.mark.parametrize("topic", ["general", "astronomy"])
def test_generated_probes_ask_exactly_what_the_generated_corpora_state(topic):
    from mixloop.data.synthetic import _world_facts, answer_questions, choice_questions

    statements = [statement for statement, _, _ in _world_facts(topic)]
    for question in choice_questions(topic):
        completions = [f"{question['prompt']} {choice}" for choice in question["choices"]]
        stated = [any(s.startswith(c) and s[len(c)] in " ." for s in statements) for c in completions]
        assert len(completions) == 4 and stated == [i == question["answer"] for i in range(4)], question
    facts = [{"question": q, "answer": a} for _, q, a in _world_facts(topic)]
    assert answer_questions(topic) == facts and len(choice_questions(topic)) == len(facts)


def test_validate_names_an_uncached_hub_task_offline_before_any_ray_work(tmp_path, monkeypatch, capsys):
    """One clear problem with the fetch command, exit code 2, and nothing started: validation reads
    lm-eval's task index and the datasets cache only."""
    from mixloop.cli import main
    from support import generated_spec, write_spec

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    spec = generated_spec(tmp_path / "run", [{"name": "s", "mixture": {"facts": 1.0}, "tokens": 2048}])
    path = write_spec(tmp_path, spec | {"benchmarks": {"tasks": ["arc_easy"]}})
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    (problem,) = [line for line in err.splitlines() if line.lstrip("- ").startswith("benchmarks.tasks")]
    assert "arc_easy needs the hub dataset allenai/ai2_arc" in problem and "datasets.load_dataset(" in problem
    assert not (tmp_path / "run").exists()
