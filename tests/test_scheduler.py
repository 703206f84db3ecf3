"""The sweep's default scheduler, synchronous successive halving: which trials go on depends on
their scores at the rung, never on the order in which they reached it (asynchronous ASHA's pick
did: the same seed and data picked other rates in a busier run)."""

from __future__ import annotations

import math

import pytest
from ray.tune.experiment import Trial

from ganflow.tuning import objective_noise, pick, rungs, synchronous_halving


class Controller:
    """What the scheduler calls on Tune's controller: it stops paused trials it cuts, and Tune
    then tells the scheduler the trial is gone (TuneController.stop_trial does)."""

    def __init__(self) -> None:
        self.scheduler = None

    def stop_trial(self, trial: Trial) -> None:
        trial.status = Trial.TERMINATED
        self.scheduler.on_trial_remove(self, trial)


def drive(
    order_at_rung: list[int],
    scores: dict[int, list[float | None]],
    ticks: int,
    reduction_factor: int,
    anchor: int | None = None,
) -> list[int]:
    """Run trials 0..n-1 through the scheduler, reaching each tick in the order given (a
    permutation per tick), as Tune would: a report is answered CONTINUE, PAUSE or STOP; paused
    trials are resumed when the scheduler lists them to run. Returns the trials that reached
    ``ticks``. Trial i trains the rates (i, i); trial ``anchor``'s are the scheduler's anchor."""
    n = len(scores)
    rates = None if anchor is None else {"lr_g": float(anchor), "lr_d": float(anchor)}
    scheduler = synchronous_halving(n, 1, reduction_factor, ticks, "fd_recent", anchor=rates)
    scheduler.set_search_properties("fd_recent", "min")
    controller = Controller()
    controller.scheduler = scheduler
    trials = [
        Trial("__fake", config={"lr_g": float(i), "lr_d": float(i)}, trial_id=f"t{i}", stub=True) for i in range(n)
    ]
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


def test_the_anchor_trial_runs_to_the_end_beside_the_survivors():
    """The train rates' trial is never cut, so the pick can be compared with it at the full trial
    budget; the others are cut as before, as many as without it."""
    scores = {0: [90.0, 90.0, 90.0, 90.0], 1: [10.0, 9.0, 8.0, 7.0], 2: [20.0, 30.0, 40.0, 50.0]}
    scores |= {3: [30.0, 8.0, 6.0, 5.0], 4: [50.0] * 4, 5: [60.0] * 4}
    assert drive(list(range(6)), scores, 4, 2) == [1, 3]  # 3 of 6 go on at tick 1, 2 of those 3 at tick 2
    assert drive(list(range(6)), scores, 4, 2, anchor=0) == [0, 1, 3]  # the worst, kept: rates (0, 0)
    assert drive(list(range(6)), scores, 4, 2, anchor=1) == [1, 3]  # the anchor survives anyway: no extra
    assert drive([5, 4, 3, 2, 1, 0], scores, 4, 2, anchor=5) == [1, 3, 5]
    assert drive(list(range(6)), scores, 4, 2, anchor=2) == [1, 2, 3]  # passed tick 1, kept at tick 2


def test_asynchronous_halving_never_stops_the_anchor(tmp_path):
    """tune.scheduler: asha (multi-worker trials): the anchor's reports count at the rungs, but
    it goes on where a trial with its scores is stopped."""
    from ganflow.config import load_config
    from ganflow.tuning import scheduler_of

    (tmp_path / "params.yaml").write_text("tune:\n  scheduler: asha\n  grace_period: 1\n  reduction_factor: 2\n")
    cfg = load_config(tmp_path / "params.yaml")
    rates = {"lr_g": cfg.train.lr_g, "lr_d": cfg.train.lr_d}
    scheduler = scheduler_of(cfg, ticks=4)
    scheduler.set_search_properties("fd_recent", "min")
    good = Trial("__fake", config={"lr_g": 1e-3, "lr_d": 1e-3}, trial_id="good", stub=True)
    anchor = Trial("__fake", config=rates, trial_id="anchor", stub=True)
    bad = Trial("__fake", config={"lr_g": 2e-3, "lr_d": 2e-3}, trial_id="bad", stub=True)
    for trial in (good, anchor, bad):
        scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, good, {"training_iteration": 1, "fd_recent": 10.0}) == "CONTINUE"
    # worse than the rung's median: a trial is stopped there, the anchor is not
    assert scheduler.on_trial_result(None, bad, {"training_iteration": 1, "fd_recent": 90.0}) == "STOP"
    assert scheduler.on_trial_result(None, anchor, {"training_iteration": 1, "fd_recent": 90.0}) == "CONTINUE"
    assert scheduler.on_trial_result(None, anchor, {"training_iteration": 2, "fd_recent": 90.0}) == "CONTINUE"
    assert scheduler._num_stopped == 1  # the anchor's reprieves are not counted as stops
    assert scheduler.on_trial_result(None, anchor, {"training_iteration": 4, "fd_recent": 90.0}) == "STOP"  # done


def history(values: list[float]) -> dict:
    return {"objective_history": values}


def test_objective_noise_ignores_a_steady_trend():
    assert objective_noise([10.0, 9.0, 8.0, 7.0, 6.0]) == pytest.approx(0.0)
    assert objective_noise([10.0, 6.0, 2.0]) == pytest.approx(0.0)
    noisy = [10.0, 12.0, 10.0, 12.0, 10.0]  # successive differences +-2: sd sqrt(16 / 3)
    expected = (16 / 3) ** 0.5 / 2**0.5
    assert objective_noise(noisy) == pytest.approx(expected)
    assert objective_noise([50.0, 40.0] + noisy) == pytest.approx(expected)  # the last 5 only
    assert math.isnan(objective_noise([10.0, 9.0]))
    assert objective_noise([10.0, float("nan"), 9.0, 8.0]) == pytest.approx(0.0)


