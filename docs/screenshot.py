"""Retake the README's MLflow UI screenshots from a real project (one that ran `make run`).

    .venv/bin/python docs/screenshot.py [--params params.yaml] [--out docs]

Serves the project's MLflow store with `mlflow server`, opens it in Debian's headless chromium
(what `make test` installs for tests/test_ui.py) and writes:
  ui-compare.png  the newest sweep's trials compared (their rates, fd_domain over epochs)
  ui-grid.png     the newest training's last per-class sample grid, in its run's artifact view
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import sys
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

from ganflow.config import load_config
from ganflow.localcluster import start_mlflow_server
from ganflow.tracking import SAMPLES_KEY, tracking_uri

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def newest(client: MlflowClient, experiment_id: str, query: str):
    runs = client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise SystemExit(f"error: no run matches {query!r} in the store: run `make run` first")
    return runs[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent))
    args = parser.parse_args()
    cfg = load_config(args.params)
    uri = tracking_uri(cfg)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        print(f"error: no experiment {cfg.tracking.experiment!r} at {uri}: run `make run` first", file=sys.stderr)
        return 1
    eid = experiment.experiment_id
    sweep = newest(client, eid, "tags.`ganflow.stage` = 'tune'")  # the parent; trials are 'tune-trial'
    trials = [r.info.run_id for r in client.search_runs([eid], f"tags.`mlflow.parentRunId` = '{sweep.info.run_id}'")]
    train = newest(client, eid, "tags.`ganflow.stage` = 'train'")
    grids = sorted(
        (
            a.path
            for a in client.list_artifacts(train.info.run_id, "images")
            if a.path.split("/")[-1].startswith(f"{SAMPLES_KEY}+step+") and a.path.endswith(".png")
        ),
        key=lambda p: int(p.split("/")[-1].split("+")[2]),
    )
    out = Path(args.out)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        server = start_mlflow_server(
            uri,
            port,
            Path(tmp) / "server.log",
            ["--default-artifact-root", cfg.paths.mlflow_artifacts.as_uri()],
            env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        try:
            shoot(f"http://127.0.0.1:{port}", eid, trials, train.info.run_id, grids[-1], out)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    print(f"{len(trials)} trials compared -> {out / 'ui-compare.png'}; {grids[-1]} -> {out / 'ui-grid.png'}")
    return 0


def shoot(url: str, eid: str, trials: list[str], train_id: str, grid: str, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_context(viewport={"width": 1400, "height": 1300}).new_page()
        page.set_default_timeout(60_000)
        runs = json.dumps(trials, separators=(",", ":"))
        page.goto(f"{url}/#/compare-runs?runs={runs}&experiments={json.dumps([eid])}")
        page.locator("body").get_by_text(f"Comparing {len(trials)} Runs").wait_for()
        close_panels(page)
        # the plot: the two rates against fd_domain (the UI starts with every param and one metric)
        chips = page.locator(".du-bois-light-select-selection-item")
        for name in ("train.seed", "loss_d"):
            chip = chips.filter(has_text=re.compile(f"^{re.escape(name)}$"))
            if chip.count():
                chip.first.locator(".du-bois-light-select-selection-item-remove").click()
        metrics = page.locator("input[id^=dubois-select]").last  # the second select: metrics
        metrics.click()
        metrics.type("fd_domain")
        page.wait_for_timeout(500)
        metrics.press("Enter")  # the first option the typed name leaves
        page.keyboard.press("Escape")
        diff = page.get_by_role("switch", name="Parameters - Show diff only")  # the rates and seeds, not all params
        if diff.count():
            diff.first.click()
        page.wait_for_timeout(3000)  # the plots draw
        page.screenshot(path=str(out / "ui-compare.png"))
        page.goto(f"{url}/#/experiments/{eid}/runs/{train_id}/artifacts/{grid}")
        image = page.locator("img[src^='blob:']").first
        image.wait_for()
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
        close_panels(page)
        page.screenshot(path=str(out / "ui-grid.png"))
        browser.close()


def close_panels(page) -> None:
    """The assistant panel, where this MLflow has one: it covers the right of the page."""
    button = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
    if button.count():
        button.first.click()


if __name__ == "__main__":
    sys.exit(main())
