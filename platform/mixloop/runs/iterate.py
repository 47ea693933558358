"""New data in, a gated version out: `mixloop add` and `mixloop watch`.

`add` turns a new corpus into an iteration by the spec's `iterate:` template: the corpus (and its
chats) under `corpora:`, a continued-pretraining stage on the new text with replay of old text,
re-warmed and decayed again, and a fine-tune when there are chats. Its budget follows from the new
text's tokens, counted with the workdir's tokenizer. The stages are appended to the spec file (its
comments and layout kept), the spec is validated, and the pipeline runs: the gate then decides whether the
iteration's last version becomes current. An iteration after a rejected one starts from `current`.

`watch` waits for corpora to land in an inbox (a local folder or an object-store prefix) and adds
them one at a time, in the order their `_READY` markers (or manifests) appeared. What it has done is
kept in `<workdir>/inbox.json`, so a restart does nothing twice and finishes an iteration that was
cut short. It holds the workdir's lock while it works, so no other run or watch works on it at once.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import fsspec
import yaml

from mixloop.config import BUILTIN_DEFAULTS, STAGE_NAME_PATTERN, Spec, load_spec
from mixloop.config.edit import append_entries, replace_validated
from mixloop.data.files import iter_records, list_chunks
from mixloop.data.records import BadRecord, checked
from mixloop.errors import MixloopError
from mixloop.storage.fs import expand_files, join, read_json, write_json
from mixloop.storage.layout import Workdir
from mixloop.storage.lock import workdir_lock
from mixloop.versioning.registry import current_version, list_versions

logger = logging.getLogger(__name__)
READY = "_READY"
MANIFEST = "manifest.json"  # {"text": FILE, "chat": FILE, "eval": FILE}, relative to the corpus's folder
ROLES = ("text", "chat", "eval")
SAMPLE_RECORDS = 2000  # records tokenized to estimate a corpus's tokens; the rest are only counted

if TYPE_CHECKING:  # torch and Ray come with the runner: imported where it runs
    from mixloop.runs.pipeline import RunResult


@dataclass(frozen=True)
class NewCorpus:
    name: str
    text: str
    chat: str | None = None
    eval: str | None = None


def plan(
    spec: Spec, new: NewCorpus, text_tokens: int, trained: set[str], start_from: str | None
) -> tuple[dict, list[dict]]:
    """(corpora, stages) to add for `new`, by the spec's iterate template. `trained`: the corpora the
    model the iteration starts from was trained on, which it replays."""
    template, pipeline = spec.config.iterate, spec.config
    text_corpora = [n for n, c in pipeline.corpora.items() if c.kind == "text" and n in trained]
    replay = template.replay_from if template.replay_from is not None else text_corpora
    corpora = {new.name: {"kind": "text", "path": new.text, **({"eval": new.eval} if new.eval else {})}}
    mixture = {new.name: 1.0 - template.replay if replay else 1.0}
    mixture |= {name: template.replay / len(replay) for name in replay}
    tokens = int(template.passes * text_tokens / mixture[new.name])
    stages = [
        {
            "name": new.name,
            **({"from": start_from} if start_from else {}),
            "mixture": _rounded(mixture),
            "tokens": tokens,
            **_lr(template.lr),
        }
    ]
    finetune = template.finetune
    chats = (
        finetune.chats
        if finetune.chats is not None
        else [n for n, c in pipeline.corpora.items() if c.kind == "chat" and n in trained]
    )
    if new.chat:
        corpora[f"{new.name}-chat"] = {"kind": "chat", "path": new.chat}
    if chats or new.chat:
        chat_share = 1.0 - finetune.text_share
        new_share = (finetune.new_share if chats else 1.0) * chat_share if new.chat else 0.0
        mixture = {f"{new.name}-chat": new_share} if new.chat else {}
        mixture |= {name: (chat_share - new_share) / len(chats) for name in chats}
        if finetune.text_share:
            mixture[new.name] = finetune.text_share
        stages.append(
            {
                "name": f"{new.name}-sft",
                "mixture": _rounded(mixture),
                "tokens": int(finetune.tokens * tokens),
                **_lr(finetune.lr),
            }
        )
    return corpora, stages


def _rounded(mixture: dict[str, float]) -> dict[str, float]:
    return {name: round(weight, 4) for name, weight in mixture.items() if weight > 0}


def _lr(lr) -> dict:
    settings = lr.model_dump(exclude_none=True)
    return {"lr": settings} if settings else {}


def count_tokens(spec: Spec, pattern: str) -> int:
    """Tokens of a text corpus's documents under the workdir's tokenizer: every record counted, the
    first SAMPLE_RECORDS tokenized, the rest estimated at their mean."""
    # lazy: transformers
    from mixloop.data.corpora import Corpora
    from mixloop.data.tokenizer import load_tokenizer

    texts: list[str] = []
    count = 0
    for chunk in list_chunks(expand_files(pattern), None):
        for _, record in iter_records(chunk):
            try:
                text, _ = checked(record, "text", "auto", {})
            except BadRecord:
                continue
            count += 1
            if len(texts) < SAMPLE_RECORDS:
                texts.append(text)
    if not count:
        raise MixloopError(
            f"{pattern}: no text records. Fix: point --text at JSON lines, Parquet or CSV files with a `text` field."
        )
    tokenizer = load_tokenizer(Corpora(spec).tokenizer())
    sampled = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return int(sampled * count / len(texts))


def add(
    spec_path: str,
    new: NewCorpus,
    dry_run: bool = False,
    tune: int = 0,
    address: str | None = None,
    lock=None,
) -> RunResult | None:
    """Add `new` to the spec file as an iteration and run the pipeline (the run's result); with
    `dry_run`, only show and validate the stages it would add; with `tune`, search the continued
    pretraining's replay share and re-warm in that many trials first, and keep the winner."""
    path = Path(spec_path)
    spec = load_spec(path)
    _check_new(spec, new)
    if tune and (tune < 3 or not new.eval):
        raise MixloopError(
            f"--tune {tune}: a search scores at least 3 trials (the template's stage and the stratified "
            "mix among them) on the new corpus's eval split. Fix: give --tune 3 or more, and --eval."
        )
    with workdir_lock(spec.workdir, f"mixloop add {new.name}", held=lock) as lock:  # reads current, edits, trains
        corpora, stages = plan(spec, new, count_tokens(spec, _resolved(path, new.text)), *_start(spec))
        text = append_entries(path, {"corpora": corpora, "stages": stages})
        logger.info(
            f"iteration {new.name}: adds to {path}\n"
            + yaml.safe_dump({"corpora": corpora, "stages": stages}, sort_keys=False).rstrip()
        )
        replace_validated(path, text, f"adding iteration {new.name}", write=not (dry_run or tune))
        if dry_run:
            logger.info(f"{path}: valid with the iteration (dry run: nothing written, nothing trained)")
            return None
        if tune:
            _tuned(path, spec, new, corpora, stages, tune, address, lock)
        return _run(path, address, lock)


def _start(spec: Spec) -> tuple[set[str], str | None]:
    """(corpora to replay, version to start from) of the next iteration. It builds on the current version:
    after the last stage's version was rejected (or rolled back), explicitly `from:` it."""
    current = current_version(spec.workdir)
    if current is None:
        return {corpus for stage in spec.config.stages for corpus in stage.mixture}, None
    lineages = list_versions(spec.workdir)
    last = spec.stage_names()[-1]
    return lineages.trained_corpora(current), current if last in lineages and last != current else None


def _tuned(
    path: Path,
    spec: Spec,
    new: NewCorpus,
    corpora: dict,
    stages: list[dict],
    trials: int,
    address: str | None,
    lock,
) -> None:
    """Search the continued-pretraining stage's replay share and re-warm (`trials` trials, the template's
    stage among them), append the winner as the stage, then the rest of the iteration."""
    from mixloop.tuning.runner import run_search  # lazy: ray, torch

    replace_validated(path, append_entries(path, {"corpora": corpora}), f"adding corpus {new.name}")
    stage, rest = stages[0], stages[1:]
    peak = stage.get("lr", {}).get("peak") or spec.config.defaults.lr.peak or BUILTIN_DEFAULTS.lr.peak
    assert peak is not None  # BUILTIN_DEFAULTS sets every setting
    measured = [name for name in stage["mixture"] if name != new.name and spec.config.corpora[name].eval]
    search = {
        "name": new.name,
        "pipeline": str(path.resolve()),
        "new_stage": {key: value for key, value in stage.items() if key not in ("name", "from")},
        **({"start_from": stage["from"]} if "from" in stage else {}),
        "space": {
            "mixture": {"corpora": list(stage["mixture"]), "min_share": 0.05},
            "lr_peak": [peak / 3, peak * 3],
            "warmup": [0.0, 0.2],
        },
        "objective": " + ".join([f"loss[{new.name!r}]", *[f"2 * forgetting[{name!r}]" for name in measured]]),
        "trials": {"count": trials, "evals": 2, "workers": 1},
    }
    search_path = path.with_name(f".{path.stem}.{new.name}.tune.yaml")  # next to the spec: `pipeline:` resolves
    search_path.write_text(yaml.safe_dump(search, sort_keys=False))
    try:
        run_search(str(search_path), address, apply=True, lock=lock)
    finally:
        search_path.unlink()
    if rest:
        replace_validated(path, append_entries(path, {"stages": rest}), f"adding {rest[0]['name']}")


def _check_new(spec: Spec, new: NewCorpus) -> None:
    if not re.fullmatch(STAGE_NAME_PATTERN, new.name):
        raise MixloopError(
            f"{new.name!r} cannot name a corpus and its stages. Fix: use lower-case letters, digits, "
            "'-', '_' and '.', starting with a letter or digit."
        )
    taken = [n for n in (new.name, f"{new.name}-chat") if n in spec.config.corpora]
    taken += [n for n in (new.name, f"{new.name}-sft") if n in spec.stage_names()]
    if taken:
        raise MixloopError(
            f"{', '.join(sorted(set(taken)))} already in the spec. Fix: add the corpus "
            "under a new name; a version, once trained, is never retrained."
        )


def _resolved(spec_path: Path, value: str) -> str:
    return value if "://" in value or os.path.isabs(value) else str((spec_path.parent / value).resolve())


def _run(spec_path: Path, address: str | None, lock) -> RunResult:
    from mixloop.runs.pipeline import PipelineRunner  # lazy: torch, transformers

    return PipelineRunner(load_spec(spec_path), address, lock).run()


# ---------------------------------------------------------------- watch


def ready_corpora(inbox: str) -> list[tuple[str, NewCorpus]]:
    """(folder URI, corpus) of every corpus folder in the inbox that is ready, in arrival order: the
    time its _READY marker (or manifest) was written, then its name. A ready folder that is no corpus
    is named in a warning and left out."""
    fs, root = fsspec.core.url_to_fs(inbox)
    protocol = inbox.split("://", 1)[0] + "://" if "://" in inbox else ""
    found = []
    for folder in sorted(fs.ls(root, detail=False)) if fs.exists(root) else []:
        marker = next((f"{folder}/{m}" for m in (READY, MANIFEST) if fs.exists(f"{folder}/{m}")), None)
        if marker is None or not fs.isdir(folder):
            continue
        uri = protocol + folder if protocol and not folder.startswith(protocol) else folder
        try:
            found.append((_modified(fs, marker), uri, _corpus_of(fs, folder, uri)))
        except MixloopError as exc:
            logger.warning(f"watch: skipping {exc}")
    return [(uri, corpus) for _, uri, corpus in sorted(found, key=lambda item: (item[0], item[1]))]


def _modified(fs, path: str) -> float:
    info = fs.info(path)
    stamp = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
    return stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp)


