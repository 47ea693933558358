"""Where a pipeline's tokens and weights come from: its tokenizer (a folder, or trained), its model
(a preset or config to build, or a folder or hub id to start from), and its corpora."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from mixloop.config.strict import Strict

MODEL_PRESETS = ("minimind-3", "small", "tiny", "micro")
GENERATED_TOPICS = ("general", "astronomy")
# max_position_embeddings of mixloop.train.model.PRESETS, and Qwen3Config's default for a preset or config without
# one. Copied so that validating a spec does not import torch and transformers (seconds); a unit test keeps
# them in step.
PRESET_POSITIONS = {"minimind-3": 32768, "small": 4096, "tiny": 2048, "micro": 2048}
QWEN3_DEFAULT_POSITIONS = 32768


class TrainTokenizer(Strict):
    vocab_size: int = Field(ge=260, le=262144, examples=[6400])
    """Size of the byte-level BPE vocabulary, special tokens included."""
    sample_bytes: int = Field(default=50_000_000, gt=0)
    """At most this many bytes of the pipeline's corpora are read to train it."""


class TokenizerConfig(Strict):
    path: str | None = None
    """A Hugging Face tokenizer directory (tokenizer.json, tokenizer_config.json)."""
    train: TrainTokenizer | None = None
    """Train a byte-level BPE with a ChatML chat template on the pipeline's corpora."""


class ModelConfig(Strict):
    preset: Literal[MODEL_PRESETS] | None = None  # type: ignore[valid-type]
    """A named Qwen3 configuration: minimind-3, small, tiny or micro."""
    config: dict[str, Any] | None = None
    """Qwen3Config fields, applied over the preset if one is given."""
    path: str | None = None
    """A Hugging Face causal-LM to start from: a folder (or URI), or a hub id such as Qwen/Qwen3-0.6B
    (downloaded once into the Hugging Face cache; HF_HUB_OFFLINE is honoured)."""
    revision: str | None = None
    """For a hub id: the branch, tag or commit to take (default: main). The commit is kept in lineage."""
    trust_remote_code: bool = False
    """Allow code shipped inside a model directory to run. Off unless you trust it."""


class Generate(Strict):
    topic: Literal[GENERATED_TOPICS]  # type: ignore[valid-type]
    """What the generated documents are about: general or astronomy."""
    documents: int = Field(default=2000, gt=0)
    """How many training documents to generate."""
    eval_documents: int = Field(default=100, gt=0)
    """How many held-out documents to generate for the eval split."""
    seed: int = 0
    """Seed of the generator: the same seed writes the same files."""


RECORD_FORMATS = ("auto", "text", "conversations", "messages", "sharegpt", "alpaca")
FILE_FORMATS = ("jsonl", "json", "parquet", "csv", "arrow")


class CorpusConfig(Strict):
    kind: Literal["text", "chat"]
    """text documents train on every token; chats train on the assistant's tokens only."""
    path: str | None = None
    """A path, glob or fsspec URI (s3://...) of jsonl, json, parquet or csv files, or a folder written
    by Hugging Face datasets' save_to_disk."""
    dataset: str | None = None
    """Instead of `path`: a Hugging Face Hub dataset id (org/name), its files downloaded once into the
    Hugging Face cache (HF_HUB_OFFLINE honoured) and read as local files are."""
    subset: str | None = None
    """For a hub dataset: its subset (the `name` of datasets.load_dataset); default: its only one."""
    split: str | None = None
    """For a hub dataset: the split to train on (default: train)."""

    @property
    def train_split(self) -> str:
        return self.split or "train"

    revision: str | None = None
    """For a hub dataset: the branch, tag or commit to take (default: main)."""
    format: Literal[RECORD_FORMATS] = "auto"  # type: ignore[valid-type]
    """The records' shape. text: {"text": ...}; chats: conversations (MiniMind's role/content turns),
    messages (OpenAI), sharegpt (from/value turns) or alpaca (instruction/input/output); auto: told
    apart by their fields, record by record (`mixloop data preview` shows what it found)."""
    columns: dict[str, str] = Field(default_factory=dict)
    """Field names where the records use others than the format's: {text: body}, or for chats any of
    conversations, messages, role, content, instruction, input, output, system."""
    file_format: Literal[FILE_FORMATS] | None = None  # type: ignore[valid-type]
    """File format; taken from the file extension when not given."""
    chat_template: str | None = None
    """For chats: the template this corpus is rendered with instead of the tokenizer's: chatml, or a
    Jinja file (path relative to the spec)."""
    eval: str | None = None
    """A held-out split in the same format, used to measure uptake and forgetting: files as in `path`,
    or for a hub dataset the name of its split (test, validation)."""
    generate: Generate | None = None
    """Let mixloop generate this corpus (used by the quickstart; nothing to download)."""
    probes: str | None = None
    """Questions on what this corpus teaches, scored on every version under the corpus's name (records as
    in benchmarks.probes): a file (relative to the spec), `eval` for a chat corpus's eval split (the first
    user turn asked, its answer the reference), or `generated` for a generated corpus: the generator
    writes them beside the corpus from the same facts (a text corpus: multiple choice completing its
    statements; a chat corpus: its questions and answers)."""
    max_bad_fraction: float = Field(default=0.01, ge=0, le=1)
    """Stop when more than this share of records is malformed (they go to rejects/)."""
    max_document_tokens: int | None = Field(default=None, gt=0)
    """Longest document, in tokens, taken whole; longer ones are handled as `long_documents` says."""
    long_documents: Literal["split", "drop"] = "split"
    """split: cut a document longer than max_document_tokens into pieces trained as separate
    documents (counted in the manifest); drop: write it to rejects/ with its length."""

    @model_validator(mode="before")
    @classmethod
    def _file_format_was_format(cls, value: Any) -> Any:
        """Specs written before record formats said `format: jsonl` or `parquet` for the file format."""
        if isinstance(value, dict) and value.get("format") in FILE_FORMATS and "file_format" not in value:
            value = {**value, "file_format": value["format"]}
            value.pop("format")
        return value
