"""Trackers as sinks: TensorBoard event files read back with TensorBoard's own reader; a tracker that
fails warns once and never stops training."""

from __future__ import annotations

import logging

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mixloop.runs.tracking import Trackers, scalars
from mixloop.train.metrics import MetricsRecord
from support import lineage_of, lineages_of, metrics_line


def record(stage: str, step: int, loss: float, tokens: float) -> MetricsRecord:
    line = metrics_line(stage, step, {"web": tokens}, {"web": loss}, step_seconds=0.5, data_s=0.1, total_steps=4)
    return MetricsRecord.model_validate_json(line)


def stages(*names: str) -> list:
    return [lineage_of(name, mixture=["web"]).stage for name in names]


def events(folder) -> EventAccumulator:
    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return accumulator


def test_a_stage_is_followed_while_it_trains_on_the_pipelines_token_axis(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    trackers = Trackers(str(tmp_path))
    with trackers.follow(stages("sft"), tokens_before=1000):
        lines = [
            r.model_dump_json()
            for r in [record("pretrain", 2, 3.0, 1000), record("sft", 2, 2.0, 200), record("sft", 4, 1.5, 400)]
        ]
        metrics.write_text("\n".join(lines) + '\n{"stage": "sft", "st')  # the last line still being written
    loss = events(tmp_path / "tensorboard" / "sft").Scalars("train/loss")
    assert [(e.step, e.value) for e in loss] == [(1200, 2.0), (1400, 1.5)]  # after pretrain's 1000 tokens
    assert {"train/loss/web", "train/lr", "train/data_wait_share"} <= set(
        events(tmp_path / "tensorboard" / "sft").Tags()["scalars"]
    )
    assert not (tmp_path / "tensorboard" / "pretrain").exists()

    lineages = lineages_of(
        lineage_of("base"),
        lineage_of("pretrain", "base", ["web"], {"web": 1000}),
        lineage_of("sft", "pretrain", ["web"], {"web": 400}),
    )
    assert lineages.tokens_through("sft") == 1400
    trackers.log_versions(
        {"sft": {"web": {"loss": 1.25}}}, {"sft": {"uptake": {}, "forgetting": {"web": -0.1}}}, lineages
    )
    evaluation = events(tmp_path / "tensorboard" / "sft")
    assert [(e.step, e.value) for e in evaluation.Scalars("eval/web")] == [(1400, 1.25)]
    assert evaluation.Scalars("forgetting/web")[0].value == pytest.approx(-0.1)


def test_a_failing_tracker_warns_once_and_is_tried_again(tmp_path, caplog):
    (tmp_path / "tensorboard").write_text("not a folder")  # every write there fails
    caplog.set_level(logging.INFO, logger="mixloop")
    trackers = Trackers(str(tmp_path))
    for step in (1, 2):
        trackers.forward("s", [(scalars(record("s", step, 2.0, 10.0 * step)), step)])
    notes = caplog.messages
    assert len(notes) == 1 and notes[0].startswith("warning: tracker TensorBoard failed")
    assert caplog.records[0].levelno == logging.WARNING and caplog.records[0].name == "mixloop.runs.tracking"
    (tmp_path / "tensorboard").unlink()  # the disk is fixed: the same trackers write again
    trackers.forward("s", [(scalars(record("s", 3, 1.0, 30.0)), 3)])
    assert len(caplog.messages) == 1 and events(tmp_path / "tensorboard" / "s").Scalars("train/loss")[0].value == 1.0


def test_a_group_of_stages_is_followed_on_one_token_axis(tmp_path):
    """Each stage's points start where the stage before it ended (its latest line's tokens)."""
    metrics = tmp_path / "metrics.jsonl"
    trackers = Trackers(str(tmp_path))
    with trackers.follow(stages("pretrain", "sft"), tokens_before=500):
        lines = [record("pretrain", 2, 3.0, 1000), record("pretrain", 4, 2.5, 2000), record("sft", 2, 2.0, 200)]
        metrics.write_text("\n".join(r.model_dump_json() for r in lines) + "\n")
    pretrain = events(tmp_path / "tensorboard" / "pretrain").Scalars("train/loss")
    sft = events(tmp_path / "tensorboard" / "sft").Scalars("train/loss")
    assert [e.step for e in pretrain] == [1500, 2500] and [e.step for e in sft] == [2700]


def test_polling_warns_retries_and_lets_the_blocks_error_win():
    """The publisher's and trackers' poll: a failed poll is reported and tried again (a storage blip must not
    stop publishing for the rest of a group); after a failed block, a failing last poll hides nothing."""
    import threading

    from mixloop.runs.tracking import polling

    calls, warnings, two_calls = [], [], threading.Event()

    def flaky() -> None:
        calls.append(len(calls))
        if len(calls) == 2:
            two_calls.set()
        if len(calls) == 1:
            raise OSError("blip")

    with polling(flaky, 0.01, "test", warnings.append):
        assert two_calls.wait(5), "the poll after a failed one never came"
    assert [str(w) for w in warnings] == ["blip"] and len(calls) >= 3  # and once more after the block

    def broken() -> None:
        raise OSError("storage gone")

    with pytest.raises(ValueError, match="training failed"):
        with polling(broken, 60, "test", warnings.append):
            raise ValueError("training failed")
    assert str(warnings[-1]) == "storage gone"
    with pytest.raises(OSError, match="storage gone"):
        with polling(broken, 60, "test", warnings.append):
            pass
