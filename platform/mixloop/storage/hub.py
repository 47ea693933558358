"""The Hugging Face Hub: a `model.path` that names no folder but a hub id (`org/name`, with an
optional `revision`), downloaded once through huggingface_hub into its cache; a corpus's `dataset:`
(a hub dataset's subset and split, whose files the datasets library picks and the cache keeps); and
an exported version pushed to a hub repo (`mixloop models export ... --push-to-hub REPO`).

HF_HUB_OFFLINE is honoured (read when the model is needed, so a process that sets it late is
heard too): offline, a model or dataset must already be in the cache, and validation says so before
any work; a push is refused before the export. HF_HUB_CACHE and HF_HOME place the cache, HF_TOKEN (or
`hf auth login`) gives the token and HF_ENDPOINT the Hub, as huggingface_hub's own tools do.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
from pathlib import Path

from mixloop.errors import MixloopError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a causal LM needs from a repository: config, weights, tokenizer and chat template; and its card,
# whose license an export's card carries on.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "README.md"]
# Weights a repo may hold from an earlier push (other shards): removed by a push, as transformers
# would load a stale model.safetensors before new shards.
WEIGHT_FILES = ["*.safetensors", "*.safetensors.index.json"]


def is_hub_id(path: str, local: str) -> bool:
    """Whether a model.path (`local`: it resolved against the spec's folder) names a hub repository:
    org/name, where neither that folder nor its parent exists here."""
    return (
        "://" not in path and bool(HUB_ID.match(path)) and not Path(local).exists() and not Path(local).parent.exists()
    )


def local_model(path: str, local: str, revision: str | None) -> tuple[str, str | None]:
    """(folder, hub commit or None) of a model.path: the folder it names, or its hub download."""
    return download(path, revision) if is_hub_id(path, local) else (local, None)


def cached_config(repo: str, revision: str | None) -> str | None:
    """The cached config.json of a hub model, or None (no network)."""
    # lazy: huggingface_hub, kept out of `mixloop --help`
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, "config.json", revision=revision, cache_dir=_cache_dir())
    return found if isinstance(found, str) else None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=8)
def download(repo: str, revision: str | None) -> tuple[str, str]:
    """(local folder, commit) of a hub model, from the cache or downloaded into it."""
    # lazy: huggingface_hub, kept out of `mixloop --help`
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = f"{repo}@{revision}" if revision else repo
    try:
        folder = snapshot_download(
            repo, revision=revision, allow_patterns=MODEL_FILES, cache_dir=_cache_dir(), local_files_only=offline()
        )
    except LocalEntryNotFoundError:
        raise MixloopError("model.path: " + not_cached_message(repo, revision)) from None
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as exc:
        raise MixloopError(
            f"model.path: the Hugging Face Hub has no model {name} you may read "
            f"({type(exc).__name__}). Fix: check the id and revision, and log in "
            "(`hf auth login` or HF_TOKEN) for a gated or private model."
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise MixloopError(
            f"model.path: cannot download {name} ({str(exc).splitlines()[0]}). Fix: check the "
            "network, or download it where there is one and set HF_HUB_OFFLINE=1 here."
        ) from None
    return folder, Path(folder).name  # a snapshot folder is named by its commit


def model_card_text(repo: str, revision: str | None) -> str | None:
    """The model card (README.md) of a hub model, from the cache or the Hub; None when it has none or
    it cannot be read (offline and not cached, no network, no access)."""
    # lazy: huggingface_hub (its HTTP stack) only where a hub model is read
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        path = hf_hub_download(repo, "README.md", revision=revision, cache_dir=_cache_dir(), local_files_only=offline())
    except (EntryNotFoundError, OSError, ValueError):
        return None
    return Path(path).read_text(encoding="utf-8")


def not_cached_message(repo: str, revision: str | None, repo_type: str = "model") -> str:
    name = ("dataset " if repo_type == "dataset" else "") + (f"{repo}@{revision}" if revision else repo)
    command = (
        f"hf download {repo}"
        + (" --repo-type dataset" if repo_type == "dataset" else "")
        + (f" --revision {revision}" if revision else "")
    )
    return (
        f"{name} is not in the Hugging Face cache ({_cache_dir() or 'the default cache'}) and HF_HUB_OFFLINE "
        f"is set. Fix: download it once where there is a network (`{command}`) into this cache, or unset "
        "HF_HUB_OFFLINE."
    )


def dataset_files(repo: str, revision: str | None, subset: str | None, split: str) -> tuple[str, ...]:
    """The local files of one split of a hub dataset, taken from the Hugging Face cache or downloaded
    into it (the files of its subset only). Which files make a split is decided by the datasets
    library, as `load_dataset` decides it: the README's `configs`, else its file-naming conventions."""
    if offline():
        return _split(_splits_in_cache(repo, revision, subset, _cache_dir()), repo, split, in_cache=True)
    commit, paths = _splits_on_hub(repo, revision, subset)
    folder = _downloaded(repo, commit, tuple(sorted({p for files in paths.values() for p in files})), _cache_dir())
    return tuple(f"{folder}/{path}" for path in _split(paths, repo, split, in_cache=False))


def split_paths(repo: str, revision: str | None, subset: str | None, split: str) -> tuple[str, ...]:
    """The files of a hub dataset's split as validation sees them, downloading nothing: local files of
    the cache when offline, paths in the repository otherwise (MixloopError: it has no such split)."""
    if offline():
        return dataset_files(repo, revision, subset, split)
    return _split(_splits_on_hub(repo, revision, subset)[1], repo, split, in_cache=False)


# Each resolution reads the dataset card and lists files (on the Hub: HTTP requests), so a process
# resolves a subset once, for validation and for every split the corpora ask for.
@functools.lru_cache(maxsize=16)
def _splits_on_hub(repo: str, revision: str | None, subset: str | None) -> tuple[str, dict[str, tuple[str, ...]]]:
    """(commit, split -> paths in the repository) of a subset, resolved on the Hub, downloading no data.
    Every split: the datasets library resolves a subset's splits together."""
    uris = _subset_files(repo, repo, subset, revision)
    first = next((uri for files in uris.values() for uri in files), None)
    if first is None:
        raise MixloopError(
            f"dataset {repo}: no data files{f' in subset {subset!r}' if subset else ''}. Fix: check "
            "the id, `subset` and `revision`."
        )
    # The datasets library names them hf://datasets/<repo>@<commit>/<path in the repository>.
    commit = first.split("@", 1)[1].split("/", 1)[0]
    return commit, {split: tuple(uri.split(f"@{commit}/", 1)[1] for uri in files) for split, files in uris.items()}


@functools.lru_cache(maxsize=16)
def _splits_in_cache(
    repo: str, revision: str | None, subset: str | None, cache_dir: str | None
) -> dict[str, tuple[str, ...]]:
    return _subset_files(_dataset_snapshot(repo, revision), repo, subset)


@functools.lru_cache(maxsize=16)
def _downloaded(repo: str, commit: str, paths: tuple[str, ...], cache_dir: str | None) -> str:
    """The snapshot folder of a subset's files (with the card and config that define its subsets)."""
    return _dataset_snapshot(repo, commit, ["README.md", ".huggingface.yaml", *paths])


def _subset_files(
    source: str, repo: str, subset: str | None, revision: str | None = None
) -> dict[str, tuple[str, ...]]:
    """split -> files of a subset of the dataset in `source` (a local snapshot folder, or the hub id)."""
    import datasets  # lazy: datasets

    try:
        builder = datasets.load_dataset_builder(source, name=subset, revision=revision)
    except ValueError as exc:  # an unknown subset (the message names the known ones), files in mixed formats
        raise MixloopError(f"dataset {repo}: {_short(exc)} Fix: check `subset` and the dataset's files.") from None
    except FileNotFoundError as exc:  # a cached snapshot that lacks some of the subset's files
        raise MixloopError(
            f"dataset {repo}: {_short(exc)} Fix: download it again where there is a network "
            f"(`hf download {repo} --repo-type dataset`)."
        ) from None
    except Exception as exc:  # noqa: BLE001 - network and Hub errors: one line, not a traceback
        raise MixloopError(
            f"dataset {repo}: cannot read it ({type(exc).__name__}: {_short(exc)}). Fix: check the "
            "id and revision, the network, and `hf auth login` for a private dataset."
        ) from None
    return {str(name): tuple(files) for name, files in (builder.config.data_files or {}).items()}


def _split(splits: dict[str, tuple[str, ...]], repo: str, split: str, in_cache: bool) -> tuple[str, ...]:
    if split not in splits:
        where = "in the Hugging Face cache" if in_cache else "on the Hub"
        raise MixloopError(
            f"dataset {repo} has no split {split!r} {where} (it has {', '.join(splits) or 'none'}). "
            "Fix: name one of those" + (", or download the split where there is a network." if in_cache else ".")
        )
    return splits[split]


def _short(exc: Exception) -> str:
    """The first line of an error, cut at 300 characters (datasets lists every file extension it knows)."""
    line = _first_line(exc)
    return line if len(line) <= 300 else line[:300] + "..."


def _dataset_snapshot(repo: str, revision: str | None, allow_patterns: list[str] | None = None) -> str:
    """The cached (and, online, completed) snapshot folder of a hub dataset."""
    # lazy: huggingface_hub, kept out of `mixloop --help`
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(
            repo,
            repo_type="dataset",
            revision=revision,
            allow_patterns=allow_patterns,
            cache_dir=_cache_dir(),
            local_files_only=offline(),
        )
    except LocalEntryNotFoundError:
        raise MixloopError(not_cached_message(repo, revision, "dataset")) from None
    except OSError as exc:  # HfHubHTTPError is one
        raise MixloopError(
            f"dataset {repo}: cannot download it ({str(exc).splitlines()[0]}). Fix: check the "
            "network, or download it where there is one and set HF_HUB_OFFLINE=1 here."
        ) from None


def check_push(repo: str) -> None:
    """Refuse `--push-to-hub REPO` before any export work: offline, not a repo id, or no token."""
    # lazy: huggingface_hub, kept out of `mixloop --help`
    from huggingface_hub import get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if offline():
        raise MixloopError(
            f"--push-to-hub {repo}: HF_HUB_OFFLINE is set, so nothing can be uploaded. Fix: unset "
            "HF_HUB_OFFLINE, or export without --push-to-hub and upload the folder later (`hf upload`)."
        )
    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        raise MixloopError(
            f"--push-to-hub {repo}: not a repo id ({_first_line(exc)}). Fix: name it org/name, "
            "or name alone for a repo of your own."
        ) from None
    if get_token() is None:
        raise MixloopError(
            f"--push-to-hub {repo}: no Hugging Face token. Fix: log in with `hf auth login`, or set "
            "HF_TOKEN to a token that can write."
        )


def push(folder: Path, repo: str, private: bool, revision: str | None, message: str) -> str:
    """Upload an exported folder to the hub repo `repo` (created if missing, private if asked), on the
    branch `revision` (created from main if missing) or main, in place of the weights there; the URL
    of the new commit."""
    from huggingface_hub import HfApi  # lazy: huggingface_hub, kept out of `mixloop --help`

    api = HfApi(endpoint=_endpoint())
    try:
        repo_id = api.create_repo(repo, private=private or None, exist_ok=True).repo_id  # name alone: yours
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id, folder_path=folder, revision=revision, commit_message=message, delete_patterns=WEIGHT_FILES
        ).commit_url
    # HfHubHTTPError and hf_xet's named errors are OSErrors; the HTTP client's network errors are not, and
    # the client differs between huggingface_hub versions (httpx in 1.x, httpx2 in 2.x); hf_xet may raise
    # a bare RuntimeError. Whatever the upload raised, the export is kept and the user told why.
    except Exception as exc:  # noqa: BLE001
        raise MixloopError(_push_failure(exc, repo, folder, private, revision)) from None


