"""The search spec (tuning/*.yaml): which stage to tune, from which version, over which space,
for which objective. Validated like a pipeline spec: every problem at once, with its YAML path.

A trial is a stage: the template (a stage of the pipeline, or a new one) with the searched
settings put in. Its YAML is valid in the pipeline as it is, so the best trial can be appended.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from mixloop.config import (
    BASE_VERSION,
    STAGE_NAME_PATTERN,
    ResolvedStage,
    Spec,
    StageConfig,
    StageTemplate,
    Strict,
    format_problems,
    load_spec,
    resolve_stage,
    stage_hash,
    stage_problems,
    validate_yaml,
)
from mixloop.errors import SpecError
from mixloop.tuning.objectives import objective_terms
from mixloop.tuning.simplex import rounded_weights, simplex_draws, simplex_weights

BASELINES = ("current", "stratified")


class MixtureSpace(Strict):
    corpora: list[str] = Field(min_length=2)
    """Corpora whose weights are searched; the weights lie on the simplex (they sum to 1)."""
    min_share: float = Field(default=0.0, ge=0, lt=0.5)
    """Smallest weight any of them gets."""


class Space(Strict):
    mixture: MixtureSpace | None = None
    """Corpus weights to search: {corpora: [a, b, ...], min_share: 0.05}."""
    lr_peak: tuple[float, float] | None = None
    """[low, high] peak learning rate, searched on a log scale."""
    warmup: tuple[float, float] | None = None
    """[low, high] share of the stage's steps spent re-warming."""
    decay: list[Literal["cosine", "linear", "wsd", "constant"]] | None = Field(default=None, min_length=1)
    """Decay shapes to choose from."""
    tokens: tuple[int, int] | None = None
    """[low, high] token budget of the stage (whole optimizer steps)."""


class Trials(Strict):
    count: int = Field(default=8, ge=3)
    """Trials in all, the two baselines (the stage's own mix and the stratified mix) included."""
    evals: int = Field(default=3, ge=1)
    """Evaluations per trial; ASHA compares trials at these points and stops the weak ones."""
    workers: int | None = Field(default=None, ge=1)
    """Training workers per trial (default: the stage's). The trajectory does not depend on it."""
    cpus_per_worker: float | None = Field(default=None, gt=0)
    """CPUs per training worker (default: the stage's)."""
    max_concurrent: int | None = Field(default=None, ge=1)
    """Trials at once; default: as many as the cluster's CPUs (or GPUs) hold now."""


class Asha(Strict):
    grace_evals: int = Field(default=1, ge=1)
    """Evaluations a trial always gets before it may be stopped."""
    reduction_factor: float = Field(default=2.0, gt=1)
    """Keep the best 1/reduction_factor of the trials at each rung."""


class SearchConfig(Strict):
    name: str = Field(pattern=STAGE_NAME_PATTERN)
    """Names the search (its folder is <workdir>/tune/<name>) and the stage it writes."""
    pipeline: str
    """The pipeline spec (a path relative to this file)."""
    stage: str | None = None
    """A stage of the pipeline to tune again: its settings are the template and its mix a baseline."""
    new_stage: StageTemplate | None = None
    """A new stage to tune (mixture, tokens, lr and any stage setting); its mix is a baseline."""
    start_from: str | None = None
    """Version every trial starts from; default: the stage's parent (with `stage`) or the pipeline's
    last stage (with `new_stage`). Missing stages up to it are trained first."""
    space: Space
    """What to search: mixture, lr_peak, warmup, decay, tokens."""
    objective: str | list[str]
    """Expression to minimise over eval metrics, e.g. `loss.astronomy + 2 * forgetting.general`
    (loss.X: eval loss on corpus X; forgetting.X: its rise over the start version; gain.X: its fall),
    or a list of them for a Pareto front."""
    trials: Trials = Field(default_factory=Trials)
    """How many trials and how each runs."""
    asha: Asha | None = Field(default_factory=Asha)
    """Early stopping on intermediate evals (one objective only); null: run every trial to the end."""
    seed: int | None = None
    """Seed of Optuna's sampler (default: the pipeline's seed)."""


