"""infra/: the deployment files are parseable, valid for the tools that read them, and secret-free.

No cluster, no Docker, no network: the KubeRay manifests are checked against a schema written
from KubeRay's CRDs (tests/infra_schemas/), the cluster launcher config with Ray's own
validator, the compose file structurally. Each check also runs on a broken copy, so it is shown
to be able to fail.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
SCHEMA = Path(__file__).parent / "infra_schemas" / "kuberay-v1.schema.json"
RAYCLUSTER = INFRA / "ray" / "raycluster.yaml"
RAYJOB = INFRA / "ray" / "rayjob.yaml"
LAUNCHER = INFRA / "ray" / "cluster-aws.yaml"
COMPOSE = INFRA / "mlflow" / "docker-compose.yaml"
ENV_EXAMPLE = INFRA / "mlflow" / ".env.example"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
DOCKERIGNORE = INFRA / "docker" / "Dockerfile.dockerignore"
IMAGE_PROJECT = "/home/ray/ganflow"  # where the Dockerfile puts the project (its WORKDIR)
# names of variables and keys that hold credentials, and credentials written into URIs
SECRET_NAME = re.compile(r"(?i)(password|passwd|secret|token|access_key|private_key|api_key)")
URI_WITH_PASSWORD = re.compile(r"\w+://[^\s:/@]+:(?!\$)[^\s@/]+@")


def project_files(under: str) -> list[Path]:
    """The files a clone has under a folder: tracked or new, never git-ignored ones such as the
    filled-in infra/mlflow/.env."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", under],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sorted(REPO / line for line in out.splitlines() if (REPO / line).is_file())


INFRA_FILES = project_files("infra")
YAML_FILES = [p for p in INFRA_FILES if p.suffix in (".yaml", ".yml")]


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


# --------------------------------------------------------------------------- every YAML file


def test_infra_has_the_expected_yaml_files():
    names = {rel(p) for p in YAML_FILES}
    assert {rel(RAYCLUSTER), rel(RAYJOB), rel(LAUNCHER), rel(COMPOSE)} <= names


@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_yaml_parses(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) for d in docs), f"{rel(path)}: expected mapping documents"


# --------------------------------------------------------------------------- cluster launcher


