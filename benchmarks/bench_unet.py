"""The U-Net separator's step, side by side in one run: the previous up path (each transposed
convolution made at twice its input and cropped afterwards, so the next layers copy a strided
view; BN statistics over the uncropped map), the current one (made at the size of the level it
joins), both with decoder dropout 0.5, and the current one without it (``unet.dropout=0``, the
demo preset since session 17). s/step of each stage that builds a new U-Net from the preset
(fine-tuning takes its parent's; the plain loop on one resident batch, one intra-op thread: one
Ray worker's share on the 2-core demo machine, bf16 autocast as the demo trains) and the loss
after the same steps from the same start.

    python benchmarks/bench_unet.py --data FEATURES --transcriptor T --classifier C
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_precision import side_by_side, stage_args  # noqa: E402
from wss_ray.config import load_config  # noqa: E402
from wss_ray.models.unet import UNetSeparator  # noqa: E402
from wss_ray.stages.base import cpu_precision  # noqa: E402

STAGES = ("supervised", "separator", "baseline")


def cropped_forward(self, mag: torch.Tensor) -> torch.Tensor:
    """UNetSeparator.forward's up path before session 17: crop after each whole up layer."""
    _, f, n = mag.shape
    x, skips, sizes = self.encode(mag)
    for i, layer in enumerate(self.up):
        x = layer(x if i == 0 else torch.cat([x, skips.pop()], dim=1))
        fi, ni = sizes[-2 - i]
        x = x[..., :fi, :ni]
    return torch.sigmoid(self.out(x))[:, :, :f, :n]


def main() -> None:
    ap = stage_args(argparse.ArgumentParser(), 10, STAGES)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the variants (drift evens out)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config)
    if cfg.models.separator.arch != "unet":
        sys.exit(f"{args.config}: models.separator.arch is {cfg.models.separator.arch!r}, not unet")
    precision = cpu_precision(cfg.ray.cpu_precision)

    def with_dropout(p: float):
        out = copy.deepcopy(cfg)
        out.models.separator.unet.dropout = p
        return out

    cropped = lambda: mock.patch.object(UNetSeparator, "forward", cropped_forward)  # noqa: E731
    # the preset before session 17 (cropped, dropout 0.5), the up path alone, and today's preset
    variants = {"cropped": (with_dropout(0.5), cropped), "sized": (with_dropout(0.5), contextlib.nullcontext),
                "sized_no_dropout": (with_dropout(0.0), contextlib.nullcontext)}
    rows = {}
    for stage in args.stages:
        best, losses = side_by_side(stage, args, variants, precision)
        rows[stage] = {**{f"{k}_s_per_step": v for k, v in best.items()},
                       **{f"{k}_loss": v for k, v in losses.items()}}
        print(f"{stage}: " + ", ".join(f"{k} {v:.3f} s/step (x{best['cropped'] / v:.2f})" for k, v in best.items())
              + f"; loss after {args.steps + 2} steps " + " / ".join(f"{v:.5f}" for v in losses.values()), flush=True)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
