"""Random-offset training windows vs the fixed chunk grid, same steps, side by side in one run:
the supervised separator and the weak chain (transcriptor -> separator[c+h]) trained each way
through the plain loop, scored on the validation split's multi-source chunks (a default is
chosen on validation, never on test).

    python benchmarks/bench_windows.py --data FEATURES [--config configs/demo.yaml] [--seeds 0 1]
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wss_ray.config import load_config
from wss_ray.evaluate import evaluate
from wss_ray.stages.runner import train_local


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out or tempfile.mkdtemp(prefix="wss-bench-windows-"))
    base = load_config(args.config)
    quiet = lambda line: None  # noqa: E731
    results: dict = {}
    for seed in args.seeds:
        for windows in (False, True):
            cfg = copy.deepcopy(base)
            cfg.seed = seed
            for s in cfg.stages.values():
                s.random_windows = windows
            tag = f"seed{seed}-{'windows' if windows else 'grid'}"
            t0 = time.time()
            sup = train_local("supervised", cfg, args.data, out / tag / "supervised", log=quiet)
            tr = train_local("transcriptor", cfg, args.data, out / tag / "transcriptor", log=quiet)
            sep = train_local("separator", cfg, args.data, out / tag / "separator", parent=str(tr), log=quiet)
            rows = evaluate([str(sup), str(sep)], args.data, out / tag / "eval", split="validation", log=quiet)
            for r in rows:
                results.setdefault((r["system"], windows), {}).setdefault(r["instrument"], []).append(r["si_sdr_mean"])
            print(f"[windows] {tag}: trained and scored in {time.time() - t0:.0f} s", flush=True)
    insts = ["bass", "guitar", "piano"]
    print(f"\nSI-SDR (dB), validation multi-source chunks, mean over seeds {args.seeds} (± std over seeds)\n")
    print("| system | windows | " + " | ".join(insts) + " | avg |")
    print("|---|---|" + "---|" * (len(insts) + 1))
    table = []
    for (system, windows), per in sorted(results.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if system in ("oracle_irm",):
            continue
        avg = np.mean([per[i] for i in insts], axis=0)           # per seed
        cells = [f"{np.mean(per[i]):.2f} ± {np.std(per[i]):.2f}" for i in insts]
        print(f"| {system} | {'random' if windows else 'grid'} | " + " | ".join(cells)
              + f" | {avg.mean():.2f} ± {avg.std():.2f} |")
        table.append({"system": system, "random_windows": windows, **{i: per[i] for i in insts}})
    (out / "bench_windows.json").write_text(json.dumps(table, indent=2))
    print(f"\n[windows] details in {out}")


if __name__ == "__main__":
    main()
