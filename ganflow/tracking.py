"""MLflow: where the tracking store is. Rank 0 and the driver only."""

from __future__ import annotations

import os

from ganflow.config import Config


def tracking_uri(cfg: Config) -> str:
    """tracking.uri, else MLFLOW_TRACKING_URI, else an absolute sqlite:/// path in the project.

    The default must be absolute: Ray workers and jobs run in other working directories.
    """
    if cfg.tracking.uri:
        return cfg.tracking.uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{cfg.paths.mlflow_db}"


def artifact_root(cfg: Config) -> str:
    """Absolute artifact location for experiments created in the local SQLite store."""
    return cfg.paths.mlflow_artifacts.as_uri()
