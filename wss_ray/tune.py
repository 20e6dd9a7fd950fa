"""Ray Tune over one stage: search spaces from ``tune_spaces/<stage>.yaml``, one Ray Train run
per trial, ASHA early stopping on the stage's validation metric, resume with
``Tuner.restore``, and a handoff record (``best.json``) naming the best trial's checkpoint.

Space file format (every key is checked; errors name the file and the key)::

    stage: separator            # must match the stage being tuned
    samples: 4                  # trials per grid point (sampled dimensions draw anew each time)
    scheduler: {grace_period: 2, reduction_factor: 2}   # ASHA; grace_period in validation rounds
    params:
      masks: {grid: [[c], [h], [c, h]]}        # every value, crossed with the other grids
      lambda_tr: {loguniform: [0.1, 10]}       # also: uniform [lo, hi], randint [lo, hi), choice [...]
      models.separator.hidden: {choice: [64, 128]}   # dotted names reach any config field

A bare name is a field of ``stages.<stage>``. Only settings that act on the stage may be tuned.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from wss_ray.config import (Config, ConfigError, _deep_merge, _set_dotted, config_from_dict, read_yaml_mapping,
                            revalidated)
from wss_ray.atomic import write_text
from wss_ray.tune_handoff import HANDOFF

SAMPLERS = ("grid", "choice", "uniform", "loguniform", "randint")
SPACE_KEYS = {"stage", "samples", "scheduler", "params"}
SCHEDULER_KEYS = {"grace_period", "reduction_factor"}
@dataclass
class Dimension:
    path: str          # full dotted config path, e.g. stages.separator.lambda_tr
    kind: str
    values: list = field(default_factory=list)   # grid / choice
    low: float = 0.0
    high: float = 0.0

    def tune_domain(self):
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(self.values)
        if self.kind == "choice":
            return tune.choice(self.values)
        if self.kind == "uniform":
            return tune.uniform(self.low, self.high)
        if self.kind == "loguniform":
            return tune.loguniform(self.low, self.high)
        return tune.randint(int(self.low), int(self.high))

    def examples(self) -> list:
        """Values that must all make a valid config (the ends of a range, every listed value)."""
        if self.kind in ("grid", "choice"):
            return list(self.values)
        if self.kind == "randint":
            return [int(self.low), int(self.high) - 1]
        return [self.low, self.high]


@dataclass
class SearchSpace:
    stage: str
    source: str
    dims: list[Dimension]
    samples: int = 1
    grace_period: int = 1
    reduction_factor: int = 2

    @property
    def n_grid(self) -> int:
        return math.prod(len(d.values) for d in self.dims if d.kind == "grid")

    @property
    def n_trials(self) -> int:
        return self.n_grid * self.samples

    def param_space(self) -> dict:
        return {d.path: d.tune_domain() for d in self.dims}

    def fingerprint(self) -> str:
        blob = json.dumps([self.stage, self.samples, self.grace_period, self.reduction_factor,
                           [(d.path, d.kind, d.values, d.low, d.high) for d in self.dims]], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def apply_params(base: Config, params: dict[str, Any]) -> Config:
    """The config of one trial: the base config with the sampled values at their dotted paths."""
    over: dict[str, Any] = {}
    for path, value in params.items():
        _set_dotted(over, path, value)
    return config_from_dict(_deep_merge(base.to_dict(), over))


def _resolve_path(stage: str, key: str, cfg: Config, where: str) -> str:
    from wss_ray.stages import RECIPES

    # each recipe declares the settings that act on it and the model it creates
    tunable, creates = RECIPES[stage].tunable, RECIPES[stage].creates
    if "." not in key:
        if key not in tunable:
            raise ConfigError(f"{where}: '{key}' is not a setting that acts on stage '{stage}'; "
                              f"tunable here: {sorted(tunable)}"
                              + (f" or models.{creates}.*" if creates else ""))
        return f"stages.{stage}.{key}"
    node: Any = cfg.to_dict()
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"{where}: '{key}' is not a config setting")
        node = node[part]
    if isinstance(node, dict):
        raise ConfigError(f"{where}: '{key}' is a section, not a setting")
    parts = key.split(".")
    if parts[0] == "stages":
        if parts[1] != stage or parts[2] not in tunable:
            raise ConfigError(f"{where}: '{key}' does not act on stage '{stage}'")
    elif parts[0] == "models":
        if creates != parts[1]:
            raise ConfigError(f"{where}: '{key}' does not act on stage '{stage}' (it "
                              + (f"creates only models.{creates}" if creates
                                 else "takes its models from the parent checkpoint") + ")")
    else:
        raise ConfigError(f"{where}: '{key}' cannot be tuned per trial (only stages.{stage}.* and models.*)")
    return key


def _dimension(path: str, spec: Any, where: str) -> Dimension:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: expected one sampler as {{KIND: VALUES}} with KIND in {list(SAMPLERS)}, "
                          f"got {spec!r}")
    kind, arg = next(iter(spec.items()))
    if kind not in SAMPLERS:
        raise ConfigError(f"{where}: unknown sampler '{kind}'; known: {list(SAMPLERS)}")
    if kind in ("grid", "choice"):
        if not isinstance(arg, list) or not arg:
            raise ConfigError(f"{where}.{kind}: expected a non-empty list of values")
        return Dimension(path, kind, values=arg)
    if not (isinstance(arg, list) and len(arg) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                            for v in arg)):
        raise ConfigError(f"{where}.{kind}: expected [low, high] numbers, got {arg!r}")
    low, high = arg
    if not low < high:
        raise ConfigError(f"{where}.{kind}: low {low} must be below high {high}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}.loguniform: low must be > 0, got {low}")
    if kind == "randint" and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"{where}.randint: bounds must be integers, got {arg!r}")
    return Dimension(path, kind, low=low, high=high)


def load_space(path: str | Path, stage: str, cfg: Config) -> SearchSpace:
    """Read and validate a search space against the stage and the base config."""
    p = Path(path)
    raw = read_yaml_mapping(p, "search space")
    unknown = sorted(set(raw) - SPACE_KEYS)
    if unknown:
        raise ConfigError(f"{p}: unknown key(s) {unknown}; known: {sorted(SPACE_KEYS)}")
    if raw.get("stage", stage) != stage:
        raise ConfigError(f"{p}: stage: this space is for '{raw['stage']}', not '{stage}'")
    samples = raw.get("samples", 1)
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ConfigError(f"{p}: samples: expected an integer >= 1, got {samples!r}")
    sched = raw.get("scheduler") or {}
    if not isinstance(sched, dict) or set(sched) - SCHEDULER_KEYS:
        raise ConfigError(f"{p}: scheduler: unknown key(s) {sorted(set(sched) - SCHEDULER_KEYS)}; "
                          f"known: {sorted(SCHEDULER_KEYS)}")
    for k, v in sched.items():
        if not isinstance(v, int) or v < (2 if k == "reduction_factor" else 1):
            raise ConfigError(f"{p}: scheduler.{k}: expected an integer >= {2 if k == 'reduction_factor' else 1}")
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{p}: params: expected a mapping of setting -> sampler with at least one entry")
    dims = []
    for key, spec in params.items():
        where = f"{p}: params.{key}"
        dim = _dimension(_resolve_path(stage, str(key), cfg, where), spec, where)
        if dim.path.endswith((".steps", ".checkpoint_every")):
            raise ConfigError(f"{where}: the step budget is fixed across trials (ASHA compares them by step)")
        for value in dim.examples():
            try:
                apply_params(cfg, {dim.path: value})
            except ConfigError as e:
                raise ConfigError(f"{where}: value {value!r} is invalid: {e}") from None
        dims.append(dim)
    return SearchSpace(stage, str(p), dims, samples, sched.get("grace_period", 1), sched.get("reduction_factor", 2))


def _trial(params: dict, *, stage: str, base: dict, data: str, parent: str | None, train_storage: str,
           local_logs: bool) -> None:
    """One trial: the stage's Ray Train run with this trial's settings. Its name is the trial id,
    so a restored or retried trial resumes its own Train run from its last checkpoint."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from wss_ray.stages.runner import build_trainer

    ctx = ray.tune.get_context()
    cfg = apply_params(config_from_dict(base), params)
    trial_dir = ctx.get_trial_dir()
    trainer = build_trainer(stage, cfg, data, parent, name=ctx.get_trial_id(), storage=train_storage,
                            tensorboard=os.path.join(trial_dir, "tensorboard") if local_logs else None,
                            callbacks=[TuneReportCallback()],
                            meta_extra={"tune": {"trial": ctx.get_trial_id(), "params": params}})
    trainer.fit()


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _local_path(uri: str) -> Path:
    return Path(uri[len("file://"):] if uri.startswith("file://") else uri)


