"""Versions: immutable Hugging Face model directories with a lineage record.

`<workdir>/models/<version>/` holds config.json, model.safetensors, the
tokenizer files with their chat template, and lineage.json. A version exists
only once it is complete: locally it is assembled in a hidden folder and
renamed into place; on object stores lineage.json is uploaded last, and
readers treat a folder without it as absent.

lineage.json records the SHA-256 of every weights file, and whoever loads a
version (the next stage, eval, chat, export) checks them first: a truncated or
altered file is named with the fix instead of failing deep inside transformers.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import fsspec

from mixloop.config.schema import CURRENT_ALIAS
from mixloop.errors import CorruptVersionError, MixloopError
from mixloop.storage.fs import is_local, join, local_copy, read_json, share_with_umask, upload, write_json
from mixloop.storage.layout import LINEAGE_FILE, Workdir
from mixloop.version import __version__
from mixloop.versioning.lineage import Lineage, Lineages, load_lineage, save_lineage

MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors")
WEIGHT_FILES = ("model.safetensors",)
PARTIAL = ".partial-"


def version_dir(workdir: str, version: str) -> str:
    return Workdir(workdir).version(version)


def read_lineage(workdir: str, version: str) -> Lineage | None:
    return load_lineage(Workdir(workdir).lineage(resolve(workdir, version)))


def require_lineage(workdir: str, version: str) -> Lineage:
    """The lineage of a version that must be there (a parent, one just published); MixloopError if not."""
    lineage = read_lineage(workdir, version)
    if lineage is None:
        raise MixloopError(f"no version {version!r} in {workdir}. See `mixloop models list {workdir}`.")
    return lineage


def write_lineage(workdir: str, lineage: Lineage) -> None:
    """Rewrite a version's lineage (a gate's verdict, a promotion); its weights never change."""
    save_lineage(Workdir(workdir).lineage(lineage.version), lineage)


def list_versions(workdir: str) -> Lineages:
    """The lineage of every complete version, oldest first (the `current` link is not one)."""
    fs, inner = fsspec.core.url_to_fs(Workdir(workdir).models)
    if not fs.exists(inner):
        return Lineages([])
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(inner, detail=False)]
    found = [read_lineage(workdir, n) for n in names if not n.startswith(".") and n != CURRENT_ALIAS]
    return Lineages(sorted((f for f in found if f), key=lambda lineage: lineage.finished))


# ---------------------------------------------------------------- the current version
# <workdir>/current.json: {"version", "history": [{version, at, why, restores?}, ...]}, newest last; a
# local workdir also has models/current, a link to that version's folder, for tools that take a path.


def current_state(workdir: str) -> dict:
    return read_json(Workdir(workdir).current_record) or {"version": None, "history": []}


def current_version(workdir: str) -> str | None:
    return current_state(workdir)["version"]


def resolve(workdir: str, name: str) -> str:
    """A version name, with `current` standing for the version it names."""
    if name != CURRENT_ALIAS:
        return name
    version = current_version(workdir)
    if version is None:
        raise MixloopError(
            f"{workdir} has no current version yet: a run makes its last version current "
            "(when it passes the gate). See `mixloop models list`."
        )
    return version


def set_current(workdir: str, version: str, why: str, **details) -> None:
    """Make `version` current, adding to the history why (and `details`, such as which entry it restores)."""
    state = current_state(workdir)
    history = [*state["history"], {"version": version, "at": now(), "why": why, **details}]
    write_json(Workdir(workdir).current_record, {"version": version, "history": history})
    if is_local(workdir):  # models/current -> <version>, replaced in one rename
        models = Path(Workdir(workdir).models.removeprefix("file://"))
        staging = models / f".{CURRENT_ALIAS}-{os.getpid()}"
        staging.unlink(missing_ok=True)
        staging.symlink_to(version)
        staging.replace(models / CURRENT_ALIAS)


def now(at: float | None = None) -> str:
    """The time `at` (seconds since the epoch; by default now) as the registry writes times."""
    moment = datetime.datetime.now(datetime.UTC) if at is None else datetime.datetime.fromtimestamp(at, datetime.UTC)
    return moment.isoformat(timespec="seconds")


def publish(workdir: str, model_dir: str, tokenizer_dir: str, lineage: Lineage) -> str:
    """Assemble model weights, tokenizer and lineage into models/<lineage.version>, atomically; the
    lineage gets the time, mixloop's version and the weights' hashes."""
    with tempfile.TemporaryDirectory() as staging:
        for name in MODEL_FILES:
            if Path(model_dir, name).exists():
                shutil.copy2(Path(model_dir, name), Path(staging, name))
        hashes = {name: file_sha256(str(Path(staging, name))) for name in WEIGHT_FILES if Path(staging, name).exists()}
        for file in Path(local_copy(tokenizer_dir)).iterdir():
            if not file.name.startswith("."):
                shutil.copy2(file, Path(staging, file.name))
        loadable_everywhere(staging)
        update = {"mixloop_version": __version__, "finished": now(), "weights_sha256": hashes}
        save_lineage(str(Path(staging, LINEAGE_FILE)), lineage.model_copy(update=update))
        target = version_dir(workdir, lineage.version)
        if is_local(target):
            _move_into_place(staging, target.removeprefix("file://"))
        else:
            upload(staging, target, last=LINEAGE_FILE)
    return target


def _move_into_place(staging: str, target: str) -> None:
    hidden = Path(target).parent / f".{Path(target).name}{PARTIAL}{os.getpid()}"
    shutil.rmtree(hidden, ignore_errors=True)
    shutil.copytree(staging, hidden)
    share_with_umask(hidden)  # the staging folder was private (0700); a version is for everyone
    if Path(target, LINEAGE_FILE).exists():
        shutil.rmtree(hidden)
        raise FileExistsError(f"version {Path(target).name} was published meanwhile by another run")
    if Path(target).exists():  # an incomplete leftover (no lineage): readers already ignore it
        shutil.rmtree(target)
    os.replace(hidden, target)


def remove_partial_publishes(workdir: str) -> list[str]:
    """Delete the hidden staging folders of publishes that were killed midway. Only safe while this
    process holds the workdir's lock, so no other publish is under way."""
    models = Path(Workdir(workdir).models.removeprefix("file://"))
    if not is_local(workdir) or not models.is_dir():
        return []  # on object stores nothing is staged in the workdir
    leftovers = [p for p in models.iterdir() if p.name.startswith(".") and PARTIAL in p.name]
    for folder in leftovers:
        shutil.rmtree(folder, ignore_errors=True)
    return [str(p) for p in leftovers]