class Search:
    """A validated search spec, its pipeline, and the stage template every trial starts from."""

    def __init__(self, config: SearchConfig, spec: Spec, path: str = "", pipeline_path: str = ""):
        self.config, self.spec, self.path, self.pipeline_path = config, spec, path, pipeline_path
        self.objectives = [config.objective] if isinstance(config.objective, str) else list(config.objective)
        self.start_from = config.start_from or _default_start(config, spec)
        source = config.new_stage or next(s for s in spec.config.stages if s.name == config.stage)
        template = source.model_dump(mode="json", by_alias=True, exclude_unset=True, exclude={"name", "start_from"})
        ordered = {key: template.pop(key) for key in ("mixture", "tokens")}
        self.template = {"name": config.name, "from": self.start_from, **ordered, **template}

    @property
    def seed(self) -> int:
        return self.spec.config.seed if self.config.seed is None else self.config.seed

    @property
    def searched_corpora(self) -> list[str]:
        mixture = self.config.space.mixture
        return mixture.corpora if mixture else list(self.template["mixture"])

    def resolve(self, stage: dict) -> ResolvedStage:
        return resolve_stage(self.spec.config, StageConfig.model_validate(stage))

    @functools.cached_property
    def resolved_template(self) -> ResolvedStage:
        """The template with every setting filled in (the trials' settings before their changes)."""
        return self.resolve(self.template)

    def fingerprint(self) -> str:
        """Changes when anything the trials' results depend on changes; not with where they run."""
        search = self.config.model_dump(
            mode="json", exclude={"trials": {"workers", "cpus_per_worker", "max_concurrent"}}
        )
        payload = {"search": search, "template": stage_hash(self.resolved_template, self.start_from)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    # ------------------------------------------------------------ trials

    def param_space(self) -> dict:
        """Ray Tune's search space. Weights are drawn as uniforms and mapped onto the simplex in
        `decode` (exponential spacings, so the mix is uniform on the simplex)."""
        from ray import tune  # lazy: ray

        space, params = self.config.space, {}
        for corpus in space.mixture.corpora if space.mixture else []:
            params[f"share.{corpus}"] = tune.uniform(0.0, 1.0)
        if space.lr_peak:
            params["lr_peak"] = tune.loguniform(*space.lr_peak)
        if space.warmup:
            params["warmup"] = tune.uniform(*space.warmup)
        if space.decay:
            params["decay"] = tune.choice(space.decay)
        if space.tokens:
            geometry = self.resolved_template.geometry
            params["steps"] = tune.randint(
                geometry.steps_for(space.tokens[0]), geometry.whole_steps_within(space.tokens[1]) + 1
            )
        return params

    def decode(self, config: dict) -> dict:
        """A trial's changes to the template, rounded as they will be written in YAML."""
        if "baseline" in config:  # Tune also fills the space's parameters in; a baseline ignores them
            return {"mixture": config["mixture"]} if "mixture" in config else {}
        changes: dict = {}
        if self.config.space.mixture:
            changes["mixture"] = simplex_weights(
                {c: config[f"share.{c}"] for c in self.config.space.mixture.corpora},
                self.config.space.mixture.min_share,
            )
        lr = {
            key: config[param]
            for key, param in (("peak", "lr_peak"), ("warmup", "warmup"), ("decay", "decay"))
            if param in config
        }
        if "peak" in lr:
            lr["peak"] = float(f"{lr['peak']:.3g}")
        if "warmup" in lr:
            lr["warmup"] = round(lr["warmup"], 3)
        if lr:
            changes["lr"] = lr
        if "steps" in config:
            changes["tokens"] = self.resolved_template.geometry.tokens_for(int(config["steps"]))
        return changes

    def trial_stage(self, config: dict) -> dict:
        """The stage YAML a trial trains: the template with the trial's changes."""
        stage, changes = copy.deepcopy(self.template), self.decode(config)
        if "mixture" in changes:
            stage["mixture"] = changes["mixture"]
        if "lr" in changes:
            stage["lr"] = {**stage.get("lr", {}), **changes["lr"]}
        if "tokens" in changes:
            stage["tokens"] = changes["tokens"]
        return stage

    def encode(self, stage: dict) -> dict | None:
        """The searched parameters that give `stage` (a baseline's), or None where it lies outside the
        space (a ramped mix, a value out of range): Optuna then learns from the baselines it can represent."""
        resolved, params = self.resolve(stage), {}
        lr = resolved.lr
        values = {
            "lr_peak": lr.peak,
            "warmup": lr.warmup,
            "decay": lr.decay,
            "steps": resolved.geometry.whole_steps_within(resolved.tokens),
        }
        if self.config.space.mixture:  # a ramp's start weights: the round trip below turns the ramp away
            draws = simplex_draws(
                {c: w.start for c, w in resolved.mixture.items()}, self.config.space.mixture.min_share
            )
            values.update({f"share.{c}": u for c, u in (draws or {}).items()})
        for name, domain in self.param_space().items():
            if values.get(name) is None or not _in_domain(values[name], domain):
                return None
            params[name] = values[name]
        # The point must give this very stage back: not a ramp, not a partial step, and no unsearched
        # setting that differs from the template.
        return params if self.resolve(self.trial_stage(params)) == resolved else None

    def baselines(self, train_tokens: dict[str, int]) -> list[dict]:
        """The stage's own mix, and weights proportional to the searched corpora's token counts."""
        tokens = {c: train_tokens[c] for c in self.searched_corpora}
        total = sum(tokens.values())
        return [
            {"baseline": "current"},
            {"baseline": "stratified", "mixture": rounded_weights({c: n / total for c, n in tokens.items()})},
        ]


def _in_domain(value, domain) -> bool:
    """Whether a Ray Tune domain can draw `value` (a randint's upper bound is exclusive)."""
    from ray.tune.search.sample import Categorical, Integer  # lazy: ray

    if isinstance(domain, Categorical):
        return value in domain.categories
    return domain.lower <= value and (value < domain.upper if isinstance(domain, Integer) else value <= domain.upper)


# ---------------------------------------------------------------- loading


def load_search(path: str | Path) -> Search:
    """Read and validate a search spec and its pipeline; raise SpecError listing every problem."""
    config = validate_yaml(path, SearchConfig, "search", "tuning/")
    pipeline_path = Path(path).resolve().parent / config.pipeline
    try:
        spec = load_spec(pipeline_path)
    except SpecError as exc:
        raise SpecError(f"{path}: pipeline: {exc}") from None
    problems = _search_problems(config, spec)
    if problems:
        raise SpecError(format_problems(path, problems, "search"))
    return Search(config, spec, str(Path(path).resolve()), str(pipeline_path))


def _default_start(config: SearchConfig, spec: Spec) -> str:
    names = spec.stage_names()
    if config.new_stage is not None:
        return names[-1]
    assert config.stage is not None  # a search names its stage or a new stage (_search_problems)
    index = names.index(config.stage)
    return spec.config.stages[index].start_from or (names[index - 1] if index else BASE_VERSION)


def _search_problems(config: SearchConfig, spec: Spec) -> list[str]:
    names = spec.stage_names()
    if (config.stage is None) == (config.new_stage is None):
        return [
            "stage: give exactly one of `stage` (a stage of the pipeline to tune again) or `new_stage` "
            "(a new stage: mixture, tokens, lr...)."
        ]
    if config.stage is not None and config.stage not in names:
        return [f"stage: {config.stage!r} is not a stage of {spec.config.name}. Fix: use one of {', '.join(names)}."]
    problems = []
    if config.start_from is not None and config.start_from not in [BASE_VERSION, *names]:
        problems.append(
            f"start_from: {config.start_from!r} is no version of the pipeline. "
            f"Fix: use base or one of {', '.join(names)}."
        )
        return problems
    search = Search(config, spec)
    template = StageConfig.model_validate(search.template)
    # The tuned stage is appended after the pipeline's stages, and starts from start_from.
    where = "new_stage" if config.new_stage else "stage"
    problems += [
        p.replace(f"{where}.name:", "name:")
        for p in stage_problems(spec, where, template, names)
        if not p.startswith(f"{where}.name: stage name")
    ]  # the name may already be applied
    return (
        problems
        + _space_problems(config, spec, search)
        + _trials_problems(config, spec, search)
        + _objective_problems(config, spec)
    )


def _space_problems(config: SearchConfig, spec: Spec, search: Search) -> list[str]:
    space, corpora, problems = config.space, spec.config.corpora, []
    if not any(getattr(space, field) for field in Space.model_fields):
        return ["space: nothing to search. Fix: give at least one of mixture, lr_peak, warmup, decay, tokens."]
    if space.mixture:
        left_out = [c for c in search.template["mixture"] if c not in space.mixture.corpora]
        if left_out:
            problems.append(
                f"space.mixture.corpora: leaves out {', '.join(left_out)} of the stage's mixture, which "
                "trials would then not train on. Fix: add them (every weight of the mix is searched)."
            )
        for index, corpus in enumerate(space.mixture.corpora):
            if corpus not in corpora:
                problems.append(
                    f"space.mixture.corpora[{index}]: unknown corpus {corpus!r}. Fix: use one of {', '.join(corpora)}."
                )
        if len(set(space.mixture.corpora)) != len(space.mixture.corpora):
            problems.append("space.mixture.corpora: a corpus is named twice. Fix: name each once.")
        if space.mixture.min_share * len(space.mixture.corpora) >= 1:
            problems.append(
                f"space.mixture.min_share: {space.mixture.min_share} for each of {len(space.mixture.corpora)} "
                "corpora leaves nothing to search. Fix: lower it."
            )
    problems += _range_problems("space.lr_peak", space.lr_peak, low=0.0, low_open=True)
    problems += _range_problems("space.warmup", space.warmup, low=0.0, high=1.0)
    if space.tokens:
        geometry = search.resolved_template.geometry
        step = geometry.global_batch_tokens
        problems += _range_problems("space.tokens", space.tokens, low=step)
        if not problems and geometry.whole_steps_within(space.tokens[1]) < geometry.steps_for(space.tokens[0]):
            problems.append(f"space.tokens: {list(space.tokens)} holds no whole step of {step} tokens. Fix: widen it.")
    return problems


def _trials_problems(config: SearchConfig, spec: Spec, search: Search) -> list[str]:
    """The stage as trials run it (trials.workers, cpus_per_worker) must still split into micro-batches."""
    trials, problems = config.trials, []
    overrides = {k: v for k, v in (("workers", trials.workers), ("cpus_per_worker", trials.cpus_per_worker)) if v}
    trial_stage = StageConfig.model_validate({**search.template, **overrides})
    problems += [
        p
        for p in stage_problems(spec, "trials", trial_stage, spec.stage_names())
        if p.startswith(("trials.workers", "trials.cpus_per_worker"))
    ]
    if config.asha and config.asha.grace_evals > trials.evals:
        problems.append(
            f"asha.grace_evals: {config.asha.grace_evals} is more than trials.evals ({trials.evals}). "
            "Fix: lower it or raise trials.evals."
        )
    return problems


def _range_problems(
    where: str, bounds: tuple | None, low: float, high: float | None = None, low_open: bool = False
) -> list[str]:
    if bounds is None:
        return []
    lo, hi = bounds
    if lo <= low if low_open else lo < low:
        return [f"{where}: the low end {lo} must be {'above' if low_open else 'at least'} {low:g}. Fix: raise it."]
    if high is not None and hi >= high:
        return [f"{where}: the high end {hi} must be below {high:g}. Fix: lower it."]
    if lo >= hi:
        return [f"{where}: [{lo}, {hi}] is empty. Fix: write [low, high] with low < high."]
    return []


def _objective_problems(config: SearchConfig, spec: Spec) -> list[str]:
    with_eval = [n for n, c in spec.config.corpora.items() if c.eval or c.generate]
    expressions = [config.objective] if isinstance(config.objective, str) else config.objective
    problems = []
    for index, expression in enumerate(expressions):
        where = "objective" if isinstance(config.objective, str) else f"objective[{index}]"
        try:
            terms = objective_terms(expression)
        except ValueError as exc:
            problems.append(f"{where}: {exc}. Fix: e.g. `loss.new_corpus + 2 * forgetting.old_corpus`.")
            continue
        if not terms:
            problems.append(f"{where}: {expression!r} uses no eval metric. Fix: use loss.X, gain.X or forgetting.X.")
        for _, corpus in terms:
            if corpus not in with_eval:
                problems.append(
                    f"{where}: corpus {corpus!r} has no eval split. Fix: use one of "
                    f"{', '.join(with_eval) or '(none: add eval splits to the corpora)'}."
                )
    if isinstance(config.objective, list) and len(config.objective) < 2:
        problems.append(
            "objective: a list is for several objectives (a Pareto front). Fix: give one string or two or more."
        )
    return problems
