"""The stages that use a cluster (prepare, tune, train) as Ray jobs on it.

A Ray job runs in an unpacked copy of the project on the cluster's head: the copy has the code
and params.yaml, but not the DVC-tracked data (`.gitignore` keeps it out of the upload) and its
outputs vanish with it. So stage files travel through an *exchange* folder on the shared storage
(``cluster.storage_path``, a shared path or an ``s3://``/``gs://`` URI):

    submitter (dvc repro / ganflow submit)       Ray job (python pipelines/<stage>.py)
    push the stage's inputs ───────────────────► fetch the inputs it lacks
                                                 run the stage as on one machine
    pull the outputs into the workspace ◄─────── push the outputs, then a manifest last

With ``cluster.address`` set, ``python pipelines/train.py`` (what ``dvc repro`` runs) does the
submitter's side itself: push, submit, stream the job's log, fail when the job fails, pull; its
exchange folder is one per submission (``exchange/<experiment>/<submission id>``), removed once
the outputs are pulled.
A job submitted by hand (``ray job submit --working-dir . -- python pipelines/train.py``) does
the job's side; ``ganflow push train`` before and ``ganflow pull train`` after move the files.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import sys
import time
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path

from ganflow.atomic import atomic_dir, file_sha256, write_file
from ganflow.config import Config
from ganflow.errors import GanflowError, first_line
from ganflow.filesystems import storage_fs
from ganflow.interrupts import Interrupted, stop_on_signals
from ganflow.raycluster import RAY_ENV_DEFAULTS

EXCHANGE_ENV = "GANFLOW_EXCHANGE"  # set by the submitter in the job's runtime env
SUBMISSION_ENV = "GANFLOW_SUBMISSION_ID"
JOB_ENV_MARKER = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # Ray's job supervisor sets it for every job driver
HEAVY_STAGES = ("prepare", "tune", "train")
TRACKED_STAGES = ("tune", "train")  # log to MLflow: the job needs a tracking server
AGENT_WAIT_S = 120.0  # how long a submission waits for a just-started head's job agent


class JobError(GanflowError):
    """A stage could not be submitted, or its Ray job failed."""


def stage_files(cfg: Config, stage: str) -> tuple[list[Path], list[Path]]:
    """(inputs, outputs) of a heavy stage, as in dvc.yaml. Prepare's input, data.path, does not
    travel: the job and its Ray tasks read it where it is (see check_job_data)."""
    if stage == "prepare":
        return [], [cfg.paths.prepared]
    if stage == "tune":
        return [cfg.paths.prepared, cfg.paths.encoder], [cfg.paths.tune_best]
    if stage == "train":
        return (
            [cfg.paths.prepared, cfg.paths.encoder, cfg.paths.tune_best],
            [cfg.paths.generator, cfg.paths.metrics / "train.json", cfg.paths.plots / "train.csv"],
        )
    raise JobError(f"stage {stage!r} does not run as a Ray job (only {', '.join(HEAVY_STAGES)})")


def in_ray_job() -> bool:
    return JOB_ENV_MARKER in os.environ


def exchange_uri(cfg: Config) -> str:
    """GANFLOW_EXCHANGE, else <cluster.storage_path>/exchange/<tracking.experiment>."""
    if os.environ.get(EXCHANGE_ENV):
        return os.environ[EXCHANGE_ENV].rstrip("/")
    if not cfg.cluster.storage_path:
        raise JobError(
            "cluster.storage_path: a Ray job needs shared storage for checkpoints and stage files "
            "(a path every node sees, or an s3:// / gs:// URI); it is not set"
        )
    return f"{cfg.cluster.storage_path.rstrip('/')}/exchange/{cfg.tracking.experiment}"


def _key(cfg: Config, path: Path) -> str:
    rel = cfg.relative(path)
    if rel.startswith("/"):
        raise JobError(
            f"{path}: stage files outside the project cannot travel with a Ray job; "
            "keep paths: entries inside the project"
        )
    return rel


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file())


def _local_hashes(cfg: Config, path: Path) -> dict[str, str]:
    """{key: sha256} of a file or folder of the project, keys relative to the project."""
    return {file.relative_to(cfg.root).as_posix(): file_sha256(file) for file in _local_files(path)}


def _upload(cfg: Config, uri: str, path: Path) -> dict[str, str]:
    """Copy a file or folder of the project to the exchange; returns {key: sha256}."""
    fs, base = storage_fs(uri)
    key = _key(cfg, path)
    if not path.exists():
        raise JobError(f"{key}: missing; run the stages before it first (dvc repro)")
    if path.is_dir():  # files the local folder no longer has must not linger in the exchange
        fs.delete_dir_contents(f"{base}/{key}", missing_dir_ok=True)
    for file in _local_files(path):
        target = f"{base}/{file.relative_to(cfg.root).as_posix()}"
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with open(file, "rb") as src, fs.open_output_stream(target) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return _local_hashes(cfg, path)


def _download(cfg: Config, uri: str, path: Path, expected: dict[str, str] | None = None) -> None:
    """Exchange -> project, atomically: a folder is replaced whole, a file in one rename."""
    import pyarrow.fs

    fs, base = storage_fs(uri)
    key = _key(cfg, path)
    info = fs.get_file_info(f"{base}/{key}")
    if info.type == pyarrow.fs.FileType.NotFound:
        raise JobError(f"{key}: not in the exchange {uri}")

    def fetch(remote: str) -> bytes:
        with fs.open_input_stream(remote) as stream:
            data = stream.read()
        rel = remote[len(base) + 1 :]
        if expected is not None and hashlib.sha256(data).hexdigest() != expected.get(rel):
            raise JobError(f"{rel}: the copy in {uri} does not match the manifest written with it (incomplete upload?)")
        return data

    if info.type == pyarrow.fs.FileType.File:
        write_file(path, fetch(f"{base}/{key}"))
        return
    selector = pyarrow.fs.FileSelector(f"{base}/{key}", recursive=True)
    with atomic_dir(path) as tmp:
        for entry in fs.get_file_info(selector):
            if entry.type != pyarrow.fs.FileType.File:
                continue
            target = _inside(tmp, entry.path[len(base) + len(key) + 2 :], uri)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(fetch(entry.path))


def _inside(folder: Path, rel: str, uri: str) -> Path:
    """``folder / rel`` for a key read from the exchange; a key that would land outside
    ``folder`` (absolute, or climbing with ``..``: possible in an object store) is refused."""
    parts = rel.replace("\\", "/").split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise JobError(f"{uri}: refused the exchange key {rel!r}: not a plain path inside the folder it fills")
    return folder.joinpath(*parts)


def _manifest_path(uri: str, stage: str, kind: str = "outputs") -> tuple[object, str]:
    fs, base = storage_fs(uri)
    return fs, f"{base}/.ganflow/{stage}.{kind}.json"


def _write_manifest(uri: str, stage: str, kind: str, record: dict) -> None:
    fs, manifest = _manifest_path(uri, stage, kind)
    fs.create_dir(manifest.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(manifest) as out:
        out.write(json.dumps(record, indent=2, sort_keys=True).encode())


def _read_manifest(uri: str, stage: str, kind: str) -> dict | None:
    """The record _write_manifest left, None when there is none."""
    fs, manifest = _manifest_path(uri, stage, kind)
    try:
        with fs.open_input_stream(manifest) as stream:
            return json.loads(stream.read())
    except (FileNotFoundError, OSError):
        return None


def _upload_all(cfg: Config, uri: str, paths: list[Path]) -> dict[str, str]:
    hashes: dict[str, str] = {}
    for path in paths:
        hashes.update(_upload(cfg, uri, path))
    return hashes


def push_inputs(cfg: Config, stage: str, uri: str | None = None) -> str:
    """Submitter side: the stage's inputs -> the exchange, then their hashes (written last).
    Returns the exchange URI."""
    uri = uri or exchange_uri(cfg)
    _write_manifest(uri, stage, "inputs", {"stage": stage, "files": _upload_all(cfg, uri, stage_files(cfg, stage)[0])})
    return uri


def fetch_inputs(cfg: Config, stage: str, uri: str) -> None:
    """Job side: the stage's inputs <- the exchange. Ray unpacks a job's project once per content
    hash and reuses that folder for every later job with the same code and params, so a copy of
    an input may already be here, left by an earlier job: it is kept only when it is, file for
    file, what the submitter pushed (without the pushed hashes, it is fetched again)."""
    record = _read_manifest(uri, stage, "inputs")
    pushed = None if record is None else record["files"]  # None: pushed by hand with an older ganflow
    for path in stage_files(cfg, stage)[0]:
        key = _key(cfg, path)
        expected = None
        if pushed is not None:
            expected = {rel: h for rel, h in pushed.items() if rel == key or rel.startswith(key + "/")}
            if path.exists() and _local_hashes(cfg, path) == expected:
                continue
        _download(cfg, uri, path, expected)


def push_outputs(cfg: Config, stage: str, uri: str, submission_id: str) -> None:
    """Job side: outputs -> the exchange, then the manifest (written last: it marks them complete)."""
    hashes = _upload_all(cfg, uri, stage_files(cfg, stage)[1])
    _write_manifest(
        uri, stage, "outputs", {"stage": stage, "submission_id": submission_id, "files": hashes, "time": time.time()}
    )


def pull_outputs(cfg: Config, stage: str, uri: str | None = None, submission_id: str | None = None) -> dict:
    """Submitter side: the outputs of the last job of ``stage`` -> the workspace (checked
    against the manifest the job wrote). Returns the manifest."""
    uri = uri or exchange_uri(cfg)
    record = _read_manifest(uri, stage, "outputs")
    if record is None:
        raise JobError(f"{stage}: no finished job's outputs in {uri} (the job failed, or never ran)")
    if submission_id and record.get("submission_id") != submission_id:
        raise JobError(f"{stage}: the outputs in {uri} are from job {record.get('submission_id')}, not {submission_id}")
    for path in stage_files(cfg, stage)[1]:
        _download(cfg, uri, path, expected=record["files"])
    return record


# --------------------------------------------------------------------------------- job side


def run_stage(cfg: Config, stage: str, body: Callable[[Config], None]) -> None:
    """What pipelines/tune.py and pipelines/train.py run: the stage here, as a Ray job, or
    the stage *inside* a Ray job (fetching inputs first, pushing outputs after)."""
    if in_ray_job():
        if stage in TRACKED_STAGES:
            _check_job_tracking(cfg)
        uri = exchange_uri(cfg)
        fetch_inputs(cfg, stage, uri)
        body(cfg)
        push_outputs(cfg, stage, uri, os.environ.get(SUBMISSION_ENV) or _own_submission_id())
        print(f"{stage}: outputs -> {uri}", flush=True)
    elif cfg.cluster.address:
        submit_stage(cfg, stage)
    else:
        body(cfg)


def _own_submission_id() -> str:
    """The submission id of the Ray job this process is the driver of (set by `ray job submit`)."""
    try:
        metadata = json.loads(os.environ[JOB_ENV_MARKER]).get("metadata") or {}
    except (KeyError, ValueError):
        metadata = {}
    return metadata.get("job_submission_id", "unknown")


def _check_job_tracking(cfg: Config) -> None:
    from ganflow.endpoints import tracking_uri

    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:") and uri.endswith(str(cfg.paths.mlflow_db)):
        raise JobError(
            "tracking.uri: a Ray job needs a tracking server (set tracking.uri, or MLFLOW_TRACKING_URI "
            "in the job's runtime env); the default SQLite file would vanish with the job's working dir"
        )


# ---------------------------------------------------------------------------- submitter side


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlparse(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def job_client(address: str):
    """A JobSubmissionClient for ``address``; Ray's token auth (on by default) needs the token
    in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, and RAY_AUTH_MODE=token."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import logging

    from ray.job_submission import JobSubmissionClient

    logging.getLogger("ray").setLevel(logging.WARNING)  # per-file packaging notes on every submit

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - ConnectionError, AuthenticationError, RuntimeError, ...
        raise JobError(f"cluster.address: cannot reach the Ray job server at {address}: {first_line(exc)}") from None