def launcher_errors(config: dict) -> None:
    """Ray's own checks, as `ray up` runs them before touching a cloud API."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_launcher_config_passes_rays_validator():
    launcher_errors(load(LAUNCHER))


def _wrong_type(c):
    c["available_node_types"]["gpu"]["min_workers"] = "two"


def _unknown_field(c):
    c["max_worker"] = c.pop("max_workers")


def _unknown_docker_option(c):
    c["docker"]["gpus"] = "all"  # not a launcher option: the NVIDIA runtime is detected


def _docker_flag_as_string(c):
    c["docker"]["pull_before_run"] = "yes"


def _missing_node_config(c):
    del c["available_node_types"]["gpu"]["node_config"]


@pytest.mark.parametrize(
    "breaks", [_wrong_type, _unknown_field, _unknown_docker_option, _docker_flag_as_string, _missing_node_config]
)
def test_launcher_validator_rejects_a_broken_copy(breaks):
    config = load(LAUNCHER)
    breaks(config)
    with pytest.raises(jsonschema.ValidationError):
        launcher_errors(config)


def test_launcher_config_keeps_auth_on_and_the_dashboard_on_loopback():
    c = load(LAUNCHER)
    head = " ".join(c["head_start_ray_commands"])
    workers = " ".join(c["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start --head" in head
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert "RAY_AUTH_MODE=token ray start --address" in workers
    assert c["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert c["available_node_types"]["gpu"]["resources"]["GPU"] >= 1
    assert c["head_node_type"] in c["available_node_types"]


# --------------------------------------------------------------------------- KubeRay manifests


def crd_validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA.read_text())
    return jsonschema.Draft202012Validator({**schema, "$ref": f"#/$defs/{kind}"})


def crd_errors(doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_validator(doc["kind"]).iter_errors(doc)]


def test_crd_schema_is_a_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(json.loads(SCHEMA.read_text()))


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=rel)
def test_kuberay_manifest_matches_the_crd(path):
    assert crd_errors(load(path)) == []


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def head_container(doc: dict) -> dict:
    return cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"][0]


def gpu_group(doc: dict) -> dict:
    return cluster_spec(doc)["workerGroupSpecs"][0]


BROKEN_MANIFESTS = {
    "misspelled field": lambda d: gpu_group(d).update(minReplica=gpu_group(d).pop("minReplicas")),
    "replicas as a string": lambda d: gpu_group(d).update(replicas="2"),
    "missing rayStartParams": lambda d: gpu_group(d).pop("rayStartParams"),
    "gpu count not a quantity": lambda d: gpu_group(d)["template"]["spec"]["containers"][0]["resources"][
        "limits"
    ].update({"nvidia.com/gpu": "one"}),
    "env value not a string": lambda d: (
        head_container(d).setdefault("env", []).append({"name": "OMP_NUM_THREADS", "value": 4})
    ),
    "secretKeyRef without key": lambda d: (
        head_container(d).setdefault("env", []).append({"name": "X", "valueFrom": {"secretKeyRef": {"name": "s"}}})
    ),
    "unknown container field": lambda d: head_container(d).update(imagePullPolcy="Always"),
    "containerPort as a string": lambda d: head_container(d)["ports"][0].update(containerPort="6379"),
    "unknown spec field": lambda d: cluster_spec(d).update(enableAutoscaling=True),
}


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=rel)
@pytest.mark.parametrize("breakage", sorted(BROKEN_MANIFESTS))
def test_crd_schema_rejects_a_broken_manifest(path, breakage):
    doc = load(path)
    BROKEN_MANIFESTS[breakage](doc)
    assert crd_errors(doc), f"{breakage} was accepted"


def test_rayjob_schema_rejects_a_wrongly_typed_job_field():
    doc = load(RAYJOB)
    doc["spec"]["shutdownAfterJobFinishes"] = "yes"
    assert crd_errors(doc)


def env_by_name(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def ray_containers(doc: dict) -> list[dict]:
    spec = cluster_spec(doc)
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_raycluster_keeps_token_auth_on_with_the_token_from_a_secret():
    doc = load(RAYCLUSTER)
    env_lists = [env_by_name(c) for c in ray_containers(doc)]
    env_lists.append({e["name"]: e for e in doc["spec"]["autoscalerOptions"]["env"]})
    for env in env_lists:
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        token = env["RAY_AUTH_TOKEN"]
        assert "value" not in token and token["valueFrom"]["secretKeyRef"]["key"] == "auth_token"


def test_rayjob_keeps_token_auth_on_and_runs_the_train_stage():
    doc = load(RAYJOB)
    spec = doc["spec"]
    assert spec["rayClusterSpec"]["authOptions"]["mode"] == "token"
    assert spec["shutdownAfterJobFinishes"] is True
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and argv[1] == f"{IMAGE_PROJECT}/pipelines/train.py"
    assert argv[2] == "--params" and argv[3] == f"{IMAGE_PROJECT}/params.yaml"
    assert "pipelines/tune.py" in RAYJOB.read_text(), "the tune variant is documented"
    # the params file the entrypoint names is the one mounted from the ganflow-params ConfigMap
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in head["containers"][0]["volumeMounts"]}
    volume = {v["name"]: v for v in head["volumes"]}[mounts[argv[3]]["name"]]
    assert volume["configMap"]["name"] == "ganflow-params"


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=rel)
def test_kuberay_cluster_shape_and_security(path):
    doc = load(path)
    spec = cluster_spec(doc)
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")
    group = gpu_group(doc)
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    worker = group["template"]["spec"]["containers"][0]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    for g in [head, *spec["workerGroupSpecs"]]:
        pod = g["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert all(c["securityContext"]["allowPrivilegeEscalation"] is False for c in pod["containers"])
    for container in ray_containers(doc):
        for name, var in env_by_name(container).items():
            if SECRET_NAME.search(name):
                assert "valueFrom" in var and "value" not in var, f"{name} must come from a Secret"
        assert {"configMapRef": {"name": "ganflow-env"}} in container["envFrom"]  # MLFLOW_TRACKING_URI


def dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert match, f"{rel(DOCKERFILE)}: no ARG {name}"
    return match.group(1)


def test_versions_and_image_agree_across_infra():
    ray_version = dockerfile_arg("RAY_VERSION")
    images = set()
    for path in (RAYCLUSTER, RAYJOB):
        doc = load(path)
        assert cluster_spec(doc)["rayVersion"] == ray_version, rel(path)
        images |= {c["image"] for c in ray_containers(doc)}
    images.add(load(LAUNCHER)["docker"]["image"])
    assert len(images) == 1, f"one runtime image everywhere, found {images}"


# --------------------------------------------------------------------------- MLflow compose

COMPOSE_TOP = {"name", "services", "volumes", "networks", "secrets", "configs", "include", "version"}
# the compose-spec service keys this project may use; extend when a new one is needed
COMPOSE_SERVICE_KEYS = {
    "image",
    "build",
    "command",
    "entrypoint",
    "environment",
    "env_file",
    "ports",
    "expose",
    "volumes",
    "depends_on",
    "healthcheck",
    "restart",
    "user",
    "working_dir",
    "networks",
    "read_only",
    "security_opt",
    "cap_drop",
    "cap_add",
    "tmpfs",
    "labels",
    "logging",
    "deploy",
    "profiles",
    "secrets",
    "configs",
    "container_name",
    "hostname",
    "init",
    "stop_grace_period",
    "ulimits",
    "shm_size",
    "platform",
    "pull_policy",
}
DEPENDS_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
ENV_REF = re.compile(r"\$\{(\w+)(:?[-?][^}]*)?\}")


def env_example_vars() -> dict[str, str]:
    pairs = [
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    return {k.strip(): v.strip() for k, v in pairs}


def compose_problems(doc: dict, example: dict[str, str]) -> list[str]:
    """Problems `docker compose config` would report (a structural subset), and breaches of our
    rules: ports on 127.0.0.1 only, credentials only as required ${VAR:?...} from .env.example."""
    problems = [f"unknown top-level key {k}" for k in doc if k not in COMPOSE_TOP and not k.startswith("x-")]
    services = doc.get("services", {})
    declared_volumes = set(doc.get("volumes") or {})
    for name, svc in services.items():
        where = f"services.{name}"
        problems += [
            f"{where}: unknown key {k}" for k in svc if k not in COMPOSE_SERVICE_KEYS and not k.startswith("x-")
        ]
        if "image" not in svc and "build" not in svc:
            problems.append(f"{where}: neither image nor build")
        for port in svc.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).split(":")[0]
            if host_ip != "127.0.0.1" or (isinstance(port, str) and port.count(":") < 2):
                problems.append(f"{where}: port {port!r} is not bound to 127.0.0.1")
        deps = svc.get("depends_on", {})
        for dep in deps:
            if dep not in services:
                problems.append(f"{where}: depends_on unknown service {dep}")
                continue
            condition = deps[dep].get("condition", "service_started") if isinstance(deps, dict) else "service_started"
            if condition not in DEPENDS_CONDITIONS:
                problems.append(f"{where}: depends_on {dep}: unknown condition {condition}")
            if condition == "service_healthy" and "healthcheck" not in services[dep]:
                problems.append(f"{where}: waits for {dep} to be healthy, which has no healthcheck")
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith((".", "/")):
                if source.startswith(".") and not (COMPOSE.parent / source).exists():
                    problems.append(f"{where}: bind mount {source} does not exist")
            elif source not in declared_volumes:
                problems.append(f"{where}: volume {source} is not declared")
        env = svc.get("environment", {})
        if isinstance(env, list):
            env = dict(item.split("=", 1) for item in env)
        for key, value in env.items():
            value = "" if value is None else str(value)
            refs = ENV_REF.findall(value)
            if SECRET_NAME.search(key):
                if not refs:
                    problems.append(f"{where}: {key} is a literal; use ${{VAR:?...}}")
                elif any(not flag.startswith(":?") for _, flag in refs):
                    problems.append(f"{where}: {key} must be required (${{VAR:?...}}), not defaulted")
            if URI_WITH_PASSWORD.search(value):
                problems.append(f"{where}: {key} has a password inside a URI")
            for var, flag in refs:
                if flag.startswith(":?") and var not in example:
                    problems.append(f"{where}: ${{{var}}} is required but missing from .env.example")
    for var, value in example.items():
        if value:
            problems.append(f".env.example: {var} has a value; placeholders stay empty")
    return problems


def test_compose_has_the_three_services_and_a_bucket_one_shot():
    services = load(COMPOSE)["services"]
    assert {"mlflow", "postgres", "minio", "createbuckets"} <= set(services)


def test_compose_passes_the_structural_and_security_checks():
    assert compose_problems(load(COMPOSE), env_example_vars()) == []


def test_compose_mlflow_server_is_authenticated_and_proxies_s3_artifacts():
    mlflow = load(COMPOSE)["services"]["mlflow"]
    command = mlflow["command"]
    assert "--app-name=basic-auth" in command and "--serve-artifacts" in command
    assert any(arg.startswith("--artifacts-destination=s3://") for arg in command)
    assert mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"] == "/etc/mlflow/basic_auth.ini"
    assert (COMPOSE.parent / mlflow["build"]["context"] / mlflow["build"]["dockerfile"]).is_file()
    ini = (COMPOSE.parent / "basic_auth.ini").read_text()
    assert not re.search(r"^\s*admin_password\s*=", ini, re.M), "the admin password comes from the environment"


@pytest.mark.parametrize(
    "breakage",
    [
        lambda d: d["services"]["mlflow"]["ports"].__setitem__(0, "5000:5000"),
        lambda d: d["services"]["minio"]["ports"].__setitem__(0, "0.0.0.0:9000:9000"),
        lambda d: d["services"]["postgres"]["environment"].update(POSTGRES_PASSWORD="hunter2hunter2"),
        lambda d: d["services"]["postgres"]["environment"].update(POSTGRES_PASSWORD="${POSTGRES_PASSWORD:-mlflow}"),
        lambda d: d["services"]["mlflow"]["depends_on"].update(redis={"condition": "service_started"}),
        lambda d: d["services"]["mlflow"].update(enviroment={}),
        lambda d: d["services"]["mlflow"]["environment"].update(
            MLFLOW_BACKEND_STORE_URI="postgresql://mlflow:hunter2@postgres/mlflow"
        ),
        lambda d: d["services"]["minio"]["environment"].update(MINIO_ROOT_PASSWORD="${MINIO_PASSWORD_TYPO:?x}"),
    ],
    ids=[
        "port-all-interfaces",
        "port-0.0.0.0",
        "literal-password",
        "defaulted-password",
        "unknown-dependency",
        "misspelled-key",
        "password-in-uri",
        "undocumented-variable",
    ],
)
def test_compose_check_catches_a_broken_copy(breakage):
    doc = load(COMPOSE)
    breakage(doc)
    assert compose_problems(doc, env_example_vars())


def test_compose_env_file_is_ignored_by_git():
    out = subprocess.run(["git", "check-ignore", "-q", "infra/mlflow/.env"], cwd=REPO, capture_output=True)
    assert out.returncode == 0, "infra/mlflow/.env must be git-ignored"


# --------------------------------------------------------------------------- Dockerfile and entry points


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    return [(x.split(None, 1)[0].upper(), x.split(None, 1)[1].strip()) for x in logical]


def copy_sources(path: Path) -> list[str]:
    sources = []
    for instruction, args in dockerfile_instructions(path):
        if instruction in ("COPY", "ADD"):
            words = [w for w in args.split() if not w.startswith("--")]
            if not any(w.startswith("--from") for w in args.split()):
                sources += words[:-1]
    return sources


def test_dockerfile_copies_only_files_that_exist_and_the_build_context_admits():
    sources = copy_sources(DOCKERFILE)
    assert {"pyproject.toml", "ganflow", "pipelines", "params.yaml"} <= set(sources)
    reincluded = {
        line[1:].strip().rstrip("/") for line in DOCKERIGNORE.read_text().splitlines() if line.startswith("!")
    }
    for source in sources:
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", source], cwd=REPO, capture_output=True)
        assert tracked.returncode == 0, f"COPY {source}: not a file tracked in the repository"
        assert source.rstrip("/") in reincluded, f"COPY {source}: excluded by {rel(DOCKERIGNORE)}"


def test_dockerfile_runs_as_non_root_and_its_command_exists():
    instructions = dockerfile_instructions(DOCKERFILE)
    users = [args for instr, args in instructions if instr == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must end as a non-root user"
    workdir = [args for instr, args in instructions if instr == "WORKDIR"][-1]
    assert workdir == IMAGE_PROJECT
    cmd = json.loads([args for instr, args in instructions if instr == "CMD"][-1])
    if tomllib is None:
        pytest.skip("reading pyproject.toml needs tomllib (Python >= 3.11)")
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert cmd[0] in scripts, f"CMD {cmd[0]}: not a console script of the project"
    assert all((REPO / a).exists() for a in cmd[1:] if a.endswith((".yaml", ".py")))
    mlflow_users = [a for i, a in dockerfile_instructions(INFRA / "mlflow" / "Dockerfile") if i == "USER"]
    assert mlflow_users and mlflow_users[-1] not in ("root", "0")


STAGE_SCRIPT = re.compile(r"(?:^|[\s/])(pipelines/\w+\.py)")


def test_every_stage_script_named_in_infra_exists():
    named = set()
    for path in [*INFRA_FILES, REPO / ".rayignore"]:
        named |= set(STAGE_SCRIPT.findall(path.read_text()))
    assert {"pipelines/train.py", "pipelines/tune.py"} <= named
    missing = sorted(s for s in named if not (REPO / s).is_file())
    assert not missing, f"named in infra/ but missing: {missing}"


def test_launcher_setup_installs_ganflow_from_the_mounted_checkout():
    c = load(LAUNCHER)
    assert c["file_mounts"]["~/ganflow"] == "."
    assert any("pip install --no-deps" in cmd and "~/ganflow" in cmd for cmd in c["setup_commands"])


# --------------------------------------------------------------------------- .rayignore

# (path, uploaded when .gitignore is honoured, uploaded with RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1)
WORKING_DIR_CASES = [
    ("params.yaml", True, True),
    ("pipelines/train.py", True, True),
    ("ganflow/config.py", True, True),
    ("data/prepared/images-00000.npy", False, True),
    ("models/encoder/encoder.safetensors", False, True),
    ("tune/best.json", False, True),
    (".venv/bin/python", False, False),
    (".git/HEAD", False, False),
    (".dvc/cache/files/md5/ab/cdef", False, False),
    (".dvc/tmp/rwlock", False, False),
    (".dvc/config.local", False, False),
    ("mlflow.db", False, False),
    ("mlartifacts/1/run/artifacts/model.bin", False, False),
    ("ray_results/train/checkpoint_000001/state.pt", False, False),
    ("ganflow/__pycache__/config.cpython-311.pyc", False, False),
    (".pytest_cache/v/cache/lastfailed", False, False),
    ("data/raw/cat.png", False, False),  # only the prepare stage reads it, locally
    ("infra/mlflow/.env", False, False),
    (".cluster/storage/exchange/ganflow/data/prepared/images-00000.npy", False, False),
]


def test_rayignore_lists_what_must_stay_behind():
    patterns = {x.strip() for x in (REPO / ".rayignore").read_text().splitlines() if x.strip() and x[0] != "#"}
    for needed in (
        "/.venv",
        "/.git",
        "/.dvc/cache",
        "/.dvc/tmp",
        "/.dvc/config.local",
        "/mlflow.db",
        "/mlartifacts",
        "/ray_results",
        "/.cluster",
        "__pycache__",
        ".pytest_cache",
        ".env",
    ):
        assert needed in patterns, f".rayignore lacks {needed}"


@pytest.mark.parametrize("honour_gitignore", [True, False], ids=["gitignore", "IGNORE_GITIGNORE=1"])
def test_ray_packs_the_working_dir_as_intended(tmp_path, honour_gitignore):
    """Ray's own packer on a model of the project: what a job would receive."""
    from ray._private.ray_constants import get_runtime_env_default_excludes
    from ray._private.runtime_env.packaging import create_package

    project = tmp_path / "project"
    for name in (".rayignore", ".gitignore", ".dvc/.gitignore", "infra/mlflow/.gitignore"):
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text((REPO / name).read_text())
    for path, _, _ in WORKING_DIR_CASES:
        (project / path).parent.mkdir(parents=True, exist_ok=True)
        (project / path).write_text("x")
    package = tmp_path / "package.zip"
    create_package(
        str(project), package, include_gitignore=honour_gitignore, excludes=get_runtime_env_default_excludes()
    )
    uploaded = set(zipfile.ZipFile(package).namelist())
    column = 1 if honour_gitignore else 2
    wrong = [(case[0], case[column]) for case in WORKING_DIR_CASES if (case[0] in uploaded) != case[column]]
    assert not wrong, f"(path, expected to upload) that Ray got wrong: {wrong}"