def _push_failure(exc: Exception, repo: str, folder: Path, private: bool, revision: str | None) -> str:
    retry = shlex.join(
        [
            "hf",
            "upload",
            repo,
            str(folder),
            ".",
            *(["--revision", revision] if revision else []),
            *(["--private"] if private else []),
            *(a for p in WEIGHT_FILES for a in ("--delete", p)),
        ]
    )
    cause, fix = _cause_and_fix(exc)
    return f"--push-to-hub {repo}: {cause}. Fix: {fix}, then upload the export kept in {folder}: `{retry}`."


def _cause_and_fix(exc: Exception) -> tuple[str, str]:
    # lazy: huggingface_hub, kept out of `mixloop --help`
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    status = exc.response.status_code if isinstance(exc, HfHubHTTPError) and exc.response is not None else None
    if isinstance(exc, RepositoryNotFoundError):
        return "the Hub has no such repo you may write to", "check the name, and that your token may write to it"
    if status == 401:
        return "the Hub refused your token (401)", (
            "set HF_TOKEN to a valid token that can write (or unset it and use `hf auth login`)"
            if os.environ.get("HF_TOKEN")
            else "log in again with a token that can write (`hf auth login`)"
        )
    if status == 403:
        return (
            "your token may not create or write to it (403)",
            "use a token with write access to its namespace, or push to a repo of your own",
        )
    if status:
        return f"the Hub answered: {_first_line(exc)}", "try again later"
    where = _endpoint() or "https://huggingface.co"
    return f"cannot reach the Hub at {where} ({_first_line(exc)})", "check the network"


def _endpoint() -> str | None:
    """HF_ENDPOINT, read now (huggingface_hub reads it once, when it is imported)."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or None


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _cache_dir() -> str | None:
    return os.environ.get("HF_HUB_CACHE") or (
        os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None
    )
