"""Tune overhead: wall time of an N-trial sweep vs the same N trials run one after another as
plain `train_stage` calls, side by side in one process on the same local Ray instance.

    python benchmarks/bench_tune.py --data FEATURES --parent TRANSCRIPTOR_CKPT [--config configs/smoke.yaml] [--trials 2]

ASHA is given a grace period equal to the step budget here, so no trial is stopped early and
both sides do the same work; the ratio is the cost of Tune's trial management.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

from wss_ray.config import load_config
from wss_ray.ray_session import ensure_ray
from wss_ray.stages.runner import train_stage
from wss_ray.tune import Dimension, SearchSpace, apply_params, run_sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--parent", required=True, help="transcriptor checkpoint (the separator is swept)")
    ap.add_argument("--config", default=str(Path(__file__).parent.parent / "configs" / "smoke.yaml"))
    ap.add_argument("--trials", type=int, default=2)
    a = ap.parse_args()
    cfg = load_config(a.config)
    steps = cfg.stages["separator"].steps
    lrs = [1e-3 * (1 + i) for i in range(a.trials)]
    space = SearchSpace("separator", "bench", [Dimension("stages.separator.lr", "grid", values=lrs)],
                        samples=1, grace_period=max(1, steps // cfg.stages["separator"].checkpoint_every))
    ensure_ray(cfg.ray)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        for i, lr in enumerate(lrs):
            train_stage("separator", apply_params(cfg, {"stages.separator.lr": lr}), a.data,
                        out=Path(tmp) / f"seq{i}", parent=a.parent, log=lambda *_: None)
        sequential = time.time() - t0
        t0 = time.time()
        run_sweep("separator", copy.deepcopy(cfg), space, a.data, parent=a.parent, storage=str(Path(tmp) / "tune"),
                  name="bench", concurrent=1, log=lambda *_: None)
        sweep = time.time() - t0
    print(f"separator, {a.trials} trials x {steps} steps, {cfg.ray.workers} workers each, one at a time")
    print(f"  sequential train_stage: {sequential:7.1f} s")
    print(f"  Tune sweep:             {sweep:7.1f} s")
    print(f"  sweep / sequential:     {sweep / sequential:7.2f}  (overhead {sweep - sequential:+.1f} s, "
          f"{(sweep - sequential) / a.trials:+.1f} s per trial)")


if __name__ == "__main__":
    main()