def file_sha256(path: str) -> str:
    """SHA-256 of a local file or URI, read in 8 MiB blocks (weights can be gigabytes)."""
    digest = hashlib.sha256()
    fs, inner = fsspec.core.url_to_fs(path)
    with fs.open(inner, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verified_version(workdir: str, version: str) -> str:
    """The folder of a complete version whose weights match the hashes in its lineage; a clear
    error naming the file and the fix otherwise. Versions published before hashes were recorded
    are taken as they are."""
    version = resolve(workdir, version)
    lineage = read_lineage(workdir, version)
    folder = version_dir(workdir, version)
    if lineage is None:
        raise MixloopError(f"no version {version!r} in {workdir}. See `mixloop models list {workdir}`.")
    for name, expected in lineage.weights_sha256.items():
        path = join(folder, name)
        try:
            actual = file_sha256(path)
        except FileNotFoundError:
            actual = "missing"
        if actual != expected:
            raise CorruptVersionError(
                f"{path}: the weights of version {version} are {'missing' if actual == 'missing' else 'corrupt'} "
                f"(SHA-256 {actual[:12]}, lineage.json says {expected[:12]}). Fix: restore the file from a backup, "
                f"or delete {folder} and run the pipeline again to retrain it."
            )
    return folder


# transformers 5 writes a tokenizer class that 4.x cannot import; this one both load as the same
# fast tokenizer (tokenizer.json decides every token).
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def loadable_everywhere(folder: str) -> None:
    """Make a local Hugging Face folder load the same under transformers 4.x as under 5.x (and in tools
    that read config.json, such as GGUF converters): 5.x keeps RoPE settings only in `rope_parameters`,
    so 4.x silently falls back to its default base (10000). The 4.x keys get the same values."""
    config_path, tokenizer_path = Path(folder, "config.json"), Path(folder, "tokenizer_config.json")
    if config_path.exists():
        config = json.loads(config_path.read_text())
        rope = config.get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" in rope:
            config["rope_theta"] = rope["rope_theta"]
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
            config["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer_path.exists():
        settings = json.loads(tokenizer_path.read_text())
        portable = portable_tokenizer_settings(settings)
        if portable != settings:
            tokenizer_path.write_text(json.dumps(portable, indent=2, ensure_ascii=False) + "\n")


def portable_tokenizer_settings(settings: dict) -> dict:
    """tokenizer_config.json as 4.x reads it too: a tokenizer class it can import, and the extra special
    tokens that 5.x lists in `extra_special_tokens` under 4.x's key for them, `additional_special_tokens`
    (4.57 takes `extra_special_tokens` for a mapping of named tokens and fails on a list; 5.x reads
    `additional_special_tokens` as its extra special tokens when `extra_special_tokens` is absent)."""
    settings = dict(settings)
    if settings.get("tokenizer_class") == "TokenizersBackend":
        settings["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    extra = settings.get("extra_special_tokens")
    if isinstance(extra, list):
        del settings["extra_special_tokens"]
        older = settings.get("additional_special_tokens") or []
        settings["additional_special_tokens"] = [*older, *(token for token in extra if token not in older)]
    return settings