def _corpus_of(fs, folder: str, uri: str) -> NewCorpus:
    """A corpus folder's files: named by its manifest, else text.*, chat.* and eval.*."""
    name = re.sub(r"[^a-z0-9_.-]", "-", uri.rstrip("/").rsplit("/", 1)[-1].lower()).lstrip("-_.") or "corpus"
    manifest = read_json(join(uri, MANIFEST)) or {}
    files = {}
    for role in ROLES:
        if role in manifest:
            files[role] = join(uri, manifest[role])
        else:
            matches = sorted(fs.glob(f"{folder}/{role}.*"))
            if matches:
                files[role] = join(uri, matches[0].rsplit("/", 1)[-1])
    if "text" not in files:
        raise MixloopError(
            f"{uri}: no text file (text.jsonl, or a manifest.json naming it). Fix: add it, then the {READY} marker."
        )
    return NewCorpus(name, files["text"], files.get("chat"), files.get("eval"))


def watch(
    spec_path: str, inbox: str, address: str | None = None, poll_s: float = 30.0, once: bool = False
) -> list[str]:
    """Add the inbox's ready corpora one at a time, polling every `poll_s` (with `once`: those ready now,
    then return); the corpora added by this call. The workdir's lock is held while there is work, not
    while waiting; a corpus that fails is recorded with why and tried again at the next start."""

    workdir = load_spec(spec_path).workdir
    state_path = Workdir(workdir).inbox_record
    added, failed, first = [], set(), True
    while True:
        pending = [
            (uri, corpus)
            for uri, corpus in ready_corpora(inbox)
            if uri not in failed and _entry(state_path, uri).get("status") != "done"
        ]
        if pending or first:
            with workdir_lock(workdir, f"mixloop watch {inbox}") as lock:
                if first:
                    _run(Path(spec_path), address, lock)  # the pipeline as it stands: a cut-short run resumes
                for uri, corpus in pending:
                    if _take(spec_path, state_path, uri, corpus, address, lock):
                        added.append(corpus.name)
                    else:
                        failed.add(uri)
            first = False
        if once:
            return added
        time.sleep(poll_s)


