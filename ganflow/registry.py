"""The model registry: registering the generator, its aliases, the promotion rule. The only
module that writes to the registry.

Rule: every newly registered version becomes `challenger`. The champion is chosen on the
validation split (tags ``validation_fd_domain`` and its sd over latent draws), never on test, among
the versions *comparable with the newest* (scored with the same encoder and reference and the same
eval.seed, tag ``eval_key``) that the copy detector did not flag (copying_flagged: a flagged
generator is never champion). A comparable, unflagged champion keeps its alias unless the best
other version beats it by more than the two versions' combined spread,
sqrt(sd_champion² + sd_challenger²): a difference within latent-draw noise promotes nothing. With no
such champion, the best comparable unflagged version becomes champion. fd_domain values from
different encoders or references are different scales, never compared. The same generator (same
weights file) registered again reuses its version.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from ganflow.artifacts import ENCODER_WEIGHTS, REFERENCE, prepared_hash
from ganflow.artifacts import GENERATOR_SPEC as SPEC
from ganflow.artifacts import GENERATOR_WEIGHTS as WEIGHTS
from ganflow.atomic import file_sha256, write_file
from ganflow.config import Config
from ganflow.errors import GanflowError
from ganflow.tracking import connect, git_commit, params_hash

CHAMPION, CHALLENGER = "champion", "challenger"
METRIC = "validation_fd_domain"  # the champion is chosen on validation; test only reports
SPREAD = "validation_fd_domain_sd"
EVAL_KEY = "eval_key"  # the tag naming what a version's fd_domain was measured against


class RegistryError(GanflowError):
    """The generator cannot be registered."""


def evaluation_key(cfg: Config) -> str:
    """What an fd_domain value is comparable under: the encoder's weights, its held-out
    reference statistics (held-out images, num_samples, feature_dim...) and eval.seed (the
    latent vectors the evaluate stage scores)."""
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


def set_alias(client: Any, name: str, alias: str, version: str, tries: int = 5) -> None:
    """Point ``alias`` at ``version``. An MLflow server on SQLite moves an alias by deleting its
    row and inserting the new one: two registers moving the same alias at once can make the
    second insert fail with a UNIQUE constraint error (seen with two racing registers beside a
    busy machine). That loser tries again; the alias ends where the last writer put it."""
    import time

    from mlflow.exceptions import MlflowException

    for attempt in range(1, tries + 1):
        try:
            client.set_registered_model_alias(name, alias, version)
            return
        except MlflowException as exc:
            if attempt == tries or "UNIQUE constraint failed" not in str(exc):
                raise
            time.sleep(0.2 * attempt)


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
    held = next((v for v in eligible if current is not None and str(v.version) == str(current.version)), None)
    if held is not None and not beats(best.tags, held.tags):
        return held  # within the noise of latent draws: the champion stays
    if current is None or str(current.version) != str(best.version):
        set_alias(client, name, CHAMPION, str(best.version))
    return best


def beats(challenger: dict[str, str], champion: dict[str, str]) -> bool:
    """True when the challenger's validation fd_domain is lower than the champion's by more than
    their combined spread over latent draws (tags METRIC and SPREAD)."""
    spread = math.hypot(float(challenger.get(SPREAD, "0")), float(champion.get(SPREAD, "0")))
    return float(champion[METRIC]) - float(challenger[METRIC]) > spread


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
    if "copying_flagged" not in metrics or "validation" not in metrics:
        raise RegistryError(
            f"{eval_path}: written by an older evaluate (no validation scores or copy "
            "detector); run `dvc repro evaluate`"
        )
    name = cfg.registry.model_name
    sha = file_sha256(cfg.paths.generator / WEIGHTS)
    key = evaluation_key(cfg)
    client, _ = connect(cfg)
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(
                name,
                description="ganflow generator: z (N, latent) [+ one-hot class] float32 -> images "
                "(N, C, H, W) in [-1, 1]. `champion`: the lowest validation fd_domain (mean over latent draws) "
                "among unflagged versions measured like the newest (tag eval_key), replaced only when beaten by "
                "more than the two versions' combined spread.",
            )
        except MlflowException as exc:  # another register created it meanwhile
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise

    # the same weights measured the same way reuse their version; measured with another encoder
    # or held-out set they are a new version (its fd_domain is another scale)
    existing = client.search_model_versions(
        f"name='{name}' and tags.generator_sha256='{sha}' and tags.{EVAL_KEY}='{key}'"
    )
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
        tags.update(
            {f"validation_{k}": repr(float(v)) for k, v in metrics["validation"].items() if isinstance(v, (int, float))}
        )
        model_id = _logged_model_id(client, run_id)
        # model_id too: a tracking server refuses a models:/ source without it (a SQLite store does not)
        version = client.create_model_version(
            name,
            source=f"models:/{model_id}",
            run_id=run_id,
            model_id=model_id,
            tags=tags,
            description=(
                f"EMA generator of epoch {spec.get('best_epoch')} (lr_g={spec.get('lr_g'):.3g}, "
                f"lr_d={spec.get('lr_d'):.3g}); test fd_domain {metrics['fd_domain']:.4g} ± "
                f"{metrics.get('fd_domain_sd') or float('nan'):.2g} = {metrics.get('fd_domain_over_real') or float('nan'):.2f}x "
                f"the real baseline; validation {metrics['validation']['fd_domain']:.4g}"
            ),
        )
        created = True
    number = str(version.version)
    set_alias(client, name, CHALLENGER, number)

    champion = _champion(client, name)
    comparable = champion is not None and champion.tags.get(EVAL_KEY) == key
    champion_fd = float(champion.tags[METRIC]) if comparable and METRIC in champion.tags else None
    fd = float(metrics["validation"]["fd_domain"])
    copying = bool(metrics["copying_flagged"])
    elected = _elect_champion(client, name, key)
    promoted = (
        elected is not None and str(elected.version) == number and (champion is None or str(champion.version) != number)
    )
    aliases = sorted(client.get_model_version(name, number).aliases)
    record = {
        "name": name,
        "version": int(number),
        "aliases": aliases,
        METRIC: fd,
        SPREAD: float(metrics["validation"].get("fd_domain_sd") or 0.0),
        "test_fd_domain": float(metrics["fd_domain"]),
        "test_fd_domain_over_real": metrics.get("fd_domain_over_real"),
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
