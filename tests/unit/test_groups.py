"""Which stages one Ray Train worker group trains in turn (no Ray: the grouping is the driver's)."""

from __future__ import annotations

from support import generated_spec, write_spec

from mixloop.pipeline import Pipeline, _blocks
from mixloop.registry import write_lineage
from mixloop.spec import load_spec


def stage(name: str, **settings) -> dict:
    return {"name": name, "mixture": {"facts": 1.0}, "tokens": 2048, **settings}


def groups(tmp_path, stages, done=(), until=None) -> list[list[list[str]]]:
    """The blocks of each group, by stage name, with the versions in `done` published."""
    spec = load_spec(write_spec(tmp_path, generated_spec(tmp_path / "run", stages)))
    write_lineage(spec.workdir, "base", {"stage_hash": "b", "parent": None})
    pipeline = Pipeline(spec, log=lambda line: None)
    for name in done:
        member = next(m for group in pipeline._groups(None) for m in group if m.stage.name == name)
        write_lineage(spec.workdir, name, {"stage_hash": member.digest, "parent": member.parent})
    return [[[m.stage.name for m in block] for block in _blocks(group)] for group in pipeline._groups(until)]


def test_consecutive_stages_on_the_same_workers_share_a_group_and_others_start_their_own(tmp_path):
    stages = [stage("a"), stage("b"), stage("c", **{"from": "a"}), stage("d", workers=1), stage("e", workers=1)]
    assert groups(tmp_path, stages) == [[["a", "b"]], [["c"]], [["d", "e"]]]


def test_done_stages_leave_the_rest_of_their_group_and_until_cuts_it(tmp_path):
    stages = [stage("a"), stage("b"), stage("c")]
    assert groups(tmp_path / "1", stages, done=["a"]) == [[["b", "c"]]]
    assert groups(tmp_path / "2", stages, until="b") == [[["a", "b"]]]
    assert groups(tmp_path / "3", stages, done=["a", "b", "c"]) == [[]]
