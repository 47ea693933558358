"""`mixloop models export`: a version as a Hugging Face folder to share: its weights in the chosen
dtype (sharded if asked) through save_pretrained, its tokenizer and chat template, its lineage, and a
model card (README.md with Hub metadata: where it started, its license, the stage chain with mixtures
and tokens, its eval losses, and what it gained and forgot against its parent).

The weights' license is not mixloop's code license: a version trained from a published model is under
that model's terms, so the card takes the license its base model's card declares. Only a model mixloop
created from scratch gets mixloop's own, apache-2.0; `--license` says it outright."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import yaml

from mixloop.config import BASE_VERSION
from mixloop.errors import MixloopError
from mixloop.evaluation.scores import Score, change, read_score_matrix
from mixloop.storage.fs import exists, join, local_copy, read_json, read_text, share_with_umask
from mixloop.storage.hub import model_card_text
from mixloop.storage.layout import Workdir
from mixloop.version import __version__
from mixloop.versioning.lineage import Lineage, mixture_shares
from mixloop.versioning.registry import (
    list_versions,
    loadable_everywhere,
    read_lineage,
    require_lineage,
    verified_version,
)

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # --dtype: torch's name
SCRATCH_LICENSE = "apache-2.0"  # of weights mixloop itself initialised: its own license
LICENSE_KEYS = ("license", "license_name", "license_link")  # the Hub's card metadata ("other" + name, link)
# Written again by save_pretrained, in the chosen dtype and shards; everything else is copied.
REWRITTEN = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")

logger = logging.getLogger(__name__)


def export(
    workdir: str,
    version: str,
    target: str,
    dtype: str = "fp32",
    max_shard_size: str | None = None,
    license: str | None = None,
) -> Path:
    """Write the version `version` of `workdir` into the new or empty folder `target`; its card's license
    is `license`, else the base model's (see card_license)."""
    # lazy: torch, transformers; the CLI imports this module for --help
    import torch

    from mixloop.train.model import load_model

    out = Path(target)
    if out.exists() and any(out.iterdir()):
        raise MixloopError(f"{target} exists and is not empty. Fix: export into a new or empty folder.")
    source = Path(local_copy(verified_version(workdir, version)))  # names a missing version too
    lineage = require_lineage(workdir, version)
    out.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.is_file() and not file.name.startswith(".") and file.name not in REWRITTEN:
            shutil.copy2(file, out / file.name)
    model = load_model(str(source)).to(getattr(torch, DTYPES[dtype]))
    model.save_pretrained(out, max_shard_size=max_shard_size or "50GB")
    loadable_everywhere(str(out))
    licensed, origin = card_license(workdir, license)
    if licensed:
        logger.info(f"license: {licensed['license']} ({origin})")
    else:
        logger.warning(f"warning: the model card names no license: {origin}. Fix: export again with --license ID.")
    (out / "README.md").write_text(model_card(workdir, lineage, dtype, licensed))
    # save_pretrained writes the weights private (0600) and copy2 keeps the version's modes: give every
    # file the modes the umask gives, as any other file the user writes.
    share_with_umask(out, contents_only=True)
    return out


def card_license(workdir: str, given: str | None) -> tuple[dict, str]:
    """(the card's license metadata, where it comes from, in words): `given`; apache-2.0 for a model
    mixloop created from scratch; else what the base model's card declares, if it can be read; else {}."""
    if given:
        return {"license": given}, "as given"
    base = read_lineage(workdir, BASE_VERSION)
    if base is None:
        return {}, f"{workdir} has no version {BASE_VERSION} to tell where the model started"
    start = (base.model or {}).get("path")
    if not start:
        return {"license": SCRATCH_LICENSE}, "mixloop's own, for a model it created from scratch"
    if _hub_id(start):
        text = model_card_text(start, base.model_commit or (base.model or {}).get("revision"))
    else:
        text = read_text(join(start, "README.md")) if exists(join(start, "README.md")) else None
    declared = _card_metadata(text or "")
    licensed = {key: declared[key] for key in LICENSE_KEYS if isinstance(declared.get(key), str)}
    if "license" in licensed:
        return licensed, f"from the model card of {start}, the base model"
    return {}, f"the base model {start} has {'no model card' if text is None else 'no license in its card'}"


def _card_metadata(text: str) -> dict:
    """The YAML metadata block at the top of a model card, {} if there is none or it is not a mapping."""
    head, marker, _ = text.removeprefix("---\n").partition("\n---")
    try:
        data = yaml.safe_load(head) if text.startswith("---\n") and marker else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _hub_id(start: str) -> bool:
    """Whether a base model's recorded path is a hub id (a folder is recorded absolute)."""
    return not start.startswith(("/", ".")) and "://" not in start


