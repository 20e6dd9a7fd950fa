"""The critic's frequency pooling: ``nn.MaxPool2d((2, 1))`` against ``PairMaxPool`` (the same
values and gradients, computed as contiguous elementwise work), side by side in one run: s/step
of each stage whose step runs the transcriptor or classifier trunk (the plain loop on one
resident batch, one intra-op thread: one Ray worker's share on the 2-core demo machine,
bf16 autocast as the demo trains), and each stage's loss after the same steps from the same
start, which must be equal (the script exits 1 when they are not).

    python benchmarks/bench_pool.py --data FEATURES --transcriptor T --classifier C --separator S
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from unittest import mock

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_precision import side_by_side, stage_args  # noqa: E402
from wss_ray.config import load_config  # noqa: E402
from wss_ray.models import transcriptor as trunk_module  # noqa: E402
from wss_ray.stages.base import cpu_precision  # noqa: E402

STAGES = ("transcriptor", "classifier", "separator", "baseline", "finetune")


def main() -> None:
    ap = stage_args(argparse.ArgumentParser(), 10, STAGES)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two poolings (drift evens out)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config)
    precision = cpu_precision(cfg.ray.cpu_precision)   # "auto": bf16 where the CPU has it
    # what SpectroTrunk builds its pooling from, swapped while the max_pool variant trains
    max_pool = lambda: mock.patch.object(trunk_module, "PairMaxPool", lambda: nn.MaxPool2d((2, 1)))  # noqa: E731
    variants = {"max_pool": (cfg, max_pool), "pair": (cfg, contextlib.nullcontext)}
    rows = {}
    for stage in args.stages:
        times, losses = side_by_side(stage, args, variants, precision)
        old, new = times["max_pool"], times["pair"]
        rows[stage] = {"max_pool_s_per_step": old, "pair_s_per_step": new, "speedup": old / new,
                       "loss_max_pool": losses["max_pool"], "loss_pair": losses["pair"]}
        print(f"{stage}: max_pool {old:.3f} s/step, pair {new:.3f} s/step (x{old / new:.2f}); loss after "
              f"{args.steps + 2} steps {losses['max_pool']:.6f} / {losses['pair']:.6f}", flush=True)
    print(json.dumps(rows, indent=2))
    differ = [k for k, r in rows.items() if r["loss_max_pool"] != r["loss_pair"]]
    if differ:
        sys.exit(f"the two poolings trained to different losses: {', '.join(differ)}")


if __name__ == "__main__":
    main()
