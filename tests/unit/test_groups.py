"""Which stages one Ray Train worker group trains in turn (no Ray: the grouping is the driver's)."""

from __future__ import annotations

from mixloop.config import load_spec
from mixloop.runs.pipeline import PipelineRunner, _blocks
from mixloop.versioning.registry import write_lineage
from support import generated_spec, lineage_of, write_spec


def stage(name: str, **settings) -> dict:
    return {"name": name, "mixture": {"facts": 1.0}, "tokens": 2048, **settings}


def groups(tmp_path, stages, done=(), until=None) -> list[list[list[str]]]:
    """The blocks of each group, by stage name, with the versions in `done` published."""
    spec = load_spec(write_spec(tmp_path, generated_spec(tmp_path / "run", stages)))
    write_lineage(spec.workdir, lineage_of("base", stage_hash="b"))
    pipeline = PipelineRunner(spec)
    for name in done:
        member = next(m for group in pipeline._groups(None) for m in group if m.stage.name == name)
        write_lineage(spec.workdir, lineage_of(name, member.parent, ["facts"], stage_hash=member.digest))
    return [[[m.stage.name for m in block] for block in _blocks(group)] for group in pipeline._groups(until)]


def test_consecutive_stages_on_the_same_workers_share_a_group_and_others_start_their_own(tmp_path):
    stages = [stage("a"), stage("b"), stage("c", **{"from": "a"}), stage("d", workers=1), stage("e", workers=1)]
    assert groups(tmp_path, stages) == [[["a", "b"]], [["c"]], [["d", "e"]]]


def test_done_stages_leave_the_rest_of_their_group_and_until_cuts_it(tmp_path):
    stages = [stage("a"), stage("b"), stage("c")]
    assert groups(tmp_path / "1", stages, done=["a"]) == [[["b", "c"]]]
    assert groups(tmp_path / "2", stages, until="b") == [[["a", "b"]]]
    assert groups(tmp_path / "3", stages, done=["a", "b", "c"]) == [[]]


def test_a_group_resumes_at_its_checkpoints_stage_and_never_from_a_stage_since_edited(tmp_path):
    import torch

    from mixloop.train.checkpoint import Start, TrainState
    from mixloop.train.job import stage_job
    from mixloop.train.loop import _resume_point

    spec = load_spec(write_spec(tmp_path, generated_spec(tmp_path / "run", [stage("a"), stage("b"), stage("c")])))
    jobs = [
        stage_job("test", s, 0.0, "parent", {"facts": "x"}, "metrics.jsonl", run=f"test.{s.name}.h1.d")
        for s in spec.resolved_stages()[1:]
    ]  # a block [b, c] of the group whose run is a's

    def at(run: str | None) -> Start:
        return Start(torch.nn.Linear(1, 1), TrainState(step=3, lr=0.1, tokens=[1.0], run=run))

    assert _resume_point(jobs, None, "test.a.h1.d") == (0, None)
    assert _resume_point(jobs, at("test.c.h1.d"), "test.a.h1.d")[0] == 1  # b is done: c resumes
    assert _resume_point(jobs, at("test.c.h0.d"), "test.a.h1.d") == (0, None)  # c's old settings: b starts afresh
    assert _resume_point(jobs, at("test.a.h1.d"), "test.a.h1.d") == (0, None)  # a published: b starts from it
    assert _resume_point(jobs, at(None), "test.b.h1.d")[0] == 0  # a run of b alone, before groups