def _write_json(folder: str, name: str, obj: Any) -> None:
    """Atomic on a local folder; through pyarrow.fs on an object store."""
    text = json.dumps(obj, indent=2, default=str)
    if _is_local(folder):
        write_text(_local_path(folder) / name, text)
        return
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(folder)
    with fs.open_output_stream(f"{root}/{name}") as fh:
        fh.write(text.encode())


def run_sweep(stage: str, cfg: Config, space: SearchSpace, data: str | Path, parent: str | None = None,
              storage: str | None = None, name: str | None = None, samples: int | None = None,
              gpus_per_trial: float = 0.0, concurrent: int = 0, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) a sweep; returns the handoff record, also written as ``best.json`` in the
    experiment folder. Every trial's metrics and checkpoint are listed in it."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from wss_ray.data.dataset import load_manifest
    from wss_ray.ray_session import ensure_ray
    from wss_ray.stages import RECIPES
    from wss_ray.stages.runner import check_parent

    recipe = RECIPES[stage]
    data = str(Path(data).resolve())
    manifest = load_manifest(data)
    parent_path = check_parent(stage, parent, manifest, cfg.stages[stage])
    if samples:
        space.samples = samples
    cfg = copy.deepcopy(cfg)
    if gpus_per_trial:
        cfg.ray.use_gpu = True
        cfg.ray.gpus_per_worker = gpus_per_trial / cfg.ray.workers
        revalidated(cfg.ray)
    name = name or f"tune-{stage}"
    storage = storage or cfg.ray.storage or str(Path("runs").resolve())
    if _is_local(storage):
        storage = str(_local_path(storage).resolve())
    experiment = f"{storage.rstrip('/')}/{name}"
    per_trial_cpus = cfg.ray.workers * cfg.ray.cpus_per_worker
    on_cluster = bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    if not concurrent and not on_cluster:
        concurrent = 1
    if not ray.is_initialized() and not on_cluster and not cfg.ray.num_cpus:
        # a local instance sized for the concurrent trials, one more trial's workers (a finished
        # trial's placement group is released asynchronously) and Ray Data's read tasks
        cfg.ray.num_cpus = max(4, math.ceil(concurrent * per_trial_cpus) + 2)
    ensure_ray(cfg.ray)
    if concurrent == 0:
        # a cluster: as many trials as its CPUs hold, keeping 2 CPUs for Ray Data
        concurrent = max(1, int((ray.cluster_resources().get("CPU", 0) - 2) // per_trial_cpus))
    metric, mode = recipe.val_metric, recipe.val_mode
    scfg = cfg.stages[stage]
    state = {"stage": stage, "space": space.source, "space_fingerprint": space.fingerprint(),
             "data_fingerprint": manifest["fingerprint"], "parent": parent_path}
    trainable = tune.with_resources(
        tune.with_parameters(_trial, stage=stage, base=cfg.to_dict(), data=data, parent=parent_path,
                             train_storage=f"{experiment}-train", local_logs=_is_local(storage)),
        # the trial function only drives Ray Train; its workers reserve the CPUs and GPUs
        {"CPU": 0.01})
    from ray.tune import Tuner

    restoring = Tuner.can_restore(experiment)
    if restoring:
        old = _read_state(experiment)
        if old and (old.get("space_fingerprint"), old.get("data_fingerprint")) != (
                state["space_fingerprint"], state["data_fingerprint"]):
            raise ConfigError(f"{experiment}: an existing sweep with another search space or data; "
                              f"pick another --name or remove the folder")
        log(f"[tune] resuming {experiment} (finished trials are kept, unfinished ones resume from their "
            f"last checkpoint)")
        tuner = Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        log(f"[tune] {stage}: {space.n_trials} trial(s) of {scfg.steps} steps, {concurrent} at a time, "
            f"metric {metric} ({mode}), ASHA grace {space.grace_period} x {scfg.checkpoint_every} steps; "
            f"experiment {experiment}")
        _write_json(experiment, "sweep.json", state)
        tuner = Tuner(
            trainable,
            param_space=space.param_space(),
            tune_config=tune.TuneConfig(
                num_samples=space.samples, max_concurrent_trials=concurrent,
                scheduler=ASHAScheduler(metric=metric, mode=mode, time_attr="step", max_t=scfg.steps,
                                        grace_period=min(scfg.steps, space.grace_period * scfg.checkpoint_every),
                                        reduction_factor=space.reduction_factor)),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=cfg.ray.max_failures)),
        )
    t0 = time.time()
    grid = tuner.fit()
    record = handoff_record(grid, stage, metric, mode, experiment, state)
    record["wall_s"] = round(time.time() - t0, 1)
    _write_json(experiment, HANDOFF, record)
    log(format_trials(record))
    log(f"[tune] best trial {record['trial']}: {metric}={record['value']:.4g} {record['params']}")
    log(f"[tune] handoff record: {experiment}/{HANDOFF} -> {record['checkpoint']}")
    return record