# --------------------------------------------------------------------------- no secrets

SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "password inside a URI": URI_WITH_PASSWORD,
    "long hex string (a token?)": re.compile(r"\b[0-9a-fA-F]{32,}\b"),
    "long base64 string (a key?)": re.compile(r"(?<![\w/+=.-])[A-Za-z0-9+/]{40,}={0,2}(?![\w/+=.-])"),
}
# `KEY: value`, `KEY=value` or `--key value` with a one-word value is a literal credential
# unless the value is a reference ($VAR, ${VAR...}, $(command)), a YAML anchor or alias, a
# <placeholder>, a path, or empty. A key inside ${...} is a reference, not an assignment.
_SECRET_WORD = r"[\w.-]*(?:password|passwd|secret|token|access_key|private_key|api_key)[\w.-]*"
ASSIGNMENT = re.compile(
    rf"""(?ix) (?: (?<![\w${{-]) (?P<key>{_SECRET_WORD}) ["']? \s* [:=]
                 | (?P<flag>--{_SECRET_WORD}) (?:\s+|=) )
        \s* (?P<value>[^\s\#]+) \s* (?:\#.*)?$"""
)
ALLOWED_VALUE = re.compile(r"""^["']?([$<*&{[~/.]|["']?$)|^(true|false|null)$""", re.I)


