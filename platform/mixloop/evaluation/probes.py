"""Probes: questions a user writes one line each, made into lm-evaluation-harness tasks.

Two kinds, told apart by a file's fields:

choice:   {"prompt": "Veld looks", "choices": ["red", "blue", "amber"], "answer": 0}
          scored by log-likelihood of each choice after the prompt (acc, acc_norm), as lm-eval scores
          its own multiple-choice tasks;
question: {"question": "What colour is Veld?", "answer": "Veld looks red."}, or a chat record of any
          shape a chat corpus takes (its first user turn asked, its assistant answer the reference),
          answered greedily through the version's chat template and scored by exact_match and contains.

A probe is read into typed records here (a bad line is an error naming file:line), written back as
plain JSON lines, and handed to lm-eval as an inline task config over them (`dataset_path: json`):
the same evaluator, aggregation and standard errors as lm-eval's named tasks.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mixloop.data.files import BLANK_LINE, iter_records, list_chunks
from mixloop.data.records import BadRecord, checked
from mixloop.errors import MixloopError
from mixloop.storage.fs import expand_files

ProbeKind = Literal["choice", "question"]
RECORD_SHAPES = (
    '{"prompt", "choices": [...], "answer": index}, {"question", "answer"}, or a chat ({"conversations": [...]})'
)


class ProbeError(MixloopError):
    """A probe file that cannot be scored: no records, or a malformed one (named file:line)."""


@dataclass(frozen=True)
class ProbeSource:
    """Where a probe's records are and how to read them."""

    name: str
    """The task name its scores carry: the benchmarks.probes key, or the corpus's name."""
    files: str | tuple[str, ...]
    """A path, glob or URI (as a corpus's `path`), or the files of a hub dataset's split."""
    file_format: str | None = None
    """jsonl, json, parquet, csv or arrow; None: from the extension."""
    record_format: str = "auto"
    """How chat records are shaped (a corpus's `format`), for question probes made of chats."""
    columns: tuple[tuple[str, str], ...] = ()
    """A corpus's `columns`, for chat records under other field names."""
    skip_bad: bool = False
    """Skip records that are no probe (a corpus's eval split, whose bad records training skips too)
    rather than stop at the first."""


@dataclass(frozen=True)
class ChoiceQuestion:
    prompt: str
    choices: tuple[str, ...]
    answer: int
    """Index of the right choice."""


@dataclass(frozen=True)
class Question:
    question: str
    answer: str
    """The reference answer."""


@dataclass(frozen=True)
class Probe:
    name: str
    kind: ProbeKind
    items: tuple[ChoiceQuestion | Question, ...]


def read_probe(source: ProbeSource) -> Probe:
    """A probe's records, all of one kind; ProbeError naming the first bad one's file:line."""
    kind, items = None, []
    files = expand_files(source.files)
    if not files:
        raise ProbeError(f"probe {source.name}: no file matches {source.files!r}. Fix: check the path.")
    for chunk in list_chunks(files, source.file_format):
        for where, record in iter_records(chunk):
            if record is BLANK_LINE:
                continue
            try:
                item_kind, item = _item(record, source)
                if kind is not None and item_kind != kind:
                    raise BadRecord(f"a {item_kind} record among {kind} records; a probe holds one kind")
            except BadRecord as exc:
                if source.skip_bad:
                    continue
                raise ProbeError(f"{where}: {exc}. Fix: each record of a probe is one of {RECORD_SHAPES}.") from None
            kind = item_kind
            items.append(item)
    if kind is None:
        raise ProbeError(f"probe {source.name}: {files[0]} holds no records. Fix: add questions, one a line.")
    return Probe(source.name, kind, tuple(items))


def _item(record: Any, source: ProbeSource) -> tuple[ProbeKind, ChoiceQuestion | Question]:
    if isinstance(record, BadRecord):
        raise record
    if isinstance(record, dict) and "choices" in record:
        return "choice", _choice(record)
    if isinstance(record, dict) and "question" in record:
        question, answer = record.get("question"), record.get("answer")
        if not isinstance(question, str) or not isinstance(answer, str) or not _text(question) or not _text(answer):
            raise BadRecord('"question" and "answer" must be non-empty strings')
        return "question", Question(question, answer)
    try:
        turns, _ = checked(record, "chat", source.record_format, dict(source.columns))
    except BadRecord as exc:
        raise BadRecord(f"not a probe record ({exc})") from None
    return "question", _first_exchange(turns)


