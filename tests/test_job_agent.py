"""A Ray head started by hand whose job agent could not bind its HTTP port: the submitter says so
in one line. The head takes only ports free now (no machine-wide default), so unlike
test_cluster.py this file runs beside the rest of the suite."""

from __future__ import annotations

import socket

import pytest

from ganflow import localcluster
from tests.conftest import copy_project, edit_params

pytestmark = pytest.mark.slow


def test_a_head_whose_job_agent_has_no_http_is_one_error_line(tmp_path, monkeypatch, capsys):
    """What a head started by hand does when another process holds its agent's HTTP port: the
    agent stays up without HTTP and every submission is refused. The submitter waits (as for a
    just-started head), then says in one line what is wrong and where to look."""
    from ganflow import jobs
    from ganflow.config import load_config

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    localcluster.ensure_auth_token()
    taken = socket.socket()
    taken.bind(("0.0.0.0", 0))
    taken.listen()
    dashboard = localcluster.free_port()
    address = f"http://127.0.0.1:{dashboard}"
    log = tmp_path / "ray.log"
    head = localcluster._spawn(
        [
            localcluster.tool("ray"),
            "start",
            "--head",
            "--block",
            "--port",
            str(localcluster.free_port()),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dashboard),
            "--dashboard-agent-listen-port",
            str(taken.getsockname()[1]),
            "--ray-client-server-port",
            str(localcluster.free_port()),
            "--num-cpus",
            "1",
            "--disable-usage-stats",
        ],
        log,
        env={"RAY_AUTH_MODE": "token"},
    )
    try:
        localcluster._wait(lambda: localcluster._job_server_ready(address), "Ray head", 240, head, log)
        root = copy_project(tmp_path / "project")
        edit_params(root / "params.yaml", cluster={"address": address, "storage_path": str(tmp_path / "storage")})
        monkeypatch.setattr(jobs, "AGENT_WAIT_S", 15.0)  # the head itself waits 10 s per try
        with pytest.raises(jobs.JobError) as refused:
            jobs.submit_stage(load_config(root / "params.yaml"), "prepare")
    finally:
        localcluster._stop(head.pid, localcluster.RAY_GRACE_S)
        taken.close()
    message = str(refused.value)
    assert "\n" not in message
    assert f"the Ray head at {address} still has no job agent after 15 s" in message
    assert "dashboard_agent.log" in message
    assert f"the Ray job agent on {address} is not up yet; waiting up to 15 s" in capsys.readouterr().out