# Passed from the submitter's shell to its job: endpoints and region only. Credentials
# (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, MLFLOW_TRACKING_USERNAME /
# PASSWORD / TOKEN) never are: a job's runtime_env can be read by every holder of the cluster's
# token (job info, dashboard), so the job uses the credentials its nodes have (Kubernetes
# Secrets or IRSA in infra/, cluster.env on launcher nodes, the shell of `ganflow cluster up`).
JOB_ENDPOINT_VARS = ("AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")


def job_runtime_env(cfg: Config, uri: str, submission_id: str) -> dict:
    from ganflow.endpoints import tracking_uri

    env = {**RAY_ENV_DEFAULTS, EXCHANGE_ENV: uri, SUBMISSION_ENV: submission_id}
    if not cfg.tracking.uri:
        # the job reads tracking.uri from its params.yaml when set; else it logs where this
        # process would (MLFLOW_TRACKING_URI, or, on a cluster on this machine, the project's store)
        env["MLFLOW_TRACKING_URI"] = tracking_uri(cfg)
    for name in JOB_ENDPOINT_VARS:
        if name in os.environ:  # where the storage is, not who may use it
            env[name] = os.environ[name]
    return {"working_dir": str(cfg.root), "env_vars": env}


def submit_stage(cfg: Config, stage: str) -> str:
    """Push inputs, submit ``python pipelines/<stage>.py``, stream its log, pull its outputs.
    Returns the submission id; a failed or stopped job raises JobError (Ctrl-C stops the job)."""
    from ganflow.endpoints import check_reachable, tracking_uri

    address = cfg.cluster.address
    if stage == "prepare":
        check_job_data(cfg)
    else:
        uri = tracking_uri(cfg)
        if not uri.startswith(("http://", "https://")) and not _is_loopback(address):
            raise JobError(
                f"tracking.uri: {uri} is a file on this machine; a job on {address} needs an MLflow "
                "server both can reach (tracking.uri: http://...)"
            )
        check_reachable(uri)
    client = job_client(address)
    submission_id = f"ganflow-{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    # a folder of its own per submission: two people (or two dvc repro) submitting at once
    # cannot overwrite each other's inputs or take each other's outputs; removed once pulled
    exchange = f"{exchange_uri(cfg)}/{submission_id}"
    try:
        return _submit(cfg, stage, client, address, exchange, submission_id)
    finally:
        _remove_exchange(exchange)


