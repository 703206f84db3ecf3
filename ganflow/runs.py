"""`ganflow runs`: the latest runs of the project's MLflow experiment as a compact table.

One row per training run and per sweep (its trials counted, the best named; ``trials=True``
lists them indented under it). Read-only: it never creates a store or an experiment.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ganflow.endpoints import check_reachable
from ganflow.errors import TrackingError, first_line
from ganflow.tracking import STOPPED_EARLY, lr_text

COLUMNS = ("run", "stage", "status", "lr_g", "lr_d", "best fd_domain", "epochs", "started", "id", "")
NAME_WIDTH = 40


@dataclass
class Row:
    name: str
    stage: str
    status: str
    lr_g: float | None
    lr_d: float | None
    fd_domain: float | None  # the best (lowest) over the run's epochs
    epochs: int | None
    start_ms: int
    run_id: str
    note: str = ""
    depth: int = 0  # 1: a trial listed under its sweep

    def cells(self) -> tuple[str, ...]:
        name = ("  " * self.depth + self.name)[:NAME_WIDTH]
        started = dt.datetime.fromtimestamp(self.start_ms / 1000).strftime("%Y-%m-%d %H:%M") if self.start_ms else ""
        return (
            name,
            self.stage,
            self.status,
            "" if self.lr_g is None else lr_text(self.lr_g),
            "" if self.lr_d is None else lr_text(self.lr_d),
            "" if self.fd_domain is None else f"{self.fd_domain:.4g}",
            "" if self.epochs is None else str(self.epochs),
            started,
            self.run_id[:8],
            self.note,
        )


def open_experiment(uri: str, experiment: str) -> tuple[Any, str]:
    """(MlflowClient, experiment id) of an existing store and experiment; TrackingError otherwise."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise TrackingError(
            f"no MLflow store at {uri.removeprefix('sqlite:///')}: nothing is tracked yet "
            "(`make run` or `dvc repro` creates it; --tracking-uri names another store)"
        )
    check_reachable(uri)
    client = MlflowClient(uri)
    try:
        found = client.get_experiment_by_name(experiment)
        names = [] if found else [e.name for e in client.search_experiments()]
    except MlflowException as exc:
        raise TrackingError(f"{uri}: cannot read the tracking store ({first_line(exc)})") from None
    if found is None:
        raise TrackingError(
            f"{uri}: no experiment named {experiment!r} (tracking.experiment)"
            + (f"; experiments there: {', '.join(sorted(names))}" if names else "")
        )
    return client, found.experiment_id


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _best_fd(client: Any, run: Any) -> float | None:
    if "fd_domain" not in run.data.metrics:
        return None
    return min(m.value for m in client.get_metric_history(run.info.run_id, "fd_domain"))


def _stage(tags: dict[str, str]) -> str:
    if tags.get("ganflow.stage") == "tune-trial":
        return "trial"
    return tags.get("dvc_stage") or tags.get("ganflow.stage", "")


def _training_row(client: Any, run: Any, depth: int = 0) -> Row:
    params, metrics = run.data.params, run.data.metrics
    return Row(
        name=run.info.run_name or "",
        stage=_stage(run.data.tags),
        status=run.info.status,
        lr_g=_float(params.get("lr_g")),
        lr_d=_float(params.get("lr_d")),
        fd_domain=_best_fd(client, run),
        epochs=int(metrics["epoch"]) if "epoch" in metrics else None,
        start_ms=run.info.start_time or 0,
        run_id=run.info.run_id,
        depth=depth,
    )


def _sweep_rows(client: Any, experiment_id: str, run: Any, trials: bool) -> list[Row]:
    """The sweep's row (the best trial's rates and fd_domain) and, with ``trials``, its trials'."""
    children = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=1000,
    )
    child_rows = [_training_row(client, c, depth=1) for c in children]
    scored = [r for r in child_rows if r.fd_domain is not None]
    best = min(scored, key=lambda r: r.fd_domain) if scored else None
    stopped = sum(c.data.tags.get("ganflow.trial_status", "").startswith(STOPPED_EARLY) for c in children)
    note = f"{len(children)} trials" + (f", {stopped} stopped early" if stopped else "")
    if best is not None:
        note += f"; best: {best.name.split(' lr_g=')[0]} ({best.run_id[:8]})"
    params = run.data.params
    row = Row(
        name=run.info.run_name or "",
        stage=_stage(run.data.tags),
        status=run.info.status,
        lr_g=_float(params.get("best_lr_g")) or (best.lr_g if best else None),
        lr_d=_float(params.get("best_lr_d")) or (best.lr_d if best else None),
        fd_domain=run.data.metrics.get("best_fd_domain", best.fd_domain if best else None),
        epochs=None,
        start_ms=run.info.start_time or 0,
        run_id=run.info.run_id,
        note=note,
    )
    return [row, *child_rows] if trials else [row]


def latest_runs(uri: str, experiment: str, limit: int = 20, trials: bool = False) -> list[Row]:
    """The ``limit`` latest top-level runs (trainings and sweeps), newest first."""
    client, experiment_id = open_experiment(uri, experiment)
    top = client.search_runs(
        [experiment_id],
        filter_string="tags.`mlflow.parentRunId` IS NULL",
        order_by=["attributes.start_time DESC"],
        max_results=limit,
    )
    rows: list[Row] = []
    for run in top:
        if run.data.tags.get("ganflow.stage") == "tune":
            rows += _sweep_rows(client, experiment_id, run, trials)
        else:
            rows.append(_training_row(client, run))
    return rows


def format_table(rows: list[Row]) -> str:
    table = [COLUMNS, *(r.cells() for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table)
