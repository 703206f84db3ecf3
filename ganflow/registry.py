"""The model registry: registering the generator, its aliases, the promotion rule. The only
module that writes to the registry.

Rule: every newly registered version becomes `challenger`; `champion` is the version with the
lowest held-out fd_domain among those *comparable with the newest* — scored with the same
encoder, the same held-out reference statistics and the same eval.seed (tag ``eval_key``) — that
the data-copying test did not flag (copying_flagged: a generator that returns training images
scores near the floor and must never win on it). fd_domain values from different encoders or
held-out sets are different scales, never compared. The champion is recomputed from the
registry's own tags on every register, so it does not depend on which of two concurrent
registers ran last. The same generator (same weights file) registered again reuses its version.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ganflow.atomic import file_sha256, write_file
from ganflow.config import Config
from ganflow.data import prepared_hash
from ganflow.errors import GanflowError
from ganflow.sampling import SPEC, WEIGHTS
from ganflow.tracking import connect, git_commit, params_hash

CHAMPION, CHALLENGER = "champion", "challenger"
METRIC = "fd_domain"
EVAL_KEY = "eval_key"  # the tag naming what a version's fd_domain was measured against


class RegistryError(GanflowError):
    """The generator cannot be registered."""


def evaluation_key(cfg: Config) -> str:
    """What an fd_domain value is comparable under: the encoder's weights, its held-out
    reference statistics (held-out images, num_samples, feature_dim...) and eval.seed (the
    latent vectors the evaluate stage scores)."""
    from ganflow.evaluation import REFERENCE
    from ganflow.evaluation import WEIGHTS as ENCODER_WEIGHTS

    digest = hashlib.sha256()
    for file in (ENCODER_WEIGHTS, REFERENCE):
        path = cfg.paths.encoder / file
        if not path.is_file():
            raise RegistryError(f"{path}: missing; run `dvc repro encoder` first")
        digest.update(file_sha256(path).encode())
    digest.update(f"eval.seed={cfg.eval.seed}".encode())
    return digest.hexdigest()[:16]


def _flagged(version: Any) -> bool:
    return float(version.tags.get("copying_flagged", "0")) != 0.0


def _elect_champion(client: Any, name: str, key: str):
    """Point `champion` at the best unflagged version measured under ``key``; returns it (None
    when every such version is flagged). Reads the registry's tags only: idempotent, and two
    registers racing end on the same answer (each runs it after its own version exists)."""
    versions = client.search_model_versions(f"name='{name}' and tags.{EVAL_KEY}='{key}'")
    eligible = [v for v in versions if METRIC in v.tags and not _flagged(v)]
    if not eligible:
        return None
    best = min(eligible, key=lambda v: (float(v.tags[METRIC]), int(v.version)))  # a tie: the older
    current = _champion(client, name)
    if current is None or str(current.version) != str(best.version):
        client.set_registered_model_alias(name, CHAMPION, str(best.version))
    return best


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
    if "copying_flagged" not in metrics:
        raise RegistryError(f"{eval_path}: no data-copying result (written before it existed); "
                            "run `dvc repro evaluate`")
    name = cfg.registry.model_name
    sha = file_sha256(cfg.paths.generator / WEIGHTS)
    key = evaluation_key(cfg)
    client, _ = connect(cfg)
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(
                name, description="ganflow generator: z (N, latent) [+ one-hot class] float32 -> images "
                "(N, C, H, W) in [-1, 1]. `champion` is the version with the lowest fd_domain (domain-encoder "
                "Fréchet distance) among those measured like the newest (tag eval_key)."
            )
        except MlflowException as exc:  # another register created it meanwhile
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise

    # the same weights measured the same way reuse their version; measured with another encoder
    # or held-out set they are a new version (its fd_domain is another scale)
    existing = client.search_model_versions(
        f"name='{name}' and tags.generator_sha256='{sha}' and tags.{EVAL_KEY}='{key}'")
    if existing:
        version = existing[0]
        created = False
    else:
        tags = {
            "generator_sha256": sha,
            EVAL_KEY: key,
            "data_hash": prepared_hash(cfg.paths.prepared),  # as the run's tag
            "params_hash": params_hash(cfg),
            "git_commit": git_commit(cfg.root),
            "best_epoch": str(spec.get("best_epoch")),
            "lr_g": repr(spec.get("lr_g")),
            "lr_d": repr(spec.get("lr_d")),
        }
        tags.update({k: repr(float(v)) for k, v in metrics.items() if isinstance(v, (int, float))})
        model_id = _logged_model_id(client, run_id)
        # model_id too: a tracking server refuses a models:/ source without it (a SQLite store does not)
        version = client.create_model_version(
            name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id, tags=tags,
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
    comparable = champion is not None and champion.tags.get(EVAL_KEY) == key
    champion_fd = float(champion.tags[METRIC]) if comparable and METRIC in champion.tags else None
    fd = float(metrics[METRIC])
    copying = bool(metrics["copying_flagged"])
    elected = _elect_champion(client, name, key)
    promoted = elected is not None and str(elected.version) == number and (
        champion is None or str(champion.version) != number)
    aliases = sorted(client.get_model_version(name, number).aliases)
    record = {
        "name": name,
        "version": int(number),
        "aliases": aliases,
        METRIC: fd,
        "champion_fd_domain_before": champion_fd,  # None: no champion, or one measured otherwise
        EVAL_KEY: key,
        "champion_version": int(elected.version) if elected is not None else None,
        "champion_fd_domain": float(elected.tags[METRIC]) if elected is not None else None,
        "promoted": promoted,
        "copying_flagged": copying,
        "created": created,
        "mlflow_run_id": run_id,
        "model_uri": f"models:/{name}/{number}",
    }
    write_file(cfg.paths.registry, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def _logged_model_id(client: Any, run_id: str) -> str:
    """The id of the run's logged generator model (MLflow 3 keeps models apart from run artifacts)."""
    import mlflow

    run = client.get_run(run_id)
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id='{run_id}'", output_format="list"
    )
    ready = [m for m in models if m.name == "generator"]
    if not ready:
        raise RegistryError(f"MLflow run {run_id} has no logged generator model")
    return ready[-1].model_id