def _choice(record: dict) -> ChoiceQuestion:
    prompt, choices, answer = record.get("prompt"), record.get("choices"), record.get("answer")
    if not isinstance(prompt, str):
        raise BadRecord('"prompt" must be a string')
    if not isinstance(choices, list) or len(choices) < 2 or not all(_text(c) for c in choices):
        raise BadRecord('"choices" must be a list of two or more non-empty strings')
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise BadRecord(f'"answer" must be the index of the right choice, 0 to {len(choices) - 1}')
    return ChoiceQuestion(prompt, tuple(choices), answer)


def _first_exchange(turns: list[dict]) -> Question:
    """The first user turn and the assistant's answer to it."""
    asked = next((i for i, turn in enumerate(turns) if turn["role"] == "user"), None)
    if asked is None or asked + 1 >= len(turns) or turns[asked + 1]["role"] != "assistant":
        raise BadRecord("a chat probe needs a user turn answered by the assistant")
    question, answer = turns[asked]["content"], turns[asked + 1]["content"]
    if not _text(question) or not _text(answer):
        raise BadRecord("the first user turn and its answer must have content")
    return Question(question, answer)


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def write_task_data(probe: Probe, folder: str) -> str:
    """The probe's records as plain JSON lines in `folder` (lm-eval reads them with datasets' json builder)."""
    path = Path(folder, hashlib.sha256(probe.name.encode()).hexdigest()[:16] + ".jsonl")  # any name, a safe file
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = (
        {"prompt": i.prompt, "choices": list(i.choices), "answer": i.answer}
        if isinstance(i, ChoiceQuestion)
        else {"question": i.question, "answer": i.answer}
        for i in probe.items
    )
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return str(path)


def probe_task(probe: Probe, data_file: str, cache_dir: str, max_new_tokens: int) -> dict:
    """An lm-eval task config (as a task YAML would give it) that scores the probe's records in `data_file`;
    datasets' own cache of the file goes to `cache_dir`."""
    task: dict[str, Any] = {
        "task": probe.name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": data_file}, "cache_dir": cache_dir},
        "test_split": "test",
        "num_fewshot": 0,  # probes have no examples to show; simple_evaluate leaves a 0 alone
        "metadata": {"version": 1},
    }
    if probe.kind == "choice":
        metrics = ("acc", "acc_norm")  # lm-eval's own: argmax of log-likelihood, and of it per character
        return task | {
            "output_type": "multiple_choice",
            "doc_to_text": "prompt",  # field names, not Jinja: a question may hold braces
            "doc_to_choice": "choices",
            "doc_to_target": "answer",
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in metrics],
        }
    return task | {
        "output_type": "generate_until",
        "doc_to_text": "question",
        "doc_to_target": "answer",
        # Greedy; the version's end-of-turn token (its eos) ends an answer, lm-eval adds it to `until`.
        "generation_kwargs": {"until": [], "do_sample": False, "max_gen_toks": max_new_tokens},
        "metric_list": [
            {"metric": metric, "aggregation": "mean", "higher_is_better": True} for metric in (exact_match, contains)
        ],
    }


# SQuAD's answer normalisation. lm-eval's exact_match removes regexes before lowercasing and cannot
# collapse whitespace, so both metrics use this one; lm-eval still aggregates them (mean, stderr).
ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercased, without punctuation or articles, words separated by single spaces."""
    return " ".join(ARTICLES.sub(" ", text.lower().translate(PUNCTUATION)).split())


def exact_match(references: list[str], predictions: list[str], **_) -> float:
    """1 when the answer is the reference, after normalize_answer."""
    return float(normalize_answer(predictions[0]) == normalize_answer(references[0]))


def contains(references: list[str], predictions: list[str], **_) -> float:
    """1 when the reference's words appear, in order and together, in the answer (after normalize_answer)."""
    return float(f" {normalize_answer(references[0])} " in f" {normalize_answer(predictions[0])} ")