def check_job_data(cfg: Config) -> None:
    """A prepare job reads data.path where it is, from every node that decodes. A path relative to
    the project would be looked for in the job's own copy of the project (code and params only),
    and its Ray tasks run on other nodes: it must be an absolute path on storage they all see."""
    if cfg.data.source == "digits":
        return
    rel = cfg.relative(cfg.data.path)
    if not rel.startswith("/"):
        raise JobError(
            f"data.path: {rel} is relative to the project, and the prepare job on {cfg.cluster.address} and its "
            "Ray tasks on other nodes do not have it: put the images on storage every node mounts and set "
            "data.path to that absolute path (or leave cluster.address unset to prepare here)"
        )


def _remove_exchange(uri: str) -> None:
    fs, base = storage_fs(uri)
    try:
        fs.delete_dir(base)
    except (FileNotFoundError, OSError):
        pass


def _submit_waiting(client, stage: str, address: str, job: dict) -> None:
    """``client.submit_job(**job)``, waiting out a head that is not ready to take it."""
    # a head that has just started answers before its job agent is up ("No available agent to
    # submit job, please try again later"): that one refusal is waited out, for a while
    # (the head also says so when its own call to the agent timed out, which may have created the
    # job: a job with this id that exists is followed, not submitted again)
    # A connection the head drops without an answer (seen from a head on a machine loaded with
    # other Rays: "Remote end closed connection without response") is waited out the same way.
    deadline = time.monotonic() + AGENT_WAIT_S
    waiting = False
    while True:
        try:
            client.submit_job(**job)
            break
        except Exception as exc:  # noqa: BLE001 - which errors Ray raises here is not documented
            dropped = _dropped_connection(exc)
            if "No available agent" not in str(exc) and not dropped:
                raise JobError(f"cluster.address: submitting {stage} to {address} failed: {first_line(exc)}") from None
            if time.monotonic() > deadline:
                if dropped:
                    why = f"kept dropping the submission of {stage} for {AGENT_WAIT_S:.0f} s: {first_line(exc)}"
                else:
                    why = (
                        f"still has no job agent after {AGENT_WAIT_S:.0f} s "
                        '("No available agent to submit job"): its dashboard agent runs without its HTTP server; '
                        "see dashboard_agent.log in the head's Ray logs (usually its port, 52365 unless "
                        "--dashboard-agent-listen-port says otherwise, is taken by another Ray on that machine)"
                    )
                raise JobError(f"cluster.address: the Ray head at {address} {why}") from None
            if _job_exists(client, job["submission_id"]):
                break
            if not waiting:
                what = "dropped the connection" if dropped else "is not up yet"
                print(
                    f"{stage}: the Ray job agent on {address} {what}; waiting up to {AGENT_WAIT_S:.0f} s",
                    flush=True,
                )
                waiting = True
            time.sleep(2.0)


