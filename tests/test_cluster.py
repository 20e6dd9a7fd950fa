"""The cluster side: ray_cluster.yaml passes Ray's own validation; on a real multi-node Ray
cluster started on this machine (head + worker node, separate `ray start`s), a stage submitted
as a Ray job finishes, and survives losing its worker node mid-stage by resuming from its last
checkpoint; the dashboard listens on loopback only."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "cluster"))
import local_cluster  # noqa: E402


def _validate(cfg: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cfg))


def test_cluster_yaml_validates_offline():
    cfg = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    _validate(cfg)
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head
    assert cfg["provider"]["type"] == "aws" and any("GPU" in k or "gpu" in k for k in cfg["available_node_types"])
    # the check is real: a typo is rejected
    with pytest.raises(Exception, match="bogus"):
        _validate({**cfg, "bogus": 1})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster") / "state.json"
    info = local_cluster.start(state, workers=1, head_cpus=1, worker_cpus=3, storage="")
    yield {**info, "state": state}
    local_cluster.stop(state)
    assert not local_cluster._processes(info), "processes of the local cluster survived stop"


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp) listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.rsplit(":", 1)
            if int(p, 16) == port and state == "0A":
                found.add(addr)
    return found


def test_dashboard_listens_on_loopback_only(cluster):
    port = int(cluster["dashboard"].rsplit(":", 1)[1])
    addrs = _listening(port)
    assert addrs == {"0100007F"}, addrs  # 127.0.0.1 only, not 0.0.0.0 / ::
    assert local_cluster.alive_nodes(cluster) == 2


def _submit(args: list[str], address: str) -> str:
    env = {**os.environ, "RAY_ADDRESS": address, "RAY": str(Path(sys.executable).with_name("ray")),
           "PYTHON": sys.executable}
    for _ in range(20):  # the job agent can lag behind the job server by a few seconds
        out = subprocess.run([str(ROOT / "cluster" / "submit.sh"), "--no-wait", *args], capture_output=True,
                             text=True, env=env, cwd=ROOT, timeout=120)
        if "No available agent" not in out.stdout + out.stderr:
            break
        time.sleep(3)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    for word in (out.stdout + out.stderr).split():
        if word.strip("'\"").startswith("raysubmit_"):
            return word.strip("'\"")
    raise AssertionError(out.stdout + out.stderr)


def _job_status(job: str, address: str) -> str:
    env = {**os.environ, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "token"}
    out = subprocess.run([str(Path(sys.executable).with_name("ray")), "job", "status", job], capture_output=True,
                         text=True, env=env, timeout=60)
    text = (out.stdout + out.stderr).lower()   # "Job 'raysubmit_..' succeeded", "... is currently running"
    for s in ("succeeded", "failed", "stopped", "running", "pending"):
        if s in text:
            return s.upper()
    return "UNKNOWN"


def _job_logs(job: str, address: str) -> str:
    env = {**os.environ, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "token"}
    return subprocess.run([str(Path(sys.executable).with_name("ray")), "job", "logs", job], capture_output=True,
                          text=True, env=env, timeout=60).stdout


def _wait(job: str, address: str, timeout: float, until=None) -> str:
    deadline = time.time() + timeout
    last = 0.0
    while time.time() < deadline:
        if until and until():
            return "CONDITION"
        if time.time() - last > 3:
            status = _job_status(job, address)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status
            last = time.time()
        time.sleep(0.2)
    raise AssertionError(f"job {job} still running after {timeout} s:\n{_job_logs(job, address)[-3000:]}")


@pytest.mark.slow  # a second Ray cluster of two nodes, a worker node killed mid-run
def test_stage_job_recovers_from_losing_its_worker_node(cluster, features, tmp_path):
    """Two DDP workers cannot fit the 1-CPU head, so they run on the worker node. Its raylet is
    SIGKILLed after the first checkpoint; a replacement node joins (what the autoscaler does);
    the job resumes from the last checkpoint and the step count continues."""
    from wss_ray.checkpoint import read_meta

    out = tmp_path / "transcriptor"
    job = _submit(["train", "transcriptor", "--data", str(features), "--config", str(ROOT / "configs" / "smoke.yaml"),
                   "--out", str(out), "--set", "stages.transcriptor.steps=60",
                   "--set", "stages.transcriptor.checkpoint_every=4", "--set", "ray.max_failures=3"],
                  cluster["dashboard"])
    runs = out / "ray" / "transcriptor"
    # a checkpoint folder appears before Ray Train has registered it; once a second one exists the
    # first is on record, so the restarted group has something to resume from
    status = _wait(job, cluster["dashboard"], 300, until=lambda: len(list(runs.glob("checkpoint_*"))) >= 2)
    assert status == "CONDITION", _job_logs(job, cluster["dashboard"])[-3000:]
    local_cluster.kill_worker(cluster)
    assert _job_status(job, cluster["dashboard"]) == "RUNNING", "the job ended before the node was killed"
    local_cluster.add_worker(cluster, 3)
    status = _wait(job, cluster["dashboard"], 420)
    logs = _job_logs(job, cluster["dashboard"])
    assert status == "SUCCEEDED", logs[-4000:]
    meta = read_meta(out / "checkpoint")
    assert meta["step"] == 60
    assert meta.get("resumed_from") and 4 <= meta["resumed_from"][0] < 60, meta.get("resumed_from")
