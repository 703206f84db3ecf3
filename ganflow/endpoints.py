"""Where the tracking store is, and whether it answers: no MLflow import, no run.

The submitter of a Ray job, the sampler and the CLI need the store's address (and a quick
reachability check) without the tracking code itself; ganflow.tracking builds on this.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request

from ganflow.config import Config
from ganflow.errors import TrackingError


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


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail before any training when an MLflow server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            if response.status != 200:
                raise TrackingError(f"tracking.uri: MLflow server at {uri} answered HTTP {response.status}")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(f"tracking.uri: MLflow server at {uri} is unreachable ({reason})") from None
