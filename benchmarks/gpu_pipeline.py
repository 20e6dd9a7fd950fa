"""Every Table-1 row of a config (`configs/gpu.yaml`; the stages in its ``pipeline.stages``) on
one GPU without Ray: the bare-machine counterpart of ``wss-ray pipeline``, training the same
rows (``wss_ray.pipeline.stage_plan``). Stages that do not depend on each other train side by side
in their own processes on the one GPU (what the Ray pipeline does with fractional GPUs):

    transcriptor -> separator[masks] -> finetune[each of pipeline.finetune_variants]
    classifier -> baseline
    supervised

then the multi-source tables on the test split and on a second test set of real compositions,
the validation table, and the best weakly supervised checkpoint on validation exported
(float16, `wss-ray export`) as the model to ship.

    python benchmarks/gpu_pipeline.py --features FEATURES [--scores SCORES_FEATURES] \\
        [--config configs/gpu.yaml] [--out DIR] [--export DIR] [--steps-scale 1.0]

FEATURES: featurized data (`benchmarks/gpu_check.py` leaves it under its work folder);
``--device cpu --steps-scale 0.002`` is the dry run on a machine without a GPU.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import threading
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))   # the repo, without an install

# weak rows a shipped model may come from (the supervised row reads stems; the baseline is a baseline)
WEAK = ("separator", "finetune")


def _train(stage: str, cfg_dict: dict, features: str, out: str, parent: str | None, device: str,
           threads: int) -> dict:
    """One stage in a fresh process (spawned: CUDA cannot be forked)."""
    import torch

    from wss_ray.config import config_from_dict
    from wss_ray.stages.runner import train_local

    torch.set_num_threads(threads)
    cfg = config_from_dict(cfg_dict)
    t0 = time.time()
    name = Path(out).name
    log_path = Path(out).parent / f"{name}.log"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as fh:
        def log(line: str) -> None:
            fh.write(line + "\n")
            fh.flush()
            if "step" in line:
                print(f"[{name}] {line}", flush=True)

        path = train_local(stage, cfg, features, out, parent=parent, device=device, log=log)
    row = {"checkpoint": str(path), "wall_s": time.time() - t0, "steps": cfg.stages[stage].steps,
           "batch_size": cfg.stages[stage].batch_size}
    row["windows_per_s"] = row["steps"] * row["batch_size"] / row["wall_s"]
    if device == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def plan(cfg) -> list[tuple[str, str, object, str | None]]:
    """(run name, stage, its config, parent run name), parents first: the Ray pipeline's rows
    (``wss_ray.pipeline.stage_plan``) under their run folders' names."""
    from wss_ray.pipeline import stage_plan
    from wss_ray.stages.runner import run_name

    rows = stage_plan(cfg)
    names = {key: run_name(stage, c) for key, stage, c, _ in rows}
    return [(names[key], stage, c, names.get(parent)) for key, stage, c, parent in rows]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--features", required=True, help="featurized data (train/validation/test)")
    ap.add_argument("--scores", help="real compositions, a second test set: featurized data, or a Slakh-format "
                                     "corpus (`gpu_bundle.py --scores`) featurized here first")
    ap.add_argument("--config", default=str(REPO / "configs" / "gpu.yaml"))
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_pipeline_out"))
    ap.add_argument("--export", help="folder for the chosen weak model (float16), e.g. models/default")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="every stage's steps times this")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads per stage process")
    args = ap.parse_args()

    import torch

    from wss_ray.config import load_config
    from wss_ray.data.contract import MANIFEST
    from wss_ray.evaluate import _avg, evaluate, ordering_holds

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_pipeline: error: CUDA is not available (use --device cpu for a dry run)", file=sys.stderr)
        return 2
    cfg = load_config(args.config)
    out = Path(args.out)
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    report: dict = {"config": args.config, "steps_scale": args.steps_scale, "stages": {}, "failures": []}
    t_all = time.time()
    if args.scores and not (Path(args.scores) / MANIFEST).is_file():
        from wss_ray.data.featurize import featurize

        cfg.data.workers = min(16, os.cpu_count() or 1)
        featurize(args.scores, out / "scores_features", cfg.data, engine="local")
        args.scores = str(out / "scores_features")
    if args.device == "cuda":
        report["device"] = torch.cuda.get_device_name()
    done: dict[str, threading.Event] = {}
    ckpts: dict[str, str] = {}
    steps = plan(cfg)
    for name, *_ in steps:
        done[name] = threading.Event()

    def save() -> None:   # after every stage and table: a run cut short still leaves what it did
        report["wall_s"] = time.time() - t_all
        (out / "gpu_pipeline.json").write_text(json.dumps(report, indent=2, default=str))

    def run_one(pool, name, stage, stage_cfg, parent) -> None:
        try:
            if parent:
                done[parent].wait()
                if parent not in ckpts:
                    report["failures"].append(f"{name}: parent {parent} failed")
                    return
            c = copy.deepcopy(stage_cfg)
            s = c.stages[stage]
            s.steps = max(1, round(s.steps * args.steps_scale))
            s.checkpoint_every = min(s.checkpoint_every, s.steps)
            t0 = time.time() - t_all
            row = pool.submit(_train, stage, c.to_dict(), str(Path(args.features).resolve()), str(runs / name),
                              ckpts.get(parent), args.device, args.threads).result()
            row["started_s"], row["ended_s"] = t0, time.time() - t_all
            report["stages"][name] = row
            ckpts[name] = row["checkpoint"]
            save()
            print(f"[gpu_pipeline] {name}: {row['steps']} steps in {row['wall_s']:.0f} s "
                  f"({row['windows_per_s']:.0f} windows/s), {row['started_s']:.0f}-{row['ended_s']:.0f} s", flush=True)
        except Exception as e:
            traceback.print_exc()
            report["failures"].append(f"{name}: {type(e).__name__}: {e}")
        finally:
            done[name].set()

    def export_best(val: dict, evaluated: list[str]) -> None:
        """The best weakly supervised row on validation, exported (float16) as the model to ship."""
        from wss_ray.checkpoint import export_model

        weak = {s: v for s, v in val.items() if s.startswith(WEAK) and v == v}
        if not weak:
            return
        best = max(weak, key=weak.get)
        # evaluate's systems: mixture, oracle_irm, then one per checkpoint in the order given
        src = dict(zip(list(val)[2:], evaluated))[best]
        note = (f"benchmarks/gpu_pipeline.py --config {Path(args.config).name} on {report.get('device', args.device)} "
                f"(training {report['train_wall_s'] / 60:.1f} min wall, stages side by side); chosen as the best "
                f"weakly supervised row on the validation split's multi-source SI-SDR ({weak[best]:.2f} dB avg)")
        export_model(src, args.export, note={"note": note}, run_root=runs)
        report["exported"] = {"system": best, "from": src, "to": args.export, "note": note}
        print(f"[gpu_pipeline] exported {best} -> {args.export}", flush=True)

    with ProcessPoolExecutor(max_workers=len(steps), mp_context=get_context("spawn")) as pool:
        threads = [threading.Thread(target=run_one, args=(pool, *row)) for row in steps]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    report["train_wall_s"] = time.time() - t_all
    save()

    evaluated = [ckpts[n] for n, st, *_ in steps if n in ckpts and st not in ("transcriptor", "classifier")]
    # validation first: the model to ship is chosen there, never on test
    tables = {"validation": (args.features, "validation"), "test": (args.features, "test")}
    if args.scores:
        tables["scores"] = (args.scores, "test")
    for key, (data, split) in tables.items():
        try:
            t0 = time.time()
            rows = evaluate(evaluated, data, out / f"eval_{key}", split=split, device=args.device,
                            log=lambda line: print(line, flush=True))
            report[f"eval_{key}_s"] = time.time() - t0
            avg = {s: _avg(rows, s) for s in dict.fromkeys(r["system"] for r in rows)}
            report[key] = {"avg": avg, "ordering_holds": ordering_holds(rows)}
            if key == "validation" and args.export:
                export_best(avg, evaluated)
        except Exception as e:
            traceback.print_exc()
            report["failures"].append(f"evaluate {key}: {type(e).__name__}: {e}")
        save()
    print(f"[gpu_pipeline] {len(report['stages'])}/{len(steps)} stages, training {report['train_wall_s']:.0f} s, "
          f"all {report['wall_s']:.0f} s" + (f"; FAILURES: {report['failures']}" if report["failures"] else ""))
    for key in ("test", "scores", "validation"):
        if key in report:
            print(f"[gpu_pipeline] {key}: ordering holds: {report[key]['ordering_holds']}; "
                  + ", ".join(f"{s} {v:.2f}" for s, v in report[key]["avg"].items()))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