def secret_findings(text: str) -> list[str]:
    findings = []
    for number, line in enumerate(text.splitlines(), 1):
        for what, pattern in SECRET_PATTERNS.items():
            if pattern.search(line):
                findings.append(f"line {number}: {what}")
        match = ASSIGNMENT.search(line)
        if match and not ALLOWED_VALUE.match(match["value"]):
            findings.append(f"line {number}: {match['key'] or match['flag']} has a literal value")
    return findings


SCANNED = [*INFRA_FILES, REPO / ".rayignore", REPO / "params.yaml"]


@pytest.mark.parametrize("path", SCANNED, ids=rel)
def test_no_secret_in_infra_files(path):
    assert secret_findings(path.read_text()) == []


@pytest.mark.parametrize(
    "text",
    [
        "aws_access_key_id = " + "AKIA" + "Q" * 16,
        "POSTGRES_PASSWORD: hunter2",
        "MLFLOW_TRACKING_PASSWORD=s3cr3t",
        "auth_token: " + "ab12" * 16,
        "export RAY_AUTH_TOKEN=" + "0f" * 32,
        "uri: postgresql://mlflow:hunter2@db:5432/mlflow",
        "-----BEGIN OPENSSH PRIVATE KEY-----",
        "secret_access_key " + "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + "EXAMPLEKEY",
    ],
)
def test_secret_scanner_finds_planted_secrets(text):
    assert secret_findings(text), f"not caught: {text}"


