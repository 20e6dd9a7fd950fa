"""Throughput of one stage on a local 2-node Ray cluster vs one node, side by side in one run.

    python benchmarks/bench_cluster.py --data FEATURES [--stage transcriptor] [--parent CKPT]
                                       [--config configs/demo.yaml] [--steps 60]

Both layouts are real clusters started with cluster/local_cluster.py (`ray start` processes)
and run the same 2-worker DDP stage through `wss-ray train` with the same logical CPUs in
total: one node with 6 CPUs and both workers packed on it (STRICT_PACK), or a head and a
worker node with 3 CPUs each and one training worker per node (STRICT_SPREAD). The figure is
the runner's own s/step over the whole loop. On one machine both layouts share the same
cores, so the ratio measures what crossing nodes costs (gloo over TCP between nodes, Ray Data
blocks moved between the nodes' object stores), not what a second machine would add.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "cluster"))
import local_cluster  # noqa: E402

LAYOUTS = {"1 node": {"workers": 0, "head_cpus": 6, "worker_cpus": 0, "strategy": "STRICT_PACK"},
           "2 nodes": {"workers": 1, "head_cpus": 3, "worker_cpus": 3, "strategy": "STRICT_SPREAD"}}


def run(layout: dict, a, tmp: Path) -> dict:
    state = tmp / "cluster.json"
    info = local_cluster.start(state, workers=layout["workers"], head_cpus=layout["head_cpus"],
                               worker_cpus=layout["worker_cpus"], storage="")
    out = tmp / f"run-{layout['strategy']}"
    try:
        cmd = [sys.executable, "-m", "wss_ray.cli", "train", a.stage, "--config", a.config, "--data", a.data,
               "--out", str(out), "--set", f"ray.address={info['gcs']}", "--set", "ray.workers=2",
               "--set", f"ray.placement_strategy={layout['strategy']}",
               "--set", f"stages.{a.stage}.steps={a.steps}", "--set", f"stages.{a.stage}.checkpoint_every={a.steps}"]
        if a.parent:
            cmd += ["--parent", a.parent]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": "token"})
        wall = time.perf_counter() - t0
        if res.returncode:
            sys.exit(f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    finally:
        local_cluster.stop(state)
    metrics = json.loads((out / "checkpoint" / "meta.json").read_text())["metrics"]
    return {"s_per_step": metrics["s_per_step"], "data_wait_s": metrics.get("data_wait_s", 0.0), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--stage", default="transcriptor")
    ap.add_argument("--parent", help="parent checkpoint, for stages that need one")
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--steps", type=int, default=60)
    a = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, layout in LAYOUTS.items():
            results[name] = run(layout, a, Path(tmp))
            r = results[name]
            print(f"{name}: {1 / r['s_per_step']:.2f} steps/s ({r['s_per_step']:.3f} s/step, "
                  f"{r['data_wait_s']:.3f} s data wait; {r['wall_s']:.0f} s wall incl. Ray start-up)", flush=True)
    ratio = results["1 node"]["s_per_step"] / results["2 nodes"]["s_per_step"]
    print(f"{a.stage}, 2 workers, {a.steps} steps: 2 nodes / 1 node throughput = {ratio:.2f}")


if __name__ == "__main__":
    main()
