"""Lineage diff of versions, and saving and loading them quietly."""

from __future__ import annotations

from mixloop.versioning.lineage import diff_lineages
from support import lineage_of


def test_diff_names_what_changed_in_mix_schedule_and_metrics():
    a = lineage_of(
        "x", "base", {"web": (1, 1)}, {"web": 1000.0}, metrics={"final_lr": 0, "loss": 2.0, "wall_seconds": 5}
    )
    b = lineage_of(
        "x",
        "a",
        {"web": (0.3, 0.1), "law": (0.7, 0.9)},
        {"web": 300.0, "law": 700.0},
        metrics={"final_lr": 0, "loss": 1.5, "wall_seconds": 9},
    )
    b = b.model_copy(update={"stage": b.stage.model_copy(update={"lr": b.stage.lr.model_copy(update={"peak": 0.002})})})
    changed = {key: (left, right) for key, left, right in diff_lineages(a, b)}
    assert changed["parent"] == ("base", "a")
    assert changed["stage.lr.peak"] == (0.001, 0.002)
    assert changed["stage.mixture.law.from"] == (None, 0.7)
    assert changed["tokens_per_corpus.web"] == (1000.0, 300.0)
    assert changed["metrics.loss"] == (2.0, 1.5)
    assert "stage.lr.decay" not in changed
    assert "metrics.wall_seconds" not in changed  # timing noise is not a change of the model


def test_saving_and_loading_a_version_prints_no_progress_bars(trained_tokenizer, tmp_path, capfd):
    """Every checkpoint and eval task saves or loads a model: transformers' bars for those would
    bury the stages' progress lines."""
    from mixloop.train.model import load_model, model_config, new_model

    new_model(model_config("micro", None, trained_tokenizer), seed=0).save_pretrained(tmp_path / "v")
    load_model(str(tmp_path / "v"))
    out, err = capfd.readouterr()
    assert "Writing model shards" not in out + err and "Loading weights" not in out + err
