"""Models from the Hugging Face Hub: a `model.path` that names no folder but a hub id (`org/name`,
with an optional `revision`), downloaded once through huggingface_hub into its cache.

HF_HUB_OFFLINE is honoured (read when the model is needed, so a process that sets it late is
heard too): offline, a model must already be in the cache, and validation says so before any
work. HF_HUB_CACHE and HF_HOME place the cache as huggingface_hub's own tools do.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

from mixloop.errors import MixloopError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a causal LM needs from a repository: config, weights, tokenizer and chat template.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def is_hub_id(path: str, local: str) -> bool:
    """Whether a model.path (`local`: it resolved against the spec's folder) names a hub repository:
    org/name, where neither that folder nor its parent exists here."""
    return ("://" not in path and bool(HUB_ID.match(path)) and not Path(local).exists()
            and not Path(local).parent.exists())


def local_model(path: str, local: str, revision: str | None) -> tuple[str, str | None]:
    """(folder, hub commit or None) of a model.path: the folder it names, or its hub download."""
    return download(path, revision) if is_hub_id(path, local) else (local, None)


def cached_config(repo: str, revision: str | None) -> str | None:
    """The cached config.json of a hub model, or None (no network)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, "config.json", revision=revision, cache_dir=_cache_dir())
    return found if isinstance(found, str) else None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=8)
def download(repo: str, revision: str | None) -> tuple[str, str]:
    """(local folder, commit) of a hub model, from the cache or downloaded into it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    name = f"{repo}@{revision}" if revision else repo
    try:
        folder = snapshot_download(repo, revision=revision, allow_patterns=MODEL_FILES, cache_dir=_cache_dir(),
                                   local_files_only=offline())
    except LocalEntryNotFoundError:
        raise MixloopError(not_cached_message(repo, revision)) from None
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as exc:
        raise MixloopError(f"model.path: the Hugging Face Hub has no model {name} you may read "
                           f"({type(exc).__name__}). Fix: check the id and revision, and log in "
                           "(`hf auth login` or HF_TOKEN) for a gated or private model.") from None
    except (HfHubHTTPError, OSError) as exc:
        raise MixloopError(f"model.path: cannot download {name} ({str(exc).splitlines()[0]}). Fix: check the "
                           "network, or download it where there is one and set HF_HUB_OFFLINE=1 here.") from None
    return folder, Path(folder).name  # a snapshot folder is named by its commit


def not_cached_message(repo: str, revision: str | None) -> str:
    name = f"{repo}@{revision}" if revision else repo
    return (f"model.path: {name} is not in the Hugging Face cache ({_cache_dir() or 'the default cache'}) and "
            f"HF_HUB_OFFLINE is set. Fix: download it once where there is a network (`hf download {repo}"
            + (f" --revision {revision}" if revision else "") + "`) into this cache, or unset HF_HUB_OFFLINE.")


def _cache_dir() -> str | None:
    return os.environ.get("HF_HUB_CACHE") or (os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME")
                                              else None)
