"""Non-finite losses: skip the step (counted) or stop with the last good checkpoint kept."""

from __future__ import annotations

import json
import math

import pytest

from mixloop.config import load_spec
from mixloop.errors import MixloopError
from mixloop.runs.pipeline import PipelineRunner
from support import NanLoss, generated_spec, write_spec

STAGE = {"name": "s", "mixture": {"facts": 1.0}, "tokens": 10240}  # 10 steps
FIRST = {"name": "first", "mixture": {"chats": 1.0}, "tokens": 5120}  # 5 steps: no NaN batch reaches it


def run(tmp_path, nonfinite, nan_steps, stages=(STAGE,)):
    spec = generated_spec(tmp_path / "run", list(stages), workers=1, nonfinite=nonfinite, max_failures=0)
    return PipelineRunner(load_spec(write_spec(tmp_path, spec)), hooks=NanLoss(nan_steps)).run()


def test_nan_batches_are_skipped_and_counted(ray_address, tmp_path):
    result = run(tmp_path, "skip", [3, 7])
    lineage = json.loads((tmp_path / "run" / "models" / "s" / "lineage.json").read_text())
    assert lineage["metrics"]["skipped_steps"] == 2
    assert all(math.isfinite(loss["loss"]) for loss in result.matrix["s"].values())
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["loss"]) for m in logged)


def test_nan_batch_stops_the_stage_and_keeps_the_last_good_checkpoint(ray_address, tmp_path):
    """The stage before it, trained by the same worker group, is a version all the same."""
    with pytest.raises(MixloopError, match="non-finite loss or gradient at step 7"):
        run(tmp_path, "stop", [7], stages=(FIRST, STAGE))
    assert (tmp_path / "run" / "models" / "first" / "lineage.json").exists()
    assert not (tmp_path / "run" / "models" / "s").exists()
    checkpoints = [p.name.rsplit(".step-")[1] for p in (tmp_path / "run" / "train").glob("*/test.s.*.step-*")]
    assert checkpoints == ["0000005"]
