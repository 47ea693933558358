"""Search specs (tuning/*.yaml): validation messages, objectives, trial stages, results and --apply.
No Ray cluster here: the searches themselves run in tests/ray/test_tune_runs.py."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from mixloop.cli import main
from mixloop.config import load_spec
from mixloop.errors import MixloopError, SpecError
from mixloop.tuning.objectives import objective_terms, objective_value
from mixloop.tuning.results import append_stage, pareto_front, pick, stage_note, verdict_line
from mixloop.tuning.search import load_search
from mixloop.tuning.simplex import simplex_weights

REPO = Path(__file__).parents[2]

PIPELINE = {
    "name": "unit",
    "workdir": "runs",
    "tokenizer": {"train": {"vocab_size": 300}},
    "model": {"preset": "micro"},
    "corpora": {
        "web": {"kind": "text", "path": "data/web.jsonl", "eval": "data/web.jsonl"},
        "news": {"kind": "text", "path": "data/web.jsonl", "eval": "data/web.jsonl"},
        "chat": {"kind": "chat", "path": "data/chat.jsonl"},
    },
    "defaults": {"seq_len": 64, "global_batch_tokens": 2048, "micro_batch_rows": 8},
    "stages": [
        {"name": "pretrain", "mixture": {"web": 1.0}, "tokens": 100_000},
        {
            "name": "news",
            "mixture": {"news": {"from": 0.7, "to": 0.9}, "web": {"from": 0.3, "to": 0.1}},
            "tokens": 50_000,
            "lr": {"peak": 0.002, "decay": "wsd"},
        },
    ],
}

SEARCH = {
    "name": "news-tuned",
    "pipeline": "pipeline.yaml",
    "stage": "news",
    "space": {
        "mixture": {"corpora": ["news", "web"], "min_share": 0.05},
        "lr_peak": [0.0005, 0.005],
        "warmup": [0.0, 0.3],
        "decay": ["cosine", "wsd"],
    },
    "objective": "loss.news + 2 * forgetting.web",
}


@pytest.fixture
def write_search(tmp_path):
    """Write the pipeline (with tiny data) and SEARCH, changed by `edit`; the search's path."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "web.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "data" / "chat.jsonl").write_text(
        '{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
    )
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(PIPELINE, sort_keys=False))

    def write(edit=None) -> Path:
        data = copy.deepcopy(SEARCH)
        if edit:
            edit(data)
        path = tmp_path / "search.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


def problems(write_search, edit) -> str:
    with pytest.raises(SpecError) as error:
        load_search(write_search(edit))
    return str(error.value)


def test_valid_search_starts_from_the_stages_parent_and_keeps_its_settings(write_search):
    search = load_search(write_search())
    assert search.start_from == "pretrain"
    assert search.template["name"] == "news-tuned" and search.template["from"] == "pretrain"
    assert search.template["mixture"] == {"news": {"from": 0.7, "to": 0.9}, "web": {"from": 0.3, "to": 0.1}}
    assert search.template["lr"] == {"peak": 0.002, "decay": "wsd"}


def test_shipped_quickstart_search_validates():
    search = load_search(REPO / "tuning" / "quickstart.yaml")
    assert search.start_from == "sft" and search.config.trials.count >= 6


def test_unknown_keys_and_bad_ranges_are_all_named_with_their_paths(write_search):
    def edit(data):
        data["space"]["lr_pek"] = [0.1, 0.2]
        data["trials"] = {"count": 2}

    message = problems(write_search, edit)
    assert "space.lr_pek: unknown key" in message and "did you mean 'lr_peak'?" in message
    assert "trials.count" in message and "greater than or equal to 3" in message


def test_space_problems_name_the_fix(write_search):
    def edit(data):
        data["space"] = {
            "mixture": {"corpora": ["news", "web", "nope"], "min_share": 0.3},
            "lr_peak": [0.0, 0.01],
            "warmup": [0.3, 0.1],
        }

    message = problems(write_search, edit)
    assert "space.mixture.corpora[2]: unknown corpus 'nope'" in message
    assert "space.lr_peak: the low end 0.0 must be above 0" in message
    assert "space.warmup: [0.3, 0.1] is empty" in message
    assert "3 problem(s) in the search spec" in message


def test_min_share_leaving_nothing_to_search_and_an_empty_space(write_search):
    three = {"corpora": ["news", "web", "chat"], "min_share": 0.4}
    assert "0.4 for each of 3 corpora leaves nothing to search" in problems(
        write_search, lambda d: d["space"].update(mixture=three)
    )
    assert "space: nothing to search" in problems(write_search, lambda d: d.update(space={}))


