"""The spec's schema: pydantic models of the pipeline YAML, strict (unknown keys are errors), each
field documented where it is declared; numbers in exponent notation (2e9) read as numbers (strict.py).
The tokenizer, model and corpora sections are in sources.py."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from mixloop.config.benchmarks import BenchmarksConfig
from mixloop.config.sources import CorpusConfig, ModelConfig, TokenizerConfig
from mixloop.config.strict import Strict, as_number, is_whole

STAGE_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]*$"
BASE_VERSION = "base"
CURRENT_ALIAS = "current"  # names the version in use (registry.resolve), never a stage


class LRConfig(Strict):
    peak: float | None = Field(default=None, gt=0)
    """Peak learning rate, reached at the end of warmup."""
    warmup: float | None = Field(default=None, ge=0, lt=1)
    """Share of the stage's steps spent warming up to the peak."""
    warmup_from: Literal["current", "zero"] | None = None
    """current: re-warm from the parent version's final learning rate; zero: from 0."""
    decay: Literal["cosine", "linear", "wsd", "constant"] | None = None
    """Shape after warmup. wsd holds the peak, then decays linearly over the last `wsd_decay` share."""
    floor: float | None = Field(default=None, ge=0, le=1)
    """Learning rate at the end of the stage, as a fraction of the peak."""
    wsd_decay: float | None = Field(default=None, gt=0, le=1)
    """For decay: wsd, the share of the stage's steps spent decaying."""


class Workers(Strict):
    shape: ClassVar[str] = "a whole number or {min: N, max: N}"
    min: int = Field(ge=1)
    """Fewest workers the stage runs with."""
    max: int = Field(ge=1)
    """Most workers the stage runs with (elastic when larger than min)."""
    resize_every_s: float = Field(default=60.0, gt=0)
    """For an elastic stage, how often to check whether more workers fit the cluster (a grow is a
    restart from the latest checkpoint, so not too often)."""

    @model_validator(mode="before")
    @classmethod
    def _from_int(cls, value: Any) -> Any:
        value = as_number(value)
        return {"min": value, "max": value} if is_whole(value) else value