@pytest.mark.parametrize(
    "text",
    [
        "POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set it}",
        "MLFLOW_TRACKING_PASSWORD=",
        'export RAY_AUTH_TOKEN="$(cat ~/.ray/auth_token)"',
        '--from-literal=password="$MLFLOW_TRACKING_PASSWORD"',
        "- name: RAY_AUTH_TOKEN",
        "RAY_AUTH_MODE: token",
        "# the token comes from the Secret ganflow-ray-token",
    ],
)
def test_secret_scanner_accepts_references(text):
    assert secret_findings(text) == []


def test_a_jobs_runtime_env_carries_no_credentials_of_the_submitter(tmp_path, monkeypatch):
    """The runtime env of a submitted stage is readable by every holder of the cluster's token:
    the submitter's keys, passwords and tokens stay in its shell; endpoints and region travel."""
    from ganflow.config import from_dict, resolve_paths
    from ganflow.jobs import job_runtime_env

    secrets = {
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEEXAMPLE00",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
        "AWS_SESSION_TOKEN": "session-token",
        "MLFLOW_TRACKING_USERNAME": "alice",
        "MLFLOW_TRACKING_PASSWORD": "hunter2",
        "MLFLOW_TRACKING_TOKEN": "tok",
    }
    for name, value in {**secrets, "AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-1"}.items():
        monkeypatch.setenv(name, value)
    cfg = resolve_paths(from_dict({"tracking": {"uri": "http://mlflow.example:5000"}}), tmp_path)
    env = job_runtime_env(cfg, "s3://bucket/exchange/x", "ganflow-train-1")["env_vars"]
    assert not set(secrets) & set(env), env
    assert not set(secrets.values()) & set(env.values())
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000" and env["AWS_DEFAULT_REGION"] == "eu-west-1"
    assert env["GANFLOW_EXCHANGE"] == "s3://bucket/exchange/x"