def test_searched_mix_must_cover_the_stage_and_trials_must_fit(write_search):
    assert "space.mixture.corpora: leaves out web of the stage's mixture" in problems(
        write_search, lambda d: d["space"].update(mixture={"corpora": ["news", "chat"]})
    )
    assert "space.tokens: [20000, 20400] holds no whole step of 2048 tokens" in problems(
        write_search, lambda d: d["space"].update(tokens=[20000, 20400])
    )
    assert "asha.grace_evals: 4 is more than trials.evals (3)" in problems(
        write_search, lambda d: d.update(asha={"grace_evals": 4})
    )
    assert "trials.workers: 5 workers but only 4 micro-batches per step" in problems(
        write_search, lambda d: d.update(trials={"workers": 5})
    )


def test_objective_must_use_known_metrics_of_corpora_with_eval_splits(write_search):
    assert "'accuracy' is not a metric" in problems(write_search, lambda d: d.update(objective="accuracy.news"))
    assert "corpus 'chat' has no eval split" in problems(write_search, lambda d: d.update(objective="loss.chat"))
    assert "is not allowed" in problems(write_search, lambda d: d.update(objective="__import__('os').getcwd()"))
    assert "not an expression" in problems(write_search, lambda d: d.update(objective="loss.news +"))
    assert "objective[1]: corpus 'x'" in problems(write_search, lambda d: d.update(objective=["loss.news", "loss.x"]))


def test_stage_and_new_stage_exclude_each_other_and_must_exist(write_search):
    assert "exactly one of `stage`" in problems(write_search, lambda d: d.pop("stage"))
    assert "'nope' is not a stage of unit" in problems(write_search, lambda d: d.update(stage="nope"))
    assert "start_from: 'later' is no version" in problems(write_search, lambda d: d.update(start_from="later"))


def test_new_stage_problems_are_named_under_new_stage(write_search):
    def edit(data):
        data.pop("stage")
        data["new_stage"] = {"mixture": {"news": 1.0, "gone": 1.0}, "tokens": 10_000}

    assert "new_stage.mixture.gone: unknown corpus" in problems(write_search, edit)


def test_new_stage_starts_from_the_last_stage_by_default(write_search):
    def edit(data):
        data.pop("stage")
        data["new_stage"] = {"mixture": {"news": 0.5, "web": 0.5}, "tokens": 10_000}

    search = load_search(write_search(edit))
    assert search.start_from == "news" and search.template["mixture"] == {
        "news": {"from": 0.5, "to": 0.5},
        "web": {"from": 0.5, "to": 0.5},
    }


def test_broken_pipeline_is_reported_through_the_search(write_search, tmp_path):
    path = write_search()
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({**PIPELINE, "stages": []}))
    with pytest.raises(SpecError, match="(?s)search.yaml: pipeline: .*stages: List should have at least 1 item"):
        load_search(path)


def test_cli_tune_reports_spec_problems_without_traceback(write_search, capsys):
    assert main(["tune", str(write_search(lambda d: d.update(objective="loss.chat")))]) == 2
    err = capsys.readouterr().err
    assert "has no eval split" in err and "Traceback" not in err


# ---------------------------------------------------------------- objectives and trials


def test_objective_terms_and_values():
    assert objective_terms('loss.news + 2 * forgetting["web-2"] - gain.news / 4') == [
        ("loss", "news"),
        ("forgetting", "web-2"),
        ("gain", "news"),
    ]
    losses, start = {"news": 2.0, "web": 1.5}, {"news": 3.0, "web": 1.0}
    assert objective_value("loss.news + 2 * forgetting.web", losses, start) == pytest.approx(3.0)
    assert objective_value("-gain.news", losses, start) == pytest.approx(-1.0)


def test_simplex_weights_sum_to_one_and_respect_the_floor():
    for uniforms in ({"a": 0.0, "b": 0.999999}, {"a": 0.5, "b": 0.5, "c": 0.1}, {"a": 0.99, "b": 0.01}):
        weights = simplex_weights(uniforms, 0.05)
        assert sum(weights.values()) == pytest.approx(1.0, abs=1e-9)
        assert min(weights.values()) >= 0.05 - 1e-3


def test_trial_stage_puts_the_decoded_settings_into_the_template(write_search):
    search = load_search(write_search())
    config = {"share.news": 0.8, "share.web": 0.2, "lr_peak": 0.00123456, "warmup": 0.1234, "decay": "cosine"}
    stage = search.trial_stage(config)
    assert set(stage["mixture"]) == {"news", "web"} and sum(stage["mixture"].values()) == pytest.approx(1.0)
    assert stage["mixture"]["news"] > stage["mixture"]["web"]
    assert stage["lr"] == {"peak": 0.00123, "decay": "cosine", "warmup": 0.123}
    assert search.trial_stage({"baseline": "current"}) == search.template
    # Tune fills the space's parameters into every config, baselines too: they must not count.
    assert search.trial_stage({"baseline": "current", **config}) == search.template