def test_the_pick_leaves_the_anchor_only_on_evidence():
    """Another trial is picked over the anchor only if it is lower by more than the margin times
    the noise of the difference of two fd_recent (each a mean of two evaluations)."""
    wobbly = [10.0, 12.0, 10.0, 12.0, 10.0]  # noise 1.63 per trial, so 1.63 for the difference
    anchor = {"fd": 11.0, "epochs": 5, "anchor": True} | history(wobbly)
    near = {"fd": 10.0, "epochs": 5, "anchor": False} | history(wobbly)  # 1.0 lower
    far = {"fd": 9.0, "epochs": 5, "anchor": False} | history(wobbly)  # 2.0 lower
    cut = {"fd": 1.0, "epochs": 3, "anchor": False} | history(wobbly[:3])  # lowest, but did not run to the end
    assert pick([anchor, near, cut], margin=1.0) is anchor
    assert pick([anchor, near, far, cut], margin=1.0) is far
    assert pick([anchor, near], margin=0.0) is near  # margin 0: the plain minimum
    assert pick([anchor, far], margin=2.0) is anchor
    # without an anchor among the finalists (include_train_rates off, or the anchor diverged): the minimum
    assert pick([dict(anchor, epochs=2), near, far], margin=1.0) is far
    assert pick([dict(anchor, fd=None), near], margin=1.0) is near
    # too few evaluations to know the noise: the plain values decide
    short = [dict(t, objective_history=[5.0, 4.0]) for t in (anchor, near)]
    assert pick(short, margin=1.0) is short[1]
    assert pick([dict(anchor, fd=None)], margin=1.0) is None


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


def test_sampled_pairs_are_tunes_own_draws_within_the_ratio_bound(tmp_path):
    """Unbounded, the pairs are those Tune's seeded random search draws; bounded, the ones of them
    with lr_g <= lr_g_over_d_max x lr_d, in the same order, topped up by later draws."""
    from ray import tune
    from ray.tune.search.sample import _BackwardsCompatibleNumpyRng
    from ray.tune.search.variant_generator import generate_variants

    from ganflow.config import load_config
    from ganflow.tuning import sampled_pairs

    def cfg(extra: str):
        (tmp_path / "params.yaml").write_text(f"tune:\n  seed: 3\n{extra}")
        return load_config(tmp_path / "params.yaml")

    rng = _BackwardsCompatibleNumpyRng(3)
    space = {"lr_g": tune.loguniform(1e-5, 1e-2), "lr_d": tune.loguniform(1e-5, 1e-2)}
    tunes = [next(generate_variants(space, random_state=rng))[1] for _ in range(40)]
    unbounded = sampled_pairs(cfg("  lr_g_over_d_max: null\n"), 40)
    assert unbounded == [pytest.approx(p) for p in tunes]

    bounded = sampled_pairs(cfg(""), 12)  # the default bound, 5
    within = [p for p in unbounded if p["lr_g"] <= 5 * p["lr_d"]]
    assert len(within) < len(unbounded)  # the bound did skip pairs, so the check below can fail
    assert bounded == within[:12]
    assert all(p["lr_g"] <= 5 * p["lr_d"] for p in bounded)


def test_pbt_explore_and_optuna_keep_the_ratio_bound(tmp_path):
    from ganflow.config import load_config
    from ganflow.tuning import _optuna_space, within_ratio

    (tmp_path / "params.yaml").write_text("tune:\n  lr_g_over_d_max: 4\n  lr_g_min: 1.0e-4\n")
    cfg = load_config(tmp_path / "params.yaml")
    assert within_ratio(cfg, {"lr_g": 1e-3, "lr_d": 5e-4, "x": 1}) == {"lr_g": 1e-3, "lr_d": 5e-4, "x": 1}
    assert within_ratio(cfg, {"lr_g": 1e-2, "lr_d": 1e-3}) == {"lr_g": pytest.approx(4e-3), "lr_d": 1e-3}
    # at lr_g's floor the bound is met by raising lr_d instead
    assert within_ratio(cfg, {"lr_g": 2e-4, "lr_d": 1e-5}) == {"lr_g": 1e-4, "lr_d": pytest.approx(2.5e-5)}

    class Trial:  # the part of Optuna's trial a define-by-run space calls
        def __init__(self, pick_high: bool) -> None:
            self.params: dict[str, float] = {}
            self.ranges: dict[str, tuple[float, float]] = {}
            self.pick_high = pick_high

        def suggest_float(self, name: str, low: float, high: float, log: bool = False) -> float:
            assert log and low <= high
            self.ranges[name] = (low, high)
            self.params[name] = high if self.pick_high else low
            return self.params[name]

    import pickle

    space = pickle.loads(pickle.dumps(_optuna_space(cfg)))  # Tune pickles the searcher with its space
    for pick_high in (False, True):
        trial = Trial(pick_high)
        space(trial)
        assert trial.ranges["lr_d"] == pytest.approx((2.5e-5, 1e-2))  # below 2.5e-5 no lr_g >= 1e-4 is within 4x
        assert trial.ranges["lr_g"] == pytest.approx((1e-4, min(1e-2, 4 * trial.params["lr_d"])))
        assert trial.params["lr_g"] <= 4 * trial.params["lr_d"] * (1 + 1e-12)
