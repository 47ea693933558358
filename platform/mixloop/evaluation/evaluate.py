"""Evaluate versions on every corpus's held-out split: token-mean loss and perplexity.

Chat sets count assistant tokens only (their labels carry that mask). Each
(version, eval set) pair is computed once (one Ray task per version, for all of
its missing sets) and stored under <workdir>/eval/<version>/<corpus>.json, keyed
by the version's weights, the packed eval set and the row count, so later runs
reuse it.
"""

from __future__ import annotations

import hashlib
import json

import fsspec
import torch

from mixloop.data.store import read_manifest
from mixloop.evaluation.health import chat_health
from mixloop.runs.tracking import counted
from mixloop.storage.fs import write_json
from mixloop.storage.layout import Workdir
from mixloop.train.heldout import evaluate_model
from mixloop.train.model import load_model
from mixloop.versioning.lineage import Lineages
from mixloop.versioning.registry import require_lineage, version_dir


def _evaluate_version(model_dir: str, eval_dirs: dict[str, str], max_rows: int) -> dict[str, dict]:
    torch.set_num_threads(1)
    model = load_model(model_dir).eval()
    return {name: evaluate_model(model, folder, max_rows) for name, folder in eval_dirs.items()}


def _cached(workdir: str, version: str, corpus: str, key: str) -> dict | None:
    fs, inner = fsspec.core.url_to_fs(Workdir(workdir).eval_result(version, corpus))
    if not fs.exists(inner):
        return None
    with fs.open(inner) as f:
        result = json.load(f)
    # A result stored before losses had standard errors is measured again: the gate weighs noise.
    return result if result.get("key") == key and "stderr" in result else None


def evaluate_versions(
    workdir: str, versions: list[str], eval_dirs: dict[str, str], max_rows: int, progress_bar: bool = False
) -> dict:
    """loss[version][corpus], computing (in parallel Ray tasks) only the pairs not stored yet; with
    `progress_bar` (a terminal), the versions are counted on a bar as they finish."""
    # lazy: ray
    import ray
    from ray.util import as_completed  # one at a time: each version is saved and counted as it finishes

    # A result belongs to one model (its hash and publication time) and one eval set (its packed key).
    models = {v: _model_key(workdir, v) for v in versions}
    keys = {name: f"{read_manifest(folder)['key']}-{max_rows}" for name, folder in eval_dirs.items()}
    matrix = {v: {c: _cached(workdir, v, c, f"{models[v]}/{keys[c]}") for c in eval_dirs} for v in versions}
    remote = ray.remote(num_cpus=1)(_evaluate_version)
    pending = {}
    for version, row in matrix.items():
        missing = {c: eval_dirs[c] for c, result in row.items() if result is None}
        if missing:
            pending[version] = remote.remote(version_dir(workdir, version), missing, max_rows)
    versions_of = {ref: version for version, ref in pending.items()}
    finished = as_completed(list(versions_of), chunk_size=1, yield_obj_refs=True)
    for ref in counted(finished, len(versions_of), "[eval] versions", progress_bar):
        version = versions_of[ref]
        for corpus, result in ray.get(ref).items():
            result["key"] = f"{models[version]}/{keys[corpus]}"
            write_json(Workdir(workdir).eval_result(version, corpus), result)
            matrix[version][corpus] = result
    return matrix


def _model_key(workdir: str, version: str) -> str:
    """What a stored result belongs to: the version's weights (their hashes), or, for versions
    published before hashes were recorded, its stage and publication time."""
    lineage = require_lineage(workdir, version)
    weights = lineage.weights_sha256
    return (
        ",".join(weights[name][:16] for name in sorted(weights))
        if weights
        else f"{lineage.stage_hash}@{lineage.finished}"
    )