def test_stratified_baseline_follows_token_counts(write_search):
    search = load_search(write_search())
    current, stratified = search.baselines({"news": 1000, "web": 3000, "chat": 5})
    assert current == {"baseline": "current"}
    assert stratified == {"baseline": "stratified", "mixture": {"news": 0.25, "web": 0.75}}
    assert search.trial_stage(stratified)["mixture"] == {"news": 0.25, "web": 0.75}


def test_token_budget_is_searched_in_whole_steps(write_search):
    search = load_search(write_search(lambda d: d["space"].update(tokens=[10_000, 40_000])))
    assert (
        search.trial_stage(
            {**{"share.news": 0.5, "share.web": 0.5, "lr_peak": 0.001, "warmup": 0.1, "decay": "wsd"}, "steps": 7}
        )["tokens"]
        == 7 * 2048
    )
    assert "space.tokens: the low end 100 must be at least 2048" in problems(
        write_search, lambda d: d["space"].update(tokens=[100, 40_000])
    )


def test_a_baseline_inside_the_space_encodes_to_parameters_that_give_it_back(write_search):
    search = load_search(write_search(lambda d: d["space"].update(tokens=[10_000, 60_000])))
    stratified = search.trial_stage({"baseline": "stratified", "mixture": {"news": 0.25, "web": 0.75}})
    stratified["tokens"] = 24 * 2048
    point = search.encode(stratified)
    assert point is not None and point["steps"] == 24 and point["decay"] == "wsd"
    assert search.trial_stage(point)["mixture"] == {"news": 0.25, "web": 0.75}
    assert search.resolve(search.trial_stage(point)) == search.resolve(stratified)

    outside = [  # each is a stage Optuna could never propose
        search.template,  # the current mix ramps
        {**stratified, "tokens": 50_000},  # not a whole number of steps
        {**stratified, "lr": {"peak": 0.01}},  # above the searched lr_peak range
        {**stratified, "mixture": {"news": 0.02, "web": 0.98}},  # under min_share
    ]
    assert [search.encode(stage) for stage in outside] == [None] * 4

    # With the mix not searched, the template's ramp is part of every point: stratified is not.
    unsearched = load_search(write_search(lambda d: d["space"].pop("mixture")))
    warmup = unsearched.resolved_template.lr.warmup  # the built-in default
    assert unsearched.encode(unsearched.template) == {"lr_peak": 0.002, "warmup": warmup, "decay": "wsd"}
    stratified = unsearched.trial_stage({"baseline": "stratified", "mixture": {"news": 0.25, "web": 0.75}})
    assert unsearched.encode(stratified) is None


def test_optuna_learns_from_the_baselines_it_can_represent(write_search):
    from mixloop.tuning.plugins import BaselinesFirst
    from mixloop.tuning.runner import _optuna

    search = load_search(write_search())
    baselines = search.baselines({"news": 1000, "web": 3000})
    points = [search.encode(search.trial_stage(b)) for b in baselines]
    assert points[0] is None and points[1] is not None  # the current mix ramps; the stratified one is constant
    searcher = BaselinesFirst(_optuna(search), baselines, points)
    searcher.set_search_properties("objective", "min", search.param_space())
    assert [searcher.suggest("current"), searcher.suggest("stratified")] == baselines
    searcher.on_trial_complete("current", {"objective": 0.6})
    searcher.on_trial_complete("stratified", {"objective": float("nan")})  # Optuna refuses NaN: not learned
    assert searcher.optuna._ot_study.trials == []
    searcher = BaselinesFirst(_optuna(search), baselines, points)
    searcher.set_search_properties("objective", "min", search.param_space())
    assert [searcher.suggest("current"), searcher.suggest("stratified")] == baselines
    for trial, objective in (("current", 0.6), ("stratified", 0.4)):
        searcher.on_trial_complete(trial, {"objective": objective})
    learned = searcher.optuna._ot_study.trials
    assert [(t.params, t.value) for t in learned] == [(points[1], 0.4)]
    proposal = searcher.suggest("first-search")
    assert set(proposal) == set(search.param_space())


def test_fingerprint_changes_with_the_space_but_not_with_how_trials_run(write_search):
    first = load_search(write_search()).fingerprint()
    resources = {"max_concurrent": 1, "workers": 3, "cpus_per_worker": 0.5}
    assert load_search(write_search(lambda d: d.update(trials=resources))).fingerprint() == first
    assert load_search(write_search(lambda d: d["space"].update(lr_peak=[0.001, 0.002]))).fingerprint() != first
    assert load_search(write_search(lambda d: d.update(trials={"count": 5}))).fingerprint() != first


# ---------------------------------------------------------------- results


def row(trial, arm, objective, status="finished", **more):
    return {"trial": trial, "arm": arm, "status": status, "objective": objective, **more}


