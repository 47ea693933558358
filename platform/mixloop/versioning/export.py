"""`mixloop models export`: a version as a Hugging Face folder to share: its weights in the chosen
dtype (sharded if asked) through save_pretrained, its tokenizer and chat template, its lineage, and a
model card (README.md with Hub metadata: where it started, the stage chain with mixtures and tokens,
its eval losses, and what it gained and forgot against its parent)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from mixloop.errors import MixloopError
from mixloop.storage.fs import exists, join, local_copy, read_json, read_text
from mixloop.version import __version__
from mixloop.versioning.registry import (
    list_versions,
    loadable_everywhere,
    mixture_shares,
    read_lineage,
    verified_version,
)

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # --dtype: torch's name
# Written again by save_pretrained, in the chosen dtype and shards; everything else is copied.
REWRITTEN = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")


def export(workdir: str, version: str, target: str, dtype: str = "fp32", max_shard_size: str | None = None) -> Path:
    """Write the version `version` of `workdir` into the new or empty folder `target`."""
    # lazy: torch, transformers; the CLI imports this module for --help
    import torch

    from mixloop.train.model import load_model

    out = Path(target)
    if out.exists() and any(out.iterdir()):
        raise MixloopError(f"{target} exists and is not empty. Fix: export into a new or empty folder.")
    source = Path(local_copy(verified_version(workdir, version)))  # names a missing version too
    lineage = read_lineage(workdir, version)
    out.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.is_file() and not file.name.startswith(".") and file.name not in REWRITTEN:
            shutil.copy2(file, out / file.name)
    model = load_model(str(source)).to(getattr(torch, DTYPES[dtype]))
    model.save_pretrained(out, max_shard_size=max_shard_size or "50GB")
    loadable_everywhere(str(out))
    (out / "README.md").write_text(model_card(workdir, lineage, dtype))
    return out


def model_card(workdir: str, lineage: dict, dtype: str) -> str:
    """A Hub model card: metadata, the stage chain from base to this version, eval losses, deltas."""
    versions = {v["version"]: v for v in list_versions(workdir)}
    chain = _chain(lineage["version"], versions)
    start = (versions.get("base", {}).get("model") or {}).get("path")
    hub_start = start if start and not start.startswith(("/", ".")) and "://" not in start else None
    datasets = _hub_datasets(workdir, chain)
    metadata = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["mixloop", "continual-pretraining"],
        **({"base_model": hub_start} if hub_start else {}),
        **({"datasets": datasets} if datasets else {}),
    }
    lines = [
        "---",
        *(f"{key}: {json.dumps(value)}" for key, value in metadata.items()),
        "---",
        "",
        f"# {lineage['version']}",
        "",
        f"Version `{lineage['version']}` of a model kept current with mixloop "
        f"{lineage.get('mixloop_version', __version__)}, exported in {dtype}. It started from "
        f"{f'`{start}`' if start else 'a new model'} and went through these stages:",
        "",
        "| version | parent | mixture (share of trained tokens) | tokens trained | peak LR |",
        "|---|---|---|---|---|",
    ]
    for step in chain:
        stage = step.get("stage") or {}
        tokens = sum((step.get("tokens_per_corpus") or {}).values())
        lines.append(
            f"| {step['version']} | {step.get('parent') or '-'} | {mixture_shares(stage.get('mixture', {}))} | "
            f"{tokens:,.0f} | {stage.get('lr', {}).get('peak', '-')} |"
        )
    lines += _evaluation(workdir, lineage["version"])
    lines += [
        "",
        "Load it with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`; "
        "`lineage.json` beside the weights records every setting of its stage.",
        "",
    ]
    return "\n".join(lines)


def _hub_datasets(workdir: str, chain: list[dict]) -> list[str]:
    """The Hub datasets (ids) of the corpora the chain trained on, from the workdir's copy of the spec."""
    copy = join(workdir, "pipeline.yaml")
    corpora = (yaml.safe_load(read_text(copy)) or {}).get("corpora", {}) if exists(copy) else {}
    used = {name for step in chain for name in (step.get("stage") or {}).get("mixture", {})}
    return sorted({corpora[name]["dataset"] for name in used if "dataset" in corpora.get(name, {})})


def _chain(version: str, versions: dict[str, dict]) -> list[dict]:
    chain = []
    while version in versions:
        chain.append(versions[version])
        version = versions[version].get("parent")
    return chain[::-1]


def _evaluation(workdir: str, version: str) -> list[str]:
    from mixloop.evaluation.evaluate import eval_file  # lazy: torch

    matrix, deltas = read_json(eval_file(workdir, "matrix.json")), read_json(eval_file(workdir, "deltas.json"))
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