@pytest.mark.parametrize("key", ["../../.bashrc", "a/../../x", "/etc/passwd", "a//b", "./a", ""])
def test_exchange_keys_that_escape_the_target_are_refused(tmp_path, key):
    from ganflow.jobs import JobError, _inside

    with pytest.raises(JobError, match="refused the exchange key"):
        _inside(tmp_path / "generator", key, "s3://bucket/exchange")


def test_plain_exchange_keys_land_inside_the_target(tmp_path):
    from ganflow.jobs import _inside

    assert _inside(tmp_path / "g", "sub/w.bin", "u") == tmp_path / "g" / "sub" / "w.bin"


class HeadStandIn:
    """What ``_submit_waiting`` sees of a job server: ``submit_job`` raises the given errors in
    turn, then takes the job; ``get_job_info`` finds the job only with ``created`` (a dropped
    request that created it anyway)."""

    def __init__(self, *errors: Exception, created: bool = False):
        self.errors, self.created, self.submitted = list(errors), created, []

    def submit_job(self, **job):
        self.submitted.append(job["submission_id"])
        if self.errors:
            raise self.errors.pop(0)

    def get_job_info(self, submission_id):
        if not self.created:
            raise RuntimeError(f"Job {submission_id} does not exist")


def dropped() -> Exception:
    import requests

    return requests.exceptions.ConnectionError("('Connection aborted.', RemoteDisconnected('Remote end closed'))")


