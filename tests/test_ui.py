"""Comparing runs in the MLflow UI, in a real browser (headless Chromium driven by Playwright).

A tracking store holding two finished trainings and one sweep (a parent run and its nested
trials) is written with ganflow's own tracking functions, the way the train and tune stages
write it (no Ray: the metric values are made up, the calls are the real ones). `mlflow server`
serves it; the test opens the experiment page, the compare-runs page and a run's sample grid,
and checks that what a person compares is on screen: both runs' learning rates, their
fd_domain, and the sample-grid image.

The README's screenshots come from a real run instead (docs/screenshot.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ganflow.config import load_config
from ganflow.data import prepare
from ganflow.dataset import PreparedDataset
from ganflow.localcluster import free_port, start_mlflow_server
from ganflow.tracking import RunLogger, connect, provenance, start_sweep_run, start_training_run, tracking_uri
from ganflow.tuning import trial_config

CHROMIUM = "/usr/bin/chromium"  # Debian's chromium; `make test` installs it
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# two trainings a person compares: (lr_g, lr_d) and the fd_domain of each epoch
TRAININGS = [((3.2e-4, 1.1e-4), [41.5, 22.25, 12.75]), ((1e-3, 2.5e-4), [38.5, 19.5, 9.125])]
TRIALS = [((5e-4, 2e-4), [30.5, 17.25]), ((2e-3, 6e-5), [88.5])]  # the second stopped early
STEPS_PER_EPOCH = 4


def fake_grids(cfg, epochs: int) -> list[torch.Tensor]:
    """(64, C, H, W) in [-1, 1] per epoch: real digits under noise that fades epoch by epoch,
    so the grids look like a training's progress."""
    real = torch.stack([PreparedDataset(cfg.paths.prepared, part="all")[i][0] for i in range(64)])
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(0))
    return [(real + noise * (1 - e / epochs)).clamp(-1, 1) for e in range(1, epochs + 1)]


def log_training(cfg, run_id: str, fds: list[float], seed: int) -> None:
    """What train_loop logs on rank 0: per-step diagnostics, then per epoch the sample grid,
    the epoch means, fd_domain and kid, and `epoch` last."""
    logger = RunLogger(tracking_uri(cfg), run_id)
    rng = np.random.default_rng(seed)
    grids = fake_grids(cfg, len(fds))
    step = 0
    for epoch, fd in enumerate(fds, start=1):
        for _ in range(STEPS_PER_EPOCH):
            step += 1
            logger.log_metrics(
                {
                    "loss_d": 1.2 + rng.random() * 0.1,
                    "loss_g": 0.8 + rng.random() * 0.1,
                    "d_real": 0.6,
                    "d_fake": 0.4,
                    "imgs_per_sec": 900.0,
                },
                step=step,
            )
        logger.log_grid(grids[epoch - 1], step=epoch)
        logger.log_metrics({"epoch_loss_d": 1.25, "epoch_loss_g": 0.85, "fd_domain": fd, "kid": fd / 1000}, step=epoch)
        logger.log_metrics({"epoch": float(epoch)}, step=epoch)
        logger.flush()


@contextlib.contextmanager
def mlflow_globals_restored():
    """connect() points mlflow's process-wide URIs, and MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI
    (inherited by subprocesses), at its store: put them back, so later tests are not sent there."""
    import mlflow

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def build_store(root: Path) -> dict:
    """A project in ``root`` (digits at 16x16) whose tracking store holds two finished
    trainings and a finished two-trial sweep. Returns their ids and the config."""
    root.mkdir(parents=True, exist_ok=True)
    params = root / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "data": {"image_size": 16},
                "train": {"epochs": 3},
                "tune": {"num_samples": len(TRIALS), "kimg": 2.4, "tick_kimg": 1.0},
                "cluster": {"num_workers": 2},
                "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}"},  # never an inherited MLFLOW_TRACKING_URI
            }
        )
    )
    cfg = load_config(params)
    with mlflow_globals_restored():
        return _fill_store(cfg, params)