def _take(spec_path: str, state_path: str, uri: str, corpus: NewCorpus, address: str | None, lock) -> bool:
    """Add one inbox corpus as an iteration, or finish the iteration a cut-short watch added for it;
    whether it is done (a failure is recorded in the state with its reason)."""
    entry = _entry(state_path, uri)
    if entry.get("status") == "done":  # another watch took it while this one waited for the lock
        return False
    try:
        if entry and corpus.name in load_spec(spec_path).stage_names():
            logger.info(f"watch: finishing iteration {corpus.name} ({uri})")
            _run(Path(spec_path), address, lock)
        else:
            logger.info(f"watch: {uri} is ready; adding it as corpus {corpus.name}")
            _record(state_path, uri, corpus=corpus.name, status="started", at=time.time())
            add(spec_path, corpus, address=address, lock=lock)
    except MixloopError as exc:
        logger.warning(f"watch: {uri} failed, left for the next start: {exc}")
        _record(state_path, uri, corpus=corpus.name, status="failed", error=str(exc))
        return False
    _record(state_path, uri, corpus=corpus.name, status="done", finished=time.time())
    return True


def _entry(state_path: str, uri: str) -> dict:
    return (read_json(state_path) or {"corpora": {}})["corpora"].get(uri, {})


def _record(state_path: str, uri: str, **entry) -> None:
    state = read_json(state_path) or {"corpora": {}}
    state["corpora"][uri] = {**state["corpora"].get(uri, {}), **entry}
    write_json(state_path, state)
