"""mixloop from Python: what the command line does, for notebooks and orchestrators.

    import mixloop

    spec = mixloop.load("jobs/quickstart.yaml", overrides=["defaults.lr.peak=0.002"])
    result = mixloop.run(spec)           # train what is missing, evaluate, report: a RunResult
    result.matrix["sft"]["general"]      # {"loss": ..., "perplexity": ...}
    mixloop.versions(spec)               # the Lineage of every version, oldest first

A spec can also come from a dict shaped like the YAML (`mixloop.from_dict`). Every function
validates first and raises `mixloop.errors.MixloopError` subclasses for what a user can fix
(`SpecError` lists every problem). Ray starts on the first call that needs it: a private local
Ray, or the cluster at `address`. Progress goes to the "mixloop" loggers (`logging`): configure
logging to see it (`logging.basicConfig(level=logging.INFO)`); warnings show without.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from mixloop.config import Spec, load_spec, spec_from_data
from mixloop.errors import MixloopError
from mixloop.storage.lock import workdir_lock
from mixloop.versioning.lineage import Lineage
from mixloop.versioning.registry import list_versions

if TYPE_CHECKING:  # the runner pulls in torch and Ray: imported when a call needs it
    from mixloop.runs.pipeline import CorpusPreview, Evaluation, RunResult


def load(path: str, overrides: Sequence[str] = ()) -> Spec:
    """A pipeline spec from a YAML file or URI, with KEY.PATH=VALUE overrides applied."""
    return load_spec(path, overrides)


def from_dict(data: dict, base_dir: str = ".", overrides: Sequence[str] = ()) -> Spec:
    """A pipeline spec from data shaped like the YAML; relative paths start at `base_dir`."""
    return spec_from_data(data, base_dir, overrides)


def run(spec: Spec, address: str | None = None, progress_bar: bool = False) -> RunResult:
    """Train every missing stage, then evaluate and report. Holds the workdir's lock, taken before anything heavy so a second run is refused at once.
    `progress_bar`: a live bar per stage instead of the workers' progress lines (for a terminal)."""
    with workdir_lock(spec.workdir, "mixloop run") as lock:
        from mixloop.runs.pipeline import PipelineRunner  # lazy: torch, transformers; once the lock is held

        return PipelineRunner(spec, address, lock, progress_bar=progress_bar).run()


def evaluate(spec: Spec, address: str | None = None) -> Evaluation:
    """Evaluate what is missing and write the report."""
    from mixloop.runs.pipeline import PipelineRunner  # lazy: torch, transformers

    return PipelineRunner(spec, address).report()


def preview(spec: Spec, stage: str | None = None, address: str | None = None) -> list[CorpusPreview]:
    """Per stage and corpus, before training: documents, tokens, rows, rejects, blank lines, share, passes."""
    from mixloop.runs.pipeline import PipelineRunner  # lazy: torch, transformers

    if stage is not None and stage not in spec.stage_names():
        raise MixloopError(f"no stage {stage!r}; stages: {', '.join(spec.stage_names())}")
    return PipelineRunner(spec, address).preview(stage)


def versions(spec_or_workdir: Spec | str) -> list[Lineage]:
    """The lineage of every complete version of a spec's workdir (or of a workdir path or URI), oldest first."""
    workdir = spec_or_workdir.workdir if isinstance(spec_or_workdir, Spec) else spec_or_workdir
    return list(list_versions(workdir).values())