class Ramp(Strict):
    shape: ClassVar[str] = "a weight or {from: W, to: W}"
    start: float = Field(alias="from", ge=0)
    """Weight at the start of the stage."""
    end: float = Field(alias="to", ge=0)
    """Weight at the end of the stage (linear in between)."""

    @model_validator(mode="before")
    @classmethod
    def _from_number(cls, value: Any) -> Any:
        value = as_number(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return {"from": value, "to": value}
        return value


class StageSettings(Strict):
    seq_len: int | None = Field(default=None, ge=8)
    """Tokens per packed row."""
    packing: bool | None = None
    """true: pack documents into full rows; false: one document per row, padded (slower: the
    padding costs compute and trains nothing)."""
    global_batch_tokens: int | None = Field(default=None, gt=0)
    """Tokens per optimizer step, whatever the number of workers (a multiple of seq_len)."""
    micro_batch_rows: int | None = Field(default=None, gt=0)
    """Rows per forward pass on one worker; gradient accumulation makes up the rest."""
    lr: LRConfig = Field(default_factory=LRConfig)
    """Learning-rate schedule; unset fields come from defaults."""
    loss_weights: dict[str, Annotated[float, Field(ge=0)]] | None = None
    """Corpus name to a factor on its share of the loss (default 1; balance: corpus only)."""
    balance: Literal["corpus", "token"] | None = None
    """corpus: average the loss within each corpus, then weight by its share of rows;
    token: a plain mean over supervised tokens."""
    weight_decay: float | None = Field(default=None, ge=0)
    """AdamW weight decay."""
    grad_clip: float | None = Field(default=None, gt=0)
    """Clip the gradient norm to this value."""
    checkpoint_every: int | None = Field(default=None, gt=0)
    """Write a checkpoint every this many optimizer steps."""
    log_every: int | None = Field(default=None, gt=0)
    """Report metrics every this many optimizer steps."""
    workers: Workers | None = None
    """Number of training workers: an integer, or {min, max} for elastic training."""
    cpus_per_worker: float | None = Field(default=None, gt=0)
    """CPUs reserved per worker; leave some for Ray Data on small machines."""
    use_gpu: bool | None = None
    """Train on one GPU per worker (NCCL, bf16 autocast)."""
    resources_per_worker: dict[str, Annotated[float, Field(gt=0)]] | None = None
    """Ray resources each worker asks for besides its CPUs: a custom resource that the nodes to train
    on declare, e.g. {"accelerator_type:A10G": 0.001}, or {GPU: 2} with use_gpu: true for two GPUs
    per worker. Not CPU: cpus_per_worker sets that."""
    max_failures: int | None = Field(default=None, ge=0)
    """Worker-group restarts allowed before the stage fails."""
    max_repeats: float | None = Field(default=None, gt=0)
    """Warn when the stage passes over a corpus more than this many times: repeating data beyond
    about 4 passes adds little (arXiv 2305.16264). Add data or lower the corpus's weight."""
    nonfinite: Literal["stop", "skip"] | None = None
    """On a non-finite loss or gradient: stop with an error (the last checkpoint stays), or skip
    the step (counted in the metrics as skipped_steps)."""


class StageTemplate(StageSettings):
    """A stage without its name and start: what a tuning search varies."""

    mixture: dict[str, Ramp]
    """Corpus name to weight (share of trained tokens), or {from, to} to ramp it linearly over the
    stage. Weights are normalised to sum 1 at every point, so ramp the other corpora too when a
    share should end at an exact value."""
    tokens: int = Field(gt=0, examples=[160_000])
    """Token budget of the stage (rounded up to whole optimizer steps)."""


class StageConfig(StageTemplate):
    name: str = Field(pattern=STAGE_NAME_PATTERN)
    """Stage name, which is also the name of the version it produces."""
    start_from: str | None = Field(default=None, alias="from")
    """Version to start from; default: the previous stage's version (or base)."""


class MLflowConfig(Strict):
    tracking_uri: str
    """The MLflow tracking server (http://HOST:5000) or store (file:///..., sqlite:///...)."""
    experiment: str | None = None
    """The experiment the runs go in; default: the pipeline's name."""


class WandbConfig(Strict):
    project: str
    """The W&B project."""
    entity: str | None = None
    """The W&B team or user; default: the logged-in user's."""
    mode: Literal["online", "offline"] = "online"
    """offline: runs are written under <workdir>/wandb/ (`wandb sync` uploads them later)."""


class TrackingConfig(Strict):
    tensorboard: bool = True
    """TensorBoard event files under <workdir>/tensorboard/, one run per stage, cumulative tokens as
    the step (`tensorboard --logdir <workdir>/tensorboard`)."""
    mlflow: MLflowConfig | None = None
    """MLflow (install mixloop[mlflow]): a parent run per pipeline run, a nested run per stage."""
    wandb: WandbConfig | None = None
    """Weights & Biases (install mixloop[wandb]): a run per stage, grouped by the pipeline's name."""


REWARM_LR: dict[str, Any] = {"warmup": 0.05, "warmup_from": "zero", "decay": "cosine"}
FINETUNE_LR: dict[str, Any] = {"peak": 3e-4, **REWARM_LR}


def _over(template: dict[str, Any], value: Any) -> Any:
    """An LR setting of the iteration template over its own defaults, so {peak: 0.002} keeps the re-warm."""
    return {**template, **value} if isinstance(value, dict) else value


class FinetuneConfig(Strict):
    tokens: float = Field(default=0.25, gt=0)
    """The fine-tune's token budget, as a share of the continued-pretraining stage's."""
    chats: list[str] | None = None
    """Chat corpora replayed in the fine-tune; default: every chat corpus an earlier stage trained on."""
    new_share: float = Field(default=0.5, gt=0, le=1)
    """The new chats' share of the fine-tune, when the new corpus brings chats."""
    text_share: float = Field(default=0.1, ge=0, lt=1)
    """Share of the fine-tune replaying the new text, so that the chat format does not wash it out."""
    lr: LRConfig = Field(default_factory=lambda: LRConfig(**FINETUNE_LR))
    """The fine-tune's learning-rate schedule: peak 3e-4, re-warmed from zero over 5%, cosine decay;
    fields set here replace those, the others come from defaults."""

    _keep_unset_lr = field_validator("lr", mode="before")(lambda value: _over(FINETUNE_LR, value))


class IterateConfig(Strict):
    """How `mixloop add` (and `mixloop watch`) turn a new corpus into stages: a continued-pretraining
    stage on the new text with replay of old text, re-warmed and decayed again, then, when there are
    chats, a fine-tune."""

    passes: float = Field(default=1.0, gt=0)
    """Passes over the new text in the continued-pretraining stage; with `replay` this sets its budget."""
    replay: float = Field(default=0.5, ge=0, lt=1)
    """Share of the continued-pretraining tokens that replays old text."""
    replay_from: list[str] | None = None
    """Old text corpora replayed, in equal shares; default: every text corpus an earlier stage trained on."""
    lr: LRConfig = Field(default_factory=lambda: LRConfig(**REWARM_LR))
    """The continued-pretraining schedule: re-warmed from zero over 5%, then a cosine decay; fields set
    here replace those, the others come from defaults."""
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    """The fine-tune after it (left out when there are no chats to train on)."""

    _keep_unset_lr = field_validator("lr", mode="before")(lambda value: _over(REWARM_LR, value))


class GateConfig(Strict):
    """What a new version must show before it becomes `current`; against the current version, on the
    eval splits and chat health. A bound left out is not checked."""

    max_forgetting: float | str | dict[str, float | str] | None = None
    """Largest rise of eval loss allowed on each earlier corpus: a number (0.05), a share of the current
    version's loss ("5%"), or per corpus {web: 0.05, wiki: "3%"} (corpora left out are not checked)."""
    min_uptake: float | str | None = None
    """Smallest fall of eval loss required on each corpus the current version did not train on: a
    number or a share ("10%")."""
    min_ended: float | None = Field(default=None, ge=0, le=1)
    """Chat health floor: the share of answers that end within chat_max_new_tokens, per chat corpus."""
    max_repetition: float | None = Field(default=None, ge=0, le=1)
    """Chat health ceiling: the mean share of repeated 4-grams in answers, per chat corpus."""
    min_score: dict[str, float] | None = None
    """Floors on benchmark scores, per task or probe ({astronomy: 0.8}): its headline metric (accuracy,
    exact match), which must not be below the floor by more than its noise (see `confidence`)."""
    max_score_drop: float | dict[str, float] | None = None
    """Largest fall of each benchmark score against the current version (0.02), or per task
    ({general: 0.02}); a fall beyond it but within the noise of the difference is not a failure."""
    confidence: float = Field(default=0.95, gt=0, lt=1)
    """How sure a failure must be: a bound fails only when it is crossed by more than the measured noise,
    z standard errors of the compared values (z = 1.96 at 0.95). Applies to loss and score bounds."""

    @field_validator("max_forgetting", "min_uptake", mode="before")
    @classmethod
    def _shares_without_spaces(cls, value: Any) -> Any:
        """ " 5% " as "5%", so the share that validation accepts is the one the gate reads."""
        if isinstance(value, dict):
            return {corpus: bound.strip() if isinstance(bound, str) else bound for corpus, bound in value.items()}
        return value.strip() if isinstance(value, str) else value


class PipelineConfig(Strict):
    name: str = Field(pattern=STAGE_NAME_PATTERN)
    """Pipeline name; also names the Ray Train runs."""
    workdir: str
    """Run directory (path relative to this file, or an fsspec URI)."""
    seed: int = 0
    """Seed for model init, the mix plan and shuffling."""
    chat_template: str | None = None
    """The chat template every version carries (and chats are rendered with): chatml, or a Jinja file
    (path relative to the spec); default: the tokenizer's own."""
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    """Where the tokenizer comes from; left out with a model.path, the model's own tokenizer."""
    model: ModelConfig
    """The architecture, or the model to start from."""
    corpora: dict[str, CorpusConfig]
    """Named sources of documents."""
    defaults: StageSettings = Field(default_factory=StageSettings)
    """Settings every stage inherits unless it sets its own."""
    stages: list[StageConfig] = Field(min_length=1)
    """The ordered stages of the model's life."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """Experiment trackers the metrics are forwarded to (metrics.jsonl stays the record)."""
    eval_rows: int = Field(default=64, gt=0)
    """Packed rows of each eval split used to evaluate a version (at the defaults' seq_len)."""
    chat_prompts: int = Field(default=8, ge=0)
    """Prompts of each chat eval split answered greedily by every version to measure chat health."""
    chat_max_new_tokens: int = Field(default=64, gt=0)
    """Longest answer generated for chat health; an answer that has not ended by then did not end."""
    iterate: IterateConfig = Field(default_factory=IterateConfig)
    """How `mixloop add` turns a new corpus into stages."""
    gate: GateConfig | None = None
    """Checks a new version must pass to become `current`; without a gate, every run's last version does."""
    benchmarks: BenchmarksConfig | None = None
    """What every version is scored on besides eval loss: lm-evaluation-harness tasks and probes."""


BUILTIN_DEFAULTS = StageSettings(
    seq_len=256,
    packing=True,
    global_batch_tokens=16384,
    micro_batch_rows=8,
    lr=LRConfig(peak=1e-3, warmup=0.05, warmup_from="current", decay="cosine", floor=0.1, wsd_decay=0.2),
    loss_weights={},
    balance="corpus",
    weight_decay=0.1,
    grad_clip=1.0,
    checkpoint_every=50,
    log_every=10,
    workers=Workers(min=1, max=1),
    cpus_per_worker=1.0,
    use_gpu=False,
    resources_per_worker={},
    max_failures=2,
    max_repeats=4.0,
    nonfinite="stop",
)
