"""Steps/s of each stage through Ray Train (1 and 2 workers) vs the same step in a plain
single-process loop on the same data, side by side in one run.

    python benchmarks/bench_stages.py --data FEATURES [--steps 40] [--config configs/demo.yaml]

The Ray figures are the runner's own s/step over the whole loop (data wait included); the
plain loop runs ``fit`` in this process on in-memory batches with one thread per worker-CPU.
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from wss_ray.checkpoint import load_checkpoint, read_meta
from wss_ray.config import load_config
from wss_ray.data.dataset import iter_local, load_manifest
from wss_ray.stages import RECIPES
from wss_ray.stages.base import StepContext
from wss_ray.stages.runner import fit, train_stage

STAGES = ("transcriptor", "separator", "finetune", "supervised")
PARENT = {"separator": "transcriptor", "finetune": "separator"}


def plain(stage, cfg, data, parent, threads):
    torch.set_num_threads(threads)
    m = load_manifest(data)
    ctx = StepContext(cfg, cfg.stages[stage], m, torch.device("cpu"), load_checkpoint(parent)[0] if parent else None)
    recipe = RECIPES[stage]
    models = recipe.build(ctx)
    opts = recipe.optimizers(models, ctx)
    batches = list(iter_local(data, "train", cfg.stages[stage].batch_size, with_stems=recipe.needs_stems,
                              drop_last=True, shuffle_seed=0))
    t = time.time()
    fit(recipe, ctx, models, opts, train_batches=lambda e: batches, val_batches=lambda: [],
        on_checkpoint=lambda s, mm: None)
    return (time.time() - t) / cfg.stages[stage].steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES,
                    help="stages to measure (a stage's parent stage must be listed before it)")
    args = ap.parse_args()
    base = load_config(args.config)
    out = Path(tempfile.mkdtemp(prefix="wss-bench-stages-"))
    ckpt, results = {}, {}
    for stage in args.stages:
        row = {}
        for workers in (1, 2):
            cfg = copy.deepcopy(base)
            cfg.ray.workers, cfg.ray.cpus_per_worker = workers, 2.0 / workers
            s = cfg.stages[stage]
            # same global batch in every setting: per-worker batch shrinks with workers
            s.batch_size = 16 // workers
            s.steps, s.checkpoint_every, s.val_batches = args.steps, args.steps, 0
            path = train_stage(stage, cfg, args.data, out=out / f"{stage}-{workers}",
                               parent=str(ckpt[PARENT[stage]]) if stage in PARENT else None, log=lambda x: None)
            row[f"ray_{workers}w_s_per_step"] = read_meta(path)["metrics"]["s_per_step"]
            if workers == 2:
                ckpt[stage] = path
        cfg = copy.deepcopy(base)
        s = cfg.stages[stage]
        s.batch_size, s.steps, s.checkpoint_every, s.val_batches = 16, args.steps, args.steps, 0
        row["plain_s_per_step"] = plain(stage, cfg, args.data, str(ckpt[PARENT[stage]]) if stage in PARENT else None, 2)
        row["ratio_ray_1w"] = row["plain_s_per_step"] / row["ray_1w_s_per_step"]
        row["ratio_ray_2w"] = row["plain_s_per_step"] / row["ray_2w_s_per_step"]
        results[stage] = row
        print(f"{stage}: plain {1 / row['plain_s_per_step']:.2f} steps/s, Ray Train 1 worker "
              f"{1 / row['ray_1w_s_per_step']:.2f} (x{row['ratio_ray_1w']:.2f}), 2 workers "
              f"{1 / row['ray_2w_s_per_step']:.2f} (x{row['ratio_ray_2w']:.2f}) [global batch 16]", flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