def format_matrix(matrix: dict, metric: str = "loss") -> str:
    """A plain-text table: versions down, eval sets across."""
    sets = sorted({c for row in matrix.values() for c in row})
    width = max([len(v) for v in matrix] + [7])
    lines = [f"{'version':<{width}}  " + "  ".join(f"{s:>12}" for s in sets)]
    for version, row in matrix.items():
        cells = [f"{row[s][metric]:>12.4f}" if row.get(s) else f"{'-':>12}" for s in sets]
        lines.append(f"{version:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def iteration_deltas(matrix: dict, lineages: Lineages) -> dict[str, dict]:
    """What each version gained and forgot, in eval loss (positive numbers are good news for uptake,
    bad news for forgetting).

    uptake[c]: parent loss - version loss, on the corpora the version's stage brought in (in its
    mixture and in no ancestor's). forgetting[c]: version loss - parent loss, on the corpora of
    earlier stages; forgetting_vs_best[c]: version loss - the lowest loss any ancestor reached.
    """
    deltas = {}
    for version, lineage in lineages.items():
        parent = lineage.parent
        if parent is None or version not in matrix or parent not in matrix:
            continue
        chain = lineages.ancestors(parent)
        earlier = lineages.trained_corpora(parent)
        new = set(lineage.corpora) - earlier
        loss = {v: {c: r["loss"] for c, r in row.items() if r} for v, row in matrix.items()}
        deltas[version] = {
            "parent": parent,
            "uptake": {c: loss[parent][c] - loss[version][c] for c in sorted(new) if c in loss[version]},
            "forgetting": {c: loss[version][c] - loss[parent][c] for c in sorted(earlier) if c in loss[version]},
            "forgetting_vs_best": {
                c: loss[version][c] - min(loss[a][c] for a in chain if c in loss.get(a, {}))
                for c in sorted(earlier)
                if c in loss[version]
            },
        }
    return deltas


# One sign convention for every table, page and plot: uptake > 0 means the version got better on the
# corpora its stage brought in (their eval loss fell); forgetting > 0 means it got worse on earlier ones
# (their loss rose). A negative forgetting is good news.
SIGNS = "uptake > 0: loss fell on the new corpora; forgetting > 0: loss rose on earlier ones"


def format_pairs(values: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:+.3f}" for name, value in values.items()) or "-"


def format_deltas(deltas: dict[str, dict]) -> str:
    lines = [f"against each parent ({SIGNS}):"]
    for version, d in deltas.items():
        lines.append(
            f"{version} (from {d['parent']}): uptake {format_pairs(d['uptake'])}; "
            f"forgetting {format_pairs(d['forgetting'])}"
        )
    return "\n".join(lines)


def delta_bars(deltas: dict[str, dict]) -> list[tuple[str, float, bool]]:
    """(label, fall of eval loss against the parent, better) for every corpus of every version: the
    same story as the tables, drawn as one axis where up is better."""
    bars = []
    for version, d in deltas.items():
        bars += [(f"{version}\n{corpus} (new)", gain, gain > 0) for corpus, gain in d["uptake"].items()]
        bars += [(f"{version}\n{corpus}", -rise, rise < 0) for corpus, rise in d["forgetting"].items()]
    return bars


def health_versions(
    workdir: str, versions: list[str], prompts: dict[str, list], max_new_tokens: int, progress_bar: bool = False
) -> dict:
    """Chat health of every version (see health.py), in parallel Ray tasks, stored per version."""
    # lazy: ray
    import ray
    from ray.util import as_completed

    if not prompts:
        return {}
    asked = hashlib.sha256(json.dumps([prompts, max_new_tokens], sort_keys=True).encode()).hexdigest()[:16]
    results, pending = {}, {}
    remote = ray.remote(num_cpus=1)(chat_health)
    for version in versions:
        key = f"{_model_key(workdir, version)}/{asked}"
        cached = _cached(workdir, version, "chat_health", key)
        if cached is not None:
            results[version] = cached["corpora"]
        else:
            pending[version] = (key, remote.remote(version_dir(workdir, version), prompts, max_new_tokens))
    versions_of = {ref: version for version, (_, ref) in pending.items()}
    finished = as_completed(list(versions_of), chunk_size=1, yield_obj_refs=True)
    for ref in counted(finished, len(versions_of), "[chat health] versions", progress_bar):
        version = versions_of[ref]
        results[version] = ray.get(ref)
        write_json(
            Workdir(workdir).eval_result(version, "chat_health"),
            {"key": pending[version][0], "corpora": results[version]},
        )
    return {v: results[v] for v in versions}
