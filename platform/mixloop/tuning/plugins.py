"""mixloop's pieces of a Ray Tune search: the searcher that hands out the baselines before Optuna's
proposals, the ASHA scheduler that never stops a baseline, and the progress lines. (A search that was
interrupted pickled them with its state by their names in mixloop.tuning.runner, which imports them.)"""

from __future__ import annotations

import logging
import math
import os
import pickle
import tempfile

from ray import tune
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from mixloop.tuning.objectives import objective_keys
from mixloop.tuning.results import describe_changes
from mixloop.tuning.search import Search

logger = logging.getLogger(__name__)


class BaselinesFirst(Searcher):
    """Hands out the baseline trials first, then Optuna's proposals. Optuna learns from the baselines
    it can represent (`points`: their parameters, or None for one outside the space, such as a
    ramped mix), as if it had proposed them; a Pareto search's Optuna learns from its own trials only."""

    def __init__(self, optuna: OptunaSearch, baselines: list[dict], points: list[dict | None]):
        super().__init__(metric=optuna.metric, mode=optuna.mode)
        self.optuna, self.waiting = optuna, list(zip(baselines, points))
        self.baseline_points: dict[str, dict | None] = {}  # trial id -> its point, for the baselines handed out

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.optuna.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str) -> dict | None:
        if self.waiting:
            config, self.baseline_points[trial_id] = self.waiting.pop(0)
            return config
        return self.optuna.suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self.baseline_points:
            self.optuna.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self.baseline_points:
            self.optuna.on_trial_complete(trial_id, result, error)
            return
        point, metric = self.baseline_points[trial_id], self.optuna.metric
        if point is not None and result and not error and isinstance(metric, str) and math.isfinite(result[metric]):
            self.optuna.add_evaluated_point(point, result[metric])

    def save(self, checkpoint_path: str) -> None:
        with tempfile.TemporaryDirectory() as folder:  # Tune keeps one file per searcher: Optuna's goes inside
            self.optuna.save(os.path.join(folder, "optuna.pkl"))
            optuna_state = open(os.path.join(folder, "optuna.pkl"), "rb").read()
        with open(checkpoint_path, "wb") as file:
            pickle.dump(
                {"waiting": self.waiting, "baseline_points": self.baseline_points, "optuna": optuna_state}, file
            )

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:
            state = pickle.load(file)
        # A search saved before Optuna learned from baselines kept their configs and ids only.
        self.waiting = [item if isinstance(item, tuple) else (item, None) for item in state["waiting"]]
        self.baseline_points = state.get("baseline_points", dict.fromkeys(state.get("baseline_ids", ())))
        with tempfile.TemporaryDirectory() as folder:
            with open(os.path.join(folder, "optuna.pkl"), "wb") as file:
                file.write(state["optuna"])
            self.optuna.restore(os.path.join(folder, "optuna.pkl"))


class SparingBaselines(ASHAScheduler):
    """ASHA that ranks baselines with the other trials but never stops them (the verdict compares
    the best trial with the finished baselines), nor a trial at its last eval (ASHA stops trials at
    max_t, which would kill it before it records its result)."""

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        spared = "baseline" in trial.config or result["step"] == result["total_steps"]
        return TrialScheduler.CONTINUE if spared else decision


class ProgressLines(tune.Callback):
    """One line per trial start, eval and end, instead of Tune's status tables, to this module's
    logger: Tune calls its callbacks in the driver."""

    def __init__(self, search: Search):
        self.search = search

    def on_trial_start(self, iteration, trials, trial, **info):
        logger.info(
            f"trial {trial.trial_id}: started, {describe_changes(self.search.decode(trial.config), trial.config)}"
        )

    def on_trial_result(self, iteration, trials, trial, result, **info):
        values = " ".join(f"{key} {result[key]:.4f}" for key in objective_keys(len(self.search.objectives)))
        logger.info(f"trial {trial.trial_id}: step {result['step']}/{result['total_steps']} {values}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        logger.info(f"trial {trial.trial_id}: ended")

    def on_trial_error(self, iteration, trials, trial, **info):
        logger.warning(f"trial {trial.trial_id}: failed; see {trial.path}/error.txt")
