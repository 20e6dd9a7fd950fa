"""The one runner every stage goes through.

``fit`` is the plain training loop (batches in, losses out, periodic validation and
checkpoints); ``_worker`` wraps it for Ray Train (DDP models, dataset shards, report,
resume from ``ray.train.get_checkpoint()``); ``train_stage`` builds the TorchTrainer on the
driver, checks the parent checkpoint and writes the final stage checkpoint.
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from wss_ray.atomic import atomic_path
from wss_ray.checkpoint import (CHECKPOINT_DIR, CheckpointError, code_revision, load_checkpoint, read_meta,
                                save_checkpoint, unwrap)
from wss_ray.config import Config, config_from_dict
from wss_ray.data.contract import MODEL_SIGNAL_KEYS, SIGNAL_KEYS, to_tensors
from wss_ray.data.dataset import load_manifest, supervised_dataset, weak_dataset
from wss_ray.stages import RECIPES
from wss_ray.stages.averaging import WeightAverages
from wss_ray.stages.base import Recipe, StepContext, as_floats, cpu_precision, critic_mode


def run_name(stage: str, cfg: Config) -> str:
    variant = RECIPES[stage].variant(cfg.stages[stage])
    return stage + (f"-{variant.replace('+', '-')}" if variant else "")


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def set_learning_rates(opts: dict, schedule: str, step: int, steps: int) -> None:
    """"constant", or "cosine": from each group's initial rate down to zero at the last step.
    A function of the step alone, so a resumed run continues the same curve."""
    factor = 1.0 if schedule == "constant" else 0.5 * (1.0 + math.cos(math.pi * step / max(steps, 1)))
    for o in opts.values():
        for g in o.param_groups:
            g["lr"] = g["initial_lr"] * factor


def fit(recipe: Recipe, ctx: StepContext, models: dict, opts: dict, train_batches: Callable[[int], Iterable[dict]],
        val_batches: Callable[[], Iterable[dict]], on_checkpoint: Callable[[int, dict], None],
        start_step: int = 0, log: Callable[[str], None] | None = None,
        after_step: Callable[[int, dict], None] | None = None, averages: WeightAverages | None = None) -> dict:
    """Train ``ctx.stage.steps`` updates; validate and checkpoint every ``checkpoint_every``.
    ``averages``: updated after every step, and what validation scores (``on_checkpoint``'s
    caller saves them, see WeightAverages)."""
    s = ctx.stage
    step, epoch, metrics = start_step, 0, {}
    log_every = max(1, s.steps // 10)
    t0 = time.time()
    wait = 0.0  # time spent waiting for input batches: the ingest share of a step
    # frozen critics stay in critic mode (see base.critic_mode: eval mode would break cuDNN's
    # RNN backward); decided once, re-applied after each validation
    trains = {n: any(p.requires_grad for p in m.parameters()) for n, m in models.items()}

    def set_modes() -> None:
        for n, m in models.items():
            m.train() if trains[n] else critic_mode(m)

    set_modes()
    for o in opts.values():
        for g in o.param_groups:
            g.setdefault("initial_lr", g["lr"])  # kept in the optimizer state: resumes decay from it
    while step < s.steps:
        seen = 0
        t_ready = time.time()
        for batch in train_batches(epoch):
            wait += time.time() - t_ready
            set_learning_rates(opts, s.lr_schedule, step, s.steps)
            metrics = recipe.update(to_device(batch, ctx.device), models, opts, ctx, step)
            if averages:
                averages.update(models)
            step += 1
            seen += 1
            logged = log and (step % log_every == 0 or step == s.steps)
            if logged or step % s.checkpoint_every == 0 or step == s.steps:
                metrics = as_floats(metrics)   # the step's only wait for the device (no sync otherwise)
            if logged:
                terms = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
                done = max(step - start_step, 1)
                log(f"[{recipe.name}] step {step}/{s.steps} {terms} ({(time.time() - t0) / done:.2f} s/step, "
                    f"{wait / done:.2f} s waiting for data)")
            if step % s.checkpoint_every == 0 or step == s.steps:
                done = max(step - start_step, 1)
                metrics.update({"s_per_step": (time.time() - t0) / done, "data_wait_s": wait / done})
                metrics.update(evaluate_batches(recipe, ctx, averages.held(models) if averages else models,
                                                val_batches()))
                set_modes()
                on_checkpoint(step, metrics)
            if after_step:
                after_step(step, metrics)
            if step >= s.steps:
                break
            t_ready = time.time()
        if seen == 0:
            raise ValueError(f"{recipe.name}: the train split yields no full batch of {s.batch_size} per worker; "
                             "lower stages.<stage>.batch_size or ray.workers, or add data")
        epoch += 1
    return metrics


@torch.no_grad()
def evaluate_batches(recipe: Recipe, ctx: StepContext, models: dict, batches: Iterable[dict]) -> dict:
    totals: dict[str, float] = {}
    n = 0
    for m in models.values():
        m.eval()
    for i, batch in enumerate(batches):
        if i >= ctx.stage.val_batches:
            break
        for k, v in recipe.validate(to_device(batch, ctx.device), models, ctx).items():
            totals[k] = totals.get(k, 0.0) + v
        n += 1
    return {k: v / n for k, v in totals.items()} if n else {}


def _arrow_batches(shard, manifest: dict, batch_size: int, seed: int | None, rank: int = 0,
                   world: int = 1) -> Iterator[dict]:
    """Training batches are full and locally shuffled; validation batches (seed None) are neither.

    ``world`` > 1: ``shard`` is the whole stream, the same on every worker (same order, same
    shuffle seed), and this worker keeps rows rank, rank + world, ... of each batch of
    batch_size * world rows; which rows a worker trains on then depends on nothing but the
    seed, where a streaming split deals blocks to whichever worker asks first."""
    train = seed is not None
    for arrow in shard.iter_batches(batch_size=batch_size * world, batch_format="pyarrow", drop_last=train,
                                    local_shuffle_buffer_size=4 * batch_size * world if train else None,
                                    local_shuffle_seed=seed):
        if world > 1:
            arrow = arrow.take(list(range(rank, arrow.num_rows, world)))
            if not arrow.num_rows:
                continue
        yield to_tensors(arrow, manifest)


def _worker(config: dict) -> None:
    """Ray Train worker: build, wrap, resume, fit, report."""
    import ray.train
    import ray.train.torch

    stage, manifest = config["stage"], config["manifest"]
    recipe = RECIPES[stage]
    progress = config.get("progress_file")

    def say(line: str) -> None:
        # on a local instance the driver tails this file (Ray's worker output is not forwarded)
        if progress:
            with open(progress, "a") as fh:
                fh.write(line + "\n")
        else:
            print(line, flush=True)

    cfg = config_from_dict(config["cfg"])
    ctx_train = ray.train.get_context()
    rank, world = ctx_train.get_world_rank(), ctx_train.get_world_size()
    device = ray.train.torch.get_device()
    # one intra-op thread per reserved CPU: more threads than cores across workers thrash
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    if rank == 0:
        # a diagnostic for Ray's log files (and the console with --verbose), not for every run's console
        print(f"[{stage}] worker threads: {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})",
              flush=True)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    parent = load_checkpoint(config["parent"])[0] if config["parent"] else None
    ctx = StepContext(cfg, cfg.stages[stage], manifest, device, parent)
    models = recipe.build(ctx)
    for name in models:
        models[name] = (ray.train.torch.prepare_model(models[name]) if name in recipe.trainable
                        else models[name].to(device))
    opts = recipe.optimizers(models, ctx)
    averages = WeightAverages(models, recipe.trainable, ctx.stage.ema)
    meta = {**config["meta"], "precision": ctx.precision}
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            payload, old = load_checkpoint(d)
            # "trained": the weights behind the averages the checkpoint holds as "models"
            states = {**payload["models"], **payload.get("trained", {})}
            for name, m in models.items():
                unwrap(m).load_state_dict(states[name]["state"])
            for name, o in opts.items():
                o.load_state_dict(payload["optim"][name])
            start = old["step"]
            averages.load(payload["models"], start)
            meta["resumed_from"] = old.get("resumed_from", []) + [start]
        if rank == 0:
            say(f"[{stage}] resumed from the checkpoint of step {start}")
    torch.manual_seed(cfg.seed + 7919 * rank + start)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    s = ctx.stage

    def on_checkpoint(step: int, metrics: dict) -> None:
        report = {"step": step, **metrics}
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                path = save_checkpoint(Path(tmp) / "ckpt", averages.held(models),
                                       {**meta, "step": step, "metrics": report}, opts, averages.trained(models))
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(str(path)))
        else:
            ray.train.report(report, checkpoint=None)

    fail_at, marker = config.get("fail_once_at"), config.get("fail_marker")
    writer = None
    if rank == 0 and config.get("tensorboard"):
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(config["tensorboard"], purge_step=start or None)

    def after_step(step: int, metrics: dict) -> None:
        if writer:
            for k, v in as_floats(metrics).items():
                writer.add_scalar(f"{stage}/{k}", v, step)
            for name, o in opts.items():
                writer.add_scalar(f"{stage}/lr_{name}", o.param_groups[0]["lr"], step)
        # test hook: a worker dies once mid-stage, to exercise FailureConfig + resume
        if fail_at and step == fail_at and rank == 0 and marker and not os.path.exists(marker):
            Path(marker).write_text(str(step))
            raise RuntimeError(f"injected failure at step {step}")

    # deal_rows: every worker reads the whole stream and keeps its own rows (same seed on all)
    deal = config.get("deal_rows", False)
    own = (rank, world) if deal else (0, 1)

    def train_batches(epoch: int) -> Iterator[dict]:
        seed = cfg.seed + epoch if deal else cfg.seed + epoch * world + rank
        return _arrow_batches(train_shard, manifest, s.batch_size, seed, *own)

    def val_batches() -> Iterator[dict]:
        return _arrow_batches(val_shard, manifest, s.batch_size, None, *own)

    fit(recipe, ctx, models, opts, train_batches=train_batches, val_batches=val_batches,
        on_checkpoint=on_checkpoint, start_step=start, log=say if rank == 0 else None, after_step=after_step,
        averages=averages)
    if writer:
        writer.close()


def check_parent(stage: str, parent: str | None, manifest: dict, settings=None) -> str | None:
    """The parent checkpoint's resolved path, refused (CheckpointError naming it) when it is of
    the wrong stage or instruments, or lacks what ``settings`` (the stage's) need of it."""
    recipe = RECIPES[stage]
    if not recipe.parents:
        if parent:
            raise CheckpointError(f"stage '{stage}' starts from scratch and takes no --parent")
        return None
    if not parent:
        raise CheckpointError(f"stage '{stage}' needs --parent: a {' or '.join(recipe.parents)} checkpoint")
    from wss_ray.tune_handoff import resolve_parent

    path = resolve_parent(parent)
    meta = read_meta(path)
    if meta.get("stage") not in recipe.parents:
        raise CheckpointError(f"{path}: is a '{meta.get('stage')}' checkpoint; stage '{stage}' needs a "
                              f"{' or '.join(recipe.parents)} checkpoint as --parent")
    if meta.get("instruments") != manifest["instruments"]:
        raise CheckpointError(f"{path}: trained on instruments {meta.get('instruments')}, the data has "
                              f"{manifest['instruments']}")
    if settings is not None:
        recipe.check_parent_checkpoint(path, settings)
    return str(Path(path).resolve())


def build_trainer(stage: str, cfg: Config, data: str | Path, parent: str | None, name: str, storage: str,
                  tensorboard: str | None = None, callbacks: list | None = None, meta_extra: dict | None = None,
                  fail_once_at: int | None = None, fail_marker: str | None = None,
                  log: Callable[[str], None] = print, progress_file: str | None = None):
    """The TorchTrainer of one stage: checked parent, datasets, scaling, failure policy.
    ``train_stage`` fits it directly; a Tune trial fits it with a report callback."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if stage not in RECIPES:
        raise ValueError(f"unknown stage {stage!r}; known: {sorted(RECIPES)}")
    recipe = RECIPES[stage]
    data = Path(data).resolve()
    manifest = load_manifest(data)
    check_signal(cfg, manifest, data)
    parent_path = check_parent(stage, parent, manifest, cfg.stages[stage])
    # "auto" decided once, here: every rank of the job (and every trial) then computes alike
    cfg = cfg.model_copy(deep=True)
    cfg.ray.cpu_precision = cpu_precision(cfg.ray.cpu_precision)
    open_split = supervised_dataset if recipe.needs_stems else weak_dataset
    scfg = cfg.stages[stage]
    rows = manifest["splits"].get("train", {}).get("chunks", 0)
    if rows < scfg.batch_size * cfg.ray.workers:
        raise ValueError(f"{data}: the train split has {rows} chunks, fewer than batch_size x workers = "
                         f"{scfg.batch_size} x {cfg.ray.workers}")
    repeat = math.ceil(scfg.steps * scfg.batch_size * cfg.ray.workers / rows) + 1
    val_split = validation_split(data)
    meta = stage_meta(stage, cfg, data, manifest, parent_path, meta_extra)
    variant = RECIPES[stage].variant(scfg)
    log(f"[{stage}{f'[{variant}]' if variant else ''}] training: {cfg.ray.workers} worker(s)"
        f"{' on GPU' if cfg.ray.use_gpu else ''}, {scfg.steps} steps, "
        f"data {data.name} ({manifest['fingerprint']}), parent {parent_path or '-'}")
    resources = {"CPU": cfg.ray.cpus_per_worker}
    dataset_config = None
    # a streaming split deals blocks to workers by timing even in a fixed order; unsplit, every
    # worker reads the whole stream and keeps rows by rank (_arrow_batches), so a run with
    # several workers repeats too, for a read of the data per worker
    deal_rows = cfg.ray.preserve_order and cfg.ray.workers > 1
    if cfg.ray.preserve_order:
        from ray.train import DataConfig as IngestConfig

        options = IngestConfig.default_ingest_options()
        options.preserve_order = True
        dataset_config = IngestConfig(datasets_to_split=[] if deal_rows else "all", execution_options=options)
    with driver_preserve_order(cfg.ray.preserve_order):  # a small split is materialized right here
        datasets = {"train": open_split(data, "train", repeat, cfg.seed, windows=scfg.random_windows),
                    "val": open_split(data, val_split)}
    if cfg.ray.use_gpu and cfg.ray.gpus_per_worker != 1.0:
        resources["GPU"] = cfg.ray.gpus_per_worker
    return TorchTrainer(
        _worker,
        train_loop_config={"stage": stage, "cfg": cfg.to_dict(), "manifest": manifest, "parent": parent_path,
                           "meta": meta, "fail_once_at": fail_once_at, "fail_marker": fail_marker,
                           "deal_rows": deal_rows,
                           # TensorBoard event files of this stage (loss terms, validation, lr)
                           "tensorboard": tensorboard, "progress_file": progress_file},
        scaling_config=ScalingConfig(num_workers=cfg.ray.workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=cfg.ray.placement_strategy),
        run_config=RunConfig(name=name, storage_path=storage, callbacks=callbacks,
                             failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets=datasets,
        dataset_config=dataset_config,
    )


def check_signal(cfg: Config, manifest: dict, data: Path) -> None:
    """Training reads its signal settings from the manifest; a config that says otherwise
    (features made with another sample rate, say) is refused rather than half-applied."""
    from wss_ray.config import ConfigError

    for key in MODEL_SIGNAL_KEYS:
        want, have = getattr(cfg.data, key), manifest.get(key)
        if (list(want) if key == "instruments" else want) != have:
            raise ConfigError(f"data.{key}: the config says {want!r}, the features in {data} were made with "
                              f"{have!r}; use the config they were made with or featurize again")


def validation_split(data: Path) -> str:
    return "validation" if (data / "validation" / "features").is_dir() else "train"


def stage_meta(stage: str, cfg: Config, data: Path, manifest: dict, parent_path: str | None,
               extra: dict | None = None) -> dict:
    """Lineage of a stage checkpoint: config, parent, data fingerprint, code revision."""
    recipe = RECIPES[stage]
    return {"stage": stage, "variant": recipe.variant(cfg.stages[stage]), "config": cfg.to_dict(),
            "signal": {k: manifest[k] for k in SIGNAL_KEYS},
            "parents": [parent_path] if parent_path else [], "data_fingerprint": manifest["fingerprint"],
            "data": str(data), "instruments": manifest["instruments"], "code_revision": code_revision(),
            "val_metric": recipe.val_metric, "val_mode": recipe.val_mode, **(extra or {})}


def train_local(stage: str, cfg: Config, data: str | Path, out: str | Path, parent: str | None = None,
                device: str | torch.device = "cpu", log: Callable[[str], None] | None = print,
                on_step: Callable[[int, dict], None] | None = None) -> Path:
    """The same stage in this process, without Ray: the whole split in memory, ``fit`` on
    ``device`` (bf16 autocast on CUDA), checkpoints with the same lineage as ``train_stage``.
    For machines without Ray (a bare GPU box), debugging and tests."""
    from wss_ray.data.dataset import iter_table, load_split

    recipe = RECIPES[stage]
    data = Path(data).resolve()
    manifest = load_manifest(data)
    check_signal(cfg, manifest, data)
    parent_path = check_parent(stage, parent, manifest, cfg.stages[stage])
    s = cfg.stages[stage]
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    ctx = StepContext(cfg, s, manifest, device, load_checkpoint(parent_path)[0] if parent_path else None)
    models = {n: m.to(device) for n, m in recipe.build(ctx).items()}
    opts = recipe.optimizers(models, ctx)
    averages = WeightAverages(models, recipe.trainable, s.ema)
    train = load_split(data, "train", with_stems=recipe.needs_stems)
    if train.num_rows < s.batch_size:
        raise ValueError(f"{data}: the train split has {train.num_rows} chunks, fewer than batch_size {s.batch_size}")
    val = load_split(data, validation_split(data), with_stems=recipe.needs_stems)
    meta = stage_meta(stage, cfg, data, manifest, parent_path, {"trained_by": "train_local", "precision": ctx.precision})
    out = Path(out)
    final = out / CHECKPOINT_DIR

    def on_checkpoint(step: int, metrics: dict) -> None:
        save_checkpoint(final, averages.held(models), {**meta, "step": step, "metrics": {"step": step, **metrics}},
                        opts, averages.trained(models))

    def after_step(step: int, metrics: dict) -> None:
        if on_step:
            on_step(step, metrics)

    fit(recipe, ctx, models, opts,
        train_batches=lambda epoch: iter_table(train, manifest, s.batch_size, shuffle_seed=cfg.seed + epoch,
                                               drop_last=True,
                                               windows_seed=cfg.seed + epoch if s.random_windows else None),
        val_batches=lambda: iter_table(val, manifest, s.batch_size),
        on_checkpoint=on_checkpoint, log=log, after_step=after_step, averages=averages)
    return final


@contextlib.contextmanager
def _tail(path: Path | None, log: Callable[[str], None], every: float = 0.5):
    """Forward the lines a file gains to ``log`` while the block runs (and what is left at the end)."""
    import threading

    if path is None:
        yield
        return
    stop = threading.Event()

    def pump(fh) -> None:
        while True:
            line = fh.readline()
            if not line:
                if stop.is_set():
                    return
                time.sleep(every)
                continue
            log(line.rstrip("\n"))

    fh = open(path)
    thread = threading.Thread(target=pump, args=(fh,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)
        fh.close()


@contextlib.contextmanager
def driver_preserve_order(on: bool):
    from ray.data import DataContext

    options = DataContext.get_current().execution_options
    before = options.preserve_order
    options.preserve_order = before or on
    try:
        yield
    finally:
        options.preserve_order = before


def export_checkpoint(checkpoint, out: Path) -> Path:
    """Copy a Ray Train checkpoint (local or on storage) to ``<out>/checkpoint``, atomically."""
    final = out / CHECKPOINT_DIR
    with atomic_path(final, directory=True) as tmp:
        checkpoint.to_directory(str(tmp))
    return final


def train_stage(stage: str, cfg: Config, data: str | Path, out: str | Path | None = None,
                parent: str | None = None, fail_once_at: int | None = None, fail_marker: str | None = None,
                log: Callable[[str], None] = print) -> Path:
    """Train one stage as a Ray Train job; returns the final checkpoint folder."""
    from wss_ray.ray_session import ensure_ray

    if stage not in RECIPES:
        raise ValueError(f"unknown stage {stage!r}; known: {sorted(RECIPES)}")
    name = run_name(stage, cfg)
    out = Path(out or Path("runs") / name).resolve()
    storage = cfg.ray.storage or str(out / "ray")
    manifest = load_manifest(data)
    check_signal(cfg, manifest, Path(data))  # fail before Ray starts
    check_parent(stage, parent, manifest, cfg.stages[stage])
    rows = manifest["splits"].get("train", {}).get("chunks", 0)
    if rows < cfg.stages[stage].batch_size * cfg.ray.workers:
        raise ValueError(f"{data}: the train split has {rows} chunks, fewer than batch_size x workers = "
                         f"{cfg.stages[stage].batch_size} x {cfg.ray.workers}")
    ensure_ray(cfg.ray)
    from wss_ray.ray_session import is_local, verbose

    progress = out / "progress.log" if is_local() and not verbose() else None
    if progress:
        out.mkdir(parents=True, exist_ok=True)
        progress.write_text("")
    trainer = build_trainer(stage, cfg, data, parent, name, storage, tensorboard=str(out / "tensorboard"),
                            fail_once_at=fail_once_at, fail_marker=fail_marker, log=log,
                            progress_file=str(progress) if progress else None)
    with _tail(progress, log):
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"[{stage}] training finished without a checkpoint (see {storage}/{name})")
    final = export_checkpoint(result.checkpoint, out)
    log(f"[{stage}] done: {final} ({', '.join(f'{k}={v:.4g}' for k, v in result.metrics.items() if isinstance(v, float))})")
    return final