def test_a_submission_the_head_drops_is_sent_again_unless_the_job_exists(monkeypatch, capsys):
    """A head on a loaded machine closed the submit request without an answer: the submitter
    waits and sends it again, as for a just-started head, and follows a job the dropped request
    created instead of submitting it twice. Any other refusal is one error line at once."""
    from ganflow import jobs

    monkeypatch.setattr(jobs.time, "sleep", lambda s: None)
    job = {"submission_id": "ganflow-train-1", "entrypoint": "python pipelines/train.py"}
    head = HeadStandIn(dropped(), dropped())
    jobs._submit_waiting(head, "train", "http://127.0.0.1:8265", job)
    assert head.submitted == ["ganflow-train-1"] * 3
    assert (
        "train: the Ray job agent on http://127.0.0.1:8265 dropped the connection; waiting" in capsys.readouterr().out
    )

    head = HeadStandIn(dropped(), created=True)
    jobs._submit_waiting(head, "train", "http://127.0.0.1:8265", job)
    assert head.submitted == ["ganflow-train-1"]  # it exists: not submitted twice

    with pytest.raises(jobs.JobError, match=r"submitting train to \S+ failed: bad runtime_env") as refused:
        jobs._submit_waiting(HeadStandIn(RuntimeError("bad runtime_env\ndetails")), "train", "http://h:1", job)
    assert "\n" not in str(refused.value)

    monkeypatch.setattr(jobs, "AGENT_WAIT_S", 0.0)
    with pytest.raises(jobs.JobError, match="kept dropping the submission of train for 0 s") as gave_up:
        jobs._submit_waiting(HeadStandIn(*[dropped()] * 3), "train", "http://h:1", job)
    assert "\n" not in str(gave_up.value)


NO_TORCH = """
import sys
sys.modules["torch"] = None  # `import torch` raises ImportError from here on
from ganflow.cli import main
code = main(sys.argv[1:])
assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None], "torch was imported"
sys.exit(code)
"""