def _fill_store(cfg, params: Path) -> dict:
    prepare(cfg)
    client, experiment_id = connect(cfg)
    trainings = []
    for i, ((lr_g, lr_d), fds) in enumerate(TRAININGS):
        tags = {"ganflow.stage": "train", **provenance(cfg, "train")}  # as distributed.run_training
        run_id = start_training_run(client, experiment_id, cfg, lr_g, lr_d, tags)
        log_training(cfg, run_id, fds, seed=i)
        client.set_terminated(run_id, status="FINISHED")
        trainings.append(run_id)

    # as tuning.run_sweep and tuning._trial (trial_config: tune.kimg, fd_domain every tick)
    parent = start_sweep_run(client, experiment_id, cfg, {"ganflow.stage": "tune", **provenance(cfg, "tune")})
    trial_cfg = trial_config(cfg)
    trials = []
    for k, ((lr_g, lr_d), fds) in enumerate(TRIALS, start=1):
        tags = {
            "mlflow.parentRunId": parent,
            "ganflow.stage": "tune-trial",
            "ganflow.trial_id": f"a1b2c_{k - 1:05d}",
            "sweep_id": parent,
            **provenance(trial_cfg, "tune"),
        }
        run_id = start_training_run(client, experiment_id, trial_cfg, lr_g, lr_d, tags, trial=k)
        log_training(trial_cfg, run_id, fds, seed=10 + k)
        stopped = len(fds) < 2  # a trial of 2.4 kimg: 2 ticks
        client.set_tag(run_id, "ganflow.trial_status", "stopped early (sha)" if stopped else "finished")
        client.set_terminated(run_id, status="KILLED" if stopped else "FINISHED")
        trials.append(run_id)
    (best_lr_g, best_lr_d), best_fds = TRIALS[0]
    client.log_param(parent, "best_lr_g", repr(best_lr_g))  # as tuning.summarise
    client.log_param(parent, "best_lr_d", repr(best_lr_d))
    client.log_metric(parent, "best_fd_domain", min(best_fds))
    client.set_terminated(parent, status="FINISHED")
    return {
        "cfg": cfg,
        "params": params,
        "experiment_id": experiment_id,
        "trainings": trainings,
        "sweep": parent,
        "trials": trials,
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` (the venv's) over the store build_store writes: (base URL, store, tmp dir)."""
    root = tmp_path_factory.mktemp("ui")
    store = build_store(root / "project")
    cfg = store["cfg"]
    port = free_port()
    # no background job runner (scorers, trace archival): nothing here uses it, and it takes
    # seconds to start and to stop
    proc = start_mlflow_server(
        tracking_uri(cfg),
        port,
        root / "mlflow-server.log",
        ["--default-artifact-root", cfg.paths.mlflow_artifacts.as_uri()],
        timeout=60,
        env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        cwd=root,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        yield url, store, root
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the workers it started
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def browser(server):  # closed before the server stops: open connections slow its shutdown
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: `make test` installs Debian's chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A fresh browser profile per test: what one test clicks (a closed panel, a toggle the UI
    remembers in local storage) does not change what the next one sees."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    # expect() keeps its own 5 s default, which a loaded CI machine overran while the compare
    # page rendered: every assertion waits for its condition up to the actions' 30 s
    expect.set_options(timeout=30_000)
    yield page
    context.close()


def _optional(action) -> bool:
    """A step that only makes the page tidier (closing a side panel, a toggle): an MLflow UI that
    lacks it still passes."""
    from playwright.sync_api import Error as PlaywrightError

    try:
        action()
        return True
    except PlaywrightError:
        return False


def _close_assistant(page) -> None:
    _optional(lambda: page.click('[data-component-id="mlflow.assistant.chat_panel.close"]', timeout=3000))


def test_experiment_page_lists_the_runs_with_rates_and_fd_domain(page, server):
    from playwright.sync_api import expect

    url, store, root = server
    # MLflow 3's sidebar switch opens experiments as GenAI by default; runs need "Model training"
    page.set_viewport_size({"width": 1800, "height": 900})
    page.goto(f"{url}/#/experiments/{store['experiment_id']}/runs?workflowType=machine_learning")
    body = page.locator("body")
    expect(body).to_contain_text("train lr_g=3.2e-4 lr_d=1.1e-4", timeout=30_000)
    expect(body).to_contain_text("train lr_g=1.0e-3 lr_d=2.5e-4")
    expect(body).to_contain_text("tune 2 trials")
    _close_assistant(page)
    # the columns a person adds to compare: fd_domain and the learning rates used
    page.get_by_role("button", name="Columns").click()
    for column in ("fd_domain", "lr_g", "lr_d"):
        page.get_by_placeholder("Search columns").fill(column)
        tree = page.locator("[data-testid=column-selector-tree] span")
        tree.filter(has_text=re.compile(f"^{column}$")).last.click()
    page.keyboard.press("Escape")
    for value in ("12.75", "9.125", "0.00032", "0.00011", "0.001", "0.00025"):  # last fd_domain, lr_g, lr_d
        expect(body).to_contain_text(value)
    # the sweep's trials are nested under it
    page.get_by_role("gridcell").filter(has_text="tune 2 trials").locator("button").first.click()
    expect(body).to_contain_text("trial 1 lr_g=5.0e-4 lr_d=2.0e-4")
    expect(body).to_contain_text("trial 2 lr_g=2.0e-3 lr_d=6.0e-5")
    page.screenshot(path=str(root / "experiment.png"))

    # what a person does next: tick the two trainings, press Compare
    for name in ("train lr_g=3.2e-4 lr_d=1.1e-4", "train lr_g=1.0e-3 lr_d=2.5e-4"):
        page.locator(".ag-row").filter(has_text=name).first.locator("input[type=checkbox]").first.check()
    page.get_by_role("button", name="Compare").click()
    expect(body).to_contain_text("Comparing 2 Runs")
    assert "/compare-runs?runs=" in page.url and all(run_id in page.url for run_id in store["trainings"])


def test_compare_runs_page_shows_both_trainings(page, server):
    from playwright.sync_api import expect

    url, store, root = server
    runs = json.dumps(store["trainings"], separators=(",", ":"))
    experiments = json.dumps([store["experiment_id"]])
    page.set_viewport_size({"width": 1280, "height": 1490})
    page.goto(f"{url}/#/compare-runs?runs={runs}&experiments={experiments}")
    body = page.locator("body")
    expect(body).to_contain_text("Comparing 2 Runs", timeout=30_000)
    for text in (
        "train lr_g=3.2e-4 lr_d=1.1e-4",
        "train lr_g=1.0e-3 lr_d=2.5e-4",  # the run names
        "0.00032",
        "0.00011",
        "0.001",
        "0.00025",  # params lr_g, lr_d
        "fd_domain",
        "12.75",
        "9.125",
    ):  # the last fd_domain of each
        expect(body).to_contain_text(text)

    # tidy for the screenshot: only what differs, fd_domain on the plot's metric axis
    _close_assistant(page)
    _optional(lambda: page.get_by_role("switch", name="Parameters - Show diff only").click(timeout=3000))
    _optional(lambda: page.get_by_role("switch", name="Metrics - Show diff only").click(timeout=3000))
    selected = page.locator(".du-bois-light-select-selection-item").filter(has_text=re.compile("^loss_d$"))
    _optional(lambda: selected.locator(".du-bois-light-select-selection-item-remove").click(timeout=3000))
    _optional(lambda: page.click("#dubois-select-2", timeout=3000))
    _optional(lambda: page.locator(".du-bois-light-select-item-option[title=fd_domain]").click(timeout=3000))
    page.keyboard.press("Escape")
    _optional(lambda: page.click('[data-component-id="mlflow_header.toggle_sidebar_button"]', timeout=3000))
    page.wait_for_timeout(1000)  # the plot redraws
    page.evaluate("() => document.querySelectorAll('*').forEach(e => { if (e.scrollTop) e.scrollTop = 0 })")
    shot = root / "compare-runs.png"
    page.screenshot(path=str(shot))


def test_run_page_shows_the_description_and_the_sample_grid(page, server):
    from mlflow.tracking import MlflowClient
    from PIL import Image
    from playwright.sync_api import expect

    from ganflow.tracking import SAMPLES_KEY

    url, store, root = server
    run_id, experiment_id = store["trainings"][0], store["experiment_id"]
    page.set_viewport_size({"width": 1400, "height": 900})
    page.goto(f"{url}/#/experiments/{experiment_id}/runs/{run_id}")
    body = page.locator("body")
    expect(body).to_contain_text("GAN training with lr_g=3.2e-4 lr_d=1.1e-4: 3 epochs", timeout=30_000)
    expect(body).to_contain_text("2 Ray Train worker(s) on CPU")

    # the last epoch's grid, opened in the run's artifact view
    client = MlflowClient(tracking_uri(store["cfg"]))
    grids = [
        a.path
        for a in client.list_artifacts(run_id, "images")
        if a.path.endswith(".png") and a.path.split("/")[-1].startswith(f"{SAMPLES_KEY}+step+3+")
    ]
    assert len(grids) == 1, grids
    page.goto(f"{url}/#/experiments/{experiment_id}/runs/{run_id}/artifacts/{grids[0]}")
    image = page.locator("img[src^='blob:']").first
    image.wait_for(timeout=30_000)
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    width = image.evaluate("img => img.naturalWidth")
    local = store["cfg"].paths.mlflow_artifacts / run_id / "artifacts" / grids[0]
    assert width == Image.open(local).width  # the grid itself: 8 columns of 16 px + padding
    _close_assistant(page)
    page.screenshot(path=str(root / "sample-grid.png"))
