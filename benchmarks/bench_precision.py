"""Step time of every stage at fp32 and at bf16 autocast on this CPU, side by side in one run
(the plain loop on one resident batch per step, one intra-op thread: one Ray worker's share on
the 2-core demo machine), with each setting's loss after the same steps from the same start.

    python benchmarks/bench_precision.py --data FEATURES [--config configs/demo.yaml] [--steps 12]

Parents come from a quick stage-1/stage-2 run here unless --transcriptor / --separator /
--classifier name checkpoints (the demo's, say)."""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import step_speed  # noqa: E402
from wss_ray.config import load_config  # noqa: E402
from wss_ray.data.dataset import load_manifest, load_split  # noqa: E402
from wss_ray.stages import RECIPES  # noqa: E402
from wss_ray.stages.base import cpu_precision  # noqa: E402
from wss_ray.stages.runner import train_local  # noqa: E402

STAGES = ("transcriptor", "classifier", "supervised", "separator", "baseline", "finetune")
PARENT = {"separator": "transcriptor", "baseline": "classifier", "finetune": "separator"}


def timed(stage, cfg, data, parent, steps, precision):
    """s/step and the loss after 2 warm-up + ``steps`` updates, at ``precision``."""
    cfg = copy.deepcopy(cfg)
    cfg.ray.cpu_precision = precision
    table = load_split(data, "train", with_stems=RECIPES[stage].needs_stems)
    row = step_speed(stage, cfg, load_manifest(data), table, parent, torch.device("cpu"), steps=steps, warmup=2)
    return row["ms_per_step"] / 1000, row["loss"]


def side_by_side(stage: str, args, variants: dict, precision: str) -> tuple[dict, dict]:
    """Each variant's s/step on ``stage`` (the best of ``args.rounds`` alternations, every other
    round in reverse order, so the machine's drift and the first run's cold start even out) and
    its loss after the same steps from the same start. ``args``: stage_args' options plus
    ``rounds``. ``variants``: name -> (config, a context-manager factory that puts the variant's
    code in place while it trains, e.g. ``lambda: mock.patch.object(...)``)."""
    parent = getattr(args, PARENT[stage]) if stage in PARENT else None
    if stage in PARENT and not parent:
        sys.exit(f"--{PARENT[stage]} is needed for {stage}")
    times = {k: [] for k in variants}
    losses = {}
    for r in range(args.rounds):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            cfg, patched = variants[name]
            with patched():
                took, losses[name] = timed(stage, cfg, args.data, parent, args.steps, precision)
            times[name].append(took)
    return {k: min(v) for k, v in times.items()}, losses


def stage_args(ap: argparse.ArgumentParser, steps: int, stages: tuple[str, ...]) -> argparse.ArgumentParser:
    """The options of a per-stage step benchmark on the plain loop: data, preset, steps, stages
    and the parent checkpoints."""
    ap.add_argument("--data", required=True)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--stages", nargs="+", default=list(stages), choices=stages)
    for p in ("transcriptor", "classifier", "separator"):
        ap.add_argument(f"--{p}", help=f"{p} checkpoint to start the stages above it from")
    return ap


def main() -> None:
    args = stage_args(argparse.ArgumentParser(), 12, STAGES).parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config)
    if cpu_precision("auto") != "bf16":
        print("note: this CPU has no native bf16 (AMX / AVX512-BF16); 'auto' keeps fp32 here")
    parents = {p: getattr(args, p) for p in ("transcriptor", "classifier", "separator") if getattr(args, p)}
    tmp = Path(tempfile.mkdtemp(prefix="wss-bench-precision-"))
    rows = {}
    for stage in args.stages:
        need = PARENT.get(stage)
        if need and need not in parents:        # a short run only to have a parent of the right shape
            quick = copy.deepcopy(cfg)
            quick.stages[need].steps = quick.stages[need].checkpoint_every = 20
            grand = PARENT.get(need)
            parents[need] = str(train_local(need, quick, args.data, tmp / need, parent=parents.get(grand), log=None))
        fp32, loss32 = timed(stage, cfg, args.data, parents.get(need), args.steps, "fp32")
        bf16, loss16 = timed(stage, cfg, args.data, parents.get(need), args.steps, "bf16")
        rows[stage] = {"fp32_s_per_step": fp32, "bf16_s_per_step": bf16, "speedup": fp32 / bf16,
                       "fp32_loss": loss32, "bf16_loss": loss16}
        print(f"{stage}: fp32 {fp32:.3f} s/step, bf16 {bf16:.3f} s/step (x{fp32 / bf16:.2f}); loss after "
              f"{args.steps + 2} steps {loss32:.4f} / {loss16:.4f}", flush=True)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