def test_push_and_pull_run_without_torch(tmp_path):
    """`ganflow push/pull` run on a submitter's laptop: they move files, and must not need (or
    pay for) torch. A stage's inputs go up, a job's outputs (written here as the job side would)
    come down byte for byte."""
    import sys

    from ganflow.config import load_config
    from ganflow.jobs import push_outputs

    root = tmp_path / "project"
    root.mkdir()
    (root / "params.yaml").write_text(f"cluster:\n  storage_path: {tmp_path / 'shared'}\n")
    inputs = {
        "data/prepared/manifest.json": b"{}",
        "data/prepared/images-00000.npy": b"\x93NUMPY" + bytes(range(256)),
        "models/encoder/encoder.json": b"{}",
        "tune/best.json": b'{"lr_g": 0.001}',
    }
    for rel, data in inputs.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)

    def cli(*argv):
        proc = subprocess.run(
            [sys.executable, "-c", NO_TORCH, *argv], cwd=root, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    assert "train inputs ->" in cli("push", "train")
    exchange = tmp_path / "shared" / "exchange" / "ganflow"
    for rel, data in inputs.items():
        assert (exchange / rel).read_bytes() == data

    job = tmp_path / "job"  # the job's copy of the project writes its outputs
    outputs = {
        "models/generator/generator.json": b'{"epoch": 1}',
        "models/generator/weights.safetensors": b"w" * 999,
        "metrics/train.json": b"{}",
        "plots/train.csv": b"epoch\n1\n",
    }
    for rel, data in outputs.items():
        (job / rel).parent.mkdir(parents=True, exist_ok=True)
        (job / rel).write_bytes(data)
    (job / "params.yaml").write_text((root / "params.yaml").read_text())
    push_outputs(load_config(job / "params.yaml"), "train", str(exchange), "sub-1")

    cli("pull", "train")
    for rel, data in outputs.items():
        assert (root / rel).read_bytes() == data


def test_a_job_working_dir_left_by_an_earlier_job_gets_the_inputs_just_pushed(tmp_path):
    """Ray unpacks a job's project once per content hash and reuses the folder: a train job with
    the same code and params as an earlier one finds that job's data/prepared in its working dir.
    The job side keeps such a copy only when it is, file for file, what the submitter pushed."""
    import os

    from ganflow.config import load_config
    from ganflow.jobs import fetch_inputs, push_inputs

    params = f"cluster:\n  storage_path: {tmp_path / 'shared'}\n"
    inputs = {
        "data/prepared/manifest.json": b'{"count": 2}',
        "data/prepared/images-00000.npy": b"new images",
        "models/encoder/encoder.json": b"{}",
        "tune/best.json": b'{"lr_g": 0.001}',
    }
    root, job = tmp_path / "project", tmp_path / "job"
    for folder, files in (
        (root, inputs),
        (
            job,
            {
                **inputs,
                "data/prepared/images-00000.npy": b"old images",  # an earlier job's data
                "data/prepared/images-00001.npy": b"old second shard",
            },
        ),
    ):
        (folder).mkdir()
        (folder / "params.yaml").write_text(params)
        for rel, data in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)

    exchange = push_inputs(load_config(root / "params.yaml"), "train")
    encoder = job / "models" / "encoder" / "encoder.json"
    kept = os.stat(encoder).st_ino
    fetch_inputs(load_config(job / "params.yaml"), "train", exchange)
    for rel, data in inputs.items():
        assert (job / rel).read_bytes() == data
    assert sorted(p.name for p in (job / "data" / "prepared").iterdir()) == ["images-00000.npy", "manifest.json"]
    assert os.stat(encoder).st_ino == kept  # the same as pushed: not fetched again


def test_cluster_down_signals_only_the_processes_it_started(tmp_path):
    """A pid in .cluster/cluster.json may name another process by the time `cluster down` runs
    (a reboot, a reused pid): only a process with the recorded start time is stopped."""
    import dataclasses
    import subprocess
    import sys
    import threading

    from ganflow import localcluster

    def sleeper():
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
        threading.Thread(target=proc.wait, daemon=True).start()  # reaped at once when stopped
        return proc

    stranger, own_ray, own_mlflow = sleeper(), sleeper(), sleeper()
    try:
        state_dir = tmp_path / localcluster.STATE_DIR
        state_dir.mkdir()
        state = localcluster.LocalCluster(
            str(tmp_path),
            stranger.pid,
            own_mlflow.pid,
            "http://127.0.0.1:1",
            1,
            "http://127.0.0.1:2",
            str(state_dir),
            ray_started="1",  # not the stranger's start time: another process
            mlflow_started=localcluster._started(own_mlflow.pid),
        )
        (state_dir / "cluster.json").write_text(json.dumps(dataclasses.asdict(state)))
        assert localcluster.down(tmp_path) is not None
        assert not localcluster._alive(own_mlflow.pid)  # ours: stopped
        assert localcluster._alive(stranger.pid)  # not ours any more: left alone
        # recorded with its start time, the same pid is ours again
        state = dataclasses.replace(state, ray_pid=own_ray.pid, ray_started=localcluster._started(own_ray.pid))
        (state_dir / "cluster.json").write_text(json.dumps(dataclasses.asdict(state)))
        localcluster.down(tmp_path)
        assert not localcluster._alive(own_ray.pid) and localcluster._alive(stranger.pid)
    finally:
        for proc in (stranger, own_ray, own_mlflow):
            proc.kill()
            proc.wait()
