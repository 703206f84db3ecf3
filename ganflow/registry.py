"""The model registry: registering the generator, its aliases, the promotion rule. The only
module that writes to the registry.

Rule: every newly registered version becomes `challenger`; `champion` moves to it only when
its held-out fd_domain is lower than the current champion's (or there is no champion) and the
data-copying test did not flag it (copying_flagged: a generator that returns training images
scores near the floor and must never win on it). The same
generator (same weights file) registered again reuses its version.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ganflow.atomic import write_file
from ganflow.config import Config
from ganflow.errors import GanflowError
from ganflow.sampling import SPEC, WEIGHTS
from ganflow.tracking import connect, git_commit, params_hash

CHAMPION, CHALLENGER = "champion", "challenger"
METRIC = "fd_domain"


class RegistryError(GanflowError):
    """The generator cannot be registered."""


def generator_sha256(cfg: Config) -> str:
    digest = hashlib.sha256()
    with open(cfg.paths.generator / WEIGHTS, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _champion(client: Any, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def register(cfg: Config) -> dict[str, Any]:
    """Register paths.generator as registry.model_name; set aliases by the rule above."""
    from mlflow.exceptions import MlflowException

    spec_path = cfg.paths.generator / SPEC
    eval_path = cfg.paths.metrics / "eval.json"
    for path, stage in ((spec_path, "train"), (eval_path, "evaluate")):
        if not path.is_file():
            raise RegistryError(f"{path}: missing; run `dvc repro {stage}` first")
    spec = json.loads(spec_path.read_text())
    metrics = json.loads(eval_path.read_text())
    run_id = spec.get("mlflow_run_id")
    if not run_id:
        raise RegistryError(f"{spec_path}: no MLflow run id: the generator was not logged")
    name = cfg.registry.model_name
    sha = generator_sha256(cfg)
    client, _ = connect(cfg)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name, description="ganflow generator: z (N, latent) float32 -> images (N, C, H, W) in [-1, 1]. "
            "`champion` is the version with the lowest fd_domain (domain-encoder Fréchet distance)."
        )

    existing = client.search_model_versions(f"name='{name}' and tags.generator_sha256='{sha}'")
    if existing:
        version = existing[0]
        created = False
    else:
        tags = {
            "generator_sha256": sha,
            "data_hash": _data_hash(cfg),
            "params_hash": params_hash(cfg),
            "git_commit": git_commit(cfg.root),
            "best_epoch": str(spec.get("best_epoch")),
            "lr_g": repr(spec.get("lr_g")),
            "lr_d": repr(spec.get("lr_d")),
        }
        tags.update({k: repr(float(v)) for k, v in metrics.items() if isinstance(v, (int, float))})
        version = client.create_model_version(
            name, source=_model_source(client, run_id), run_id=run_id, tags=tags,
            description=(
                f"EMA generator of epoch {spec.get('best_epoch')} (lr_g={spec.get('lr_g'):.3g}, "
                f"lr_d={spec.get('lr_d'):.3g}); fd_domain {metrics[METRIC]:.4g} = "
                f"{metrics.get('fd_domain_over_floor', float('nan')):.2f}x its real-vs-real floor"
            ),
        )
        created = True
    number = str(version.version)
    client.set_registered_model_alias(name, CHALLENGER, number)

    champion = _champion(client, name)
    champion_fd = float(champion.tags[METRIC]) if champion is not None and METRIC in champion.tags else None
    fd = float(metrics[METRIC])
    if "copying_flagged" not in metrics:
        raise RegistryError(f"{eval_path}: no data-copying result (written before it existed); "
                            "run `dvc repro evaluate`")
    copying = bool(metrics["copying_flagged"])
    promoted = not copying and (
        champion is None or (str(champion.version) != number and champion_fd is not None and fd < champion_fd)
    )
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, number)
    aliases = sorted(client.get_model_version(name, number).aliases)
    record = {
        "name": name,
        "version": int(number),
        "aliases": aliases,
        METRIC: fd,
        "champion_fd_domain_before": champion_fd,
        "promoted": promoted,
        "copying_flagged": copying,
        "created": created,
        "mlflow_run_id": run_id,
        "model_uri": f"models:/{name}/{number}",
    }
    write_file(cfg.paths.registry, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def _data_hash(cfg: Config) -> str:
    from ganflow.data import read_manifest

    return read_manifest(cfg.paths.prepared)["source_hash"]


def _model_source(client: Any, run_id: str) -> str:
    """The logged model of the run (MLflow 3 keeps models apart from run artifacts)."""
    import mlflow

    run = client.get_run(run_id)
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id='{run_id}'", output_format="list"
    )
    ready = [m for m in models if m.name == "generator"]
    if not ready:
        raise RegistryError(f"MLflow run {run_id} has no logged generator model")
    return f"models:/{ready[-1].model_id}"