def _read_state(experiment: str) -> dict | None:
    if _is_local(experiment):
        p = _local_path(experiment) / "sweep.json"
        return json.loads(p.read_text()) if p.is_file() else None
    return None


def handoff_record(grid, stage: str, metric: str, mode: str, experiment: str, state: dict) -> dict:
    trials = []
    for r in grid:
        m = r.metrics or {}
        trials.append({"trial": m.get("trial_id") or (Path(r.path).name if r.path else None),
                       "params": dict(r.config or {}),
                       "status": "error" if r.error else "ok", "step": m.get("step"),
                       metric: m.get(metric), "checkpoint": m.get("checkpoint_path"),
                       "error": str(r.error).splitlines()[0] if r.error else None})
    good = [t for t in trials if t["status"] == "ok" and t["checkpoint"] and isinstance(t[metric], (int, float))
            and math.isfinite(t[metric])]
    if not good:
        errs = "; ".join(f"{t['trial']}: {t['error']}" for t in trials if t["error"]) or "no trial reported"
        raise RuntimeError(f"[tune] {experiment}: no trial finished with a checkpoint and {metric} ({errs})")
    # compare at the full step budget when any trial reached it: ASHA-stopped trials report early rounds
    top = max(t["step"] or 0 for t in good)
    pool = [t for t in good if (t["step"] or 0) == top]
    best = (min if mode == "min" else max)(pool, key=lambda t: t[metric])
    return {**state, "metric": metric, "mode": mode, "experiment": experiment, "trial": best["trial"],
            "value": best[metric], "params": best["params"], "checkpoint": best["checkpoint"], "trials": trials}


def format_trials(record: dict) -> str:
    metric = record["metric"]
    lines = [f"| trial | step | {metric} | params |", "|---|---|---|---|"]
    for t in record["trials"]:
        v = t[metric]
        mark = " **best**" if t["trial"] == record["trial"] else ""
        lines.append(f"| {t['trial']}{mark} | {t['step']} | {'' if v is None else f'{v:.4g}'} | "
                     f"{json.dumps(t['params'])} |" + (f" error: {t['error']}" if t["error"] else ""))
    return "\n".join(lines)
