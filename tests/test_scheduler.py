"""The sweep's default scheduler, synchronous successive halving: which trials go on depends on
their scores at the rung, never on the order in which they reached it (asynchronous ASHA's pick
did: the same seed and data picked other rates in a busier run)."""

from __future__ import annotations

import pytest
from ray.tune.experiment import Trial

from ganflow.tuning import rungs, synchronous_halving


class Controller:
    """What the scheduler calls on Tune's controller: it stops paused trials it cuts, and Tune
    then tells the scheduler the trial is gone (TuneController.stop_trial does)."""

    def __init__(self) -> None:
        self.scheduler = None

    def stop_trial(self, trial: Trial) -> None:
        trial.status = Trial.TERMINATED
        self.scheduler.on_trial_remove(self, trial)


def drive(
    order_at_rung: list[int], scores: dict[int, list[float | None]], ticks: int, reduction_factor: int
) -> list[int]:
    """Run trials 0..n-1 through the scheduler, reaching each tick in the order given (a
    permutation per tick), as Tune would: a report is answered CONTINUE, PAUSE or STOP; paused
    trials are resumed when the scheduler lists them to run. Returns the trials that reached
    ``ticks``."""
    n = len(scores)
    scheduler = synchronous_halving(n, 1, reduction_factor, ticks, "fd_recent")
    scheduler.set_search_properties("fd_recent", "min")
    controller = Controller()
    controller.scheduler = scheduler
    trials = [Trial("__fake", trial_id=f"t{i}", stub=True) for i in range(n)]
    for trial in trials:
        scheduler.on_trial_add(controller, trial)
        trial.status = Trial.RUNNING
    reached = {i: 0 for i in range(n)}
    for tick in range(1, ticks + 1):
        for i in order_at_rung:
            trial = trials[i]
            if trial.status == Trial.PAUSED and trial in scheduler._trial_info[trial][0].trials_to_unpause:
                trial.status = Trial.RUNNING
            if trial.status != Trial.RUNNING or reached[i] != tick - 1:
                continue
            reached[i] = tick
            score = scores[i][tick - 1]
            result = {"training_iteration": tick, **({} if score is None else {"fd_recent": score})}
            action = scheduler.on_trial_result(controller, trial, result)
            trial.status = {"CONTINUE": Trial.RUNNING, "PAUSE": Trial.PAUSED, "STOP": Trial.TERMINATED}[action]
            if action == "STOP":
                scheduler.on_trial_complete(controller, trial, {})
        # trials paused at this tick's rung run on once every trial has reached it
        for trial in trials:
            if trial.status == Trial.PAUSED and trial in scheduler._trial_info[trial][0].trials_to_unpause:
                trial.status = Trial.RUNNING
    return sorted(i for i in range(n) if reached[i] == ticks)


def test_rungs_are_grace_times_reduction_powers_below_the_budget():
    assert rungs(1, 3, 10) == [1, 3, 9]
    assert rungs(1, 2, 3) == [1, 2]
    assert rungs(2, 3, 2) == []  # a budget of one rung: nobody is cut
    assert rungs(5, 3, 2) == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_survivors_do_not_depend_on_the_order_of_arrival(seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    n, ticks = 6, 10
    # each trial's score per tick; the best at tick 1 is not the best at tick 3
    scores = {i: list(rng.uniform(10, 100, ticks)) for i in range(n)}
    finals = set()
    for _ in range(6):
        order = list(rng.permutation(n))
        finals.add(tuple(drive(order, scores, ticks, 3)))
    assert len(finals) == 1, finals  # every order: the same finalist
    (final,) = finals
    # and it is the one successive halving names: the best 2 of 6 at tick 1, the better of them at tick 3
    first = sorted(range(n), key=lambda i: scores[i][0])[:2]
    assert final == (min(first, key=lambda i: scores[i][2]),)


def test_a_report_without_a_score_ranks_last():
    """A diverged trial reports no fd_recent (or a NaN): it is cut at the rung, not a crash of the sweep."""
    scores = {0: [50.0, 40.0, 30.0], 1: [None] * 3, 2: [60.0, 20.0, 10.0], 3: [float("nan")] * 3}
    assert drive([1, 0, 3, 2], scores, 3, 2) == [2]  # 0 and 2 pass tick 1; 2 is better at tick 2


def test_max_concurrent_trials_caps_the_running_trials():
    """tune.max_concurrent_trials under sha: the scheduler starts no trial while that many run (a
    searcher's limit would count paused trials too, and judge the first rung among fewer)."""
    scheduler = synchronous_halving(3, 1, 3, 3, "fd_recent", concurrent=1)
    scheduler.set_search_properties("fd_recent", "min")
    controller = Controller()
    controller.scheduler = scheduler
    trials = [Trial("__fake", trial_id=f"t{i}", stub=True) for i in range(3)]
    for trial in trials:
        scheduler.on_trial_add(controller, trial)  # PENDING
    first = scheduler.choose_trial_to_run(controller)
    assert first in trials
    first.status = Trial.RUNNING
    assert scheduler.choose_trial_to_run(controller) is None  # one runs: no second
    first.status = Trial.PAUSED  # at its rung
    assert scheduler.choose_trial_to_run(controller) in set(trials) - {first}
    unlimited = synchronous_halving(3, 1, 3, 3, "fd_recent")
    unlimited.set_search_properties("fd_recent", "min")
    for trial in trials:
        trial.status = Trial.PENDING
        unlimited.on_trial_add(controller, trial)
    trials[0].status = Trial.RUNNING
    assert unlimited.choose_trial_to_run(controller) in trials[1:]
