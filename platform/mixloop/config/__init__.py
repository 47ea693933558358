"""The pipeline spec: one YAML file, validated strictly before any Ray work.

Structure is checked by pydantic (unknown keys are errors), meaning by
``checks``; every problem is reported at once with its YAML path and
a fix. When the structure is wrong, the parts that validate on their own (the
tokenizer, the model, each corpus, the defaults, each stage) still get their
semantic checks, so one run of ``mixloop validate`` lists everything it can.
Stages inherit unset settings from ``defaults``, which inherit from
``BUILTIN_DEFAULTS``; ``resolve_stage`` produces the complete, typed and frozen
``ResolvedStage`` that the driver plans with and workers receive (as JSON, inside their job).

The package's modules: schema (the pydantic models; strict, their base; sources, the tokenizer, model
and corpora sections), resolve (stages filled in, and their hash),
messages (structural problems in words), checks and data_checks (semantic problems), load (YAML to a Spec).
"""

from mixloop.config.checks import max_positions, stage_problems
from mixloop.config.data_checks import workdir_problems
from mixloop.config.load import apply_overrides, check_spec_data, load_spec, read_yaml, spec_from_data, validate_yaml
from mixloop.config.messages import format_problems
from mixloop.config.resolve import (
    TRAJECTORY_FIELDS,
    ResolvedLR,
    ResolvedStage,
    Share,
    Spec,
    StepGeometry,
    base_hash,
    resolve_stage,
    stage_hash,
)
from mixloop.config.schema import (
    BASE_VERSION,
    BUILTIN_DEFAULTS,
    STAGE_NAME_PATTERN,
    GateConfig,
    IterateConfig,
    LRConfig,
    PipelineConfig,
    Ramp,
    StageConfig,
    StageSettings,
    StageTemplate,
    Workers,
)
from mixloop.config.sources import (
    MODEL_PRESETS,
    PRESET_POSITIONS,
    QWEN3_DEFAULT_POSITIONS,
    CorpusConfig,
    ModelConfig,
)
from mixloop.config.strict import Strict

__all__ = [
    "BASE_VERSION",
    "BUILTIN_DEFAULTS",
    "MODEL_PRESETS",
    "PRESET_POSITIONS",
    "QWEN3_DEFAULT_POSITIONS",
    "STAGE_NAME_PATTERN",
    "TRAJECTORY_FIELDS",
    "CorpusConfig",
    "GateConfig",
    "IterateConfig",
    "LRConfig",
    "ModelConfig",
    "PipelineConfig",
    "Ramp",
    "ResolvedLR",
    "ResolvedStage",
    "Share",
    "Spec",
    "StepGeometry",
    "StageSettings",
    "StageConfig",
    "StageTemplate",
    "Strict",
    "Workers",
    "apply_overrides",
    "base_hash",
    "check_spec_data",
    "format_problems",
    "load_spec",
    "max_positions",
    "read_yaml",
    "resolve_stage",
    "spec_from_data",
    "stage_hash",
    "stage_problems",
    "validate_yaml",
    "workdir_problems",
]
