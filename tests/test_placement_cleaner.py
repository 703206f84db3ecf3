"""Ray Train's placement-group cleaner kills a healthy run when Ray's state API gives it an empty
answer (ray-project/ray#65447); on the stage's own local Ray, ganflow trains without it
(ganflow.raytrain.without_cleaner). The injection: a sitecustomize module, on the PYTHONPATH of
the driver and so of every Ray worker process it starts, patches the cleaner's module as it is
imported, so that every liveness check gets the empty answer and is written to a log."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

CLEANER_MODULE = "ray.train.v2._internal.execution.controller.placement_group_cleaner"

INJECTION = textwrap.dedent(f"""
    import importlib.abc, importlib.machinery, os, sys

    TARGET = {CLEANER_MODULE!r}

    def note(text):
        with open(os.environ["CLEANER_LOG"], "a") as fh:
            fh.write(text + "\\n")

    class EmptyStateAnswers(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != TARGET:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            run_module = spec.loader.exec_module

            def exec_module(module):
                run_module(module)

                def empty_answer(actor_id, timeout):
                    # what is_actor_alive returns when the state API's answer is empty, once the
                    # run's worker is training (as in the incidents: mid-run)
                    note("check")
                    with open(os.environ["CLEANER_LOG"]) as fh:
                        return None if "worker:" in fh.read() else True

                module.is_actor_alive = empty_answer
                cls = module.PlacementGroupCleaner
                init, register, cleanup = cls.__init__, cls.register_placement_group, cls._cleanup_placement_group

                def created(self, *args, **kwargs):
                    note("created")
                    init(self, *args, **kwargs)

                def registering(self, placement_group):
                    note("registered")
                    register(self, placement_group)

                def cleaning(self, placement_group):
                    cleanup(self, placement_group)
                    note("removed" if placement_group is not None else "nothing-to-remove")

                cls.__init__, cls.register_placement_group, cls._cleanup_placement_group = created, registering, cleaning

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, EmptyStateAnswers())
""")

DRIVER = textwrap.dedent("""
    import os
    import sys
    import threading
    import time

    import psutil
    from ray.train import FailureConfig, RunConfig, ScalingConfig

    from ganflow.raytrain import trainer_class
    from ganflow.raycluster import init_ray, own_local_ray

    def read_log():
        with open(os.environ["CLEANER_LOG"]) as fh:
            return fh.read().split()

    def loop(config):
        import os
        import time
        import ray.train

        with open(os.environ["CLEANER_LOG"], "a") as fh:
            fh.write(f"worker:{os.getpid()}\\n")
        for i in range(3):
            ray.train.report({"i": i})
        if config["wait_for_cleaner"]:
            # until killed with the placement group; should the cleaner leave it (or have nothing
            # to remove), the worker returns after its fifth check, and the test fails on that
            while True:
                since = read_log()[read_log().index(f"worker:{os.getpid()}"):]
                if "nothing-to-remove" in since or ("removed" not in since and since.count("check") >= 5):
                    break
                time.sleep(0.2)

    init_ray()  # the stage's own local Ray
    assert own_local_ray()
    arm = sys.argv[1]
    trainer = trainer_class(arm == "ganflow")(
        loop, train_loop_config={"wait_for_cleaner": arm == "ray"},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=arm, storage_path=sys.argv[2], failure_config=FailureConfig(max_failures=0)),
    )
    outcome = []

    def fit():
        try:
            outcome.append(("finished", trainer.fit()))
        except Exception as exc:  # the run failed
            outcome.append(("failed", exc))

    threading.Thread(target=fit, daemon=True).start()
    while not outcome and "removed" not in read_log():
        time.sleep(0.2)
    # if the cleaner removed the placement group, the run dies with it: its worker group fails
    # to start, or its running worker is destroyed (and Ray Train's fit does not return then)
    while True:
        if outcome:
            print(outcome[0][0].upper(), " ".join(str(outcome[0][1]).split())[:300], flush=True)
            os._exit(0 if outcome[0][0] == "finished" else 3)
        pids = [int(w.split(":")[1]) for w in read_log() if w.startswith("worker:")]
        if pids and not (psutil.pid_exists(pids[0]) and psutil.Process(pids[0]).status() != psutil.STATUS_ZOMBIE):
            print(f"WORKER KILLED: {pids[0]}", flush=True)
            os._exit(3)
        time.sleep(0.2)
""")


def run_arm(tmp_path: Path, arm: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    inject = tmp_path / "inject"
    inject.mkdir(exist_ok=True)
    (inject / "sitecustomize.py").write_text(INJECTION)
    (tmp_path / "driver.py").write_text(DRIVER)
    log = tmp_path / f"{arm}.log"
    log.write_text("")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(inject), str(REPO)]), "CLEANER_LOG": str(log)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "driver.py"), arm, str(tmp_path / "results")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return proc, (log.read_text().split() if log.is_file() else [])


@pytest.mark.timeout(1200)
def test_an_empty_state_answer_kills_ray_s_trainer_and_not_ganflow_s(tmp_path):
    # today's Ray: the cleaner takes the empty answer for a dead controller and removes the
    # placement group under the healthy worker, which never returns by itself
    proc, log = run_arm(tmp_path, "ray")
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    # the worker dies with its placement group: seen as its process gone, or (under load, when
    # Ray notices first) as the run failing on the worker's health check
    died = "WORKER KILLED" in proc.stdout or (proc.stdout.startswith("FAILED") and "worker" in proc.stdout.lower())
    assert died or "placement group" in proc.stdout + proc.stderr, proc.stdout[-2000:]
    assert log[0] == "created" and "registered" in log and "removed" in log
    # ganflow's trainer on its own local Ray: no cleaner is created, the run finishes
    proc, log = run_arm(tmp_path, "ganflow")
    assert proc.returncode == 0 and "FINISHED" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert [w for w in log if not w.startswith("worker:")] == []  # no cleaner was ever created


def test_what_the_fix_relies_on_in_ray_is_still_there():
    """without_cleaner filters Ray Train's default callbacks by the cleaner callback's class, and
    OwnRayTrainer overrides DataParallelTrainer._create_default_callbacks: if a Ray upgrade moves
    either, this fails rather than the cleaner silently coming back."""
    import inspect

    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from ganflow.raytrain import without_cleaner

    assert "PlacementGroupCleanerCallback()" in inspect.getsource(DataParallelTrainer._create_default_callbacks)
    assert without_cleaner([PlacementGroupCleanerCallback(), "other"]) == ["other"]
