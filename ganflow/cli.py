"""`ganflow ...`: the command line for people (the DVC stages live in pipelines/)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from ganflow.config import DEFAULT_PARAMS, load_config
from ganflow.errors import GanflowError
from ganflow.stage import run_main


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.params)
    print(f"# {args.params}: OK (resolved, paths absolute)")
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    g, d = cfg.net_widths
    print(f"# model widths at {cfg.data.image_size} px: G {g}, D {d}; tune.scheduler: {cfg.sweep_scheduler}")
    return 0


def cmd_outputs(args: argparse.Namespace) -> int:
    """Where the pipeline's artifacts are, and which exist yet."""
    cfg = load_config(args.params)
    for name, path in cfg.paths.model_dump().items():
        state = "present" if path.exists() else "not yet produced"
        print(f"{name:17s} {cfg.relative(path):32s} {state}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """Draw images from an exported generator or an MLflow model URI."""
    import numpy as np

    from ganflow.atomic import write_file
    from ganflow.images import make_grid
    from ganflow.sampling import sample

    if args.n <= 0:
        raise GanflowError(f"-n: must be > 0, got {args.n}")
    if args.tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(args.tracking_uri)
        mlflow.set_registry_uri(args.tracking_uri)
    elif ":/" in args.model and "MLFLOW_TRACKING_URI" not in os.environ:
        # runs:/ and models:/ URIs resolve against the project's own store by default
        import mlflow

        from ganflow.endpoints import tracking_uri

        uri = tracking_uri(load_config(args.params))
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
    images = sample(args.model, args.n, args.seed, class_name=args.class_name)  # (N, H, W, C) uint8
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, images=images)
    out = Path(args.out)
    write_file(out, buf.getvalue())
    print(f"{len(images)} images {images.shape[1]}x{images.shape[2]}x{images.shape[3]} -> {out}")
    if args.grid:
        from PIL import Image

        Image.fromarray(make_grid(images)).save(args.grid)
        print(f"grid -> {args.grid}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """Score any set of images with the evaluate stage's metrics, baseline and copy detector."""
    import json

    import numpy as np

    from ganflow.atomic import write_file
    from ganflow.evaluation import score_images
    from ganflow.report import reading, summary_line

    cfg = load_config(args.params)
    path = Path(args.samples)
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "images" not in archive:
                raise GanflowError(f"{path}: no 'images' array (uint8, N x H x W x C)")
            images = archive["images"]
            labels = archive["labels"].astype(np.int64) if "labels" in archive else None
    except (OSError, ValueError) as exc:
        raise GanflowError(
            f"{path}: not a readable .npz file ({str(exc).splitlines()[0] if str(exc) else exc})"
        ) from None
    if images.ndim == 3 and cfg.data.channels == 1:
        images = images[..., None]
    metrics = score_images(cfg, images, labels, args.split)
    text = json.dumps(metrics, indent=2, sort_keys=True) + "\n"
    if args.out:
        write_file(Path(args.out), text)
    print(summary_line(metrics) + (f" -> {args.out}" if args.out else ""))
    print(reading(metrics))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from ganflow.endpoints import artifact_root, tracking_uri

    cfg = load_config(args.params)
    uri = tracking_uri(cfg)
    from ganflow.localcluster import tool

    command = [tool("mlflow"), "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)]
    if uri.startswith("sqlite:"):
        command += ["--default-artifact-root", artifact_root(cfg)]
    base = f"http://{args.host}:{args.port}"
    page = _experiment_page(uri, cfg.tracking.experiment)
    print(f"MLflow UI on {base} (store: {uri}); Ctrl-C stops it", flush=True)
    if page:
        print(f"the {cfg.tracking.experiment} runs: {base}/{page}", flush=True)
    os.execvp(command[0], command)
    return 0  # not reached


def _experiment_page(uri: str, name: str) -> str | None:
    """The UI route of the experiment's training runs (MLflow 3 opens on GenAI traces otherwise)."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return None  # nothing tracked yet; never create the store here
    try:
        from mlflow.tracking import MlflowClient

        experiment = MlflowClient(uri).get_experiment_by_name(name)
    except Exception:  # noqa: BLE001 - the store may be away or unknown: no experiment
        return None
    if experiment is None:
        return None
    return f"#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"


def cmd_runs(args: argparse.Namespace) -> int:
    """The latest runs of the project's MLflow experiment as a table."""
    from ganflow.endpoints import tracking_uri
    from ganflow.runs import format_table, latest_runs

    if args.limit <= 0:
        raise GanflowError(f"--limit: must be > 0, got {args.limit}")
    uri, experiment = args.tracking_uri, args.experiment
    if uri is None or experiment is None:
        cfg = load_config(args.params)
        uri, experiment = uri or tracking_uri(cfg), experiment or cfg.tracking.experiment
    rows = latest_runs(uri, experiment, limit=args.limit, trials=args.trials)
    if not rows:
        print(f"no runs yet in experiment {experiment!r} ({uri})")
        return 0
    print(format_table(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ganflow",
        description="Reproducible, distributed, tracked GAN training. The pipeline itself runs with "
        "`dvc repro` (or `make run`); these commands are for people: check a params file, find the "
        "outputs, draw samples, list and compare the tracked runs, run stages on a Ray cluster.",
        epilog="`ganflow COMMAND --help` describes each command. Errors are one line on stderr with a "
        "non-zero exit status (2 for an invalid params file).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    p = sub.add_parser(
        "check-config",
        help="validate a params file and print the resolved config",
        description="Validate a params file without running anything: print every key as it resolves "
        "(defaults filled in, paths absolute), or one error line naming the file and key (exit 2).",
    )
    p.add_argument("params", nargs="?", default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
    p.set_defaults(fn=cmd_check_config)

    p = sub.add_parser(
        "outputs",
        help="list where the pipeline's artifacts are and which exist",
        description="List every path of the params file's `paths:` section and whether the pipeline "
        "has produced it yet.",
    )
    p.add_argument("params", nargs="?", default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
    p.set_defaults(fn=cmd_outputs)

    p = sub.add_parser(
        "sample",
        help="draw images from a trained generator",
        description="Draw N images from a generator: the exported one (models/generator), a training "
        "run's (runs:/RUN_ID/generator) or a registered one (models:/NAME@ALIAS). The same seed gives "
        "the same images.",
    )
    p.add_argument(
        "--model",
        default="models/generator",
        help="a generator directory, runs:/RUN_ID/generator or models:/NAME@ALIAS (default: models/generator)",
    )
    p.add_argument("-n", type=int, default=64, help="number of images (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="latent noise seed (default: 0)")
    p.add_argument(
        "--class",
        dest="class_name",
        metavar="CLASS",
        help="a class-conditional generator: draw only this class (name or index); by default "
        "its classes at their training frequencies",
    )
    p.add_argument("--out", required=True, help="output .npz; 'images' is uint8 (N, H, W, C)")
    p.add_argument("--grid", help="also write a PNG grid of the images")
    p.add_argument("--params", default=DEFAULT_PARAMS, help="params file naming the tracking store")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for runs:/ and models:/ (default: the project's)")
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser(
        "score",
        help="score a set of images (e.g. another codebase's samples) like the evaluate stage",
        description="Score the images of an .npz file against the project's reference split with exactly "
        "the metrics, real baseline and copy detector of the evaluate stage. The samples are cut into as "
        "many draws of the split's draw size (with its class counts, when 'labels' gives the class each "
        "sample was drawn for) as they fill; every figure is the mean and sd over those draws.",
    )
    p.add_argument(
        "--samples",
        required=True,
        metavar="FILE.npz",
        help="'images': uint8 (N, H, W, C) at data.image_size and data.channels; optional "
        "'labels': int (N,) class indices",
    )
    p.add_argument(
        "--split",
        choices=("validation", "test"),
        default="test",
        help="the reference split (default: test, what reports)",
    )
    p.add_argument("--out", metavar="FILE.json", help="write every metric here as JSON")
    p.add_argument("--params", default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
    p.set_defaults(fn=cmd_score)

    p = sub.add_parser(
        "runs",
        help="list the latest tracked runs: trainings and sweeps",
        description="The latest runs of the project's MLflow experiment, newest first: name, stage, "
        "status, learning rates, best fd_domain (lower is better), epochs, start time, run id. A sweep "
        "is one row with its best trial's rates; --trials lists its trials under it. "
        "`ganflow ui` shows the same runs in the MLflow UI, where they can be compared.",
    )
    p.add_argument("-n", "--limit", type=int, default=20, help="how many trainings and sweeps (default: 20)")
    p.add_argument("--trials", action="store_true", help="list each sweep's trials, indented under it")
    p.add_argument("--params", default=DEFAULT_PARAMS, help="params file naming the store and experiment")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the project's, from --params)")
    p.add_argument("--experiment", help="experiment name (default: tracking.experiment from --params)")
    p.set_defaults(fn=cmd_runs)

    p = sub.add_parser(
        "ui",
        help="start the MLflow UI on the project's tracking store",
        description="Start the MLflow UI (mlflow ui) over the project's tracking store and print its "
        "URL; Ctrl-C stops it. In the UI, choose 'Model training' in the sidebar (MLflow 3 opens on "
        "GenAI traces), open the experiment, tick runs and press Compare.",
    )
    p.add_argument("--params", default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=5000, help="port (default: 5000)")
    p.set_defaults(fn=cmd_ui)

    add_cluster_commands(sub)  # cluster, submit, push, pull
    return parser


def cmd_cluster(args: argparse.Namespace) -> int:
    import subprocess

    from ganflow.errors import first_line
    from ganflow.localcluster import ClusterError, describe, down, ours, read_state, up

    root = Path(args.root).resolve()
    if args.action == "up":
        try:
            state = up(root, args.ray_port, args.dashboard_port, args.mlflow_port, args.num_cpus)
        except (OSError, subprocess.SubprocessError) as exc:
            raise ClusterError(f"cannot start the local cluster: {first_line(exc)}") from None
        print(describe(state))
    elif args.action == "down":
        state = down(root)
        print(
            "stopped the local Ray head and MLflow server (stores kept in .cluster/)"
            if state
            else "no local cluster is running here"
        )
    else:
        state = read_state(root)
        if state is None or not (
            ours(state.ray_pid, state.ray_started) and ours(state.mlflow_pid, state.mlflow_started)
        ):
            print("no local cluster is running here (make cluster-up starts one)")
            return 1
        print(describe(state))
    return 0


def add_cluster_commands(sub) -> None:
    """`ganflow cluster`, `ganflow submit`, `ganflow push`, `ganflow pull`."""
    p = sub.add_parser("cluster", help="start/stop a Ray head + MLflow server on this machine (127.0.0.1)")
    p.add_argument("action", choices=("up", "down", "status"))
    p.add_argument("--root", default=".", help="project directory (state goes to ROOT/.cluster)")
    p.add_argument("--ray-port", type=int, default=6379, help="GCS port (default: 6379)")
    p.add_argument("--dashboard-port", type=int, default=8265, help="dashboard/job server port (default: 8265)")
    p.add_argument("--mlflow-port", type=int, default=5001, help="MLflow server port (default: 5001)")
    p.add_argument("--num-cpus", type=int, help="CPUs the head offers (default: all)")
    p.set_defaults(fn=cmd_cluster)

    for name, text in (
        ("submit", "run a heavy stage as a Ray job on cluster.address and bring its outputs back"),
        ("push", "copy a stage's inputs to the shared storage, before `ray job submit`"),
        ("pull", "copy the outputs of a stage's last Ray job from the shared storage into the project"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("stage", choices=jobs_stages())
        p.add_argument("--params", default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
        p.set_defaults(fn=_exchange_command(name))


def jobs_stages() -> tuple[str, ...]:
    from ganflow.jobs import HEAVY_STAGES

    return HEAVY_STAGES


def _exchange_command(name: str):
    def run(args) -> int:
        from ganflow import jobs

        cfg = load_config(args.params)
        if name == "submit":
            if not cfg.cluster.address:
                raise jobs.JobError("cluster.address: not set; `ganflow submit` needs the Ray job server's URL")
            jobs.submit_stage(cfg, args.stage)
        elif name == "push":
            print(f"{args.stage} inputs -> {jobs.push_inputs(cfg, args.stage)}")
        else:
            record = jobs.pull_outputs(cfg, args.stage)
            print(f"{args.stage} outputs of job {record['submission_id']} <- {jobs.exchange_uri(cfg)}")
        return 0

    return run


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