def _submit(cfg: Config, stage: str, client, address: str, exchange: str, submission_id: str) -> str:
    push_inputs(cfg, stage, exchange)
    params_rel = cfg.relative(cfg.source)
    entrypoint = f"python pipelines/{stage}.py --params {params_rel}"
    job = {
        "entrypoint": entrypoint,
        "submission_id": submission_id,
        "runtime_env": job_runtime_env(cfg, exchange, submission_id),
        "metadata": {"ganflow_stage": stage},
    }
    _submit_waiting(client, stage, address, job)
    print(f"{stage}: submitted Ray job {submission_id} to {address} ({entrypoint})", flush=True)
    log: list[str] = []
    # Ctrl-C, or SIGTERM (a killed `dvc repro`), stops the job: it would go on, orphaned, on the cluster
    with stop_on_signals(
        f"{stage} (Ray job {submission_id})", on_deadline=lambda: client.stop_job(submission_id)
    ) as quiet:
        try:
            status = _follow(client, submission_id, log)
        except KeyboardInterrupt:
            quiet()
            client.stop_job(submission_id)
            raise Interrupted(f"{stage}: interrupted; stopped Ray job {submission_id}") from None
    if status != "SUCCEEDED":
        # the stage's own one-line error, when the job got that far
        errors = [line.removeprefix("error: ") for line in log if line.startswith("error: ")]
        reason = errors[-1] if errors else first_line(client.get_job_info(submission_id).message or "")
        raise JobError(f"{stage}: Ray job {submission_id} {status}: {reason or 'see the log above'}")
    pull_outputs(cfg, stage, exchange, submission_id)
    print(f"{stage}: Ray job {submission_id} SUCCEEDED; outputs pulled into the workspace", flush=True)
    return submission_id


def _dropped_connection(exc: BaseException) -> bool:
    """Whether a request failed because the connection broke or timed out after it was made
    (the head answered before: job_client checked it), not because the head refused it."""
    import requests

    return isinstance(exc, (ConnectionError, requests.exceptions.ConnectionError, requests.exceptions.Timeout))


def _job_exists(client, submission_id: str) -> bool:
    try:
        client.get_job_info(submission_id)
        return True
    except Exception:  # noqa: BLE001 - RuntimeError "does not exist", or the server not answering either
        return False


def _follow(client, submission_id: str, log: list[str]) -> str:
    """Stream the job's log to stdout (and into ``log``) until it ends; returns its final status."""
    from ray.job_submission import JobStatus

    async def tail() -> None:
        async for lines in client.tail_job_logs(submission_id):
            sys.stdout.write(lines)
            sys.stdout.flush()
            log.extend(lines.splitlines())

    try:
        asyncio.run(tail())
    except Exception as exc:  # noqa: BLE001 - the log stream broke; the job may still run: poll its status
        print(f"(log stream ended: {first_line(exc)}; polling the job's status)", file=sys.stderr)
    while True:
        status = client.get_job_status(submission_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status.value)
        time.sleep(1.0)
