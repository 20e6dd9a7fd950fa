"""Every stage on one GPU, on a bare machine (torch, torchaudio, numpy, pyarrow, pyyaml, plus
the small wheels of `benchmarks/gpu_bundle.py`; no Ray, no FluidSynth, no package index):

1. featurize the bundled corpus with a process pool (the same shards as Ray Data writes);
2. train every stage's recipe through the plain loop (``train_local``) on CUDA with bf16
   autocast: transcriptor, classifier, supervised, separator[c+h], baseline, finetune[c+h+aml];
3. a small evaluation of the separators (multi-source and all-chunks tables);
4. speed of each stage's step in this single process on a batch held on the GPU: windows/s,
   peak memory, and the share of step time the GPU sits idle (host: Python, launches, syncs),
   from the profiler's kernel time.

    python benchmarks/gpu_check.py --corpus gpu_bundle/corpus [--steps 300] [--out DIR]

Writes ``gpu_check.json`` and ``results.md`` into --out ($OUT when set) and exits non-zero if
any stage failed. ``--device cpu --steps 4`` is the dry run for a machine without a GPU.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the repo, without an install

from wss_ray.checkpoint import load_checkpoint  # noqa: E402
from wss_ray.config import load_config  # noqa: E402
from wss_ray.data.dataset import iter_table, load_manifest, load_split  # noqa: E402
from wss_ray.stages import RECIPES  # noqa: E402
from wss_ray.stages.base import StepContext, as_floats, critic_mode  # noqa: E402
from wss_ray.stages.runner import run_name, to_device, train_local  # noqa: E402

# (stage, variant settings, parent run)
PLAN = [("transcriptor", {}, None), ("classifier", {}, None), ("supervised", {}, None),
        ("separator", {"masks": ["c", "h"]}, "transcriptor"), ("baseline", {}, "classifier"),
        ("finetune", {"masks": ["c", "h"], "adversarial": ["aml"]}, "separator-c-h")]


def step_speed(stage: str, cfg, manifest: dict, table, parent: Path | None, device: torch.device,
               steps: int = 30, warmup: int = 5, read_every_step: bool = False) -> dict:
    """Windows/s of ``recipe.update`` on one batch resident on the device (no input pipeline),
    peak memory, and the GPU's idle share of the step time. ``read_every_step``: the loss terms
    read as numbers after every step (a host sync per step, as the loop did before it read them
    only when logging): the lever's effect."""
    recipe = RECIPES[stage]
    s = cfg.stages[stage]
    torch.manual_seed(cfg.seed)
    ctx = StepContext(cfg, s, manifest, device, load_checkpoint(parent)[0] if parent else None)
    models = {n: m.to(device) for n, m in recipe.build(ctx).items()}
    for n, m in models.items():  # as the runner does: trainables in train mode, frozen critics in critic mode
        m.train() if any(p.requires_grad for p in m.parameters()) else critic_mode(m)
    opts = recipe.optimizers(models, ctx)
    batch = to_device(next(iter_table(table, manifest, s.batch_size, shuffle_seed=0, drop_last=True)), device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    def step(i: int) -> dict:
        terms = recipe.update(batch, models, opts, ctx, i)
        return as_floats(terms) if read_every_step else terms

    for i in range(warmup):
        step(i)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(steps):
        terms = step(warmup + i)
    sync()
    wall = time.perf_counter() - t0
    row = {"batch": s.batch_size, "windows_per_s": s.batch_size * steps / wall, "ms_per_step": 1000 * wall / steps,
           "loss": float(terms["loss"])}
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for i in range(10):
                step(warmup + steps + i)
            sync()
            wall = time.perf_counter() - t0
        kernel_us = sum(e.self_device_time_total for e in prof.key_averages())
        row["gpu_busy_share"] = min(1.0, kernel_us / 1e6 / wall)
        row["host_share"] = 1.0 - row["gpu_busy_share"]
    return row


def _fmt(row: dict, key: str, spec: str) -> str:
    return format(row[key], spec) if key in row else "–"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, help="Slakh-format corpus (benchmarks/gpu_bundle.py makes one)")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    ap.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "configs" / "gpu.yaml"))
    ap.add_argument("--steps", type=int, default=300, help="training steps per stage")
    ap.add_argument("--batch-size", type=int, default=0, help="per-step batch (default: the config's)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--speed-batches", type=int, nargs="*", default=[128, 512],
                    help="also time the separator's and fine-tuning's step at these batch sizes")
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="featurization processes")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: CUDA is not available (use --device cpu for a dry run)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    out = Path(args.out)
    work = Path(os.environ.get("GPU_CHECK_WORK", out / "work"))
    work.mkdir(parents=True, exist_ok=True)
    base = load_config(args.config)
    base.data.workers = args.workers
    report: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "steps": args.steps, "stages": {}, "speed": {}, "failures": []}
    t_all = time.time()

    from wss_ray.data.featurize import featurize

    t0 = time.time()
    features = work / "features"
    manifest = featurize(args.corpus, features, base.data, engine="local")
    report["featurize_s"] = time.time() - t0
    if manifest["_run"]["bad_tracks"]:
        report["failures"].append(f"featurize: {len(manifest['_run']['bad_tracks'])} bad track(s)")
    manifest = load_manifest(features)

    ckpts: dict[str, Path] = {}
    for stage, settings, parent in PLAN:
        cfg = copy.deepcopy(base)
        s = cfg.stages[stage]
        for k, v in settings.items():
            setattr(s, k, v)
        s.steps, s.checkpoint_every = args.steps, args.steps
        s.batch_size = args.batch_size or s.batch_size
        name = run_name(stage, cfg)
        if parent and parent not in ckpts:
            report["failures"].append(f"{name}: parent {parent} failed")
            continue
        t0 = time.time()
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            path = train_local(stage, cfg, features, work / name, parent=str(ckpts[parent]) if parent else None,
                               device=device, log=lambda line: print(line, flush=True))
            ckpts[name] = path
            meta = json.loads((path / "meta.json").read_text())
            wall = time.time() - t0
            report["stages"][name] = {"wall_s": wall, "windows_per_s": args.steps * s.batch_size / wall,
                                      "metrics": meta["metrics"]}
            if device.type == "cuda":
                report["stages"][name]["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            report["speed"][name] = step_speed(stage, cfg, manifest, load_split(features, "train", RECIPES[stage].needs_stems),
                                               ckpts[parent] if parent else None, device)
            sp = report["speed"][name]
            if stage in ("separator", "finetune"):
                extra = {f"{name} (read every step)": (s.batch_size, True)}
                extra.update({f"{name} @ batch {b}": (b, False) for b in args.speed_batches})
                for label, (b, read) in extra.items():
                    c = copy.deepcopy(cfg)
                    c.stages[stage].batch_size = b
                    report["speed"][label] = step_speed(stage, c, manifest, load_split(features, "train"),
                                                        ckpts[parent] if parent else None, device,
                                                        read_every_step=read)
            print(f"[gpu_check] {name}: trained {args.steps} steps in {wall:.1f} s; step alone "
                  f"{sp['windows_per_s']:.0f} windows/s ({sp['ms_per_step']:.1f} ms/step"
                  + (f", peak {sp['peak_mem_gib']:.2f} GiB, GPU busy {sp['gpu_busy_share']:.0%}" if "peak_mem_gib" in sp else "")
                  + ")", flush=True)
        except Exception as e:  # every stage is tried; the exit status says whether all passed
            traceback.print_exc()
            report["failures"].append(f"{name}: {type(e).__name__}: {e}")

    from wss_ray.evaluate import evaluate

    separators = [str(p) for n, p in ckpts.items() if n not in ("transcriptor", "classifier")]
    if separators:
        try:
            t0 = time.time()
            rows = evaluate(separators, features, out / "eval", split="test", device=args.device,
                            log=lambda line: print(line, flush=True))
            report["evaluate_s"] = time.time() - t0
            report["multi_source"] = rows
            (out / "results.md").write_text((out / "eval" / "results.md").read_text())
        except Exception as e:
            traceback.print_exc()
            report["failures"].append(f"evaluate: {type(e).__name__}: {e}")
    report["wall_s"] = time.time() - t_all
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    print("\n| stage | batch | trained windows/s | step-only windows/s | ms/step | peak GiB | host share |")
    print("|---|---|---|---|---|---|---|")
    for name, sp in report["speed"].items():
        trained = report["stages"].get(name, {})
        print(f"| {name} | {sp['batch']} | {_fmt(trained, 'windows_per_s', '.0f')} | {sp['windows_per_s']:.0f} | "
              f"{sp['ms_per_step']:.1f} | {_fmt(sp, 'peak_mem_gib', '.2f')} | "
              f"{_fmt(sp, 'host_share', '.0%')} |")
    print(f"[gpu_check] {len(report['stages'])}/{len(PLAN)} stages passed in {report['wall_s']:.0f} s"
          + (f"; FAILURES: {report['failures']}" if report["failures"] else ""))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