def test_best_is_the_lowest_finished_objective_and_the_verdict_gives_the_margin():
    rows = [
        row("a", "current", 3.0),
        row("b", "stratified", 2.5),
        row("c", "search", 2.0),
        row("d", "search", 1.0, status="stopped"),
    ]
    best = pick(rows, ["objective"], None)
    assert best["trial"] == "c"
    assert verdict_line(rows, ["objective"], best) == (
        "winner: trial c (search) with objective 2.0000, 0.5000 (20.0%) below the stratified baseline's 2.5000"
    )


def test_verdict_when_stratified_wins_or_did_not_finish():
    rows = [row("a", "current", 3.0), row("b", "stratified", 2.5), row("c", "search", 2.7)]
    assert "the stratified baseline won" in verdict_line(rows, ["objective"], pick(rows, ["objective"], None))
    rows[1]["status"] = "failed"
    assert "the stratified baseline did not finish" in verdict_line(
        rows, ["objective"], pick(rows, ["objective"], None)
    )


def test_chosen_trial_must_exist_and_have_finished():
    rows = [row("a", "current", 3.0), row("b", "search", 1.0, status="stopped")]
    with pytest.raises(MixloopError, match="no trial 'z'"):
        pick(rows, ["objective"], "z")
    with pytest.raises(MixloopError, match="stopped before the end"):
        pick(rows, ["objective"], "b")


def test_pareto_front_keeps_the_trials_nothing_beats_on_both():
    keys = ["objective_1", "objective_2"]
    rows = [
        {"trial": t, "arm": "search", "status": "finished", "objective_1": a, "objective_2": b}
        for t, a, b in [("a", 1, 5), ("b", 2, 2), ("c", 3, 3), ("d", 5, 1)]
    ]
    rows.append({"trial": "s", "arm": "stratified", "status": "finished", "objective_1": 4, "objective_2": 4})
    assert [r["trial"] for r in pareto_front(rows, keys)] == ["a", "b", "d"]
    assert "the stratified baseline is not on it" in verdict_line(rows, keys, rows[0])


def test_best_stage_appends_to_the_pipeline_keeping_comments_and_validates(write_search, tmp_path):
    search = load_search(write_search())
    pipeline_path = tmp_path / "pipeline.yaml"
    pipeline_path.write_text("# my pipeline\n" + pipeline_path.read_text())
    stage = search.trial_stage({"share.news": 0.8, "share.web": 0.2, "lr_peak": 0.001, "warmup": 0.1, "decay": "wsd"})
    note = stage_note(search, {"trial": "t1", "arm": "search", "objective": 1.5, "stage": stage})
    append_stage(pipeline_path, stage, note)
    assert pipeline_path.read_text().startswith("# my pipeline\n")
    assert (
        "\n# tuned by search.yaml: trial t1 (search), objective 1.5000\n- name: news-tuned\n"
        in pipeline_path.read_text()
    )
    spec = load_spec(pipeline_path)
    assert spec.stage_names() == ["pretrain", "news", "news-tuned"]
    assert spec.config.stages[-1].start_from == "pretrain"
    with pytest.raises(MixloopError, match="already has a stage named 'news-tuned'"):
        append_stage(pipeline_path, stage, note)


def test_append_goes_to_the_end_of_the_stages_list_when_other_sections_follow(write_search, tmp_path):
    search = load_search(write_search())
    pipeline_path = tmp_path / "pipeline.yaml"
    pipeline_path.write_text(pipeline_path.read_text() + "\n# evaluation\neval_rows: 8\n")
    stage = search.trial_stage({"baseline": "current"})
    append_stage(pipeline_path, stage, "tuned")
    spec = load_spec(pipeline_path)
    assert spec.stage_names()[-1] == "news-tuned" and spec.config.eval_rows == 8
    assert pipeline_path.read_text().endswith("\n# evaluation\neval_rows: 8\n")


def test_append_to_a_flow_style_pipeline(write_search, tmp_path):
    search = load_search(write_search())
    pipeline_path = tmp_path / "pipeline.yaml"
    pipeline_path.write_text("# all in brackets\n" + yaml.safe_dump(PIPELINE, sort_keys=False, default_flow_style=True))
    stage = search.trial_stage({"baseline": "current"})
    append_stage(pipeline_path, stage, "tuned")  # inside brackets the note is left out: a later edit could not keep it
    assert pipeline_path.read_text().startswith("# all in brackets\n{name: unit,")
    spec = load_spec(pipeline_path)
    assert spec.stage_names() == ["pretrain", "news", "news-tuned"] and list(spec.config.corpora) == list(
        PIPELINE["corpora"]
    )
    assert (
        yaml.safe_load(pipeline_path.read_text())["stages"][-1] == stage
        and spec.config.stages[-1].start_from == "pretrain"
    )
