#!/usr/bin/env python3
"""A real multi-node Ray cluster on one machine: a head and worker nodes, each its own
`ray start` (own raylet, object store and worker processes), for trying cluster jobs and
node failures without a cloud. The dashboard and job server listen on 127.0.0.1 only, and
token authentication stays on.

    python cluster/local_cluster.py start --workers 1      # prints RAY_ADDRESS for `ray job submit`
    python cluster/local_cluster.py add-worker
    python cluster/local_cluster.py kill-worker             # SIGKILL a worker node's raylet
    python cluster/local_cluster.py stop

State (ports, node temp folders) lives in --state (default ~/.wss-ray-local-cluster.json).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_STATE = Path.home() / ".wss-ray-local-cluster.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


def _env() -> dict:
    env = dict(os.environ)
    env["RAY_AUTH_MODE"] = "token"
    env.pop("RAY_ADDRESS", None)
    return env


def _ensure_token() -> None:
    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if not token.is_file() and not os.environ.get("RAY_AUTH_TOKEN"):
        subprocess.run([_ray(), "get-auth-token", "--generate"], check=True, capture_output=True, env=_env())


def _run(args: list[str]) -> str:
    p = subprocess.run(args, capture_output=True, text=True, env=_env())
    if p.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return p.stdout


def load(state: Path) -> dict:
    if not state.is_file():
        raise SystemExit(f"no local cluster recorded in {state}; run `start` first")
    return json.loads(state.read_text())


def save(state: Path, info: dict) -> None:
    tmp = state.with_name(state.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, state)


def _agent_ports() -> list[str]:
    """Every node gets its own agent ports: two nodes (or another Ray instance on the machine,
    a pytest session's) on the default 52365 leave the job agent dead ("No available agent")."""
    return [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}"]


def add_worker(info: dict, cpus: float) -> dict:
    node = {"cpus": cpus, "resources": {"worker_node": 1}}
    _run([_ray(), "start", f"--address={info['gcs']}", f"--num-cpus={int(cpus)}",
          "--resources", json.dumps(node["resources"]), "--node-ip-address=127.0.0.1",
          f"--min-worker-port={info['next_port']}", f"--max-worker-port={info['next_port'] + 199}",
          *_agent_ports()])
    info["next_port"] += 200
    info.setdefault("workers", []).append(node)
    return info


def start(state: Path, workers: int, head_cpus: int, worker_cpus: int, storage: str) -> dict:
    if state.is_file():
        raise SystemExit(f"a local cluster is already recorded in {state}; `stop` it first")
    _ensure_token()
    port, dash, client = _free_port(), _free_port(), _free_port()
    temp = Path(storage).resolve() if storage else Path("/tmp") / f"wss-ray-cluster-{port}"
    _run([_ray(), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
          "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
          f"--num-cpus={head_cpus}", "--include-dashboard=true", f"--temp-dir={temp}",
          "--min-worker-port=20000", "--max-worker-port=20199", *_agent_ports()])
    info = {"gcs": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "temp_dir": str(temp),
            "head_cpus": head_cpus, "next_port": 20200, "workers": []}
    for _ in range(workers):
        add_worker(info, worker_cpus)
    save(state, info)
    _wait_nodes(info, 1 + workers)
    _wait_job_server(info)
    return info


def _wait_job_server(info: dict, timeout: float = 90) -> None:
    """The job server answers before its agent is up ("No available agent to submit job")."""
    deadline = time.time() + timeout
    env = {**_env(), "RAY_ADDRESS": info["dashboard"]}
    while time.time() < deadline:
        p = subprocess.run([_ray(), "job", "list"], capture_output=True, text=True, env=env)
        if p.returncode == 0 and "No available agent" not in p.stdout + p.stderr:
            return
        time.sleep(2)
    raise RuntimeError(f"the job server at {info['dashboard']} did not come up in {timeout:.0f} s")


def _wait_nodes(info: dict, n: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if alive_nodes(info) >= n:
            return
        time.sleep(1)
    raise RuntimeError(f"the local cluster did not reach {n} nodes in {timeout:.0f} s")


def alive_nodes(info: dict) -> int:
    code = ("import ray, json; ray.init(address=%r, logging_level='ERROR'); "
            "print(json.dumps(sum(n['Alive'] for n in ray.nodes())))" % info["gcs"])
    out = _run([sys.executable, "-c", code]).strip().splitlines()
    return int(out[-1])


def _processes(info: dict) -> list[tuple[int, str]]:
    """(pid, args) of this cluster's processes: those naming its GCS address or session folder,
    so a stop never touches another Ray instance on the machine."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout  # -ww: no COLUMNS cut
    found = []
    port = info["gcs"].rsplit(":", 1)[1]
    for line in out.splitlines()[1:]:
        pid, _, args = line.strip().partition(" ")
        # Ray names the GCS by the machine's IP whatever --node-ip-address says: match the port
        gcs = any(t.startswith(("--gcs-address=", "--gcs_address=", "--address=")) and t.endswith(f":{port}")
                  for t in args.split())
        if gcs or info["temp_dir"] in args:
            found.append((int(pid), args))
    return found


def worker_raylets(info: dict) -> list[int]:
    """PIDs of the raylets of worker nodes (the head's raylet carries --head)."""
    return [pid for pid, args in _processes(info)
            if args.split(" ")[0].endswith("/raylet") and "worker_node" in args and "--head" not in args]


def kill_worker(info: dict) -> int:
    pids = worker_raylets(info)
    if not pids:
        raise SystemExit("no worker-node raylet found")
    os.kill(pids[-1], signal.SIGKILL)
    return pids[-1]


def stop(state: Path) -> None:
    info = json.loads(state.read_text()) if state.is_file() else {}
    if info:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            procs = _processes(info)
            for pid, _ in procs:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + 10
            while procs and time.time() < deadline and _processes(info):
                time.sleep(0.5)
    if state.is_file():
        state.unlink()
    if info.get("temp_dir", "").startswith("/tmp/wss-ray-cluster-"):
        shutil.rmtree(info["temp_dir"], ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state", type=Path, default=DEFAULT_STATE, help="where the cluster's ports are recorded")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="start a head and worker nodes")
    s.add_argument("--workers", type=int, default=1, help="worker nodes (default 1)")
    s.add_argument("--head-cpus", type=int, default=1, help="logical CPUs of the head (default 1)")
    s.add_argument("--worker-cpus", type=int, default=3, help="logical CPUs per worker node (default 3)")
    s.add_argument("--temp-dir", default="", help="Ray's session folder (default /tmp/wss-ray-cluster-PORT)")
    a = sub.add_parser("add-worker", help="start one more worker node")
    a.add_argument("--worker-cpus", type=int, default=3)
    sub.add_parser("kill-worker", help="SIGKILL the raylet of the newest worker node (a node failure)")
    sub.add_parser("status", help="print the recorded addresses and the number of live nodes")
    sub.add_parser("stop", help="stop every node of the local cluster")
    args = p.parse_args(argv)
    if args.cmd == "start":
        info = start(args.state, args.workers, args.head_cpus, args.worker_cpus, args.temp_dir)
        print(f"local cluster up: {1 + args.workers} nodes; dashboard and job server on {info['dashboard']}\n"
              f"  export RAY_ADDRESS={info['dashboard']}   # for ray job submit / cluster/submit.sh\n"
              f"  (wss-ray inside a job connects to the cluster by itself)")
    elif args.cmd == "add-worker":
        info = load(args.state)
        save(args.state, add_worker(info, args.worker_cpus))
        print(f"worker added; {alive_nodes(info)} live nodes")
    elif args.cmd == "kill-worker":
        print(f"killed worker raylet {kill_worker(load(args.state))}")
    elif args.cmd == "status":
        info = load(args.state)
        print(json.dumps({**info, "alive_nodes": alive_nodes(info)}, indent=2))
    else:
        stop(args.state)
        print("local cluster stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
