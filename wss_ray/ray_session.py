"""Connect to a Ray cluster, or start a local instance sized so Ray Data keeps CPU.

On a 2-core machine, two training workers at 1 CPU each on a 2-CPU Ray instance leave Ray
Data's read tasks nothing to run on and the job hangs ("Cluster resources are not enough to
run any task"). Logical CPUs are a scheduling budget, not cores, so the local instance
advertises more of them than the workers reserve.
"""
from __future__ import annotations

import os

from wss_ray.config import RayConfig


def ensure_ray(cfg: RayConfig | None = None) -> None:
    import ray

    cfg = cfg or RayConfig()
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # the dashboard (on loopback) serves the state API that Ray Train's placement-group cleaner
        # polls; without it a Tune trial's workers can keep their CPUs after the trial ends
        ray.init(num_cpus=cfg.local_cpus(), include_dashboard=True, dashboard_host="127.0.0.1",
                 log_to_driver=True)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