def model_card(workdir: str, lineage: Lineage, dtype: str, licensed: dict | None = None) -> str:
    """A Hub model card (huggingface_hub's ModelCard): metadata with the benchmark scores as its
    model-index, the stage chain from base to this version, eval losses and scores, their changes."""
    # lazy: huggingface_hub, only when a card is written (the CLI imports this module for --help)
    from huggingface_hub import ModelCard, ModelCardData

    versions = list_versions(workdir)
    chain = [versions[v] for v in reversed(versions.ancestors(lineage.version))]
    start = ((versions[BASE_VERSION].model or {}) if BASE_VERSION in versions else {}).get("path")
    scores = read_score_matrix(workdir).get(lineage.version, {})
    metadata = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["mixloop", "continual-pretraining"],
        base_model=start if start and _hub_id(start) else None,
        datasets=_hub_datasets(workdir, chain) or None,
        model_name=lineage.version if scores else None,
        eval_results=_eval_results(scores) or None,
        **(licensed or {}),
    )
    lines = [
        f"# {lineage.version}",
        "",
        f"Version `{lineage.version}` of a model kept current with mixloop "
        f"{lineage.mixloop_version or __version__}, exported in {dtype}. It started from "
        f"{f'`{start}`' if start else 'a new model'} and went through these stages:",
        "",
        "| version | parent | mixture (share of trained tokens) | tokens trained | peak LR |",
        "|---|---|---|---|---|",
    ]
    for step in chain:
        mixture = mixture_shares(step.stage.mixture) if step.stage else "-"
        peak = step.stage.lr.peak if step.stage else "-"
        lines.append(f"| {step.version} | {step.parent or '-'} | {mixture} | {step.trained_tokens:,.0f} | {peak} |")
    lines += _evaluation(workdir, lineage.version) + _knowledge(workdir, lineage, scores)
    lines += [
        "",
        "Load it with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`; "
        "`lineage.json` beside the weights records every setting of its stage.",
        "",
    ]
    return str(ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(lines)))


def _eval_results(scores: dict[str, Score]) -> list:
    """The version's benchmark scores as the Hub's model-index results (the standard error in the name)."""
    from huggingface_hub import EvalResult  # lazy: huggingface_hub, as in model_card

    return [
        EvalResult(
            task_type="text-generation",
            dataset_type=task,
            dataset_name=task,
            metric_type=score.metric,
            metric_value=round(score.value, 4),
            metric_name=f"{score.metric} ({score.text()}, {score.samples} questions)",
        )
        for task, score in sorted(scores.items())
    ]


def _knowledge(workdir: str, lineage: Lineage, scores: dict[str, Score]) -> list[str]:
    if not scores:
        return []
    parent = read_score_matrix(workdir).get(lineage.parent or "", {})
    lines = [
        "",
        "Benchmark scores (headline metric ± standard error; change against the parent ± its standard error):",
        "",
    ]
    lines += ["| task | metric | score | change vs parent |", "|---|---|---|---|"]
    for task, score in sorted(scores.items()):
        moved = change(parent[task], score) if task in parent else None
        delta = (
            "-"
            if moved is None
            else f"{moved['change']:+.3f}" + (f" ± {moved['stderr']:.3f}" if moved["stderr"] is not None else "")
        )
        lines.append(f"| {task} | {score.metric} | {score.text()} | {delta} |")
    return lines


def _hub_datasets(workdir: str, chain: list[Lineage]) -> list[str]:
    """The Hub datasets (ids) of the corpora the chain trained on, from the workdir's copy of the spec."""
    copy = Workdir(workdir).pipeline_copy
    corpora = (yaml.safe_load(read_text(copy)) or {}).get("corpora", {}) if exists(copy) else {}
    used = {name for step in chain for name in step.corpora}
    return sorted({corpora[name]["dataset"] for name in used if "dataset" in corpora.get(name, {})})


def _evaluation(workdir: str, version: str) -> list[str]:
    matrix, deltas = read_json(Workdir(workdir).eval_matrix), read_json(Workdir(workdir).eval_deltas)
    row = (matrix or {}).get(version) or {}
    if not row:
        return ["", "No evaluation yet (run `mixloop report` on its pipeline)."]
    lines = [
        "",
        "## Evaluation",
        "",
        "Eval loss (token mean; chat sets on assistant tokens):",
        "",
        "| eval set | loss |",
        "|---|---|",
        *(f"| {name} | {r['loss']:.4f} |" for name, r in sorted(row.items()) if r),
    ]
    delta = (deltas or {}).get(version)
    if delta:
        lines += ["", f"Against its parent `{delta['parent']}` (loss change; negative is better):", ""]
        lines += [
            f"- {name}: {change:+.4f} (new corpus)"
            for name, change in ((c, -gain) for c, gain in delta["uptake"].items())
        ]
        lines += [f"- {name}: {change:+.4f} (earlier corpus)" for name, change in delta["forgetting"].items()]
    return lines
